"""Guest memory: the address space a driver and a device share.

:class:`GuestMemory` maps guest addresses to host buffers (a ``bytearray``,
an ``mmap`` of a memfd or file) and hands out bounds-checked ``memoryview``
slices, so devices read and write guest data without copying. A bad address is
a :class:`~virtio.errors.GuestMemoryError`, never a read of the wrong memory.

:class:`TranslatedMemory` puts an address-translation hook (an IOMMU, for
VIRTIO_F_ACCESS_PLATFORM) in front of a ``GuestMemory``: the queue code sees
the same interface and every address it uses is an IOVA.

:class:`Allocator` hands out guest memory to the driver side (rings,
indirect tables, request buffers).
"""

from __future__ import annotations

import bisect
import contextlib
import mmap
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Protocol

from virtio.errors import GuestMemoryError

Buffer = bytearray | mmap.mmap | memoryview


@dataclass
class MemoryRegion:
    """One contiguous piece of guest memory backed by a host buffer."""

    gpa: int
    size: int
    view: memoryview
    name: str = ""
    # Keeps the backing object (mmap, file descriptor owner, ...) alive.
    owner: object = field(default=None, repr=False)

    @property
    def end(self) -> int:
        return self.gpa + self.size


class Memory(Protocol):
    """What the virtqueue code needs of memory: guest or IOVA address space."""

    def view(self, addr: int, length: int) -> memoryview: ...

    def iovecs(self, addr: int, length: int) -> list[memoryview]: ...

    def read(self, addr: int, length: int) -> bytes: ...

    def write(self, addr: int, data: bytes | bytearray | memoryview) -> None: ...


class GuestMemory:
    """A set of non-overlapping regions, looked up by guest physical address."""

    def __init__(self, regions: Iterable[MemoryRegion] = ()) -> None:
        self._regions: list[MemoryRegion] = []
        self._starts: list[int] = []
        # The region of the last hit: guests touch the same region over and over.
        self._last: MemoryRegion | None = None
        for region in regions:
            self._insert(region)

    # -- building the map ----------------------------------------------------

    def add(
        self, gpa: int, buffer: Buffer, *, name: str = "", owner: object = None
    ) -> MemoryRegion:
        """Map ``buffer`` at guest address ``gpa``."""
        view = memoryview(buffer)
        if view.readonly:
            raise GuestMemoryError(f"region {name or hex(gpa)} is read-only")
        view = view.cast("B")
        region = MemoryRegion(gpa, view.nbytes, view, name, owner if owner is not None else buffer)
        self._insert(region)
        return region

    def add_memfd(
        self, gpa: int, size: int, *, name: str = "guest-ram"
    ) -> tuple[MemoryRegion, int]:
        """Allocate ``size`` bytes of shareable memory (a memfd) at ``gpa``.

        Returns the region and the memfd, which stays open (it is what a
        vhost-user front-end passes to the back-end); the caller closes it.
        """
        fd = os.memfd_create(name, os.MFD_CLOEXEC)
        try:
            os.ftruncate(fd, size)
            mapping = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except BaseException:
            os.close(fd)
            raise
        return self.add(gpa, mapping, name=name, owner=mapping), fd

    def _insert(self, region: MemoryRegion) -> None:
        if region.size <= 0:
            raise GuestMemoryError(f"region {region.name or hex(region.gpa)} is empty")
        if region.gpa < 0 or region.end > 1 << 64:
            raise GuestMemoryError(f"region at {region.gpa:#x} is outside the 64-bit space")
        index = bisect.bisect_left(self._starts, region.gpa)
        before = self._regions[index - 1] if index > 0 else None
        after = self._regions[index] if index < len(self._regions) else None
        if (before and before.end > region.gpa) or (after and region.end > after.gpa):
            raise GuestMemoryError(
                f"region {region.gpa:#x}+{region.size:#x} overlaps an existing region"
            )
        self._regions.insert(index, region)
        self._starts.insert(index, region.gpa)

    def remove(self, gpa: int) -> MemoryRegion:
        """Unmap the region that starts at ``gpa``."""
        index = bisect.bisect_left(self._starts, gpa)
        if index == len(self._starts) or self._starts[index] != gpa:
            raise GuestMemoryError(f"no region starts at {gpa:#x}")
        self._starts.pop(index)
        region = self._regions.pop(index)
        if self._last is region:
            self._last = None
        return region

    def last_region(self) -> MemoryRegion | None:
        """The region of the latest lookup: hot loops check it inline first."""
        return (
            self._last if self._last is not None else (self._regions[0] if self._regions else None)
        )

    @property
    def regions(self) -> tuple[MemoryRegion, ...]:
        return tuple(self._regions)

    # -- access --------------------------------------------------------------

    def region_of(self, addr: int) -> MemoryRegion:
        index = bisect.bisect_right(self._starts, addr) - 1
        if index >= 0:
            region = self._regions[index]
            if addr < region.end:
                return region
        raise GuestMemoryError(f"guest address {addr:#x} is not mapped")

    def view(self, addr: int, length: int) -> memoryview:
        """A zero-copy view of ``length`` bytes, which must lie in one region."""
        region = self._last
        if region is not None:
            offset = addr - region.gpa
            if offset >= 0 and length >= 0 and offset + length <= region.size:
                return region.view[offset : offset + length]
        if length < 0:
            raise GuestMemoryError(f"negative length {length}")
        region = self.region_of(addr)
        offset = addr - region.gpa
        if offset + length > region.size:
            raise GuestMemoryError(
                f"guest range {addr:#x}+{length:#x} runs past the end of its region"
            )
        self._last = region
        return region.view[offset : offset + length]

    def iovecs(self, addr: int, length: int) -> list[memoryview]:
        """Views covering ``addr..addr+length``, split where regions meet."""
        region = self._last
        if region is not None:
            offset = addr - region.gpa
            if offset >= 0 and length >= 0 and offset + length <= region.size:
                return [region.view[offset : offset + length]]
        if length < 0:
            raise GuestMemoryError(f"negative length {length}")
        out: list[memoryview] = []
        while length > 0:
            region = self.region_of(addr)
            offset = addr - region.gpa
            take = min(length, region.size - offset)
            out.append(region.view[offset : offset + take])
            self._last = region
            addr += take
            length -= take
        return out

    def read(self, addr: int, length: int) -> bytes:
        return b"".join(self.iovecs(addr, length))

    def write(self, addr: int, data: bytes | bytearray | memoryview) -> None:
        src = memoryview(data).cast("B")
        pos = 0
        for piece in self.iovecs(addr, src.nbytes):
            n = piece.nbytes
            piece[:] = src[pos : pos + n]
            pos += n


# An IOMMU hook: (iova, length, write) -> [(guest address, length), ...] covering
# the range, or raise GuestMemoryError when it is not mapped.
Translate = Callable[[int, int, bool], list[tuple[int, int]]]


class FileMappings:
    """Shared mappings of the memory fds a VMM sends (vhost-user, QEMU's proxy).

    :meth:`map` maps ``size`` bytes of an fd from ``offset`` (any offset: the
    mapping starts at the page below it) and returns a view of exactly those
    bytes; :meth:`unmap` releases it, leaving the unmapping to the garbage
    collector while a request still holds a view into it.
    """

    def __init__(self) -> None:
        self._maps: dict[int, mmap.mmap] = {}  # id(view) -> mapping

    def map(self, fd: int, size: int, offset: int) -> Buffer:
        aligned = offset - offset % mmap.PAGESIZE
        delta = offset - aligned
        mapping = mmap.mmap(
            fd, size + delta, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE, offset=aligned
        )
        view = memoryview(mapping)[delta : delta + size]
        self._maps[id(view)] = mapping
        return view

    def unmap(self, buffer: Buffer) -> None:
        mapping = self._maps.pop(id(buffer), None)
        if isinstance(buffer, memoryview):
            with contextlib.suppress(BufferError):
                buffer.release()
        if mapping is not None:
            with contextlib.suppress(BufferError):
                mapping.close()


class TranslatedMemory:
    """IOVA space in front of guest memory (VIRTIO_F_ACCESS_PLATFORM)."""

    def __init__(self, memory: GuestMemory, translate: Translate, *, write: bool = True) -> None:
        self.memory = memory
        self.translate = translate
        self._write = write

    def _pieces(self, addr: int, length: int) -> list[tuple[int, int]]:
        pieces = self.translate(addr, length, self._write)
        if sum(n for _, n in pieces) != length:
            raise GuestMemoryError(f"IOVA range {addr:#x}+{length:#x} is not fully mapped")
        return pieces

    def view(self, addr: int, length: int) -> memoryview:
        pieces = self._pieces(addr, length)
        if len(pieces) != 1:
            raise GuestMemoryError(f"IOVA range {addr:#x}+{length:#x} is not contiguous")
        gpa, n = pieces[0]
        return self.memory.view(gpa, n)

    def iovecs(self, addr: int, length: int) -> list[memoryview]:
        out: list[memoryview] = []
        for gpa, n in self._pieces(addr, length):
            out.extend(self.memory.iovecs(gpa, n))
        return out

    def read(self, addr: int, length: int) -> bytes:
        return b"".join(self.iovecs(addr, length))

    def write(self, addr: int, data: bytes | bytearray | memoryview) -> None:
        src = memoryview(data).cast("B")
        pos = 0
        for piece in self.iovecs(addr, src.nbytes):
            n = piece.nbytes
            piece[:] = src[pos : pos + n]
            pos += n


class PageTable:
    """A simple IOMMU: page-granular IOVA -> guest address mappings."""

    def __init__(self, page_size: int = 4096) -> None:
        self.page_size = page_size
        self._pages: dict[int, int] = {}

    def map(self, iova: int, gpa: int, length: int) -> None:
        ps = self.page_size
        if iova % ps or gpa % ps or length % ps:
            raise ValueError("IOMMU mappings are page aligned")
        for off in range(0, length, ps):
            self._pages[(iova + off) // ps] = gpa + off

    def unmap(self, iova: int, length: int) -> None:
        ps = self.page_size
        for off in range(0, length, ps):
            self._pages.pop((iova + off) // ps, None)

    def __call__(self, iova: int, length: int, write: bool) -> list[tuple[int, int]]:
        ps = self.page_size
        out: list[tuple[int, int]] = []
        while length > 0:
            base = self._pages.get(iova // ps)
            if base is None:
                raise GuestMemoryError(f"IOVA {iova:#x} is not mapped by the IOMMU")
            off = iova % ps
            take = min(length, ps - off)
            gpa = base + off
            if out and out[-1][0] + out[-1][1] == gpa:
                out[-1] = (out[-1][0], out[-1][1] + take)
            else:
                out.append((gpa, take))
            iova += take
            length -= take
        return out


class Allocator:
    """First-fit allocator of guest addresses for the driver side."""

    def __init__(self, base: int, size: int) -> None:
        self.base = base
        self.size = size
        self._free: list[tuple[int, int]] = [(base, size)]  # sorted (addr, size)
        self._used: dict[int, int] = {}

    def alloc(self, size: int, align: int = 16) -> int:
        if size <= 0:
            raise ValueError("allocation size must be positive")
        for i, (addr, avail) in enumerate(self._free):
            start = (addr + align - 1) // align * align
            pad = start - addr
            if avail - pad >= size:
                pieces = []
                if pad:
                    pieces.append((addr, pad))
                rest = avail - pad - size
                if rest:
                    pieces.append((start + size, rest))
                self._free[i : i + 1] = pieces
                self._used[start] = size
                return start
        raise MemoryError(f"guest allocator: no {size} bytes free")

    def free(self, addr: int) -> None:
        size = self._used.pop(addr)
        index = bisect.bisect_left(self._free, (addr, 0))
        self._free.insert(index, (addr, size))
        # Merge with neighbours so large allocations keep fitting.
        merged: list[tuple[int, int]] = []
        for a, n in self._free[max(0, index - 1) : index + 2]:
            if merged and merged[-1][0] + merged[-1][1] == a:
                merged[-1] = (merged[-1][0], merged[-1][1] + n)
            else:
                merged.append((a, n))
        self._free[max(0, index - 1) : index + 2] = merged

    @property
    def bytes_free(self) -> int:
        return sum(n for _, n in self._free)
