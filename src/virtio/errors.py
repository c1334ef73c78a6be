"""Exceptions shared by every layer of pyvirtio.

Errors caused by a peer (a driver, a device, a vhost-user front-end) carry the
normative id of the spec requirement the peer broke, so that logs and the
DEVICE_NEEDS_RESET reason name the rule, not just the symptom.
"""

from __future__ import annotations


class VirtioError(Exception):
    """Base class of every pyvirtio error."""


class SpecViolation(VirtioError):
    """The peer broke a normative requirement of the spec.

    ``normative`` is the id of the block in ``normative.json`` (for example
    ``drivernormative:Basic Facilities of a Virtio Device / Device Status Field``).
    """

    def __init__(self, message: str, normative: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.normative = normative

    def __str__(self) -> str:
        if self.normative:
            return f"{self.message} [{self.normative}]"
        return self.message


class GuestMemoryError(SpecViolation):
    """An access to guest memory fell outside every mapped region."""


class RingError(SpecViolation):
    """A virtqueue's shared structures are inconsistent (hostile or buggy peer)."""


class NegotiationError(SpecViolation):
    """Feature negotiation or the status sequence went wrong."""


class DeviceModelError(VirtioError):
    """A device model asked its ring for something the spec forbids the device.

    This is a bug in our own device type (pushing a buffer twice, out of order
    with VIRTIO_F_IN_ORDER, or claiming more bytes written than the buffer
    holds), never the driver's fault: it is raised to the caller and nothing
    reaches the ring.
    """


class DeviceNeedsReset(VirtioError):
    """The device has set DEVICE_NEEDS_RESET; it serves nothing until reset."""


def one_line(err: BaseException) -> str:
    """An exception as one log-friendly line: its type (unless ours) and its text."""
    text = " ".join(str(err).split()) or "(no details)"
    if isinstance(err, VirtioError):
        return text
    return f"{type(err).__name__}: {text}"
