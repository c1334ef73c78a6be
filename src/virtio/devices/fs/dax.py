"""The virtio-fs DAX window: shared memory region 0, where file ranges are mapped for real.

The window is one anonymous mapping of ``size`` bytes. FUSE_SETUPMAPPING maps
a file range over part of it with ``mmap(MAP_FIXED)`` (``MAP_SHARED`` when
writable, so stores reach the file; ``MAP_PRIVATE`` when read-only, so a
stray store changes a private copy and never the file, and never faults);
FUSE_REMOVEMAPPING puts anonymous memory back. Offsets and lengths are
multiples of the page size (announced as FUSE_INIT's ``map_alignment``).

Only the pages that hold file data are file-backed: the rest of a mapping
past the end of its file is anonymous (touching a shared file page past EOF
raises SIGBUS), and :meth:`DaxWindow.fit` follows a file that changed size.
A file shrunk by another host process between two requests is outside what
the device can guard.

Message layouts (Linux's include/uapi/linux/fuse.h): fuse_setupmapping_in is
fh, foffset, len, flags, moffset (5 x u64); fuse_removemapping_in is a u32
count followed by that many fuse_removemapping_one (moffset, len: 2 x u64).
"""

from __future__ import annotations

import bisect
import ctypes
import errno
import fcntl
import logging
import mmap
import os
import stat
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Generic, TypeVar

from virtio.core.device import SharedMemoryRegion
from virtio.devices.fs import wire as W
from virtio.devices.fs.wire import Order

log = logging.getLogger("virtio.fs")

#: VIRTIO_FS_SHMCAP_ID_CACHE: the DAX window is shared memory region 0.
SHMID_CACHE = 0
PAGE = mmap.PAGESIZE
#: FUSE_INIT map_alignment: log2 of the alignment SETUPMAPPING/REMOVEMAPPING need.
MAP_ALIGNMENT = PAGE.bit_length() - 1

FLAG_WRITE = 1 << 0  # FUSE_SETUPMAPPING_FLAG_WRITE
FLAG_READ = 1 << 1  # FUSE_SETUPMAPPING_FLAG_READ
NO_FH = (1 << 64) - 1  # Linux maps by node id with fh = -1

SETUPMAPPING_IN = "QQQQQ"  # fh foffset len flags moffset
REMOVEMAPPING_IN = "I"  # count
REMOVEMAPPING_ONE = "QQ"  # moffset len
REMOVEMAPPING_ONE_SIZE = W.size(REMOVEMAPPING_ONE)

#: Pieces the window keeps at most (each is a kernel VMA or two: far below vm.max_map_count).
MAX_MAPPINGS = 4096

_MAP_FIXED = 0x10  # Linux's value; the mmap module does not export it
_MAP_FAILED = ctypes.c_void_p(-1).value
_OFF_MAX = (1 << 63) - 1

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [
    ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int64,
]  # fmt: skip

T = TypeVar("T")


def _fail(err: int, what: str) -> OSError:
    return OSError(err, f"{os.strerror(err)}: {what}")


class RangeMap(Generic[T]):
    """Disjoint ``[start, end)`` ranges with a value each; a new range replaces what it overlaps.

    ``shift(value, delta)`` is the value of the part of a range that starts
    ``delta`` bytes into it (what a split keeps on the right).
    """

    def __init__(self, shift: Callable[[T, int], T]) -> None:
        self._shift = shift
        self._starts: list[int] = []
        self._ranges: list[tuple[int, int, T]] = []

    def __len__(self) -> int:
        return len(self._ranges)

    def __iter__(self) -> Iterator[tuple[int, int, T]]:
        return iter(list(self._ranges))

    def _first(self, start: int) -> int:
        i = bisect.bisect_right(self._starts, start) - 1
        if i < 0 or self._ranges[i][1] <= start:
            i += 1
        return i

    def cut(self, start: int, end: int) -> list[tuple[int, int, T]]:
        """Take ``[start, end)`` out of every range; the pieces taken out."""
        i = j = self._first(start)
        taken: list[tuple[int, int, T]] = []
        keep: list[tuple[int, int, T]] = []
        while j < len(self._ranges) and self._ranges[j][0] < end:
            s, e, v = self._ranges[j]
            if s < start:
                keep.append((s, start, v))
            if e > end:
                keep.append((end, e, self._shift(v, end - s)))
            lo = max(s, start)
            taken.append((lo, min(e, end), self._shift(v, lo - s)))
            j += 1
        self._ranges[i:j] = keep
        self._starts[i:j] = [s for s, _, _ in keep]
        return taken

    def put(self, start: int, end: int, value: T) -> None:
        self.cut(start, end)
        i = bisect.bisect_left(self._starts, start)
        self._ranges.insert(i, (start, end, value))
        self._starts.insert(i, start)

    def growth(self, start: int, end: int) -> int:
        """How many ranges :meth:`put` of ``[start, end)`` would add (a split adds 2)."""
        i = j = self._first(start)
        while j < len(self._ranges) and self._ranges[j][0] < end:
            j += 1
        if i == j:
            return 1
        left = int(self._ranges[i][0] < start)
        right = int(self._ranges[j - 1][1] > end)
        return 1 + left + right - (j - i)

    def covers(self, start: int, end: int, accept: Callable[[T], bool] = lambda _v: True) -> bool:
        """Whether ranges whose values ``accept`` cover all of ``[start, end)``."""
        pos = start
        i = self._first(start)
        while pos < end:
            if i >= len(self._ranges):
                return False
            s, e, v = self._ranges[i]
            if s > pos or not accept(v):
                return False
            pos, i = e, i + 1
        return True


@dataclass(frozen=True)
class _Piece:
    """What one window range maps: ``file`` from ``foffset``, file-backed up to ``fend``."""

    file: tuple[int, int, bool]  # (st_dev, st_ino, writable): a key of DaxWindow._files
    foffset: int
    fend: int  # window offset where file pages stop (anonymous after it, past EOF)


def _shift(piece: _Piece, delta: int) -> _Piece:
    return replace(piece, foffset=piece.foffset + delta)


def _backed(size: int, foffset: int, length: int) -> int:
    """Bytes of a mapping that file pages can back: up to EOF, rounded up to a page."""
    return max(0, min(length, -(-(size - foffset) // PAGE) * PAGE))


def parse_setupmapping(order: Order, body: bytes) -> tuple[int, int, int, int, int]:
    """(fh, foffset, len, flags, moffset) of a fuse_setupmapping_in."""
    s = W.fmt(order, SETUPMAPPING_IN)
    if len(body) != s.size:
        raise _fail(errno.EINVAL, f"SETUPMAPPING body of {len(body)} bytes, not {s.size}")
    fh, foffset, length, flags, moffset = s.unpack(body)
    return fh, foffset, length, flags, moffset


def parse_removemapping(order: Order, body: bytes) -> list[tuple[int, int]]:
    """The (moffset, len) entries of a fuse_removemapping_in and its array."""
    head = W.fmt(order, REMOVEMAPPING_IN)
    if len(body) < head.size:
        raise _fail(errno.EINVAL, "REMOVEMAPPING without a count")
    (count,) = head.unpack_from(body)
    if count == 0 or len(body) != head.size + count * REMOVEMAPPING_ONE_SIZE:
        raise _fail(errno.EINVAL, f"REMOVEMAPPING count {count} in a {len(body)}-byte body")
    one = W.fmt(order, REMOVEMAPPING_ONE)
    return [one.unpack_from(body, head.size + k * REMOVEMAPPING_ONE_SIZE) for k in range(count)]


def check_range(moffset: int, length: int, size: int) -> None:
    """EINVAL unless ``[moffset, moffset + length)`` is page-aligned, non-empty, in the window."""
    if length == 0 or moffset % PAGE or length % PAGE:
        raise _fail(errno.EINVAL, f"window range {length:#x} at {moffset:#x} is not page-aligned")
    if moffset + length > size:
        # The device MUST reject mappings beyond the end of the window.
        raise _fail(errno.EINVAL, f"window range {length:#x} at {moffset:#x} ends past {size:#x}")


class DaxWindow:
    """A DAX window of ``size`` bytes (a multiple of the page size) and its mappings."""

    def __init__(self, size: int, *, max_mappings: int = MAX_MAPPINGS) -> None:
        if size <= 0 or size % PAGE:
            raise ValueError(f"DAX window size {size} is not a positive multiple of {PAGE}")
        self.size = size
        self.max_mappings = max_mappings
        flags = mmap.MAP_PRIVATE | getattr(mmap, "MAP_NORESERVE", 0)
        self.memory = mmap.mmap(-1, size, flags=flags)
        anchor = ctypes.c_char.from_buffer(self.memory)
        self._base = ctypes.addressof(anchor)
        del anchor  # release the buffer export: the address stays valid while memory is open
        self._map: RangeMap[_Piece] = RangeMap(_shift)
        self._files: dict[tuple[int, int, bool], int] = {}
        self.region = SharedMemoryRegion(SHMID_CACHE, size, self.memory)

    @property
    def mappings(self) -> int:
        return len(self._map)

    def __iter__(self) -> Iterator[tuple[int, int, int]]:
        """(moffset, len, foffset) of each mapped piece, in window order."""
        for s, e, piece in self._map:
            yield s, e - s, piece.foffset

    # -- mmap ---------------------------------------------------------------------------

    def _mmap(self, moffset: int, length: int, fd: int, foffset: int, *, shared: bool) -> None:
        flags = _MAP_FIXED | (mmap.MAP_SHARED if shared else mmap.MAP_PRIVATE)
        if fd < 0:
            flags |= mmap.MAP_ANONYMOUS
        got = _libc.mmap(
            self._base + moffset, length, mmap.PROT_READ | mmap.PROT_WRITE, flags, fd, foffset
        )
        if got == _MAP_FAILED:
            err = ctypes.get_errno()
            raise _fail(err, f"mmap of {length:#x} bytes at window offset {moffset:#x}")
        if got != self._base + moffset:  # MAP_FIXED never moves; a kernel that did is unusable
            raise RuntimeError(f"mmap placed window offset {moffset:#x} at {got:#x}")

    def _anonymous(self, moffset: int, length: int) -> None:
        if length > 0:
            self._mmap(moffset, length, -1, 0, shared=False)

    def _file_pages(self, moffset: int, length: int, piece: _Piece, foffset: int) -> None:
        if length > 0:
            shared = piece.file[2]
            self._mmap(moffset, length, self._files[piece.file], foffset, shared=shared)

    # -- requests -------------------------------------------------------------------------

    def setup(self, fd: int, foffset: int, length: int, moffset: int, *, writable: bool) -> None:
        """FUSE_SETUPMAPPING: ``length`` bytes of ``fd`` from ``foffset`` at ``moffset``.

        Overlapping mappings, whole or partial, are replaced where they overlap.
        """
        check_range(moffset, length, self.size)
        if foffset % PAGE or foffset + length > _OFF_MAX:
            raise _fail(errno.EINVAL, f"file offset {foffset:#x} is not page-aligned or too large")
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise _fail(errno.ENODEV, "only regular files can be mapped")
        mode = fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE
        if mode == os.O_WRONLY or (writable and mode != os.O_RDWR):
            raise _fail(errno.EACCES, f"a {'writable' if writable else 'readable'} mapping")
        if len(self._map) + self._map.growth(moffset, moffset + length) > self.max_mappings:
            # Out of resources: SETUPMAPPING fails until REMOVEMAPPING frees some.
            raise _fail(errno.ENOMEM, f"the window holds {len(self._map)} mappings")
        key = (st.st_dev, st.st_ino, writable)
        if key not in self._files:
            self._files[key] = os.dup(fd)
        backed = _backed(st.st_size, foffset, length)
        piece = _Piece(key, foffset, moffset + backed)
        try:
            self._file_pages(moffset, backed, piece, foffset)
        except OSError:
            # A failed MAP_FIXED may have unmapped the range already: never leave a hole.
            self._anonymous(moffset, length)
            self._map.cut(moffset, moffset + length)
            self._drop_unused()
            raise
        self._anonymous(moffset + backed, length - backed)
        self._map.put(moffset, moffset + length, piece)
        self._drop_unused()
        log.debug(
            "DAX: %#x bytes of file %#x at window %#x (%s, %#x file-backed)",
            length, foffset, moffset, "rw" if writable else "ro", backed,
        )  # fmt: skip

    def remove(self, ranges: Sequence[tuple[int, int]]) -> None:
        """FUSE_REMOVEMAPPING: anonymous memory over each (moffset, len); all checked first."""
        for moffset, length in ranges:
            check_range(moffset, length, self.size)
        for moffset, length in ranges:
            self._anonymous(moffset, length)
            self._map.cut(moffset, moffset + length)
        self._drop_unused()
        log.debug("DAX: removed %s", ", ".join(f"{n:#x}@{m:#x}" for m, n in ranges))

    def fit(self) -> None:
        """Make file-backed exactly the mapped pages that hold file data now (sizes change)."""
        sizes: dict[tuple[int, int, bool], int] = {}
        for s, e, piece in self._map:
            if piece.file not in sizes:
                sizes[piece.file] = os.fstat(self._files[piece.file]).st_size
            want = s + _backed(sizes[piece.file], piece.foffset, e - s)
            have = min(max(piece.fend, s), e)
            if want == have:
                continue
            if want < have:
                self._anonymous(want, have - want)
            else:
                self._file_pages(have, want - have, piece, piece.foffset + (have - s))
            self._map.put(s, e, replace(piece, fend=want))

    def clear(self) -> None:
        """Remove every mapping (the FUSE session ended)."""
        if len(self._map):
            self._anonymous(0, self.size)
            self._map.cut(0, self.size)
        self._drop_unused()

    def close(self) -> None:
        self.clear()
        try:
            self.memory.close()
        except BufferError:  # a transport still holds a view; the mapping goes with the process
            log.info("DAX window still exported at close")

    def _drop_unused(self) -> None:
        used = {piece.file for _s, _e, piece in self._map}
        for key in [k for k in self._files if k not in used]:
            os.close(self._files.pop(key))
