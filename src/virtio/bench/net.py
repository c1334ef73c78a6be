"""`virtio bench net`: a packet generator and receiver on the pyvirtio net driver.

    virtio bench net --connect SOCK [--size 64] [--queues 1] [--burst 32] [--runtime 5] [--json]

It connects to a vhost-user net back-end (``virtio serve net``, testpmd's
vhost PMD, ...) as a front-end, sends frames as fast as the device takes
them and counts the frames that come back (a peer that echoes, like testpmd
in macswap mode, sends every one back; a sink returns none). Both rings are
busy-polled: no interrupts are asked for.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass

from virtio.devices.net import wire as W
from virtio.devices.net.driver import NetDriver
from virtio.errors import VirtioError
from virtio.spec.device_ids import DeviceId

#: An EtherType for local experiments (IEEE 802 local experimental 1).
ETHERTYPE = b"\x88\xb5"
DST = b"\x02\x00\x00\x00\x00\x02"


@dataclass
class NetResult:
    tx_packets: int = 0
    rx_packets: int = 0
    tx_bytes: int = 0
    rx_bytes: int = 0
    errors: int = 0
    seconds: float = 0.0

    def summary(self, size: int) -> dict[str, object]:
        s = self.seconds or 1e-9
        return {
            "size": size,
            "seconds": round(self.seconds, 3),
            "tx_packets": self.tx_packets,
            "rx_packets": self.rx_packets,
            "packets_per_s": round(self.tx_packets / s),
            "rx_packets_per_s": round(self.rx_packets / s),
            "bits_per_s": round(self.tx_bytes * 8 / s),
            "rx_bits_per_s": round(self.rx_bytes * 8 / s),
            "errors": self.errors,
        }


def make_frame(src: bytes, size: int, seq: int = 0) -> bytes:
    """A ``size``-byte Ethernet frame (no FCS) from ``src`` with a sequence number."""
    size = max(size, 60)
    head = DST + src + ETHERTYPE + seq.to_bytes(8, "big")
    return head + bytes(size - len(head))


@contextlib.contextmanager
def vhost_user_driver(
    path: str, queues: int, queue_size: int = 256, memory: int = 256 << 20
) -> Iterator[NetDriver]:
    from virtio.vhost_user.frontend import VhostUserFrontend

    frontend = VhostUserFrontend(
        path, device_id=DeviceId.NET, memory_size=memory, queue_max_size=queue_size
    )
    try:
        # The front-end keeps no control queue of its own: with one pair, data queues only.
        driver = NetDriver(
            frontend,
            queue_pairs=queues,
            avoid_features=0 if queues > 1 else 1 << W.CTRL_VQ | 1 << W.MQ,
        )
        driver.initialize()
        driver.start()
        yield driver
    finally:
        frontend.close()


def run(driver: NetDriver, *, size: int, burst: int, runtime: float, queues: int) -> NetResult:
    """Send bursts and collect what comes back for ``runtime`` seconds."""
    for q in driver.queues:
        q.disable_interrupts()
    frame = make_frame(driver.mac, size)
    frames = [frame] * burst
    result = NetResult()
    pairs = max(1, min(queues, driver.max_pairs))
    start = time.perf_counter()
    end = start + runtime
    c = driver.counters
    tx0, rx0 = c.tx_packets, c.rx_packets
    now = start
    while now < end:
        for pair in range(pairs):
            driver.send_many(frames, pair=pair)
            driver.poll_received(pair)
        now = time.perf_counter()
    # Let frames still on their way back arrive.
    settle = time.perf_counter() + 0.2
    while time.perf_counter() < settle:
        driver.poll_received()
    result.seconds = now - start
    result.tx_packets = c.tx_packets - tx0
    result.rx_packets = c.rx_packets - rx0
    result.tx_bytes = result.tx_packets * len(frame)
    result.rx_bytes = result.rx_packets * len(frame)
    result.errors = c.errors
    return result


def print_table(summary: dict[str, object]) -> None:
    pps, rx = summary["packets_per_s"], summary["rx_packets_per_s"]
    assert isinstance(pps, int) and isinstance(rx, int)
    bps, rbps = summary["bits_per_s"], summary["rx_bits_per_s"]
    assert isinstance(bps, int) and isinstance(rbps, int)
    print(f"| direction | packets | packets/s | bit/s |  (frames of {summary['size']} bytes)")
    print("| --- | ---: | ---: | ---: |")
    print(f"| sent | {summary['tx_packets']:,} | {pps:,} | {bps / 1e6:,.1f} M |")
    print(f"| received | {summary['rx_packets']:,} | {rx:,} | {rbps / 1e6:,.1f} M |")
    print(f"errors: {summary['errors']}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="virtio bench net", description=__doc__)
    p.add_argument("--connect", metavar="SOCK", required=True, help="vhost-user net back-end")
    p.add_argument("--size", type=int, default=64, help="frame bytes (default 64, at least 60)")
    p.add_argument("--queues", type=int, default=1, help="queue pairs to use (default 1)")
    p.add_argument("--burst", type=int, default=32, help="frames per burst (default 32)")
    p.add_argument("--runtime", type=float, default=5.0, help="seconds (default 5)")
    p.add_argument("--queue-size", type=int, default=256, help="ring size (default 256)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    return p


def main(argv: list[str]) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    if not 60 <= args.size <= 9018:
        p.error("--size must be 60..9018")
    if not 1 <= args.burst <= 1024:
        p.error("--burst must be 1..1024")
    if not 1 <= args.queues <= 64:
        p.error("--queues must be 1..64")
    if args.runtime <= 0:
        p.error("--runtime must be positive")
    try:
        with vhost_user_driver(args.connect, args.queues, args.queue_size) as driver:
            result = run(
                driver,
                size=args.size,
                burst=args.burst,
                runtime=args.runtime,
                queues=args.queues,
            )
    except (VirtioError, OSError, ValueError) as err:
        print(f"virtio bench net: {err}", file=sys.stderr)
        return 1
    summary = result.summary(max(args.size, 60))
    if args.json:
        print(json.dumps(summary))
    else:
        print_table(summary)
    return 0
