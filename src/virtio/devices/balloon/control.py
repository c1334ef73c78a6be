"""The balloon's control socket: a line protocol on a Unix socket, and its client.

One command a line, one line back::

    set 64M        ->  ok target 64.0M (16384 pages)
    status         ->  target=16384 actual=16384 ballooned=16384 stats=3 ...
    stats          ->  free_memory=120.5M total_memory=250.0M ...   (and asks for fresh ones)
    hint           ->  ok cmd_id 2          (start a free page hinting round)
    hint stop|done ->  ok cmd_id 0|1

The server side is served from the device's own host loop (it watches its
sockets through ``device.events``), so commands reach the device while a
front-end is connected. ``virtio balloon set 64M --control PATH`` is the
client (:func:`main`).
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

from virtio.devices.balloon import wire as W
from virtio.devices.balloon.device import MAX_PAGES, BalloonDevice

log = logging.getLogger("virtio.balloon")

MAX_LINE = 256
MAX_CLIENTS = 8


class BalloonControl:
    """Listens on ``path`` and applies each command to ``device``."""

    def __init__(self, path: str | os.PathLike[str], device: BalloonDevice) -> None:
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
            # A client that does not read its answers is dropped.
            self._drop(fd)
            return False
        return True

    def command(self, line: str) -> str:
        """The answer to one command line."""
        words = line.split()
        if not words:
            return "error: empty command (set SIZE, status, stats, hint [stop|done])"
        verb, args = words[0].lower(), words[1:]
        device = self.device
        try:
            if verb == "set" and len(args) == 1:
                pages = W.pages_for(W.parse_size(args[0]))
                if pages > MAX_PAGES:
                    return f"error: {args[0]} is more than the balloon can hold"
                device.set_target(pages)
                return f"ok target {W.format_size(pages * W.PAGE_SIZE)} ({pages} pages)"
            if verb == "status" and not args:
                c = device.counters
                return (
                    f"target={device.target_pages} actual={device.actual} "
                    f"ballooned={len(device.pages)} stats={c.stats_updates} "
                    f"inflated={c.inflated} deflated={c.deflated} ignored={c.ignored} "
                    f"reported={c.reported_bytes} released={c.released_bytes} "
                    f"hinted={c.hinted_pages} cmd_id={device.cmd_id}"
                )
            if verb == "stats" and not args:
                device.request_stats()
                return W.format_stats(device.stats)
            if verb == "hint" and len(args) <= 1:
                what = args[0].lower() if args else "start"
                if what == "start":
                    return f"ok cmd_id {device.start_hinting()}"
                if what in ("stop", "done"):
                    device.stop_hinting(done=what == "done")
                    return f"ok cmd_id {device.cmd_id}"
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
    """`virtio balloon set SIZE --control PATH` (and status, stats, hint)."""
    p = argparse.ArgumentParser(
        prog="virtio balloon", description="talk to `virtio serve balloon --control PATH`"
    )
    p.add_argument("command", choices=("set", "status", "stats", "hint"))
    p.add_argument("value", nargs="?", help="set: the target size (64M, 1G); hint: stop|done")
    p.add_argument("--control", required=True, help="the balloon's control socket")
    p.add_argument("--timeout", type=float, default=10.0)
    args = p.parse_args(argv)
    if args.command == "set" and args.value is None:
        p.error("set needs a size (e.g. 64M)")
    line = " ".join(x for x in (args.command, args.value) if x)
    try:
        answer = request(args.control, line, args.timeout)
    except OSError as err:
        print(f"virtio balloon: {args.control}: {err}", file=sys.stderr)
        return 1
    print(answer)
    return 1 if not answer or answer.startswith("error") else 0
