"""Fixtures for real-guest tests: cached guest assets and `virtio serve blk` processes."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from virtio.vm import GuestAssets, prepare


@pytest.fixture(scope="session")
def guest_assets() -> GuestAssets:
    return prepare()


@dataclass
class ServeProcess:
    """A `virtio serve TYPE` process, restartable (it is a real process)."""

    image: Path | None
    socket: Path
    args: list[str]
    log: Path
    proc: subprocess.Popen[bytes] | None = None
    kind: str = "blk"
    #: A command the server runs under (``ip netns exec NS``).
    prefix: list[str] = field(default_factory=list)

    def start(self) -> None:
        cmd = [sys.executable, "-m", "virtio.cli", "serve", self.kind, "--socket", str(self.socket)]
        image = [] if self.image is None else [str(self.image)]
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [*self.prefix, *cmd, *self.args, *image],
                stdout=log,
                stderr=log,
                start_new_session=True,
            )
        deadline = time.monotonic() + 15
        while not self.socket.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(
                    f"virtio serve {self.kind} did not start: {self.log.read_text()}"
                )
            time.sleep(0.05)

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, sig)
            self.proc.wait(timeout=10)

    def stop(self) -> int | None:
        """SIGTERM: a clean stop (flush, remove the socket)."""
        if self.proc is None:
            return None
        self.kill(signal.SIGTERM)
        return self.proc.returncode

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")


@dataclass
class BlkServer(ServeProcess):
    """A `virtio serve blk` process on an image."""

    image: Path


@pytest.fixture
def blk_server(tmp_path: Path) -> Iterator[Callable[..., BlkServer]]:
    servers: list[BlkServer] = []

    def start(*args: str, size: int = 64 << 20, image: Path | None = None) -> BlkServer:
        img = image or tmp_path / f"disk{len(servers)}.img"
        if image is None:
            with open(img, "wb") as f:
                f.truncate(size)
        server = BlkServer(
            img,
            tmp_path / f"vblk{len(servers)}.sock",
            list(args),
            tmp_path / f"serve{len(servers)}.log",
        )
        server.start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.kill()
