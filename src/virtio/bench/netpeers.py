"""`virtio bench net-peers`: pyvirtio's net device and driver next to DPDK's, with testpmd.

    virtio bench net-peers [--runtime 3] [--sizes 64,1500] [--json] [--profile DIR]

For each frame size it measures, in one run:

* the device side: testpmd's virtio-user PMD in ``txonly`` mode (CPU 1) sending
  into ``virtio serve net`` with one socket, a sink that counts and drops (CPU 0),
  next to the same testpmd sending into testpmd's vhost PMD in ``rxonly`` mode
  (CPU 0). The sink's rate is testpmd's transmit counter over the window: a
  packet counts once the device has taken its descriptor back from the full
  ring, so it is what the device accepted (checked against the count the
  device logs when testpmd goes away);
* the driver side: the pyvirtio net driver (``virtio bench net``'s loop, in this
  process, on CPU 1) sending through testpmd's vhost PMD in ``macswap`` mode
  (CPU 0) and taking every frame back, next to testpmd's virtio-user PMD in
  ``flowgen`` mode doing the same against the same kind of macswap testpmd.

The ratio is C's packets per second over pyvirtio's (how many times faster
C is). With ``--profile DIR`` the pyvirtio sides run under cProfile (the sink
as ``python -m cProfile``, the driver in process) and DIR gets
``sink-SIZE.prof`` and ``driver-SIZE.prof``; their figures then include the
profiler's cost.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import io
import json
import os
import pstats
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from virtio.bench.net import run
from virtio.bench.testpmd import Testpmd, find_testpmd
from virtio.devices.net import wire as W
from virtio.devices.net.driver import NetDriver
from virtio.errors import VirtioError
from virtio.spec.device_ids import DeviceId

#: Where each side runs: the device (vhost side, sink) and the driver (virtio-user side).
DEVICE_CORE = 0
DRIVER_CORE = 1

#: The line a net device logs at reset when it moved frames (device.py's on_reset).
_COUNTS = re.compile(
    r"virtio\.net \w+ (?P<mac>[0-9a-f:]{17}|net): sent (?P<sent>\d+) frames.*?"
    r"received (?P<received>\d+)(?:.*?dropped (?P<tx_dropped>\d+) sent "
    r"and (?P<rx_dropped>\d+) received)?"
)


@dataclass(frozen=True)
class DeviceCounts:
    """One device's totals from its reset log line."""

    mac: str
    sent: int
    received: int
    tx_dropped: int = 0
    rx_dropped: int = 0


def parse_counts(text: str) -> list[DeviceCounts]:
    """Every "MAC: sent N frames, received M ..." line of a `virtio serve net` log."""
    out = []
    for m in _COUNTS.finditer(text):
        out.append(
            DeviceCounts(
                m["mac"],
                int(m["sent"]),
                int(m["received"]),
                int(m["tx_dropped"] or 0),
                int(m["rx_dropped"] or 0),
            )
        )
    return out


def pinned(core: int | None, cmd: Sequence[str]) -> list[str]:
    """``cmd`` on one CPU (taskset), killed if this process dies first (setpriv)."""
    out = list(cmd)
    if core is not None:
        out = ["taskset", "-c", str(core), *out]
    if shutil.which("setpriv"):
        out = ["setpriv", "--pdeathsig", "KILL", "--", *out]
    return out


class NetServe:
    """A `virtio serve net` process on one or more sockets, pinned to ``core``.

    Started on enter (once every socket exists), stopped with SIGTERM on exit
    (SIGKILL if it does not go within ``stop_timeout``). ``profile`` runs it
    under cProfile, writing the stats there when it stops.
    """

    def __init__(
        self,
        sockets: Sequence[Path],
        log: Path,
        *,
        args: Sequence[str] = (),
        core: int | None = DEVICE_CORE,
        profile: Path | None = None,
        start_timeout: float = 15.0,
        stop_timeout: float = 10.0,
    ) -> None:
        self.sockets = list(sockets)
        self.log = log
        self.args = list(args)
        self.core = core
        self.profile = profile
        self.start_timeout = start_timeout
        self.stop_timeout = stop_timeout
        self.proc: subprocess.Popen[bytes] | None = None

    def command(self) -> list[str]:
        python = [sys.executable]
        if self.profile is not None:
            python += ["-m", "cProfile", "-o", str(self.profile)]
        cmd = [*python, "-m", "virtio.cli", "serve", "net"]
        for sock in self.sockets:
            cmd += ["--socket", str(sock)]
        return pinned(self.core, [*cmd, *self.args])

    def start(self) -> None:
        for sock in self.sockets:
            sock.unlink(missing_ok=True)
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(
                self.command(), stdout=out, stderr=out, start_new_session=True
            )
        deadline = time.monotonic() + self.start_timeout
        while not all(s.exists() for s in self.sockets):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"virtio serve net did not start:\n{self.log_text()}")
            time.sleep(0.05)

    def stop(self) -> int | None:
        proc = self.proc
        if proc is None:
            return None
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=self.stop_timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
        return proc.returncode

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def log_text(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except OSError:
            return "(no log)"

    def counts(self) -> list[DeviceCounts]:
        return parse_counts(self.log_text())

    def wait_counts(self, n: int = 1, timeout: float = 10.0) -> list[DeviceCounts]:
        """The first ``n`` reset lines (a device logs one when its front-end goes away)."""
        deadline = time.monotonic() + timeout
        while True:
            exited = self.proc is None or self.proc.poll() is not None
            found = self.counts()
            if len(found) >= n:
                return found
            if exited or time.monotonic() > deadline:
                raise RuntimeError(f"no counters in the device's log:\n{self.log_text()}")
            time.sleep(0.05)


# -- the pyvirtio driver on a DPDK back-end --------------------------------------------------


class PeerNetDriver(NetDriver):
    """The net driver, doing without VIRTIO_NET_F_MTU where the device's mtu is not valid.

    A vhost-user back-end without VHOST_USER_PROTOCOL_F_CONFIG (DPDK's vhost
    PMD) offers VIRTIO_NET_F_MTU, expecting the VMM to own the config space,
    while our front-end reads that space as zeros: an mtu of 0, below the 68 a
    device must offer. Linux's virtnet_validate clears the feature then; so does
    this driver, before FEATURES_OK.
    """

    def choose_features(self, offered: int) -> int:
        accept = super().choose_features(offered)
        if accept >> W.MTU & 1:
            mtu = int.from_bytes(self.read_config(W.CFG_MTU, 2), self.byteorder)
            if mtu < 68:
                accept &= ~(1 << W.MTU)
        return accept


@contextlib.contextmanager
def peer_driver(
    path: str,
    *,
    queue_size: int = 256,
    memory: int = 256 << 20,
    avoid_features: int = 0,
) -> Iterator[NetDriver]:
    """A started one-pair net driver over a vhost-user front-end connected to ``path``."""
    from virtio.vhost_user.frontend import VhostUserFrontend

    frontend = VhostUserFrontend(
        path, device_id=DeviceId.NET, memory_size=memory, queue_max_size=queue_size
    )
    try:
        # The front-end keeps no control queue of its own: one pair, data queues only.
        driver = PeerNetDriver(
            frontend,
            queue_pairs=1,
            avoid_features=avoid_features | 1 << W.CTRL_VQ | 1 << W.MQ,
        )
        driver.initialize()
        driver.start()
        yield driver
    finally:
        frontend.close()


@contextlib.contextmanager
def on_core(core: int | None) -> Iterator[None]:
    """Run the calling thread on one CPU for the block's duration."""
    if core is None:
        yield
        return
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {core})
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


# -- measurements ------------------------------------------------------------------------------


def _port0(pmd: Testpmd) -> tuple[float, int, int]:
    """(time, TX packets, RX packets) of testpmd's port 0."""
    t0 = time.monotonic()
    s = pmd.stats()[0]
    return (t0 + time.monotonic()) / 2, s.tx_packets, s.rx_packets


def _wait_tx(pmd: Testpmd, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while pmd.stats()[0].tx_packets == 0:
        if not pmd.running() or time.monotonic() > deadline:
            raise RuntimeError(f"testpmd sent nothing:\n{pmd.log_tail()}")
        time.sleep(0.02)


def measure_py_sink(
    size: int,
    seconds: float,
    tmpdir: Path,
    *,
    warmup: float = 0.5,
    serve_args: Sequence[str] = (),
    profile: Path | None = None,
) -> dict[str, Any]:
    """testpmd virtio-user ``txonly`` (CPU 1) into a `virtio serve net` sink (CPU 0).

    ``rx_pps``: packets the sink took per second after ``warmup`` (testpmd's TX
    counter); ``sink_frames``/``testpmd_tx``: the totals the device logged and
    testpmd counted over the whole run.
    """
    sock = tmpdir / "pyvirtio-sink.sock"
    serve = NetServe([sock], tmpdir / "serve-sink.log", args=serve_args, profile=profile)
    with serve:
        pmd = Testpmd(
            f"net_virtio_user0,path={sock}",
            "txonly",
            cores=str(DRIVER_CORE),
            args=[f"--txpkts={size}"],
            log=tmpdir / "testpmd-txonly.log",
        )
        with pmd:
            _wait_tx(pmd)
            time.sleep(warmup)
            t0, tx0, _ = _port0(pmd)
            time.sleep(seconds)
            t1, tx1, _ = _port0(pmd)
            last_tx = tx1
        # testpmd's "Forward statistics" when it stopped, else the last sample.
        final = pmd.final_stats.get(0)
        testpmd_tx = final.tx_packets if final is not None else last_tx
        counts = serve.wait_counts(1)[0]
    dt = t1 - t0
    return {
        "size": size,
        "seconds": dt,
        "rx_pps": (tx1 - tx0) / dt,
        "rx_bps": (tx1 - tx0) * size * 8 / dt,
        "testpmd_tx": testpmd_tx,
        "sink_frames": counts.sent,
        "sink_dropped": counts.tx_dropped,
    }


def measure_py_driver(
    size: int,
    seconds: float,
    tmpdir: Path,
    *,
    burst: int = 32,
    warmup: float = 0.5,
    avoid_features: int = 0,
    profile: Path | None = None,
) -> dict[str, Any]:
    """The pyvirtio driver (this process, CPU 1) through a vhost ``macswap`` testpmd (CPU 0).

    ``tx_pps``/``rx_pps``: what the driver sent and got back per second after
    ``warmup``; ``device_rx``/``device_tx``: testpmd's counts over the window.
    """
    sock = tmpdir / "testpmd-macswap.sock"
    sock.unlink(missing_ok=True)
    pmd = Testpmd(
        f"net_vhost0,iface={sock}",
        "macswap",
        cores=str(DEVICE_CORE),
        log=tmpdir / "testpmd-macswap.log",
    )
    with pmd, on_core(DRIVER_CORE), peer_driver(str(sock), avoid_features=avoid_features) as drv:
        pmd.wait_link_up()
        run(drv, size=size, burst=burst, runtime=warmup, queues=1)
        _, dtx0, drx0 = _port0(pmd)
        prof = cProfile.Profile() if profile is not None else None
        if prof is not None:
            prof.enable()
        result = run(drv, size=size, burst=burst, runtime=seconds, queues=1)
        if prof is not None:
            prof.disable()
            prof.dump_stats(str(profile))
        _, dtx1, drx1 = _port0(pmd)
        negotiated = drv.negotiated
    s = result.seconds or 1e-9
    return {
        "size": size,
        "seconds": result.seconds,
        "tx_pps": result.tx_packets / s,
        "rx_pps": result.rx_packets / s,
        "tx_packets": result.tx_packets,
        "rx_packets": result.rx_packets,
        "errors": result.errors,
        "device_rx": drx1 - drx0,
        "device_tx": dtx1 - dtx0,
        "features": f"{negotiated:#x}",
    }


@dataclass(frozen=True)
class Row:
    what: str
    size: int
    pyvirtio_pps: float
    c_pps: float

    @property
    def ratio(self) -> float | None:
        """How many times C's rate is pyvirtio's."""
        return self.c_pps / self.pyvirtio_pps if self.pyvirtio_pps else None

    def as_dict(self) -> dict[str, Any]:
        ratio = self.ratio
        return {
            "what": self.what,
            "size": self.size,
            "pyvirtio_pps": round(self.pyvirtio_pps),
            "c_pps": round(self.c_pps),
            "ratio": None if ratio is None else round(ratio, 1),
        }


def measure(
    sizes: Sequence[int],
    runtime: float,
    tmpdir: Path,
    *,
    profile_dir: Path | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Every measurement for every size; the rows of the table and the raw figures."""
    from virtio.bench.testpmd import measure_c_driver, measure_c_pair

    rows: list[Row] = []
    details: dict[str, dict[str, Any]] = {}

    def say(text: str) -> None:
        if progress:
            print(text, file=sys.stderr, flush=True)

    for size in sizes:
        sink_prof = driver_prof = None
        if profile_dir is not None:
            sink_prof = profile_dir / f"sink-{size}.prof"
            driver_prof = profile_dir / f"driver-{size}.prof"
        say(f"{size} bytes: testpmd txonly -> virtio serve net")
        py_sink = measure_py_sink(size, runtime, tmpdir, profile=sink_prof)
        say(f"{size} bytes: testpmd txonly -> testpmd rxonly")
        c_sink = measure_c_pair(size, runtime, tmpdir)
        say(f"{size} bytes: pyvirtio driver -> testpmd macswap")
        py_drv = measure_py_driver(size, runtime, tmpdir, profile=driver_prof)
        say(f"{size} bytes: testpmd flowgen -> testpmd macswap")
        c_drv = measure_c_driver(size, runtime, tmpdir)
        rows += [
            Row("device: testpmd txonly into it", size, py_sink["rx_pps"], c_sink["rx_pps"]),
            Row("driver: sent through macswap", size, py_drv["tx_pps"], c_drv["tx_pps"]),
            Row("driver: received back", size, py_drv["rx_pps"], c_drv["rx_pps"]),
        ]
        details[str(size)] = {
            "device": {"pyvirtio": py_sink, "c": c_sink},
            "driver": {"pyvirtio": py_drv, "c": c_drv},
        }
    return {
        "runtime": runtime,
        "cores": {"device": DEVICE_CORE, "driver": DRIVER_CORE},
        "profiled": profile_dir is not None,
        "rows": [r.as_dict() for r in rows],
        "details": details,
    }


def print_table(result: dict[str, Any]) -> None:
    print("| what | frame bytes | pyvirtio packets/s | C packets/s | C / pyvirtio |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for row in result["rows"]:
        ratio = "-" if row["ratio"] is None else f"{row['ratio']:,.1f}x"
        print(
            f"| {row['what']} | {row['size']} | {row['pyvirtio_pps']:,} | "
            f"{row['c_pps']:,} | {ratio} |"
        )
    for size, d in result["details"].items():
        sink = d["device"]["pyvirtio"]
        print(
            f"{size} bytes: the sink logged {sink['sink_frames']:,} frames, "
            f"testpmd counted {sink['testpmd_tx']:,} sent; "
            f"driver errors {d['driver']['pyvirtio']['errors']}"
        )
    if result["profiled"]:
        print("(pyvirtio figures measured under cProfile)")


def print_profiles(profile_dir: Path, top: int = 15) -> None:
    for prof in sorted(profile_dir.glob("*.prof")):
        out = io.StringIO()
        stats = pstats.Stats(str(prof), stream=out)
        stats.strip_dirs().sort_stats("tottime").print_stats(top)
        print(f"\n## {prof.name} (by own time)\n")
        print(out.getvalue().split("\n\n", 1)[-1].rstrip())


def _sizes(text: str) -> list[int]:
    try:
        sizes = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a list of sizes: {text!r}") from None
    if not sizes or any(not 60 <= s <= 9018 for s in sizes):
        raise argparse.ArgumentTypeError("sizes must be 60..9018 bytes")
    return sizes


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="virtio bench net-peers",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--runtime", type=float, default=3.0, help="seconds per measurement (3)")
    p.add_argument(
        "--sizes", type=_sizes, default=[64, 1500], help="frame sizes, comma-separated (64,1500)"
    )
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--profile", metavar="DIR", type=Path, help="cProfile the pyvirtio sides")
    return p


def main(argv: list[str]) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    if not 0 < args.runtime <= 600:
        p.error("--runtime must be 0..600 seconds")
    if find_testpmd() is None:
        print("virtio bench net-peers: dpdk-testpmd is not installed (dpdk-dev)", file=sys.stderr)
        return 1
    if len(os.sched_getaffinity(0) & {DEVICE_CORE, DRIVER_CORE}) < 2:
        print(
            f"virtio bench net-peers: needs CPUs {DEVICE_CORE} and {DRIVER_CORE}", file=sys.stderr
        )
        return 1
    if args.profile is not None:
        args.profile.mkdir(parents=True, exist_ok=True)
    try:
        with tempfile.TemporaryDirectory(prefix="pyvirtio-net-peers-") as tmp:
            result = measure(
                args.sizes,
                args.runtime,
                Path(tmp),
                profile_dir=args.profile,
                progress=not args.json,
            )
    except (RuntimeError, OSError, subprocess.SubprocessError, VirtioError) as err:
        print(f"virtio bench net-peers: {err}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(result))
    else:
        print_table(result)
        if args.profile is not None:
            print_profiles(args.profile)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
