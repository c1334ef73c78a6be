"""The seam between the net device model and its host side (TAP, switch port, sink).

The device model hands every frame the guest transmits to
:meth:`NetBackend.transmit`, already checked (a malformed header never gets
here) and, where the backend cannot take an offload, already segmented and
checksummed. Frames for the guest come back through the ``deliver`` callback
given to :meth:`NetBackend.start`, from the device's own host loop: a backend
that waits on a file descriptor (a TAP) or on frames from other threads (a
switch port's eventfd) asks for it through the device's
:class:`~virtio.core.events.EventSources`, so the device model stays sans-IO.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from virtio.core.events import EventSources
from virtio.devices.net.wire import NetHdr

#: Hands one frame to the guest; False when the guest has no room (the frame is dropped).
Deliver = Callable[[NetHdr, bytes], bool]


class NetBackend(Protocol):
    """A host side for one net device."""

    #: Short text for logs ("tap tap0", "switch port 1").
    name: str

    #: HOST_* offload feature bits (wire.HOST_OFFLOAD_BITS) the backend takes as they
    #: are: a GSO frame or a partial checksum goes through unchanged. The device
    #: segments and checksums the rest itself.
    tx_offloads: int

    def start(self, events: EventSources, deliver: Deliver) -> None:
        """The device is live: begin handing frames to ``deliver``."""

    def stop(self) -> None:
        """The device was reset or closed: stop delivering and let go of the events."""

    def transmit(self, hdr: NetHdr, frame: bytes) -> None:
        """A frame the guest sent (its header says which offloads it still needs)."""

    def set_rx_offloads(self, guest_offloads: int) -> None:
        """The guest's GUEST_* offload bits now in force: frames may use those."""

    def close(self) -> None:
        """Release host resources."""


class NullBackend:
    """Takes every frame and delivers none: a device with nothing behind it."""

    name = "none"
    tx_offloads = 0

    def __init__(self) -> None:
        self.transmitted = 0

    def start(self, events: EventSources, deliver: Deliver) -> None:
        pass

    def stop(self) -> None:
        pass

    def transmit(self, hdr: NetHdr, frame: bytes) -> None:
        self.transmitted += 1

    def set_rx_offloads(self, guest_offloads: int) -> None:
        pass

    def close(self) -> None:
        pass
