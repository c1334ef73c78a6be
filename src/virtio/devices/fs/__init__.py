"""virtio-fs, the file system device (device id 26): FUSE over virtqueues."""

from virtio.core.driver import VirtioDriver
from virtio.devices.fs import options as _options
from virtio.devices.fs.device import FsDevice
from virtio.devices.fs.driver import FsDriver, FuseError
from virtio.devices.fs.server import FuseServer
from virtio.devices.fs.wire import ROOT_ID
from virtio.devices.registry import DeviceType
from virtio.spec.device_ids import DeviceId


def _smoke(driver: VirtioDriver) -> None:
    assert isinstance(driver, FsDriver)
    driver.init()
    driver.getattr(ROOT_ID)


DEVICE_TYPE = DeviceType(
    smoke=_smoke,
    name="fs",
    device_id=DeviceId.FS,
    summary="a host directory shared over FUSE (virtio-fs)",
    device=FsDevice,
    driver=FsDriver,
    add_arguments=_options.add_arguments,
    from_arguments=_options.from_arguments,
    example=_options.example,
    qemu_vhost_user_device="vhost-user-fs-pci",
    num_queues=_options.num_queues,
)

__all__ = ["DEVICE_TYPE", "FsDevice", "FsDriver", "FuseError", "FuseServer"]
