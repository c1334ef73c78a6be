"""The hybrid Unix-socket host side (the convention of Firecracker and vhost-device-vsock).

* A guest connecting to host port P reaches whatever listens on the Unix
  socket ``UDS_PATH_P`` (a stream socket for stream connections, a
  seqpacket socket for seqpacket ones).
* A host process connecting to ``UDS_PATH`` and writing ``CONNECT P\\n``
  reaches the guest's port P; once the guest accepts, it reads
  ``OK <host port>\\n`` and the connection carries data both ways.

Every socket is non-blocking and watched through the device's
``EventSources``: the device's host loop does the waiting.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
from collections.abc import Callable

from virtio.core.events import EventSources
from virtio.devices.vsock.device import MessageTooLarge, VsockDevice
from virtio.devices.vsock.wire import Type

log = logging.getLogger("virtio.vsock.uds")

#: The longest ``CONNECT <port>\n`` line taken from a host process.
MAX_LINE = 64
#: Host processes still to say which port they want, at most.
MAX_HANDSHAKES = 64
#: sun_path holds 108 bytes, the terminating NUL included; ``_4294967295`` is 11.
MAX_PATH = 107 - 11


class UnixEndpoint:
    """One connected Unix socket as a connection's host end."""

    def __init__(self, sock: socket.socket, events: EventSources) -> None:
        sock.setblocking(False)
        self.sock = sock
        self.events = events
        self.message = sock.type == socket.SOCK_SEQPACKET
        self._on_readable: Callable[[], None] | None = None
        self._watching = False
        self._closed = False

    def start(self, on_readable: Callable[[], None]) -> None:
        self._on_readable = on_readable

    def set_reading(self, on: bool) -> None:
        if self._closed or on == self._watching:
            return
        self._watching = on
        if on:
            self.events.watch(self.sock.fileno(), self._readable)
        else:
            self.events.unwatch(self.sock.fileno())

    def _readable(self, _now: float) -> None:
        if self._on_readable is not None:
            self._on_readable()

    def read(self, n: int) -> bytes | None:
        try:
            if self.message:
                # The whole next message, or nothing: a message is never cut.
                # With MSG_TRUNC the kernel says the message's real size. A size of
                # 0 is end of file: an empty message cannot be told from it.
                size = self.sock.recv_into(bytearray(1), 1, socket.MSG_PEEK | socket.MSG_TRUNC)
                if size > n:
                    raise MessageTooLarge(size)
                return self.sock.recv(max(size, 1))
            return self.sock.recv(n)
        except (BlockingIOError, InterruptedError):
            return None

    def write(self, data: bytes) -> int:
        try:
            return self.sock.send(data, socket.MSG_NOSIGNAL)
        except (BlockingIOError, InterruptedError):
            return 0

    def shutdown_write(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_WR)

    def accepted(self, local_port: int) -> None:
        # A fresh socket's buffer is empty: the short line goes out whole.
        with contextlib.suppress(OSError):
            self.sock.send(f"OK {local_port}\n".encode(), socket.MSG_NOSIGNAL)

    def close(self) -> None:
        if self._closed:
            return
        self.set_reading(False)
        self._closed = True
        self.sock.close()


class UdsBackend:
    """Listens on ``uds_path`` for host processes; connects to ``uds_path_PORT`` for the guest."""

    def __init__(self, uds_path: str | os.PathLike[str]) -> None:
        self.uds_path = os.fspath(uds_path)
        if len(os.fsencode(self.uds_path)) > MAX_PATH:
            raise ValueError(f"--uds-path {self.uds_path}: longer than {MAX_PATH} bytes")
        self.events: EventSources | None = None
        self.device: VsockDevice | None = None
        self._listener: socket.socket | None = None
        self._handshakes: dict[int, socket.socket] = {}

    def start(self, events: EventSources, device: VsockDevice) -> None:
        self.events = events
        self.device = device
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.uds_path)  # a stale socket of an earlier run
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            listener.bind(self.uds_path)
            listener.listen(64)
        except OSError as err:
            # The guest still reaches host ports; only host-initiated connections are off.
            log.error("cannot listen on %s: %s", self.uds_path, err)
            listener.close()
            return
        listener.setblocking(False)
        self._listener = listener
        events.watch(listener.fileno(), self._accept)

    def stop(self) -> None:
        for fd in list(self._handshakes):
            self._end_handshake(fd)
        if self._listener is not None and self.events is not None:
            self.events.unwatch(self._listener.fileno())
            self._listener.close()
            self._listener = None
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.uds_path)

    def close(self) -> None:
        self.stop()

    def connect(self, port: int, type: int) -> UnixEndpoint | None:
        assert self.events is not None
        kind = socket.SOCK_SEQPACKET if type == Type.SEQPACKET else socket.SOCK_STREAM
        sock = socket.socket(socket.AF_UNIX, kind | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK)
        path = f"{self.uds_path}_{port}"
        try:
            sock.connect(path)
        except OSError as err:
            # Nobody listens there (or its backlog is full): the guest gets an RST.
            log.info("guest connection to port %d refused: %s: %s", port, path, err)
            sock.close()
            return None
        return UnixEndpoint(sock, self.events)

    # -- host processes connecting ------------------------------------------------------

    def _accept(self, _now: float) -> None:
        assert self._listener is not None and self.events is not None
        try:
            conn, _ = self._listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        except OSError as err:
            log.warning("cannot accept a host connection: %s", err)
            return
        conn.setblocking(False)
        if len(self._handshakes) >= MAX_HANDSHAKES:
            self._end_handshake(next(iter(self._handshakes)))  # the oldest has waited longest
        fd = conn.fileno()
        self._handshakes[fd] = conn
        self.events.watch(fd, lambda _n: self._handshake(fd))

    def _end_handshake(self, fd: int) -> socket.socket | None:
        conn = self._handshakes.pop(fd, None)
        if conn is not None and self.events is not None:
            self.events.unwatch(fd)
        return conn

    def _handshake(self, fd: int) -> None:
        conn = self._handshakes.get(fd)
        if conn is None:
            return
        try:
            # Peek: whatever follows the line is the connection's data.
            head = conn.recv(MAX_LINE, socket.MSG_PEEK)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            head = b""
        end = head.find(b"\n")
        if end < 0:
            if head and len(head) < MAX_LINE:
                return  # the rest of the line is still on its way
            self._refuse(fd, "closed or sent no CONNECT line" if not head else "line too long")
            return
        conn.recv(end + 1)
        words = head[:end].decode("ascii", "replace").split()
        port = None
        if len(words) == 2 and words[0] == "CONNECT" and words[1].isdigit():
            port = int(words[1])
        if port is None or port > 0xFFFFFFFF:
            self._refuse(fd, f"bad request {head[:end]!r}")
            return
        self._end_handshake(fd)
        assert self.events is not None and self.device is not None
        endpoint = UnixEndpoint(conn, self.events)
        if not self.device.host_connect(port, endpoint):
            log.info("host connection to guest port %d refused: the guest is not ready", port)
            endpoint.close()

    def _refuse(self, fd: int, reason: str) -> None:
        log.info("host connection dropped: %s", reason)
        conn = self._end_handshake(fd)
        if conn is not None:
            conn.close()
