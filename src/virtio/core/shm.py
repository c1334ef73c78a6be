"""Shared memory regions as a driver reaches them: the seam between drivers and transports.

A transport that can reach a device's shared memory regions gives a
:class:`ShmWindow` for a region id (:class:`SharedMemoryTransport`); a
driver asks :func:`find_window` and never needs to know which transport it
has. PCI reaches a region through a BAR, MMIO at a guest-physical base the
SHM registers give, the loopback through the device's own buffer.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol, runtime_checkable

from virtio.core.device import SharedMemoryRegion
from virtio.errors import NegotiationError
from virtio.memory import Memory


class ShmWindow(Protocol):
    """Byte access to one shared memory region, ``length`` bytes long."""

    length: int

    def read(self, offset: int, size: int) -> bytes: ...
    def write(self, offset: int, data: bytes) -> None: ...


@runtime_checkable
class SharedMemoryTransport(Protocol):
    """A driver-side transport that reaches shared memory regions."""

    def shared_memory_window(self, shmid: int) -> ShmWindow | None:
        """Region ``shmid``, or None when the device has no such region."""


def find_window(transport: object, shmid: int) -> ShmWindow | None:
    """Region ``shmid`` through ``transport``; None if absent or out of its reach."""
    if isinstance(transport, SharedMemoryTransport):
        return transport.shared_memory_window(shmid)
    return None


def check_range(offset: int, size: int, length: int) -> None:
    if offset < 0 or size < 0 or offset + size > length:
        raise ValueError(f"{size} bytes at {offset:#x} are outside the {length}-byte region")


class MemoryWindow:
    """A region at guest-physical ``start`` in ``memory``."""

    def __init__(self, memory: Memory, start: int, length: int) -> None:
        self.memory, self.start, self.length = memory, start, length

    def read(self, offset: int, size: int) -> bytes:
        check_range(offset, size, self.length)
        return self.memory.read(self.start + offset, size)

    def write(self, offset: int, data: bytes) -> None:
        check_range(offset, len(data), self.length)
        self.memory.write(self.start + offset, data)


class BufferWindow:
    """A region this process maps itself (the device's own buffer, as in the loopback)."""

    def __init__(self, region: SharedMemoryRegion) -> None:
        if region.backing is None:
            raise NegotiationError(f"shared memory region {region.id} has no memory behind it")
        self.view = memoryview(region.backing).cast("B")
        self.length = min(region.length, len(self.view))

    def read(self, offset: int, size: int) -> bytes:
        check_range(offset, size, self.length)
        return bytes(self.view[offset : offset + size])

    def write(self, offset: int, data: bytes) -> None:
        check_range(offset, len(data), self.length)
        self.view[offset : offset + len(data)] = data


class AccessWindow:
    """A region reached by register-sized accesses (a BAR): 8, 4 or 1 bytes each."""

    def __init__(
        self,
        length: int,
        read: Callable[[int, int], int],
        write: Callable[[int, int, int], None],
    ) -> None:
        self.length, self._read, self._write = length, read, write

    @staticmethod
    def _pieces(offset: int, size: int) -> list[tuple[int, int]]:
        out, end = [], offset + size
        while offset < end:
            n = next(w for w in (8, 4, 1) if offset % w == 0 and offset + w <= end)
            out.append((offset, n))
            offset += n
        return out

    def read(self, offset: int, size: int) -> bytes:
        check_range(offset, size, self.length)
        return b"".join(
            self._read(at, n).to_bytes(n, "little") for at, n in self._pieces(offset, size)
        )

    def write(self, offset: int, data: bytes) -> None:
        check_range(offset, len(data), self.length)
        for at, n in self._pieces(offset, len(data)):
            self._write(at, n, int.from_bytes(data[at - offset : at - offset + n], "little"))
