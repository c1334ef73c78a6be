"""A real Linux guest's virtio_balloon driver against `virtio serve balloon`.

User-Mode Linux (mem=256M) gets the balloon as ``virtio_uml.device=SOCK:5``.
The host raises the target to 64 MiB through the control socket, waits for
``actual`` to get there and for the guest to see its memory drop, then lowers
it to 0; the guest samples /proc/meminfo meanwhile and prints when its
memory dropped by about the balloon's size and when it came back.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.integration.conftest import ServeProcess
from virtio.control import request
from virtio.vm import GuestAssets, VhostUserDevice, run_guest

pytestmark = pytest.mark.guest

BALLOON = "Device Types / Memory Balloon Device"
N_OP_DEV = f"devicenormative:{BALLOON} / Device Operation"
N_STATS_DEV = f"devicenormative:{BALLOON} / Device Operation / Memory Statistics"

TARGET_MB = 64
PAGES = TARGET_MB << 8

# The guest marks its steps in a host directory (through hostfs): the host
# raises the target once the guest has its baseline, and lowers it once the
# guest saw its memory drop. Samples every 0.2 s; MemTotal drops without
# DEFLATE_ON_OOM, MemFree with it.
SCRIPT = """
sample() { awk '/^MemTotal:|^MemFree:/ {printf "%s %s ", $1, $2} END {print ""}' /proc/meminfo; }
last=$(sample); phase=up
maxt=$(echo "$last" | awk '{print $2}'); maxf=$(echo "$last" | awk '{print $4}')
echo "BEFORE $last"
touch /host{dir}/ready
for i in $(seq 300); do
    line=$(sample)
    [ "$line" != "$last" ] && echo "SAMPLE $line"; last=$line
    total=$(echo "$line" | awk '{print $2}')
    free=$(echo "$line" | awk '{print $4}')
    if [ "$phase" = up ]; then
        [ $total -gt $maxt ] && maxt=$total
        [ $free -gt $maxf ] && maxf=$free
        if [ $((maxt - total)) -gt {drop} ] || [ $((maxf - free)) -gt {drop} ]; then
            echo "INFLATED $line"; phase=down; touch /host{dir}/inflated
        fi
    elif [ $((maxt - total)) -lt {back} ] && [ $((maxf - free)) -lt {back} ]; then
        echo "DEFLATED $line"; sleep 1; break
    fi
    sleep 0.2
done
"""


def _status(ctl: Path) -> dict[str, int]:
    answer = request(ctl, "status", timeout=5)
    return {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", answer)}


def _drive(ctl: Path, marks: Path, log: list[str], stop: threading.Event) -> None:
    """Raise the target once the guest is ready, lower it once the guest saw it."""

    def wait_for(what: str, check: Callable[[], bool], timeout: float = 40) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not stop.is_set():
            if check():
                log.append(f"{what}: {_status(ctl)}")
                return True
            time.sleep(0.2)
        log.append(f"timed out waiting for {what}")
        return False

    if not wait_for("ready", lambda: (marks / "ready").exists()):
        return
    log.append(request(ctl, f"set {TARGET_MB}M"))
    if not wait_for("inflated", lambda: _status(ctl)["actual"] == PAGES):
        return
    if not wait_for("seen", lambda: (marks / "inflated").exists()):
        return
    log.append(request(ctl, "set 0"))
    wait_for("deflated", lambda: _status(ctl)["actual"] == 0)


@pytest.mark.normative(N_OP_DEV, N_STATS_DEV)
def test_uml_guest_balloon_follows_the_control_socket(
    tmp_path: Path, guest_assets: GuestAssets
) -> None:
    sock, ctl = tmp_path / "vb.sock", tmp_path / "ctl.sock"
    server = ServeProcess(
        image=None,
        socket=sock,
        args=["--control", str(ctl), "--stats-interval", "1"],
        log=tmp_path / "serve.log",
        kind="balloon",
    )
    server.start()
    host_log: list[str] = []
    stop = threading.Event()
    marks = tmp_path / "marks"
    marks.mkdir()
    driver = threading.Thread(target=_drive, args=(ctl, marks, host_log, stop), daemon=True)
    driver.start()
    try:
        # The guest compares against the most memory it has seen (in KiB).
        script = (
            SCRIPT.replace("{drop}", str((TARGET_MB - 16) << 10))
            .replace("{back}", str(16 << 10))
            .replace("{dir}", str(marks))
        )
        result = run_guest(
            script,
            vm="uml",
            devices=[VhostUserDevice(str(sock), 5)],
            memory_mb=256,
            timeout=90,
            host_share=True,
            assets=guest_assets,
        )
    finally:
        stop.set()
        driver.join(timeout=40)
        server.stop()
    out = result.section()
    serve_log = server.log_text()
    context = (
        f"{result.output[-3000:]}\ntimed out: {result.timed_out}\nhost: {host_log}\n"
        f"serve log:\n{serve_log[-3000:]}"
    )
    assert result.ok, context
    assert f"ok target {TARGET_MB}.0M ({PAGES} pages)" in host_log, context
    assert any(line.startswith("deflated:") for line in host_log), context
    assert "INFLATED" in out and "DEFLATED" in out, context
    # Statistics from the guest reached the device, with the guest's memory size.
    stats = re.findall(r"balloon stats: .*total_memory=([\d.]+)M", serve_log)
    assert stats and 150 < float(stats[-1]) <= 256, context
    assert "Traceback" not in serve_log and "DEVICE_NEEDS_RESET" not in serve_log, context
