"""virtio-blk (device id 2): wire format, device model and driver."""

from virtio.devices.blk.device import BlkDevice, BlkOptions
from virtio.devices.blk.driver import BlkDriver, BlkError, BlkGeometry

__all__ = ["BlkDevice", "BlkDriver", "BlkError", "BlkGeometry", "BlkOptions"]
