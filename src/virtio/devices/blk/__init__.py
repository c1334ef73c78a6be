"""virtio-blk (device id 2): wire format, device model and driver."""

from virtio.core.driver import VirtioDriver
from virtio.devices.blk import options as _options
from virtio.devices.blk.device import BlkDevice, BlkOptions
from virtio.devices.blk.driver import BlkDriver, BlkError, BlkGeometry
from virtio.devices.registry import DeviceType
from virtio.spec.device_ids import DeviceId


def _smoke(driver: VirtioDriver) -> None:
    assert isinstance(driver, BlkDriver)
    driver.write(1, b"pyvirtio".ljust(512, b"."))
    if not driver.read(1, 512).startswith(b"pyvirtio"):
        raise AssertionError("sector 1 did not read back what was written")


DEVICE_TYPE = DeviceType(
    smoke=_smoke,
    name="blk",
    device_id=DeviceId.BLOCK,
    summary="a block device serving a disk image",
    device=BlkDevice,
    driver=BlkDriver,
    add_arguments=_options.add_arguments,
    from_arguments=_options.from_arguments,
    example=_options.example,
    qemu_vhost_user_device="vhost-user-blk-pci",
    num_queues=lambda args: int(args.num_queues),
    bench="virtio.bench.blk:main",
)

__all__ = ["DEVICE_TYPE", "BlkDevice", "BlkDriver", "BlkError", "BlkGeometry", "BlkOptions"]
