"""Data between host files and guest-memory views, shared by blk, scsi and fs.

``os.preadv``/``os.pwritev`` move the bytes straight between a file and a
chain's views; these add what each device needs around them: batches of at
most ``IOV_MAX`` views, reads that stop at the end of the file, writes that
resume after a short write, and zeroes where a file ended early.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence

#: preadv/pwritev take at most this many buffers per call (Linux's UIO_MAXIOV).
IOV_MAX = 1024


def _batched(
    call: Callable[[int, Sequence[memoryview], int], int],
    fd: int,
    views: Sequence[memoryview],
    offset: int,
) -> int:
    """``call`` (preadv or pwritev) over ``views`` in batches of IOV_MAX; stops after a
    short one. The bytes moved."""
    if len(views) <= IOV_MAX:
        return call(fd, views, offset) if views else 0
    moved = 0
    for i in range(0, len(views), IOV_MAX):
        batch = views[i : i + IOV_MAX]
        n = call(fd, batch, offset + moved)
        moved += n
        if n < sum(v.nbytes for v in batch):
            return moved  # end of file, a short read of a pipe, a short write
    return moved


def preadv_all(fd: int, views: Sequence[memoryview], offset: int) -> int:
    """Read into ``views`` from ``offset`` until they are full or the file ends; bytes read."""
    return _batched(os.preadv, fd, views, offset)


def pwritev_all(fd: int, views: Sequence[memoryview], offset: int) -> int:
    """Write ``views`` at ``offset`` in batches; after a short write, what was written."""
    return _batched(os.pwritev, fd, views, offset)


def pwritev_full(fd: int, views: Sequence[memoryview], offset: int) -> None:
    """Write every byte of ``views`` at ``offset``, resuming after short writes."""
    out = list(views)
    while out:
        done = os.pwritev(fd, out[:IOV_MAX], offset)
        offset += done
        written = 0
        while written < len(out) and done >= out[written].nbytes:
            done -= out[written].nbytes
            written += 1
        del out[:written]
        if out and done:
            out[0] = out[0][done:]


def zero_views(views: Sequence[memoryview], skip: int) -> None:
    """Zero every byte of ``views`` after the first ``skip`` (a file that ended early)."""
    pos = 0
    for v in views:
        n = v.nbytes
        if pos + n > skip:
            start = max(0, skip - pos)
            v[start:] = bytes(n - start)
        pos += n
