"""A line-protocol control socket served from a device's host loop, and its client.

A device type with a run-time knob (the balloon's target, virtio-mem's
requested size) listens on a Unix socket: one command per line, one answer
line each. The sockets are watched through the device's ``events``, so the
device stays sans-IO and commands run on its host thread, connected to a
front-end or waiting for one.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import logging
import os
import socket
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Generic, Protocol, TypeVar

from virtio.core.events import EventSources

log = logging.getLogger("virtio.control")

MAX_LINE = 256
MAX_CLIENTS = 8


class LineControl:
    """Listens on ``path``; each line a client sends is answered by :meth:`command`."""

    def __init__(self, path: str | os.PathLike[str], events: EventSources) -> None:
        self.path = Path(path)
        self.events = events
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
        events.watch(self.listener.fileno(), self._accept)

    def close(self) -> None:
        for fd in list(self._clients):
            self._drop(fd)
        if self.listener.fileno() >= 0:
            self.events.unwatch(self.listener.fileno())
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
        self.events.watch(fd, functools.partial(self._readable, fd))

    def _drop(self, fd: int) -> None:
        conn, _ = self._clients.pop(fd)
        self.events.unwatch(fd)
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

    #: The commands, for the answer to an empty line ("set SIZE, status").
    usage = ""

    def command(self, line: str) -> str:
        """The answer to one command line: a device type's :meth:`answer`, or an error."""
        words = line.split()
        if not words:
            return f"error: empty command ({self.usage})"
        try:
            answer = self.answer(words[0].lower(), words[1:])
        except ValueError as err:
            return f"error: {err}"
        if answer is None:
            return f"error: unknown command {line.strip()[:64]!r}"
        return answer

    def answer(self, verb: str, args: list[str]) -> str | None:
        """The answer to ``verb args``; None for a command the device does not know.

        A ValueError's message is answered as ``error: MESSAGE``.
        """
        raise NotImplementedError


class ControlledDevice(Protocol):
    """A device with a control socket: its host loop's events, and closers run by close()."""

    events: EventSources
    closers: list[Callable[[], None]]

    def close(self) -> None: ...


D = TypeVar("D", bound=ControlledDevice)


class DeviceControl(LineControl, Generic[D]):
    """The control socket of one device: served from its host loop, closed with it."""

    def __init__(self, path: str | os.PathLike[str], device: D) -> None:
        super().__init__(path, device.events)
        self.device = device
        device.closers.append(self.close)

    @classmethod
    def attach(cls, path: str | os.PathLike[str], device: D) -> None:
        """Listen on ``path`` for ``device``; if that fails the device is closed too."""
        try:
            cls(path, device)
        except OSError:
            device.close()
            raise


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


def client_main(
    argv: list[str], *, prog: str, what: str, commands: tuple[str, ...], value_help: str
) -> int:
    """``PROG COMMAND [VALUE] --control PATH``: one command to a control socket."""
    p = argparse.ArgumentParser(
        prog=prog, description=f"talk to `virtio serve {prog.split()[-1]} --control PATH`"
    )
    p.add_argument("command", choices=commands)
    p.add_argument("value", nargs="?", help=value_help)
    p.add_argument("--control", required=True, help=f"the {what}'s control socket")
    p.add_argument("--timeout", type=float, default=10.0)
    args = p.parse_args(argv)
    if args.command == "set" and args.value is None:
        p.error("set needs a size (e.g. 64M)")
    line = " ".join(x for x in (args.command, args.value) if x)
    return client(prog, args.control, line, args.timeout)


def client(prog: str, path: str, line: str, timeout: float) -> int:
    """Send ``line``, print the answer; exit status 1 on an error answer or no socket."""
    try:
        answer = request(path, line, timeout)
    except OSError as err:
        print(f"{prog}: {path}: {err}", file=sys.stderr)
        return 1
    print(answer)
    return 1 if not answer or answer.startswith("error") else 0
