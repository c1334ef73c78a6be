"""virtio-rng, the entropy device (device id 4): device model and driver."""

from virtio.core.driver import VirtioDriver
from virtio.devices.registry import DeviceType
from virtio.devices.rng import options as _options
from virtio.devices.rng.device import RngDevice
from virtio.devices.rng.driver import RngDriver
from virtio.spec.device_ids import DeviceId


def _smoke(driver: VirtioDriver) -> None:
    assert isinstance(driver, RngDriver)
    if not driver.read(32):
        raise AssertionError("no random bytes")


DEVICE_TYPE = DeviceType(
    smoke=_smoke,
    name="rng",
    device_id=DeviceId.ENTROPY,
    summary="an entropy source",
    device=RngDevice,
    driver=RngDriver,
    add_arguments=_options.add_arguments,
    from_arguments=_options.from_arguments,
    example=_options.example,
    qemu_vhost_user_device="vhost-user-rng-pci",
)

__all__ = ["DEVICE_TYPE", "RngDevice", "RngDriver"]
