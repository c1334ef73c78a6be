"""virtio-vsock, the socket device (device id 19): wire format, device model, driver, host side."""

from virtio.core.driver import VirtioDriver
from virtio.devices.registry import DeviceType
from virtio.devices.vsock import options as _options
from virtio.devices.vsock.device import VsockDevice
from virtio.devices.vsock.driver import VsockDriver
from virtio.spec.device_ids import DeviceId


def _smoke(driver: VirtioDriver) -> None:
    assert isinstance(driver, VsockDriver)
    driver.start()
    try:
        driver.connect(1)  # nobody listens at host port 1: the device answers RST
    except ConnectionRefusedError:
        return
    raise AssertionError("a connection to an unserved port was accepted")


DEVICE_TYPE = DeviceType(
    smoke=_smoke,
    name="vsock",
    device_id=DeviceId.VSOCK,
    summary="a socket device (hybrid Unix-socket and TCP host side)",
    device=VsockDevice,
    driver=VsockDriver,
    add_arguments=_options.add_arguments,
    from_arguments=_options.from_arguments,
    example=_options.example,
    qemu_vhost_user_device="vhost-user-vsock-pci",
)

__all__ = ["DEVICE_TYPE", "VsockDevice", "VsockDriver"]
