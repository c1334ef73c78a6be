"""The persistent memory driver: finds the region, reads and writes it, flushes it.

Where the region is depends on VIRTIO_PMEM_F_SHMEM_REGION: with it, shared
memory region 0 of the transport (the config's start and size are not
used); without it, ``start`` and ``size`` from the config space, a range of
guest-physical memory the driver reaches through its transport's memory
(or a :class:`~virtio.memory.Memory` it is given). A flush answers the
device's ``ret``: 0 for success, -1 for failure; anything else is a device
error.
"""

from __future__ import annotations

from typing import Protocol

from virtio.core.device import SharedMemoryRegion
from virtio.core.driver import VirtioDriver
from virtio.devices.pmem import wire as W
from virtio.errors import NegotiationError, VirtioError
from virtio.memory import Memory
from virtio.spec.device_ids import DeviceId

N_INIT_DRV = "drivernormative:Device Types / PMEM Device / Device Initialization"


class PmemError(VirtioError):
    """A flush failed, or the device answered what the spec does not allow."""


class Window(Protocol):
    """Byte access to the persistent memory region, wherever it is."""

    length: int

    def read(self, offset: int, size: int) -> bytes: ...
    def write(self, offset: int, data: bytes) -> None: ...


def _check(offset: int, size: int, length: int) -> None:
    if offset < 0 or size < 0 or offset + size > length:
        raise ValueError(f"{size} bytes at {offset:#x} are outside the {length}-byte region")


class MemoryWindow:
    """The region at guest-physical ``start`` (no shared memory region)."""

    def __init__(self, memory: Memory, start: int, length: int) -> None:
        self.memory, self.start, self.length = memory, start, length

    def read(self, offset: int, size: int) -> bytes:
        _check(offset, size, self.length)
        return self.memory.read(self.start + offset, size)

    def write(self, offset: int, data: bytes) -> None:
        _check(offset, len(data), self.length)
        self.memory.write(self.start + offset, data)


class BufferWindow:
    """A shared memory region this process maps (the loopback's)."""

    def __init__(self, region: SharedMemoryRegion) -> None:
        if region.backing is None:
            raise NegotiationError(f"shared memory region {region.id} has no memory behind it")
        self.view = memoryview(region.backing).cast("B")
        self.length = min(region.length, len(self.view))

    def read(self, offset: int, size: int) -> bytes:
        _check(offset, size, self.length)
        return bytes(self.view[offset : offset + size])

    def write(self, offset: int, data: bytes) -> None:
        _check(offset, len(data), self.length)
        self.view[offset : offset + len(data)] = data


class _Accessor(Protocol):
    shared_memory: dict[int, tuple[int, int, int]]

    def read_shared_memory(self, shmid: int, offset: int, size: int) -> int: ...
    def write_shared_memory(self, shmid: int, offset: int, size: int, value: int) -> None: ...


class BarWindow:
    """A shared memory region behind a PCI BAR: 8, 4 or 1 bytes an access."""

    def __init__(self, transport: _Accessor, shmid: int) -> None:
        self.transport, self.shmid = transport, shmid
        self.length = transport.shared_memory[shmid][2]

    def _pieces(self, offset: int, size: int) -> list[tuple[int, int]]:
        out, end = [], offset + size
        while offset < end:
            n = next(w for w in (8, 4, 1) if offset % w == 0 and offset + w <= end)
            out.append((offset, n))
            offset += n
        return out

    def read(self, offset: int, size: int) -> bytes:
        _check(offset, size, self.length)
        t = self.transport
        return b"".join(
            t.read_shared_memory(self.shmid, at, n).to_bytes(n, "little")
            for at, n in self._pieces(offset, size)
        )

    def write(self, offset: int, data: bytes) -> None:
        _check(offset, len(data), self.length)
        for at, n in self._pieces(offset, len(data)):
            value = int.from_bytes(data[at - offset : at - offset + n], "little")
            self.transport.write_shared_memory(self.shmid, at, n, value)


class PmemDriver(VirtioDriver):
    device_id = DeviceId.PMEM

    def supported_features(self) -> int:
        return 1 << W.F_SHMEM_REGION

    def config(self) -> tuple[int, int]:
        """(start, size) as the config space says (meaningless with SHMEM_REGION)."""
        return W.unpack_config(self.read_config(0, W.CONFIG_SIZE))

    def window(self, memory: Memory | None = None) -> Window:
        """Access to the region: shared memory region 0, or ``start`` in ``memory``.

        ``memory`` is where guest-physical addresses resolve (default: the
        transport's memory, which may not map the region).
        """
        if self.has(W.F_SHMEM_REGION):
            # MUST query shared memory id 0, and MUST NOT use start or size.
            return self._shared_window()
        start, size = self.config()
        if size == 0:
            raise PmemError("the device reports an empty region")
        return MemoryWindow(memory or self.transport.memory, start, size)

    def _shared_window(self) -> Window:
        t = self.transport
        shared = getattr(t, "shared_memory", None)
        if isinstance(shared, dict) and hasattr(t, "read_shared_memory"):
            if W.SHMEM_ID not in shared:
                raise NegotiationError("no shared memory region 0", N_INIT_DRV)
            return BarWindow(t, W.SHMEM_ID)  # type: ignore[arg-type]
        registers = getattr(t, "registers", None)
        regions = getattr(registers, "shared_memory_regions", ())
        for region in regions:
            if isinstance(region, SharedMemoryRegion) and region.id == W.SHMEM_ID:
                return BufferWindow(region)
        raise NegotiationError(
            f"{type(t).__name__} offers no shared memory region 0 to this driver", N_INIT_DRV
        )

    def flush(self, timeout: float = 30.0) -> int:
        """One FLUSH request; its ret (0 or -1). PmemError if the device broke the format."""
        return self.request(W.REQ_TYPE_FLUSH, timeout)

    def request(self, type_: int, timeout: float = 30.0) -> int:
        written, data = self.call(0, [W.pack_request(type_)], [W.RESP_SIZE], timeout)
        if written < W.RESP_SIZE:
            raise PmemError(f"device wrote {written} bytes of a {W.RESP_SIZE}-byte response")
        ret = W.unpack_response(data)
        if ret not in (W.RET_OK, W.RET_FAILURE):
            raise PmemError(f"device answered ret {ret} (the spec allows 0 and -1)")
        return ret
