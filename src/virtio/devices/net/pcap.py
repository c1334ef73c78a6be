"""Recording frames in the classic libpcap format, for tshark, tcpdump or Wireshark.

:class:`PcapWriter` writes the file (microsecond timestamps, Ethernet link
type, a snap length that keeps whole GSO frames). Writes from several
threads interleave whole records. By default each record is flushed as it is
written, like ``tcpdump -U``, so a reader sees frames while the server still
runs; a ``flush_interval`` trades that for fewer system calls.

:class:`PcapTap` wraps any :class:`NetBackend` and records what goes through
it both ways; a switch records through its ``tap_frames`` hook, for which
:meth:`PcapWriter.capture` fits as it is.

A frame is recorded as it crosses: a GSO frame appears as one large frame and
a partial checksum as the guest left it (not yet filled in).
"""

from __future__ import annotations

import os
import struct
import threading
import time

from virtio.core.events import EventSources
from virtio.devices.net.backend import Deliver, NetBackend
from virtio.devices.net.wire import NetHdr

PCAP_MAGIC = 0xA1B2C3D4
PCAP_VERSION = (2, 4)
SNAPLEN = 262144
LINKTYPE_ETHERNET = 1

_FILE_HEADER = struct.Struct("<IHHiIII")
_RECORD_HEADER = struct.Struct("<IIII")

Frame = bytes | bytearray | memoryview


class PcapWriter:
    """A pcap file being written (see the module docstring)."""

    def __init__(self, path: str | os.PathLike[str], *, flush_interval: float = 0.0) -> None:
        """``flush_interval`` > 0: flush when a frame comes that long after the last flush."""
        self.path = os.fspath(path)
        self.flush_interval = flush_interval
        self.frames = 0
        self._lock = threading.Lock()
        self._file = open(self.path, "wb")  # noqa: SIM115 (open until close())
        self._last_flush = 0.0
        major, minor = PCAP_VERSION
        self._file.write(
            _FILE_HEADER.pack(PCAP_MAGIC, major, minor, 0, 0, SNAPLEN, LINKTYPE_ETHERNET)
        )
        self._file.flush()

    @property
    def closed(self) -> bool:
        return self._file.closed

    def write(self, frame: Frame, timestamp: float) -> None:
        """Record one frame, seen at ``timestamp`` (seconds since the Unix epoch)."""
        usec = round(timestamp * 1_000_000)
        sec, usec = divmod(usec, 1_000_000)
        length = len(frame)
        kept = min(length, SNAPLEN)
        record = _RECORD_HEADER.pack(sec & 0xFFFFFFFF, usec, kept, length)
        with self._lock:
            f = self._file
            if f.closed:
                return
            f.write(record)
            f.write(frame if kept == length else memoryview(frame)[:kept])
            self.frames += 1
            if timestamp - self._last_flush >= self.flush_interval:
                f.flush()
                self._last_flush = timestamp

    def capture(self, frame: bytes, hdr: NetHdr | None = None) -> None:
        """:meth:`write` stamped with the current time (a switch's ``tap_frames`` hook)."""
        self.write(frame, time.time())

    def flush(self) -> None:
        with self._lock:
            if not self._file.closed:
                self._file.flush()

    def close(self) -> None:
        with self._lock:
            self._file.close()

    def __enter__(self) -> PcapWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class PcapTap:
    """A backend that records every frame through ``inner``, both ways, then delegates.

    Closing it closes ``inner`` but not the writer, which several taps may share.
    """

    def __init__(self, inner: NetBackend, writer: PcapWriter) -> None:
        self.inner = inner
        self.writer = writer
        self.name = inner.name
        self.tx_offloads = inner.tx_offloads

    def start(self, events: EventSources, deliver: Deliver) -> None:
        write = self.writer.write

        def recorded(hdr: NetHdr, frame: bytes) -> bool:
            write(frame, time.time())
            return deliver(hdr, frame)

        self.inner.start(events, recorded)

    def stop(self) -> None:
        self.inner.stop()

    def transmit(self, hdr: NetHdr, frame: bytes) -> None:
        self.writer.write(frame, time.time())
        self.inner.transmit(hdr, frame)

    def set_rx_offloads(self, guest_offloads: int) -> None:
        self.inner.set_rx_offloads(guest_offloads)

    def close(self) -> None:
        self.inner.close()
