"""`virtio bench net-guests`: TCP between real guests, pyvirtio's switch beside testpmd's.

Two QEMU TCG guests run iperf3 (the host's binary, through the read-only
share) across, in turn:

- ``virtio serve net --switch`` with two sockets (offloads on: TSO and
  checksum offload pass through the switch), and
- DPDK's testpmd with two vhost ports forwarding in ``io`` mode;

and, with ``--tap``, one UML guest to the host end of a TAP in a network
namespace made for the run. The table shows Mbit/s and the ratio ours / theirs.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import secrets
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from virtio.vm import GuestResult, VhostUserNic, prepare, run_guest

SERVER = """
ip link set eth0 up; ip addr add 192.0.2.2/24 dev eth0
timeout {wait} hostrun /usr/bin/iperf3 -s -1 >/dev/null 2>&1
"""
CLIENT = """
ip link set eth0 up; ip addr add 192.0.2.1/24 dev eth0
for i in $(seq 60); do ping -c 1 -W 1 {peer} >/dev/null 2>&1 && break; done
sleep 1
hostrun /usr/bin/iperf3 -c {peer} -t {seconds} -J | tr -d '\\n'; echo
"""


def _bits_per_s(result: GuestResult) -> float:
    """The receiver's rate from iperf3's JSON report in the client's output."""
    found = re.search(r'\{\s*"start"', result.output)
    if found is None:
        raise RuntimeError(f"no iperf3 report:\n{result.output[-2000:]}")
    text = result.output[found.start() :].splitlines()[0]
    report = json.loads(text)
    return float(report["end"]["sum_received"]["bits_per_second"])


def _pair(sockets: tuple[Path, Path], seconds: int, macs: tuple[str, str]) -> float:
    assets = prepare()
    results: list[GuestResult | None] = [None, None]
    scripts = (
        CLIENT.format(peer="192.0.2.2", seconds=seconds),
        SERVER.format(wait=seconds + 90),
    )

    def boot(i: int) -> None:
        results[i] = run_guest(
            scripts[i],
            vm="qemu",
            nics=[VhostUserNic(str(sockets[i]), mac=macs[i])],
            timeout=seconds + 120,
            host_share=True,
            assets=assets,
        )

    threads = [threading.Thread(target=boot, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    client = results[0]
    assert client is not None
    return _bits_per_s(client)


@contextlib.contextmanager
def _serve(args: list[str], log: Path, prefix: list[str] | None = None) -> Iterator[None]:
    cmd = [*(prefix or []), sys.executable, "-m", "virtio.cli", "serve", "net", *args]
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=out, start_new_session=True)
    try:
        sockets = [Path(a) for i, a in enumerate(args) if i and args[i - 1] == "--socket"]
        deadline = time.monotonic() + 15
        while not all(s.exists() for s in sockets):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"virtio serve net did not start: {log.read_text()}")
            time.sleep(0.05)
        yield
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def measure_switch(tmp: Path, seconds: int) -> float:
    a, b = tmp / "a.sock", tmp / "b.sock"
    with _serve(["--socket", str(a), "--socket", str(b), "--switch"], tmp / "serve.log"):
        return _pair((a, b), seconds, ("52:54:00:00:00:0a", "52:54:00:00:00:0b"))


def measure_testpmd(tmp: Path, seconds: int) -> float:
    from virtio.bench.testpmd import Testpmd

    a, b = tmp / "ta.sock", tmp / "tb.sock"
    vdevs = [f"net_vhost0,iface={a}", f"net_vhost1,iface={b}"]
    with Testpmd(vdevs, "io", cores="0"):
        return _pair((a, b), seconds, ("52:54:00:00:00:0c", "52:54:00:00:00:0d"))


TAP_LISTENER = """
ip link set eth0 up; ip addr add 192.0.2.2/24 dev eth0
for i in $(seq 60); do ping -c 1 -W 1 192.0.2.1 >/dev/null 2>&1 && break; done
hostrun /usr/bin/iperf3 -c 192.0.2.1 -t {seconds} -J | tr -d '\\n'; echo
"""


def measure_tap(tmp: Path, seconds: int) -> float:
    """One UML guest sending to iperf3 on the host end of a TAP in a fresh namespace."""
    ns = f"pyv-bench-{secrets.token_hex(3)}"
    tap = f"pyvb{secrets.token_hex(2)}"
    sock = tmp / "tap.sock"
    subprocess.run(["ip", "netns", "add", ns], check=True, timeout=10)
    try:
        prefix = ["ip", "netns", "exec", ns]
        with _serve(["--socket", str(sock), "--tap", tap], tmp / "tap.log", prefix):
            subprocess.run(["ip", "-n", ns, "addr", "add", "192.0.2.1/24", "dev", tap], check=True)
            subprocess.run(["ip", "-n", ns, "link", "set", tap, "up"], check=True)
            iperf = subprocess.Popen(
                [*prefix, "iperf3", "-s", "-1", "-B", "192.0.2.1"],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            try:
                result = run_guest(
                    TAP_LISTENER.format(seconds=seconds),
                    vm="uml",
                    nics=[VhostUserNic(str(sock))],
                    timeout=seconds + 60,
                    host_share=True,
                )
            finally:
                iperf.kill()
                iperf.wait()
        return _bits_per_s(result)
    finally:
        subprocess.run(["ip", "netns", "del", ns], timeout=10, check=False)


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="virtio bench net-guests", description=__doc__)
    p.add_argument("--seconds", type=int, default=5, help="iperf3 run time (default 5)")
    p.add_argument("--tap", action="store_true", help="also a UML guest to a TAP's host end")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    if os.geteuid() != 0 and args.tap:
        p.error("--tap needs root (a network namespace and a TAP)")
    out: dict[str, float] = {}
    try:
        with tempfile.TemporaryDirectory(prefix="pyvirtio-netguests-") as tmp:
            out["switch_bits_per_s"] = measure_switch(Path(tmp), args.seconds)
            out["testpmd_bits_per_s"] = measure_testpmd(Path(tmp), args.seconds)
            if args.tap:
                out["tap_bits_per_s"] = measure_tap(Path(tmp), args.seconds)
    except (RuntimeError, OSError, subprocess.SubprocessError, json.JSONDecodeError) as err:
        print(f"virtio bench net-guests: {err}", file=sys.stderr)
        return 1
    out["ratio"] = round(out["switch_bits_per_s"] / out["testpmd_bits_per_s"], 3)
    if args.json:
        print(json.dumps(out))
        return 0
    print("| path (QEMU TCG guests, iperf3 TCP) | Mbit/s |")
    print("| --- | ---: |")
    print(f"| two guests, `virtio serve net --switch` | {out['switch_bits_per_s'] / 1e6:,.0f} |")
    print(
        f"| two guests, testpmd io with two vhost ports | {out['testpmd_bits_per_s'] / 1e6:,.0f} |"
    )
    if "tap_bits_per_s" in out:
        print(f"| UML guest to the TAP's host end | {out['tap_bits_per_s'] / 1e6:,.0f} |")
    print(f"ratio switch / testpmd: {out['ratio']}")
    return 0
