"""virtio-rng, the entropy device (device id 4): device model and driver."""

from virtio.devices.rng.device import RngDevice
from virtio.devices.rng.driver import RngDriver

__all__ = ["RngDevice", "RngDriver"]
