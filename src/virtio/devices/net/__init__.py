"""virtio-net, the network device (device id 1): wire format, device model, driver, host sides."""

from virtio.core.driver import VirtioDriver
from virtio.devices.net import options as _options
from virtio.devices.net.device import NetDevice
from virtio.devices.net.driver import NetDriver
from virtio.devices.registry import DeviceType
from virtio.spec.device_ids import DeviceId


def _smoke(driver: VirtioDriver) -> None:
    assert isinstance(driver, NetDriver)
    driver.start()
    if not driver.send(b"\xff" * 6 + b"\x02" * 6 + b"\x88\xb5" + bytes(50)):
        raise AssertionError("no transmit slot")
    if driver.ctrl_queue is not None and driver.command(0, 0, b"\x00")[0] != 0:
        raise AssertionError("promiscuous mode off refused")


DEVICE_TYPE = DeviceType(
    smoke=_smoke,
    name="net",
    device_id=DeviceId.NET,
    summary="a network interface (TAP, built-in switch or sink)",
    device=NetDevice,
    driver=NetDriver,
    add_arguments=_options.add_arguments,
    from_arguments=_options.from_arguments,
    example=_options.example,
    qemu_vhost_user_device="virtio-net-pci",
    num_queues=_options.num_queues,
    qemu_options=_options.qemu_options,
    bench="virtio.bench.net:main",
    devices_for_sockets=_options.devices_for_sockets,
)

__all__ = ["DEVICE_TYPE", "NetDevice", "NetDriver"]
