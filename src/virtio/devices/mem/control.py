"""The memory device's control socket: a line protocol on a Unix socket, and its client.

One command a line, one line back::

    set 64M   ->  ok requested 64.0M (32 blocks)
    status    ->  requested=67108864 plugged=33554432 usable=100663296 region=536870912 ...

Served from the device's own host loop (its sockets are watched through
``device.events``), so a new requested size reaches the driver, as a
configuration change notification. The vhost-user server watches those
sockets only while a front-end is connected: commands sent with none wait
(and the client times out).
``virtio mem set 64M --control PATH`` is the client (:func:`main`).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import logging
import os
import socket
import sys
from pathlib import Path

from virtio.devices.balloon.wire import format_size, parse_size
from virtio.devices.mem.device import MemDevice

log = logging.getLogger("virtio.mem")

MAX_LINE = 256
MAX_CLIENTS = 8


class MemControl:
    """Listens on ``path`` and applies each command to ``device``."""

    def __init__(self, path: str | os.PathLike[str], device: MemDevice) -> None:
        self.path = Path(path)
        self.device = device
        if self.path.is_socket():
            self.path.unlink()  # a stale socket from an earlier run
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            self.listener.bind(str(self.path))
            self.listener.listen(MAX_CLIENTS)
            self.listener.setblocking(False)
        except OSError:
            self.listener.close()
            raise
        self._clients: dict[int, tuple[socket.socket, bytearray]] = {}
        device.events.watch(self.listener.fileno(), self._accept)
        device.closers.append(self.close)

    def close(self) -> None:
        for fd in list(self._clients):
            self._drop(fd)
        if self.listener.fileno() >= 0:
            self.device.events.unwatch(self.listener.fileno())
            self.listener.close()
            with contextlib.suppress(OSError):
                self.path.unlink()

    def _accept(self, _now: float) -> None:
        try:
            conn, _ = self.listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        except OSError as err:
            log.info("control socket: accept failed: %s", err)
            return
        if len(self._clients) >= MAX_CLIENTS:
            conn.close()
            return
        conn.setblocking(False)
        fd = conn.fileno()
        self._clients[fd] = (conn, bytearray())
        self.device.events.watch(fd, functools.partial(self._readable, fd))

    def _drop(self, fd: int) -> None:
        conn, _ = self._clients.pop(fd)
        self.device.events.unwatch(fd)
        conn.close()

    def _readable(self, fd: int, _now: float) -> None:
        conn, pending = self._clients[fd]
        try:
            data = conn.recv(4096)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self._drop(fd)
            return
        pending += data
        while b"\n" in pending:
            line, _, rest = bytes(pending).partition(b"\n")
            pending[:] = rest
            if len(line) > MAX_LINE:
                break
            if not self._reply(fd, self.command(line.decode("utf-8", "replace"))):
                return
        else:
            if len(pending) <= MAX_LINE:
                return
        if fd in self._clients:
            self._reply(fd, "error: line too long")
            self._drop(fd)

    def _reply(self, fd: int, text: str) -> bool:
        conn, _ = self._clients[fd]
        try:
            conn.sendall((text + "\n").encode())
        except OSError:
            self._drop(fd)  # a client that does not read its answers
            return False
        return True

    def command(self, line: str) -> str:
        """The answer to one command line."""
        words = line.split()
        if not words:
            return "error: empty command (set SIZE, status)"
        verb, args = words[0].lower(), words[1:]
        device = self.device
        try:
            if verb == "set" and len(args) == 1:
                size = parse_size(args[0])
                device.set_requested_size(size)
                blocks = size // device.block_size
                return f"ok requested {format_size(size)} ({blocks} blocks)"
            if verb == "status" and not args:
                return (
                    f"requested={device.requested_size} plugged={device.plugged_size} "
                    f"usable={device.usable_region_size} region={device.region_size} "
                    f"block={device.block_size} addr={device.addr:#x}"
                )
        except ValueError as err:
            return f"error: {err}"
        return f"error: unknown command {line.strip()[:64]!r}"


def request(path: str | os.PathLike[str], line: str, timeout: float = 10.0) -> str:
    """Send one command to a control socket; its one-line answer."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(str(path))
        sock.sendall(line.strip().encode() + b"\n")
        answer = bytearray()
        while not answer.endswith(b"\n"):
            chunk = sock.recv(4096)
            if not chunk:
                break
            answer += chunk
    return answer.decode("utf-8", "replace").strip()


def main(argv: list[str]) -> int:
    """`virtio mem set SIZE --control PATH` (and `virtio mem status`)."""
    p = argparse.ArgumentParser(
        prog="virtio mem", description="talk to `virtio serve mem --control PATH`"
    )
    p.add_argument("command", choices=("set", "status"))
    p.add_argument("value", nargs="?", help="set: the requested size (64M, 1G)")
    p.add_argument("--control", required=True, help="the memory device's control socket")
    p.add_argument("--timeout", type=float, default=10.0)
    args = p.parse_args(argv)
    if args.command == "set" and args.value is None:
        p.error("set needs a size (e.g. 64M)")
    line = " ".join(x for x in (args.command, args.value) if x)
    try:
        answer = request(args.control, line, args.timeout)
    except OSError as err:
        print(f"virtio mem: {args.control}: {err}", file=sys.stderr)
        return 1
    print(answer)
    return 1 if not answer or answer.startswith("error") else 0
