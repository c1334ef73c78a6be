"""virtio-mem, the memory device (device id 24): device model and driver."""

from virtio.core.driver import VirtioDriver
from virtio.devices.mem import options as _options
from virtio.devices.mem import wire as _wire
from virtio.devices.mem.device import MemDevice
from virtio.devices.mem.driver import MemDriver
from virtio.devices.registry import DeviceType
from virtio.spec.device_ids import DeviceId


def _smoke(driver: VirtioDriver) -> None:
    assert isinstance(driver, MemDriver)
    c = driver.config()
    nb = max(1, c.usable_region_size // c.block_size)
    answer = driver.state(c.addr, nb) if c.usable_region_size else None
    if answer is not None and answer[0] != _wire.RESP_ACK:
        raise AssertionError(f"STATE of the usable region answered {answer}")
    if driver.state(c.addr + c.region_size, 1)[0] != _wire.RESP_ERROR:
        raise AssertionError("STATE beyond the region was not an error")


DEVICE_TYPE = DeviceType(
    name="mem",
    device_id=DeviceId.MEM,
    summary="memory plugged into the guest block by block (virtio-mem)",
    device=MemDevice,
    driver=MemDriver,
    add_arguments=_options.add_arguments,
    from_arguments=_options.from_arguments,
    example=_options.example,
    smoke=_smoke,
)

__all__ = ["DEVICE_TYPE", "MemDevice", "MemDriver"]
