"""The pcap writer, read back by tshark, and the recording backend wrapper."""

from __future__ import annotations

import struct
import subprocess
import threading
from pathlib import Path

from virtio.core.events import EventSources
from virtio.devices.net import wire
from virtio.devices.net.backend import Deliver
from virtio.devices.net.pcap import SNAPLEN, PcapTap, PcapWriter
from virtio.devices.net.switch import LearningSwitch, SwitchPort
from virtio.devices.net.wire import NetHdr

TSHARK = "/usr/bin/tshark"


def tshark_fields(path: Path, *fields: str) -> list[list[str]]:
    argv = [TSHARK, "-n", "-r", str(path), "-T", "fields"]
    for f in fields:
        argv += ["-e", f]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return [line.split("\t") for line in done.stdout.splitlines()]


def mac(i: int) -> bytes:
    return bytes([2, 0, 0, 0, 0x10, i])


def eth_frame(src: bytes, size: int) -> bytes:
    return wire.BROADCAST + src + b"\x88\xb5" + bytes(size - 14)


def test_frames_read_back_by_tshark(tmp_path: Path) -> None:
    path = tmp_path / "frames.pcap"
    sizes = [60, 64, 1514, 9014, 65000]
    with PcapWriter(path) as writer:
        for i, size in enumerate(sizes):
            writer.write(eth_frame(mac(i), size), 1_700_000_000.25 + i)
        # Flushed as written: a reader sees the frames while the writer is open.
        rows = tshark_fields(path, "frame.len", "eth.src", "frame.time_epoch")
        assert writer.frames == len(sizes)
    assert [int(r[0]) for r in rows] == sizes
    assert [r[1] for r in rows] == [wire.mac_text(mac(i)) for i in range(len(sizes))]
    assert [round(float(r[2]), 6) for r in rows] == [1_700_000_000.25 + i for i in range(5)]
    raw = path.read_bytes()
    assert raw[:4] == bytes.fromhex("d4c3b2a1")  # a1b2c3d4 written little-endian
    assert struct.unpack_from("<HHiIII", raw, 4) == (2, 4, 0, 0, SNAPLEN, 1)
    assert writer.closed


def test_timestamps_round_to_microseconds(tmp_path: Path) -> None:
    path = tmp_path / "t.pcap"
    with PcapWriter(path) as writer:
        writer.write(eth_frame(mac(1), 60), 10.9999996)  # rounds up to the next second
    sec, usec, kept, length = struct.unpack_from("<IIII", path.read_bytes(), 24)
    assert (sec, usec, kept, length) == (11, 0, 60, 60)


def test_oversized_frames_are_cut_at_the_snap_length(tmp_path: Path) -> None:
    path = tmp_path / "big.pcap"
    with PcapWriter(path) as writer:
        writer.write(eth_frame(mac(1), SNAPLEN + 100), 1.0)
        writer.write(eth_frame(mac(2), 100), 2.0)
    rows = tshark_fields(path, "frame.len", "frame.cap_len", "eth.src")
    assert rows == [
        [str(SNAPLEN + 100), str(SNAPLEN), wire.mac_text(mac(1))],
        ["100", "100", wire.mac_text(mac(2))],
    ]


def test_writes_from_threads_stay_whole_records(tmp_path: Path) -> None:
    path = tmp_path / "threads.pcap"
    per_thread = 200
    with PcapWriter(path, flush_interval=1.0) as writer:

        def run(i: int) -> None:
            for k in range(per_thread):
                writer.write(eth_frame(mac(i), 60 + k), 1000.0 + k)

        threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        writer.flush()
        rows = tshark_fields(path, "frame.len", "eth.src")
    assert len(rows) == 4 * per_thread
    for i in range(4):
        lengths = [int(r[0]) for r in rows if r[1] == wire.mac_text(mac(i))]
        assert lengths == [60 + k for k in range(per_thread)]
    # After close a write is ignored, not an error.
    writer.write(eth_frame(mac(9), 60), 1.0)
    assert writer.frames == 4 * per_thread


class Recorder:
    """An inner backend that remembers calls and can deliver on demand."""

    name = "recorder"
    tx_offloads = wire.HOST_OFFLOAD_BITS

    def __init__(self) -> None:
        self.sent: list[tuple[NetHdr, bytes]] = []
        self.deliver: Deliver | None = None
        self.offloads = -1
        self.stopped = self.closed = False

    def start(self, events: EventSources, deliver: Deliver) -> None:
        self.deliver = deliver

    def stop(self) -> None:
        self.stopped = True

    def transmit(self, hdr: NetHdr, frame: bytes) -> None:
        self.sent.append((hdr, frame))

    def set_rx_offloads(self, guest_offloads: int) -> None:
        self.offloads = guest_offloads

    def close(self) -> None:
        self.closed = True


def test_pcap_tap_records_both_ways_and_delegates(tmp_path: Path) -> None:
    path = tmp_path / "tap.pcap"
    inner = Recorder()
    writer = PcapWriter(path)
    tap = PcapTap(inner, writer)
    assert (tap.name, tap.tx_offloads) == ("recorder", wire.HOST_OFFLOAD_BITS)
    got: list[bytes] = []

    def deliver(hdr: NetHdr, frame: bytes) -> bool:
        got.append(frame)
        return True

    tap.start(EventSources(), deliver)
    hdr = NetHdr(flags=wire.HDR_F_NEEDS_CSUM)
    out, back = eth_frame(mac(1), 100), eth_frame(mac(2), 200)
    tap.transmit(hdr, out)
    assert inner.sent == [(hdr, out)]
    assert inner.deliver is not None
    assert inner.deliver(NetHdr(), back) is True
    assert got == [back]
    tap.set_rx_offloads(1 << wire.GUEST_CSUM)
    assert inner.offloads == 1 << wire.GUEST_CSUM
    tap.stop()
    tap.close()
    assert inner.stopped and inner.closed
    assert not writer.closed  # the writer is the caller's: it may serve other taps
    writer.close()
    rows = tshark_fields(path, "frame.len", "eth.src")
    assert rows == [["100", wire.mac_text(mac(1))], ["200", wire.mac_text(mac(2))]]


def test_switch_hook_records_every_frame_once(tmp_path: Path) -> None:
    path = tmp_path / "switch.pcap"
    sw = LearningSwitch()
    writer = PcapWriter(path)
    sw.tap_frames = writer.capture
    ports = [SwitchPort(sw, n) for n in range(3)]
    try:
        for i, p in enumerate(ports):
            p.transmit(NetHdr(), eth_frame(mac(i), 60 + i))
    finally:
        for p in ports:
            p.close()
        writer.close()
    rows = tshark_fields(path, "frame.len", "eth.src")
    assert rows == [[str(60 + i), wire.mac_text(mac(i))] for i in range(3)]
