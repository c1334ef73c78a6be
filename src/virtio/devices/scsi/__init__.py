"""virtio-scsi (device id 8): a SCSI host, its target's LUNs served from image files."""

from virtio.core.driver import VirtioDriver
from virtio.devices.registry import DeviceType
from virtio.devices.scsi import options as _options
from virtio.devices.scsi.device import ScsiDevice
from virtio.devices.scsi.driver import (
    ScsiDriver,
    ScsiError,
    ScsiEvent,
    ScsiProtocolError,
    ScsiResult,
)
from virtio.spec.device_ids import DeviceId


def _smoke(driver: VirtioDriver) -> None:
    assert isinstance(driver, ScsiDriver)
    if len(driver.inquiry(0)) < 36:
        raise AssertionError("short INQUIRY data")


DEVICE_TYPE = DeviceType(
    smoke=_smoke,
    name="scsi",
    device_id=DeviceId.SCSI,
    summary="a SCSI host serving disk images as LUNs",
    device=ScsiDevice,
    driver=ScsiDriver,
    add_arguments=_options.add_arguments,
    from_arguments=_options.from_arguments,
    example=_options.example,
    qemu_vhost_user_device="vhost-user-scsi-pci",
    num_queues=_options.num_queues,
)

__all__ = [
    "DEVICE_TYPE",
    "ScsiDevice",
    "ScsiDriver",
    "ScsiError",
    "ScsiEvent",
    "ScsiProtocolError",
    "ScsiResult",
]
