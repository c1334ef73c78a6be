"""Device and driver state machines shared by every device type."""

from virtio.core.device import DeviceHooks, QueueState, RingOptions, VirtioDevice
from virtio.core.driver import DriverTransport, Request, VirtioDriver

__all__ = [
    "DeviceHooks",
    "DriverTransport",
    "QueueState",
    "Request",
    "RingOptions",
    "VirtioDevice",
    "VirtioDriver",
]
