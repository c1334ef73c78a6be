"""virtio-console, the console device (device id 3): wire format, device model, driver, host sides."""

from virtio.core.driver import VirtioDriver
from virtio.devices.console import options as _options
from virtio.devices.console.device import ConsoleDevice
from virtio.devices.console.driver import ConsoleDriver
from virtio.devices.registry import DeviceType
from virtio.spec.device_ids import DeviceId


def _smoke(driver: VirtioDriver) -> None:
    assert isinstance(driver, ConsoleDriver)
    driver.write(b"pyvirtio\n")


DEVICE_TYPE = DeviceType(
    smoke=_smoke,
    name="console",
    device_id=DeviceId.CONSOLE,
    summary="a console and serial ports (stdio, pty, Unix sockets or a log file)",
    device=ConsoleDevice,
    driver=ConsoleDriver,
    add_arguments=_options.add_arguments,
    from_arguments=_options.from_arguments,
    example=_options.example,
    qemu_vhost_user_device=None,
    num_queues=_options.num_queues,
)

__all__ = ["DEVICE_TYPE", "ConsoleDevice", "ConsoleDriver"]
