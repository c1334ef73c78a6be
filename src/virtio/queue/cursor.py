"""Cursors over a chain's device-readable and device-writable bytes.

A request's header, payload and status may be split across descriptors in
any way the driver likes ("Message Framing": the device MUST NOT make
assumptions about the arrangement). :class:`ChainReader` and
:class:`ChainWriter` walk the segments front to back so a device model reads
a header, hands the payload's views to ``os.pwritev`` and writes a status
byte without slicing descriptors by hand.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence

from virtio.errors import VirtioError
from virtio.queue.common import Chain


class ShortChain(VirtioError):
    """The chain has fewer readable (or writable) bytes than the request needs."""


class _Cursor:
    __slots__ = ("_index", "_offset", "_pieces", "position", "total")

    def __init__(self, pieces: Sequence[memoryview], total: int) -> None:
        self._pieces = pieces
        self._index = 0
        self._offset = 0
        self.position = 0
        self.total = total

    @property
    def remaining(self) -> int:
        return self.total - self.position

    def views(self, n: int) -> list[memoryview]:
        """Zero-copy views of the next ``n`` bytes (for ``os.preadv`` / ``os.pwritev``)."""
        if n > self.total - self.position or n < 0:
            raise ShortChain(f"{n} bytes wanted, {self.remaining} left in the chain")
        pieces = self._pieces
        if n and self._index < len(pieces):
            # The common case: the bytes sit in the current segment.
            piece = pieces[self._index]
            start = self._offset
            end = start + n
            if end < piece.nbytes:
                self._offset = end
                self.position += n
                return [piece[start:end]]
            if end == piece.nbytes:
                self._index += 1
                self._offset = 0
                self.position += n
                return [piece[start:end] if start else piece]
        out: list[memoryview] = []
        while n:
            piece = pieces[self._index]
            start = self._offset
            take = min(n, piece.nbytes - start)
            if take:
                out.append(piece[start : start + take] if take != piece.nbytes else piece)
            n -= take
            self.position += take
            if start + take == piece.nbytes:
                self._index += 1
                self._offset = 0
            else:
                self._offset = start + take
        return out

    def skip(self, n: int) -> None:
        pieces = self._pieces
        if n > 0 and self._index < len(pieces) and self._offset + n < pieces[self._index].nbytes:
            if n > self.total - self.position:
                raise ShortChain(f"{n} bytes wanted, {self.remaining} left in the chain")
            self._offset += n
            self.position += n
            return
        self.views(n)

    def seek(self, position: int) -> None:
        """Move to an absolute byte offset within the readable/writable part."""
        if not 0 <= position <= self.total:
            raise ShortChain(f"offset {position} outside the {self.total} bytes of the chain")
        self._index = 0
        self._offset = 0
        self.position = 0
        self.views(position)


class ChainReader(_Cursor):
    """Reads the device-readable bytes of a chain, in order."""

    __slots__ = ()

    def __init__(self, chain: Chain) -> None:
        # Set directly (no super().__init__ call): one cursor per request is hot.
        self._pieces = chain.readable
        self._index = self._offset = self.position = 0
        self.total = chain.read_len

    def read(self, n: int) -> bytes:
        """Exactly ``n`` bytes (ShortChain if fewer are left)."""
        pieces = self.views(n)
        if len(pieces) == 1:
            return bytes(pieces[0])
        return b"".join(pieces)

    def read_struct(self, fmt: struct.Struct) -> tuple[int | bytes, ...]:
        """The next ``fmt.size`` bytes unpacked (one C call when they sit in one segment)."""
        if self._index < len(self._pieces):
            piece = self._pieces[self._index]
            if piece.nbytes - self._offset >= fmt.size:
                values: tuple[int | bytes, ...] = fmt.unpack_from(piece, self._offset)
                self.skip(fmt.size)
                return values
        return tuple(fmt.unpack(self.read(fmt.size)))

    def read_all(self) -> bytes:
        return self.read(self.remaining)


class ChainWriter(_Cursor):
    """Writes the device-writable bytes of a chain, in order; ``position`` is what was written."""

    __slots__ = ()

    def __init__(self, chain: Chain) -> None:
        self._pieces = chain.writable
        self._index = self._offset = self.position = 0
        self.total = chain.write_len

    def write(self, data: bytes | bytearray | memoryview) -> int:
        src = memoryview(data).cast("B")
        done = 0
        for view in self.views(src.nbytes):
            n = view.nbytes
            view[:] = src[done : done + n]
            done += n
        return done

    def write_struct(self, fmt: struct.Struct, *values: int | bytes) -> None:
        self.write(fmt.pack(*values))
