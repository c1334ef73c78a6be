"""virtio-pmem, the persistent memory device (device id 27): device model and driver."""

from virtio.core.driver import VirtioDriver
from virtio.devices.pmem import options as _options
from virtio.devices.pmem.device import PmemDevice
from virtio.devices.pmem.driver import PmemDriver
from virtio.devices.registry import DeviceType
from virtio.spec.device_ids import DeviceId


def _smoke(driver: VirtioDriver) -> None:
    assert isinstance(driver, PmemDriver)
    ret = driver.flush()
    if ret != 0:
        raise AssertionError(f"flush answered ret {ret}")


DEVICE_TYPE = DeviceType(
    name="pmem",
    device_id=DeviceId.PMEM,
    summary="persistent memory backed by a host file, flushed with fsync",
    device=PmemDevice,
    driver=PmemDriver,
    add_arguments=_options.add_arguments,
    from_arguments=_options.from_arguments,
    example=_options.example,
    smoke=_smoke,
)

__all__ = ["DEVICE_TYPE", "PmemDevice", "PmemDriver"]
