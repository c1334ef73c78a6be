"""Host sides of console ports: stdio, a pty, a Unix socket, a log file, memory.

A host side moves one port's bytes between the device model and the host.
It waits on its file descriptors and timers only through the device's
:class:`~virtio.core.events.EventSources` (given to :meth:`PortHost.start`),
so the device model stays sans-IO, and it talks back through a
:class:`PortLink`: bytes for the guest, the host end opening or closing,
and (for a terminal) a new window size.

Writes toward the host never block the device's loop: what a full pty or
socket does not take waits in a bounded backlog, retried on a timer; past
the bound the newest bytes are dropped and counted.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import select
import socket
import struct
import termios
import tty
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from virtio.core.events import EventSources, Timer

log = logging.getLogger("virtio.console.host")

#: Bytes waiting for a slow host reader before new output is dropped.
BACKLOG_LIMIT = 1 << 20
#: Bytes read from the host per wake-up.
READ_CHUNK = 4096
RETRY_S = 0.02
#: How often a terminal's window size is looked at (a pty sends no SIGWINCH to us).
WINSIZE_POLL_S = 0.25
_WINSIZE = struct.Struct("HHHH")


def _nothing_bytes(_data: bytes) -> None:
    pass


def _nothing_bool(_up: bool) -> None:
    pass


def _nothing_size(_cols: int, _rows: int) -> None:
    pass


@dataclass
class PortLink:
    """How a host side reaches the device: input, host open/closed, window size."""

    deliver: Callable[[bytes], None] = _nothing_bytes
    connected: Callable[[bool], None] = _nothing_bool
    resized: Callable[[int, int], None] = _nothing_size


def window_size(fd: int) -> tuple[int, int] | None:
    """(cols, rows) of a terminal, None if ``fd`` is not one (or has no size)."""
    try:
        rows, cols, _x, _y = _WINSIZE.unpack(
            fcntl.ioctl(fd, termios.TIOCGWINSZ, bytes(_WINSIZE.size))
        )
    except OSError:
        return None
    return (cols, rows) if cols and rows else None


class PortHost:
    """Base host side: output dropped, no input, always connected."""

    name = "none"

    def __init__(self) -> None:
        self.events: EventSources | None = None
        self.link = PortLink()
        self.written = 0
        self.dropped = 0
        self._paused = False

    @property
    def connected(self) -> bool:
        """Whether a host process has the port open (PORT_OPEN to the guest)."""
        return True

    def start(self, events: EventSources, link: PortLink) -> None:
        self.events = events
        self.link = link
        self._watch_input()

    def write(self, data: bytes) -> None:
        """Output from the guest."""
        self.dropped += len(data)

    def pause_input(self) -> None:
        """The guest has no room: stop reading until :meth:`resume_input`."""
        if not self._paused:
            self._paused = True
            self._unwatch_input()

    def resume_input(self) -> None:
        if self._paused:
            self._paused = False
            self._watch_input()

    def close(self) -> None:
        self._unwatch_input()

    def size(self) -> tuple[int, int] | None:
        """The host terminal's (cols, rows), if the host side is a terminal."""
        return None

    def _watch_input(self) -> None:
        """Start watching the input fd (subclasses)."""

    def _unwatch_input(self) -> None:
        """Stop watching the input fd (subclasses)."""


class MemoryHost(PortHost):
    """Output collected in ``output``; :meth:`feed` is host input (tests, examples)."""

    name = "memory"

    def __init__(self, *, connected: bool = True) -> None:
        super().__init__()
        self.output = bytearray()
        self._connected = connected

    @property
    def connected(self) -> bool:
        return self._connected

    def set_connected(self, up: bool) -> None:
        self._connected = up
        self.link.connected(up)

    def feed(self, data: bytes) -> None:
        self.link.deliver(data)

    def write(self, data: bytes) -> None:
        self.output += data
        self.written += len(data)


class _Backlog:
    """Writes to a non-blocking fd; what it does not take waits, retried on a timer."""

    def __init__(self, owner: PortHost) -> None:
        self.owner = owner
        self.pending = bytearray()
        self.timer: Timer | None = None

    def write(self, fd: int | None, data: bytes) -> None:
        if fd is None or self.pending:
            self._keep(data)
            if fd is not None:
                self.flush(fd)
            return
        try:
            n = os.write(fd, data)
        except BlockingIOError:
            n = 0
        except OSError as err:
            self._lost(fd, err, len(data))
            return
        self.owner.written += n
        if n < len(data):
            self._keep(data[n:])
            self._arm(fd)

    def _keep(self, data: bytes) -> None:
        room = BACKLOG_LIMIT - len(self.pending)
        if len(data) > room:
            self.owner.dropped += len(data) - max(room, 0)
            data = data[: max(room, 0)]
        self.pending += data

    def flush(self, fd: int) -> None:
        while self.pending:
            try:
                n = os.write(fd, self.pending)
            except BlockingIOError:
                self._arm(fd)
                return
            except OSError as err:
                self._lost(fd, err, len(self.pending))
                self.pending.clear()
                return
            self.owner.written += n
            del self.pending[:n]

    def _arm(self, fd: int) -> None:
        events = self.owner.events
        if self.timer is None and events is not None:
            self.timer = events.call_later(RETRY_S, lambda _now: self._retry(fd))

    def _retry(self, fd: int) -> None:
        self.timer = None
        self.flush(fd)

    def _lost(self, fd: int, err: OSError, n: int) -> None:
        self.owner.dropped += n
        log.info("%s: output lost (%s)", self.owner.name, err.strerror or err)

    def cancel(self) -> None:
        if self.timer is not None and self.owner.events is not None:
            self.owner.events.cancel(self.timer)
        self.timer = None


class FdHost(PortHost):
    """A host side on file descriptors: input read from one, output written to another.

    With ``terminal`` set, the terminal's window size is followed (looked at
    every :data:`WINSIZE_POLL_S` seconds) and reported through the link.
    """

    def __init__(
        self,
        read_fd: int | None,
        write_fd: int | None,
        *,
        name: str = "fd",
        nonblocking: bool = True,
        terminal: int | None = None,
    ) -> None:
        super().__init__()
        self.name = name
        self.read_fd = read_fd
        self.write_fd = write_fd
        self.terminal = terminal
        self._eof = False
        self._backlog = _Backlog(self)
        self._size = window_size(terminal) if terminal is not None else None
        self._size_timer: Timer | None = None
        if nonblocking and write_fd is not None:
            os.set_blocking(write_fd, False)

    def start(self, events: EventSources, link: PortLink) -> None:
        super().start(events, link)
        if self.terminal is not None:
            self._size_timer = events.call_later(WINSIZE_POLL_S, self._poll_size)

    def size(self) -> tuple[int, int] | None:
        return self._size

    def write(self, data: bytes) -> None:
        self._backlog.write(self.write_fd, data)

    def _watch_input(self) -> None:
        if self.events is not None and self.read_fd is not None and not self._eof:
            self.events.watch(self.read_fd, self._readable)

    def _unwatch_input(self) -> None:
        if self.events is not None and self.read_fd is not None:
            self.events.unwatch(self.read_fd)

    def _readable(self, _now: float) -> None:
        assert self.read_fd is not None
        try:
            data = os.read(self.read_fd, READ_CHUNK)
        except BlockingIOError:
            return
        except OSError as err:
            if err.errno != errno.EIO:  # EIO: a pty with no other end open
                log.info("%s: input ends (%s)", self.name, err.strerror)
            data = b""
        if not data:
            self._eof = True
            self._unwatch_input()
            return
        self.link.deliver(data)

    def _poll_size(self, _now: float) -> None:
        assert self.terminal is not None and self.events is not None
        size = window_size(self.terminal)
        if size is not None and size != self._size:
            self._size = size
            self.link.resized(*size)
        self._size_timer = self.events.call_later(WINSIZE_POLL_S, self._poll_size)

    def close(self) -> None:
        super().close()
        self._backlog.cancel()
        if self._size_timer is not None and self.events is not None:
            self.events.cancel(self._size_timer)


def pollable(fd: int) -> bool:
    """Whether ``fd`` can be waited on (epoll refuses files and /dev/null)."""
    try:
        with select.epoll() as ep:
            ep.register(fd, select.EPOLLIN)
    except OSError:
        return False
    return True


def stdio_host(*, input_: bool = True) -> FdHost:
    """The server's own stdin and stdout (writes there block: they are the user's).

    A stdin that cannot be waited on (a file, /dev/null) gives no input.
    """
    read_fd = 0 if input_ and pollable(0) else None
    terminal = 0 if read_fd is not None and os.isatty(0) else None
    return FdHost(read_fd, 1, name="stdio", nonblocking=False, terminal=terminal)


class PtyHost(FdHost):
    """A new pseudo-terminal: the guest's port on its master side, ``path`` for host programs.

    The device keeps the slave side open itself, so the master never reads
    EIO when no program has the pty open; the pty is raw (no echo, no
    newline translation): it carries the guest's bytes as they are.
    """

    def __init__(self) -> None:
        master, slave = os.openpty()
        tty.setraw(slave)
        self.path = os.ttyname(slave)
        self._slave = slave
        super().__init__(master, master, name=f"pty {self.path}", terminal=master)
        os.set_blocking(master, False)

    def close(self) -> None:
        super().close()
        for fd in (self.read_fd, self._slave):
            if fd is not None:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self.read_fd = self.write_fd = None


class LogHost(PortHost):
    """Output appended to a file; no input."""

    def __init__(self, path: Path) -> None:
        super().__init__()
        self.path = path
        self.name = f"log {path}"
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o644)

    def write(self, data: bytes) -> None:
        try:
            self.written += os.write(self._fd, data)
        except OSError as err:
            self.dropped += len(data)
            log.info("%s: output lost (%s)", self.name, err.strerror)

    def close(self) -> None:
        super().close()
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


class UnixHost(PortHost):
    """A listening Unix socket; one client at a time is the port's host end.

    A client connecting opens the port (PORT_OPEN 1 to the guest), its
    leaving closes it. Output while no client is there waits in the backlog
    for the next one. A second client while one is connected is refused.
    """

    def __init__(self, path: Path) -> None:
        super().__init__()
        self.path = path
        self.name = f"unix {path}"
        with contextlib.suppress(FileNotFoundError):
            if path.is_socket():
                path.unlink()
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        self._listener.bind(str(path))
        self._listener.listen(4)
        self._listener.setblocking(False)
        self._client: socket.socket | None = None
        self._backlog = _Backlog(self)

    @property
    def connected(self) -> bool:
        return self._client is not None

    def start(self, events: EventSources, link: PortLink) -> None:
        super().start(events, link)
        events.watch(self._listener.fileno(), self._accept)

    def _accept(self, _now: float) -> None:
        try:
            client, _ = self._listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        except OSError as err:
            log.info("%s: accept failed: %s", self.name, err.strerror)
            return
        if self._client is not None:
            log.info("%s: refusing a second client", self.name)
            client.close()
            return
        client.setblocking(False)
        self._client = client
        self._watch_input()
        self.link.connected(True)
        self._backlog.flush(client.fileno())

    def _watch_input(self) -> None:
        if self.events is not None and self._client is not None and not self._paused:
            self.events.watch(self._client.fileno(), self._readable)

    def _unwatch_input(self) -> None:
        if self.events is not None and self._client is not None:
            self.events.unwatch(self._client.fileno())

    def _readable(self, _now: float) -> None:
        client = self._client
        if client is None:
            return
        try:
            data = client.recv(READ_CHUNK)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self._drop_client()
            return
        self.link.deliver(data)

    def _drop_client(self) -> None:
        client = self._client
        if client is None:
            return
        self._unwatch_input()
        self._backlog.cancel()
        self._client = None
        client.close()
        self.link.connected(False)

    def write(self, data: bytes) -> None:
        self._backlog.write(None if self._client is None else self._client.fileno(), data)

    def close(self) -> None:
        self._drop_client()
        if self.events is not None:
            self.events.unwatch(self._listener.fileno())
        self._listener.close()
        with contextlib.suppress(OSError):
            self.path.unlink()
