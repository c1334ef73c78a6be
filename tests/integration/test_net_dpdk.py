"""pyvirtio's net device and driver against DPDK's testpmd, real vhost-user peers both ways.

* the pyvirtio driver (vhost-user front-end) drives testpmd's vhost PMD in macswap mode;
* testpmd's virtio-user PMD (a front-end) drives `virtio serve net`, a sink;
* testpmd and the pyvirtio driver on two ports of `virtio serve net --switch`.

Each peer gets its own CPU where it busy-polls (testpmd always does): the
device side on CPU 0, the driver side on CPU 1.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from virtio.bench import testpmd as tp
from virtio.bench.net import DST, make_frame, run
from virtio.bench.netpeers import (
    DEVICE_CORE,
    DRIVER_CORE,
    DeviceCounts,
    NetServe,
    on_core,
    parse_counts,
    peer_driver,
    pinned,
)
from virtio.devices.net import wire as W
from virtio.devices.net.driver import NetDriver
from virtio.spec import features as F

#: Descriptors testpmd's virtio-user PMD and our driver keep per ring (256 by default).
RING = 256
MAC_A = "52:54:00:12:34:56"  # `virtio serve net`'s first device; later sockets count up
MAC_B = "52:54:00:12:34:57"


@pytest.fixture(autouse=True)
def _testpmd_installed() -> None:
    assert tp.find_testpmd() is not None, "dpdk-testpmd is not installed (apt-get install dpdk-dev)"


def _bench_net(sock: Path, runtime: float, core: int) -> dict[str, int]:
    """`virtio bench net --connect SOCK --json` as a process on ``core``; its summary."""
    cmd = [sys.executable, "-m", "virtio.cli", "bench", "net", "--connect", str(sock)]
    cmd += ["--runtime", str(runtime), "--json"]
    out = subprocess.run(
        pinned(core, cmd), capture_output=True, text=True, timeout=runtime + 30, check=False
    )
    assert out.returncode == 0, out.stderr
    summary: dict[str, int] = json.loads(out.stdout)
    return summary


def _receive(driver: NetDriver, count: int, timeout: float = 5.0) -> list[bytes]:
    frames: list[bytes] = []
    deadline = time.monotonic() + timeout
    while len(frames) < count and time.monotonic() < deadline:
        frames += [frame for _hdr, frame in driver.receive(timeout=0.5)]
    return frames


@pytest.mark.timeout(60)
@pytest.mark.parametrize("packed", [True, False], ids=["packed", "split"])
def test_driver_through_testpmd_vhost_macswap(tmp_path: Path, packed: bool) -> None:
    sock = tmp_path / "vhost.sock"
    avoid = 0 if packed else 1 << F.VIRTIO_F_RING_PACKED
    pmd = tp.Testpmd(
        f"net_vhost0,iface={sock}", "macswap", cores=str(DEVICE_CORE), log=tmp_path / "pmd.log"
    )
    with pmd:
        with on_core(DRIVER_CORE), peer_driver(str(sock), avoid_features=avoid) as driver:
            pmd.wait_link_up()
            assert driver.has(F.VIRTIO_F_RING_PACKED) == packed
            assert driver.has(W.MRG_RXBUF)
            # A few frames first, waiting on the call eventfd: each comes back with its
            # addresses swapped and the rest as it was.
            sent = [make_frame(driver.mac, 64, seq) for seq in range(8)]
            assert driver.send_many(sent) == len(sent)
            got = _receive(driver, len(sent))
            assert len(got) == len(sent)
            for back, frame in zip(got, sent, strict=True):
                assert back[0:6] == frame[6:12] == driver.mac
                assert back[6:12] == frame[0:6] == DST
                assert back[12:] == frame[12:]
            # Then as fast as it goes, both rings polled.
            result = run(driver, size=64, burst=32, runtime=2, queues=1)
            counters = driver.counters
        stats = pmd.stats()[0]
    assert pmd.returncode == 0
    assert result.tx_packets > 1000
    assert result.rx_packets > 1000
    assert result.errors == 0 and counters.errors == 0, counters.reasons
    # testpmd saw every frame the driver sent, and sent back what the driver got (and
    # at most a ring's worth more, left in the receive ring at the end).
    assert stats.rx_packets == counters.tx_packets
    assert counters.rx_packets <= stats.tx_packets <= counters.rx_packets + RING
    assert stats.rx_errors == stats.tx_errors == 0


@pytest.mark.timeout(60)
def test_bench_net_against_testpmd_vhost(tmp_path: Path) -> None:
    sock = tmp_path / "vhost.sock"
    pmd = tp.Testpmd(
        f"net_vhost0,iface={sock}", "macswap", cores=str(DEVICE_CORE), log=tmp_path / "pmd.log"
    )
    with pmd:
        summary = _bench_net(sock, 2, DRIVER_CORE)
        stats = pmd.stats()[0]
    assert summary["rx_packets"] > 0 and summary["errors"] == 0
    assert stats.rx_packets == summary["tx_packets"]


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    "ring",
    ["split", "packed"],
)
def test_testpmd_virtio_user_into_pyvirtio_sink(tmp_path: Path, ring: str) -> None:
    sock = tmp_path / "sink.sock"
    with NetServe([sock], tmp_path / "serve.log", core=DEVICE_CORE) as serve:
        pmd = tp.Testpmd(
            f"net_virtio_user0,path={sock}" + (",packed_vq=1" if ring == "packed" else ""),
            "txonly",
            cores=str(DRIVER_CORE),
            args=["--txpkts=64"],
            log=tmp_path / "pmd.log",
        )
        with pmd:
            time.sleep(2)
            live = pmd.stats()[0]
        # The device logs its counters when testpmd's rings go away.
        counts = serve.wait_counts(1)
    assert pmd.returncode == 0
    final = pmd.final_stats[0]
    assert final.tx_packets >= live.tx_packets > 1000
    assert final.rx_packets == 0
    sink = counts[0]
    assert sink.mac == MAC_A
    # Every packet testpmd counts as sent was on the ring; the device took them all
    # (but for at most a ring's worth still there when testpmd stopped) and dropped none.
    assert final.tx_packets - RING <= sink.sent <= final.tx_packets
    assert sink.tx_dropped == 0
    assert sink.received == 0


@pytest.mark.timeout(60)
@pytest.mark.parametrize("mode", ["macswap", "io"])
def test_switch_between_testpmd_and_driver(tmp_path: Path, mode: str) -> None:
    a, b = tmp_path / "a.sock", tmp_path / "b.sock"
    serve = NetServe([a, b], tmp_path / "serve.log", args=["--switch"], core=DEVICE_CORE)
    with serve:
        # testpmd on port A (its own CPU: it busy-polls), the driver on port B sharing the
        # switch's CPU. The driver's frames go to an unknown address: flooded to A, and
        # testpmd sends each back (macswap: to the driver's address; io: as it was,
        # flooded again).
        pmd = tp.Testpmd(
            f"net_virtio_user0,path={a}", mode, cores=str(DRIVER_CORE), log=tmp_path / "pmd.log"
        )
        with pmd:
            summary = _bench_net(b, 2, DEVICE_CORE)
        counts = {c.mac: c for c in serve.wait_counts(2)}
    assert pmd.returncode == 0
    stats = pmd.final_stats[0]
    assert summary["errors"] == 0
    assert summary["tx_packets"] > 1000
    assert summary["rx_packets"] > 0
    # What testpmd received came from the driver; what the driver got, testpmd sent.
    assert 0 < stats.rx_packets <= summary["tx_packets"]
    assert summary["rx_packets"] <= stats.tx_packets <= stats.rx_packets
    port_a, port_b = counts[MAC_A], counts[MAC_B]
    # Port B's device took the driver's frames (a ring's worth may be left at the end)
    # and gave it what came back; port A's device carried them to and from testpmd.
    assert summary["tx_packets"] - RING <= port_b.sent <= summary["tx_packets"]
    assert summary["rx_packets"] <= port_b.received
    assert port_a.received == stats.rx_packets
    assert port_a.sent == stats.tx_packets
    assert port_a.tx_dropped == port_b.tx_dropped == 0


def test_parse_counts_reads_the_reset_lines() -> None:
    log = (
        "2026-12-01 09:50:05,176 virtio.net INFO 52:54:00:12:34:56: sent 176392 frames "
        "(0 GSO, 0 segmented here), received 0 (0 GSO, 0 waited for buffers, 0 still "
        "waiting), dropped 0 sent and 0 received \n"
        "2026-12-01 09:50:06,001 virtio.vhost_user.server INFO front-end disconnected\n"
        "2026-12-01 09:50:22,642 virtio.net INFO 52:54:00:12:34:57: sent 54593 frames, "
        "received 3336 (778 waited for buffers, 256 still waiting), dropped 2 sent and "
        "35392 received {'rx: no receive buffers': 35392}\n"
    )
    assert parse_counts(log) == [
        DeviceCounts(MAC_A, 176392, 0, 0, 0),
        DeviceCounts(MAC_B, 54593, 3336, 2, 35392),
    ]
