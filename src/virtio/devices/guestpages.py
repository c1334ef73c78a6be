"""Giving guest pages back to the host: ``madvise`` on the back-end's mapping.

Only memory the back-end mapped from a file or memfd (an ``mmap``) is ever
advised, and only whole host pages inside the view given: a view into a
``bytearray`` (in-process guest memory, the Python heap) is left alone.
``MADV_DONTNEED`` on a shared mapping drops the back-end's page table
entries and keeps the contents; ``MADV_REMOVE`` also frees the backing
pages, which then read as zeroes.
"""

from __future__ import annotations

import ctypes
import logging
import mmap
from typing import Literal

log = logging.getLogger("virtio.balloon")

Release = Literal["none", "dontneed", "remove"]
RELEASE_MODES: tuple[Release, ...] = ("none", "dontneed", "remove")

_ADVICE: dict[Release, int] = {
    "dontneed": mmap.MADV_DONTNEED,
    "remove": getattr(mmap, "MADV_REMOVE", mmap.MADV_DONTNEED),
}


def _address(buffer: memoryview | mmap.mmap) -> int:
    # A short-lived export: the pointer object is dropped before returning.
    return ctypes.addressof(ctypes.c_char.from_buffer(buffer))


def release_view(view: memoryview, mode: Release) -> int:
    """Advise the host pages wholly inside ``view``; the bytes advised (0: none)."""
    if mode == "none" or view.nbytes == 0 or view.readonly:
        return 0
    mapping = view.obj
    if not isinstance(mapping, mmap.mmap) or mapping.closed:
        return 0
    page = mmap.PAGESIZE
    try:
        offset = _address(view) - _address(mapping)
    except (TypeError, ValueError, BufferError):
        return 0
    start = -(-offset // page) * page
    end = (offset + view.nbytes) // page * page
    if end <= start or start < 0 or end > len(mapping):
        return 0
    try:
        mapping.madvise(_ADVICE[mode], start, end - start)
    except (OSError, ValueError) as err:
        log.info("cannot release %d bytes of guest memory: %s", end - start, err)
        return 0
    return end - start
