"""Moving data between files and guest-memory views (blk, scsi, fs share it)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import pytest

from virtio.devices import fileio


def pieces(data: bytes, size: int) -> list[memoryview]:
    return [memoryview(bytearray(data[i : i + size])) for i in range(0, len(data), size)]


def test_full_write_resumes_short_writes_over_many_batches(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = os.pwritev

    def short(fd: int, views: Sequence[memoryview], offset: int) -> int:
        assert len(views) <= fileio.IOV_MAX
        return real(fd, [views[0][:3]], offset)  # never more than 3 bytes a call

    blob = os.urandom(fileio.IOV_MAX * 2 + 7)
    fd = os.open(tmp_path / "f", os.O_RDWR | os.O_CREAT)
    try:
        monkeypatch.setattr(os, "pwritev", short)
        fileio.pwritev_full(fd, [memoryview(b""), *pieces(blob, 2)], 5)
        monkeypatch.undo()
        assert os.pread(fd, len(blob) + 10, 5) == blob
    finally:
        os.close(fd)


def test_reads_stop_at_the_end_of_the_file_and_zeroes_fill_the_rest(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"abcdefg")
    views = pieces(b"\xff" * 12, 5)
    fd = os.open(path, os.O_RDONLY)
    try:
        got = fileio.preadv_all(fd, views, 2)
    finally:
        os.close(fd)
    assert got == 5
    fileio.zero_views(views, got)
    assert b"".join(bytes(v) for v in views) == b"cdefg" + bytes(7)
