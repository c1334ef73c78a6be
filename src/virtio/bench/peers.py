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


def _start(cmd: list[str], sock: Path, log: Path, stack: ExitStack) -> None:
    out = stack.enter_context(open(log, "wb"))  # noqa: SIM115 (closed by the stack)
    proc = subprocess.Popen(cmd, stdout=out, stderr=out, start_new_session=True)

    def stop() -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=10)

    stack.callback(stop)
    deadline = time.monotonic() + 15
    while not sock.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"{cmd[0]} did not start: {log.read_text()}")
        time.sleep(0.05)


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
        _start(
            [
                "qemu-storage-daemon",
                "--blockdev",
                f"driver=file,node-name=file0,filename={image}",
                "--blockdev",
                "driver=raw,node-name=disk0,file=file0",
                "--export",
                "type=vhost-user-blk,id=exp0,addr.type=unix,"
                f"addr.path={found.qsd_socket},node-name=disk0,writable=on",
            ],
            found.qsd_socket,
            work / "qsd.log",
            stack,
        )
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
