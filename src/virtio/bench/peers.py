"""Back-end processes the benchmarks compare: qemu-storage-daemon and `virtio serve blk`."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Backends:
    image: Path
    qsd_socket: Path
    pyvirtio_socket: Path


def start_process(cmd: list[str], sock: Path, log: Path) -> subprocess.Popen[bytes]:
    """Start a back-end in its own session; return once its socket exists."""
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=out, start_new_session=True)
    deadline = time.monotonic() + 15
    while not sock.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            stop_process(proc)
            raise RuntimeError(f"{cmd[0]} did not start: {log.read_text()}")
        time.sleep(0.05)
    return proc


def stop_process(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM its process group (a clean stop), SIGKILL if it does not go."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


def qsd_command(image: Path, sock: Path) -> list[str]:
    """qemu-storage-daemon exporting ``image`` as vhost-user-blk on ``sock``."""
    return [
        "qemu-storage-daemon",
        "--blockdev",
        f"driver=file,node-name=file0,filename={image}",
        "--blockdev",
        "driver=raw,node-name=disk0,file=file0",
        "--export",
        f"type=vhost-user-blk,id=exp0,addr.type=unix,addr.path={sock},node-name=disk0,writable=on",
    ]


def _start(cmd: list[str], sock: Path, log: Path, stack: ExitStack) -> None:
    proc = start_process(cmd, sock, log)
    stack.callback(stop_process, proc)


@contextmanager
def backends(*, image_size: int = 256 << 20, packed: bool = True) -> Iterator[Backends]:
    """Both back-ends on one scratch image; stopped (SIGTERM) on exit.

    ``packed=False`` keeps pyvirtio to split rings, like qemu-storage-daemon.
    """
    if shutil.which("qemu-storage-daemon") is None:
        raise RuntimeError("qemu-storage-daemon is not installed (./dev setup)")
    with ExitStack() as stack:
        work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="pyvirtio-bench-")))
        image = work / "disk.img"
        with open(image, "wb") as f:
            f.truncate(image_size)
        found = Backends(image, work / "qsd.sock", work / "pyvirtio.sock")
        _start(qsd_command(image, found.qsd_socket), found.qsd_socket, work / "qsd.log", stack)
        serve = [sys.executable, "-m", "virtio.cli", "serve", "blk"]
        _start(
            [
                *serve,
                "--socket",
                str(found.pyvirtio_socket),
                *([] if packed else ["--no-packed"]),
                str(image),
            ],
            found.pyvirtio_socket,
            work / "pyvirtio.log",
            stack,
        )
        yield found
