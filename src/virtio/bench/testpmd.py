"""DPDK's testpmd as a C peer for pyvirtio's net device and driver.

testpmd with the vhost PMD (``--vdev net_vhost0,iface=SOCK``) is a vhost-user
back-end listening on SOCK; with the virtio-user PMD
(``--vdev net_virtio_user0,path=SOCK``) it is a virtio-net driver (vhost-user
front-end) connecting to SOCK. Both run without hugepages (``--no-huge -m 512``):
EAL then backs its memory with a shared memfd ("memfd:nohuge"), whose fd the
virtio-user PMD sends in VHOST_USER_SET_MEM_TABLE, so no other option is needed
for the two to share buffers. testpmd needs two lcores (a main one and a
forwarding one); ``cores="N"`` puts both on CPU N (the main lcore sleeps).

Counters come from DPDK's telemetry socket (``/ethdev/stats,PORT``, JSON, read
on demand), or, if that is missing, from the last "NIC statistics" block testpmd
prints every ``--stats-period`` seconds.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Self

#: Every prefix this process gives testpmd starts with this (a test can look for leftovers).
PREFIX_BASE = f"pyvirtio-{os.getpid()}"
_counter = itertools.count()

_READY = re.compile(rb"packet forwarding - ports=|Press enter to exit|Port statistics =")
_NIC_BLOCK = re.compile(
    r"NIC statistics for port (\d+)\s+#+\s+"
    r"RX-packets:\s*(\d+)\s+RX-missed:\s*(\d+)\s+RX-bytes:\s*(\d+)\s+"
    r"RX-errors:\s*(\d+)\s+RX-nombuf:\s*(\d+)\s+"
    r"TX-packets:\s*(\d+)\s+TX-errors:\s*(\d+)\s+TX-bytes:\s*(\d+)"
)
_FWD_BLOCK = re.compile(
    r"Forward statistics for port (\d+)\s+-+\s+"
    r"RX-packets:\s*(\d+)\s+RX-dropped:\s*(\d+)\s+RX-total:\s*\d+\s+"
    r"TX-packets:\s*(\d+)\s+TX-dropped:\s*(\d+)"
)


def find_testpmd() -> str | None:
    """The testpmd binary on PATH (Debian's dpdk package names it dpdk-testpmd)."""
    return shutil.which("dpdk-testpmd") or shutil.which("testpmd")


def dpdk_runtime_dir(prefix: str) -> Path:
    """Where EAL keeps a process's runtime files (config, sockets) for ``prefix``."""
    base = "/var/run" if os.geteuid() == 0 else os.environ.get("XDG_RUNTIME_DIR", "/tmp")
    return Path(base) / "dpdk" / prefix


@dataclass(frozen=True)
class PortStats:
    """One port's counters (rte_eth_stats)."""

    rx_packets: int
    tx_packets: int
    rx_bytes: int
    tx_bytes: int
    rx_missed: int = 0
    rx_errors: int = 0
    tx_errors: int = 0
    rx_nombuf: int = 0


@dataclass(frozen=True)
class ForwardStats:
    """One port's totals from the "Forward statistics" testpmd prints when it stops."""

    rx_packets: int
    rx_dropped: int
    tx_packets: int
    tx_dropped: int


def _lcore_args(cores: str) -> list[str]:
    """EAL core options: one CPU gets both lcores (main and forwarding), more go to -l."""
    if cores.isdigit():
        return [f"--lcores=0@{cores},1@{cores}"]
    return ["-l", cores]


class Testpmd:
    """A dpdk-testpmd process: started on enter (once ready), stopped and cleaned on exit.

    ``args`` go to testpmd (``--txpkts=1500``, ``--burst=64``, ``--rxq=2``,
    ``--stats-period=1``), ``eal_args`` to EAL before them.
    """

    def __init__(
        self,
        vdev: str | Sequence[str],
        forward_mode: str,
        *,
        cores: str = "0",
        prefix: str | None = None,
        args: Sequence[str] = (),
        eal_args: Sequence[str] = (),
        log: Path | None = None,
        memory_mb: int = 512,
        mbufs: int = 16384,
        binary: str | None = None,
        ready_timeout: float = 30.0,
        stop_timeout: float = 10.0,
        die_with_parent: bool = True,
    ) -> None:
        self.vdevs = [vdev] if isinstance(vdev, str) else list(vdev)
        self.forward_mode = forward_mode
        self.cores = cores
        self.prefix = prefix or f"{PREFIX_BASE}-{next(_counter)}"
        self.args = list(args)
        self.eal_args = list(eal_args)
        # A log of our own choosing is removed after a clean stop; one given is kept.
        self._own_log = log is None
        self.log = log or Path(tempfile.gettempdir()) / f"{self.prefix}.log"
        self.memory_mb = memory_mb
        self.mbufs = mbufs
        self.binary = binary or find_testpmd()
        self.ready_timeout = ready_timeout
        self.stop_timeout = stop_timeout
        self.die_with_parent = die_with_parent
        self.proc: subprocess.Popen[bytes] | None = None
        self.returncode: int | None = None
        self.final_stats: dict[int, ForwardStats] = {}
        self._telemetry: socket.socket | None = None
        self._max_output = 16384

    @property
    def runtime_dir(self) -> Path:
        return dpdk_runtime_dir(self.prefix)

    def command(self) -> list[str]:
        """The full command line (EAL options, then testpmd's own after ``--``)."""
        if self.binary is None:
            raise RuntimeError("dpdk-testpmd is not installed (apt-get install dpdk-dev)")
        eal = [
            self.binary,
            *_lcore_args(self.cores),
            "--no-huge",
            "-m",
            str(self.memory_mb),
            "--no-pci",
            f"--file-prefix={self.prefix}",
        ]
        for v in self.vdevs:
            eal += ["--vdev", v]
        eal += self.eal_args
        app = [f"--total-num-mbufs={self.mbufs}", f"--forward-mode={self.forward_mode}", "-a"]
        return [*eal, "--", *app, *self.args]

    def start(self) -> None:
        """Start testpmd and wait until it forwards (or raise with its log tail)."""
        cmd = self.command()
        if shutil.which("stdbuf"):
            # testpmd's stdout to a file is block-buffered: line-buffer it to see the log live.
            cmd = ["stdbuf", "-oL", "-eL", *cmd]
        if self.die_with_parent and shutil.which("setpriv"):
            # SIGKILL testpmd if we die first: a stray busy-polling process eats a core.
            cmd = ["setpriv", "--pdeathsig", "KILL", "--", *cmd]
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log, "wb") as out:
            # stdin stays an open pipe: without -i or --stats-period, testpmd exits at stdin's EOF.
            self.proc = subprocess.Popen(
                cmd, stdin=subprocess.PIPE, stdout=out, stderr=out, start_new_session=True
            )
        deadline = time.monotonic() + self.ready_timeout
        while True:
            if self.proc.poll() is not None:
                self._cleanup()
                raise RuntimeError(
                    f"testpmd exited ({self.proc.returncode}) before it was ready:\n"
                    f"{self.log_tail()}"
                )
            if self._ready():
                return
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(
                    f"testpmd not ready after {self.ready_timeout} s:\n{self.log_tail()}"
                )
            time.sleep(0.05)

    def _ready(self) -> bool:
        """Every port started (telemetry), or, without telemetry, forwarding in the log."""
        if self._connect_telemetry(required=False) and self._telemetry is not None:
            ports = self.ports()
            return bool(ports) and all(
                self.telemetry(f"/ethdev/info,{p}").get("dev_started") == 1 for p in ports
            )
        return "--no-telemetry" in self.eal_args and bool(_READY.search(self.log.read_bytes()))

    def stop(self) -> int | None:
        """SIGINT (testpmd prints its totals and exits), SIGKILL if it does not; clean up."""
        proc = self.proc
        if proc is None:
            return None
        if self._telemetry is not None:
            self._telemetry.close()
            self._telemetry = None
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=self.stop_timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
        if proc.stdin is not None:
            with contextlib.suppress(OSError):
                proc.stdin.close()
        self.returncode = proc.returncode
        self.final_stats = self._forward_stats()
        self._cleanup()
        if self._own_log and self.returncode == 0:
            self.log.unlink(missing_ok=True)
        return self.returncode

    def _cleanup(self) -> None:
        shutil.rmtree(self.runtime_dir, ignore_errors=True)

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

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_tail(self, lines: int = 40) -> str:
        """The last ``lines`` lines of testpmd's output."""
        try:
            text = self.log.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.replace("\x1b[2J\x1b[1;1H", "").splitlines()[-lines:])

    # Telemetry: a SOCK_SEQPACKET socket, one JSON reply per command.

    def _connect_telemetry(self, *, required: bool) -> bool:
        if self._telemetry is not None:
            return True
        path = self.runtime_dir / "dpdk_telemetry.v2"
        if not path.exists():
            if required:
                raise RuntimeError(f"no telemetry socket {path}")
            return False
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        sock.settimeout(5)
        try:
            sock.connect(str(path))
            hello = json.loads(sock.recv(4096))
        except (OSError, ValueError):
            sock.close()
            if required:
                raise
            return False
        self._max_output = int(hello.get("max_output_len", 16384))
        self._telemetry = sock
        return True

    def telemetry(self, command: str) -> Any:
        """Run one telemetry command (e.g. "/ethdev/stats,0"); its decoded value."""
        self._connect_telemetry(required=True)
        assert self._telemetry is not None
        self._telemetry.send(command.encode())
        reply = json.loads(self._telemetry.recv(self._max_output + 1024))
        return next(iter(reply.values()))

    def ports(self) -> list[int]:
        return [int(p) for p in self.telemetry("/ethdev/list")]

    def link_up(self, port: int = 0) -> bool:
        return bool(self.telemetry(f"/ethdev/link_status,{port}").get("status") == "UP")

    def wait_link_up(self, port: int = 0, timeout: float = 15.0) -> None:
        """Wait for the port's link (a vhost port's comes up at the front-end's DRIVER_OK)."""
        deadline = time.monotonic() + timeout
        while not self.link_up(port):
            if not self.running() or time.monotonic() > deadline:
                raise RuntimeError(f"testpmd port {port} link not up:\n{self.log_tail()}")
            time.sleep(0.02)

    def stats(self) -> dict[int, PortStats]:
        """Each port's counters now (telemetry), or as of testpmd's last periodic print."""
        if self._telemetry is not None or (self.runtime_dir / "dpdk_telemetry.v2").exists():
            out: dict[int, PortStats] = {}
            for port in self.ports():
                s = self.telemetry(f"/ethdev/stats,{port}")
                out[port] = PortStats(
                    rx_packets=s["ipackets"],
                    tx_packets=s["opackets"],
                    rx_bytes=s["ibytes"],
                    tx_bytes=s["obytes"],
                    rx_missed=s["imissed"],
                    rx_errors=s["ierrors"],
                    tx_errors=s["oerrors"],
                    rx_nombuf=s["rx_nombuf"],
                )
            return out
        return self.logged_stats()

    def logged_stats(self) -> dict[int, PortStats]:
        """The last "NIC statistics" block per port in the log (needs --stats-period)."""
        out: dict[int, PortStats] = {}
        for m in _NIC_BLOCK.finditer(self.log.read_text(errors="replace")):
            port, rxp, missed, rxb, rxerr, nombuf, txp, txerr, txb = map(int, m.groups())
            out[port] = PortStats(rxp, txp, rxb, txb, missed, rxerr, txerr, nombuf)
        return out

    def _forward_stats(self) -> dict[int, ForwardStats]:
        out: dict[int, ForwardStats] = {}
        with contextlib.suppress(OSError):
            for m in _FWD_BLOCK.finditer(self.log.read_text(errors="replace")):
                port, rxp, rxd, txp, txd = map(int, m.groups())
                out[port] = ForwardStats(rxp, rxd, txp, txd)
        return out


def _sample(*pmds: Testpmd) -> tuple[float, list[PortStats]]:
    """Port 0's counters of each testpmd, with the time they were read."""
    t0 = time.monotonic()
    stats = [p.stats()[0] for p in pmds]
    return (t0 + time.monotonic()) / 2, stats


def _wait_traffic(pmd: Testpmd, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while pmd.stats()[0].rx_packets == 0:
        if not pmd.running() or time.monotonic() > deadline:
            raise RuntimeError(f"no packets reached testpmd:\n{pmd.log_tail()}")
        time.sleep(0.02)


def _pair(
    tmpdir: Path, device_mode: str, driver_mode: str, size: int, extra: Sequence[str]
) -> tuple[Testpmd, Testpmd]:
    sock = tmpdir / "testpmd-vhost.sock"
    sock.unlink(missing_ok=True)
    device = Testpmd(
        f"net_vhost0,iface={sock}",
        device_mode,
        cores="0",
        log=tmpdir / "testpmd-vhost.log",
    )
    driver = Testpmd(
        f"net_virtio_user0,path={sock}",
        driver_mode,
        cores="1",
        args=[f"--txpkts={size}", *extra],
        log=tmpdir / "testpmd-virtio-user.log",
    )
    return device, driver


def _window(
    device: Testpmd, driver: Testpmd, seconds: float, warmup: float
) -> tuple[float, list[PortStats], list[PortStats]]:
    """Start both, let traffic settle, and sample both sides' counters ``seconds`` apart."""
    with device, driver:
        device.wait_link_up()
        _wait_traffic(device)
        time.sleep(warmup)
        t0, first = _sample(device, driver)
        time.sleep(seconds)
        t1, last = _sample(device, driver)
    return t1 - t0, first, last


def measure_c_pair(
    size: int, seconds: float, tmpdir: Path, *, warmup: float = 0.5
) -> dict[str, float]:
    """C vs C device side: virtio-user ``txonly`` (CPU 1) into a vhost ``rxonly`` (CPU 0).

    ``rx_pps`` is what the vhost side received per second, after ``warmup``.
    """
    device, driver = _pair(tmpdir, "rxonly", "txonly", size, ())
    dt, (d0, u0), (d1, u1) = _window(device, driver, seconds, warmup)
    return {
        "size": size,
        "seconds": dt,
        "rx_pps": (d1.rx_packets - d0.rx_packets) / dt,
        "rx_bps": (d1.rx_bytes - d0.rx_bytes) * 8 / dt,
        "tx_pps": (u1.tx_packets - u0.tx_packets) / dt,
        "rx_packets": d1.rx_packets - d0.rx_packets,
    }


def measure_c_driver(
    size: int, seconds: float, tmpdir: Path, *, mode: str = "flowgen", warmup: float = 0.5
) -> dict[str, float]:
    """C vs C driver side: virtio-user (CPU 1) sending through a vhost ``macswap`` (CPU 0).

    ``tx_pps``/``rx_pps`` are what the virtio-user side sent and got back per second.
    ``mode`` is the virtio-user's forward mode: ``flowgen`` sends and receives;
    ``txonly`` never polls its RX queue, so its rx_pps is 0 (the vhost side drops).
    """
    device, driver = _pair(tmpdir, "macswap", mode, size, ())
    dt, (d0, u0), (d1, u1) = _window(device, driver, seconds, warmup)
    return {
        "size": size,
        "seconds": dt,
        "tx_pps": (u1.tx_packets - u0.tx_packets) / dt,
        "rx_pps": (u1.rx_packets - u0.rx_packets) / dt,
        "device_rx_pps": (d1.rx_packets - d0.rx_packets) / dt,
        "device_tx_pps": (d1.tx_packets - d0.tx_packets) / dt,
    }
