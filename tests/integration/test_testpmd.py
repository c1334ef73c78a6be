"""DPDK's testpmd as a peer: a vhost and a virtio-user testpmd pass packets; none is left over."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from virtio.bench import testpmd as tp


def _running(pattern: str) -> list[str]:
    """Command lines of processes matching ``pattern`` (pgrep -f)."""
    out = subprocess.run(["pgrep", "-af", pattern], capture_output=True, text=True, timeout=10)
    return out.stdout.splitlines()


@pytest.mark.timeout(60)
def test_c_pair_passes_packets(tmp_path: Path) -> None:
    assert tp.find_testpmd() is not None, "dpdk-testpmd is not installed (apt-get install dpdk-dev)"
    result = tp.measure_c_pair(64, 2, tmp_path)
    assert result["rx_packets"] > 1000
    assert result["rx_pps"] > 1000
    # What the virtio-user side sent is what the vhost side received.
    assert result["tx_pps"] == pytest.approx(result["rx_pps"], rel=0.05)
    assert _running(f"file-prefix={tp.PREFIX_BASE}-") == []


@pytest.mark.timeout(60)
def test_testpmd_stops_cleanly(tmp_path: Path) -> None:
    sock = tmp_path / "vhost.sock"
    log = tmp_path / "testpmd.log"
    with tp.Testpmd(f"net_vhost0,iface={sock}", "rxonly", log=log) as pmd:
        assert pmd.running()
        assert pmd.runtime_dir.is_dir()
        assert _running(f"file-prefix={pmd.prefix}( |$)") != []
        assert pmd.stats()[0].rx_packets == 0
        # A vhost port's link is down until a front-end sets DRIVER_OK.
        assert not pmd.link_up(0)
    assert pmd.returncode == 0  # SIGINT: a clean exit, not a kill
    assert not pmd.running()
    assert _running(f"file-prefix={pmd.prefix}( |$)") == []
    assert not pmd.runtime_dir.exists()
    assert pmd.final_stats[0].rx_packets == 0
