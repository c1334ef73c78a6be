"""Host image files shared by the block-like device types (blk, scsi): holes and zeroes."""

from __future__ import annotations

import ctypes
import ctypes.util
import os
from collections.abc import Callable
from typing import cast

_ZERO_CHUNK = bytes(1 << 20)
_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02


def _load_fallocate() -> Callable[[int, int, int, int], int] | None:
    # os has posix_fallocate but not fallocate(2) with its mode flags.
    name = ctypes.util.find_library("c")
    if not name:
        return None
    try:
        fn = ctypes.CDLL(name, use_errno=True).fallocate
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    fn.restype = ctypes.c_int
    return cast(Callable[[int, int, int, int], int], fn)


_fallocate = _load_fallocate()

#: Whether holes can be punched here (unmapped ranges then read back as zeroes).
CAN_PUNCH_HOLES = _fallocate is not None


def punch_hole(fd: int, offset: int, length: int) -> bool:
    """Deallocate a range, keeping the file's size; False where that is not possible."""
    if _fallocate is None:
        return False
    return _fallocate(fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, offset, length) == 0


def write_zeroes(fd: int, offset: int, length: int) -> None:
    """Write ``length`` zero bytes at ``offset``."""
    while length > 0:
        n = os.pwrite(fd, _ZERO_CHUNK[: min(length, len(_ZERO_CHUNK))], offset)
        offset += n
        length -= n
