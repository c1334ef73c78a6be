"""The vhost-user back-end's I/O adapter: a Unix socket, eventfds, mmap, one epoll loop.

:class:`VhostUserServer` listens on a socket path, serves one front-end
connection at a time with a :class:`~virtio.vhost_user.backend.BackendSession`,
and keeps listening when that front-end goes away, so a VM can reconnect
(QEMU ``reconnect=1``) or a new one can attach. A broken message from one
front-end closes that connection with a log line; the server goes on.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import mmap
import os
import select
import socket
import threading
from pathlib import Path

from virtio.core.device import VirtioDevice
from virtio.errors import SpecViolation
from virtio.memory import Buffer
from virtio.vhost_user.backend import BackendSession
from virtio.vhost_user.io import PeerClosed, recv_message, send_message
from virtio.vhost_user.wire import Message, VhostUserError, encode

log = logging.getLogger("virtio.vhost_user.server")

_PAGE = mmap.PAGESIZE
_ONE = (1).to_bytes(8, "little")
_POLL_INTERVAL = 0.001  # seconds between polls of rings without a kick fd


class OsHost:
    """The session's window on the operating system."""

    def __init__(self, poller: select.epoll) -> None:
        self.poller = poller
        self.kick_fds: dict[int, int] = {}  # fd -> ring index
        self.polled: set[int] = set()
        self._maps: dict[int, mmap.mmap] = {}  # id(view) -> mapping

    def map(self, fd: int, size: int, offset: int) -> Buffer:
        aligned = offset - offset % _PAGE
        delta = offset - aligned
        mapping = mmap.mmap(
            fd, size + delta, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE, offset=aligned
        )
        view = memoryview(mapping)[delta : delta + size]
        self._maps[id(view)] = mapping
        return view

    def unmap(self, buffer: Buffer) -> None:
        mapping = self._maps.pop(id(buffer), None)
        if isinstance(buffer, memoryview):
            with contextlib.suppress(BufferError):
                buffer.release()
        if mapping is not None:
            # Views handed to requests may still exist; the GC unmaps then.
            with contextlib.suppress(BufferError):
                mapping.close()

    def close(self, fd: int) -> None:
        self.unwatch_fd(fd)
        with contextlib.suppress(OSError):
            os.close(fd)

    def unwatch_fd(self, fd: int) -> None:
        if fd in self.kick_fds:
            del self.kick_fds[fd]
            with contextlib.suppress(OSError, ValueError):
                self.poller.unregister(fd)

    def watch_kick(self, index: int, fd: int | None) -> None:
        self.unwatch_kick(index)
        if fd is None:
            self.polled.add(index)
            return
        os.set_blocking(fd, False)
        self.kick_fds[fd] = index
        self.poller.register(fd, select.EPOLLIN)

    def unwatch_kick(self, index: int) -> None:
        self.polled.discard(index)
        for fd, ring in list(self.kick_fds.items()):
            if ring == index:
                self.unwatch_fd(fd)

    def signal(self, fd: int) -> None:
        try:
            os.write(fd, _ONE)
        except BlockingIOError:
            pass  # the counter is saturated: the front-end has a wake-up pending anyway
        except OSError as err:
            log.warning("cannot signal fd %d: %s", fd, err)

    def create_shared(self, size: int) -> tuple[int, Buffer]:
        fd = os.memfd_create("pyvirtio-inflight", os.MFD_CLOEXEC)
        os.ftruncate(fd, size)
        return fd, self.map(fd, size, 0)

    def send_backend_request(self, fd: int, msg: Message) -> None:
        try:
            os.write(fd, encode(msg))
        except OSError as err:
            log.warning("back-end request channel: %s", err)


class VhostUserServer:
    """Serves a device model to vhost-user front-ends on a Unix socket."""

    def __init__(self, path: str | os.PathLike[str], device: VirtioDevice) -> None:
        self.path = Path(path)
        self.device = device
        self.stop_event = threading.Event()
        self.connections = 0
        self.listener: socket.socket | None = None

    def bind(self) -> None:
        if self.path.exists() or self.path.is_symlink():
            if not self.path.is_socket():
                raise OSError(errno.EEXIST, f"{self.path} exists and is not a socket")
            self.path.unlink()
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        listener.bind(str(self.path))
        listener.listen(1)
        self.listener = listener

    def stop(self) -> None:
        self.stop_event.set()

    def close(self) -> None:
        if self.listener is not None:
            self.listener.close()
            self.listener = None
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()

    def serve_forever(self) -> None:
        if self.listener is None:
            self.bind()
        assert self.listener is not None
        try:
            while not self.stop_event.is_set():
                ready, _, _ = select.select([self.listener], [], [], 0.2)
                if not ready:
                    continue
                conn, _ = self.listener.accept()
                self.connections += 1
                log.info("front-end connected (connection %d)", self.connections)
                with conn:
                    self._serve_connection(conn)
                log.info("front-end disconnected; waiting for the next one")
        finally:
            self.close()

    def _serve_connection(self, conn: socket.socket) -> None:
        poller = select.epoll()
        host = OsHost(poller)
        session = BackendSession(self.device, host)
        conn.setblocking(False)
        poller.register(conn.fileno(), select.EPOLLIN)
        try:
            while not self.stop_event.is_set():
                timeout = _POLL_INTERVAL if host.polled else 0.2
                events = poller.poll(timeout)
                for fd, _mask in events:
                    if fd == conn.fileno():
                        if not self._read_messages(conn, session):
                            return
                    elif fd in host.kick_fds:
                        with contextlib.suppress(BlockingIOError):
                            os.read(fd, 8)
                        self._kick(session, host.kick_fds[fd])
                for index in list(host.polled):
                    self._kick(session, index)
        except (VhostUserError, SpecViolation) as err:
            log.error("closing the connection: %s", err)
        finally:
            session.close()
            poller.close()
            self._flush()

    def _kick(self, session: BackendSession, index: int) -> None:
        session.kick(index)

    def _read_messages(self, conn: socket.socket, session: BackendSession) -> bool:
        """Handle every message waiting on the connection; False when it should close."""
        while True:
            conn.setblocking(False)
            try:
                ready = conn.recv(1, socket.MSG_PEEK)
            except BlockingIOError:
                return True
            except OSError as err:
                log.info("connection error: %s", err)
                return False
            if not ready:
                return False
            # A message that has begun arrives whole within moments.
            conn.settimeout(5.0)
            try:
                msg = recv_message(conn)
            except PeerClosed:
                return False
            except (VhostUserError, OSError) as err:
                log.error("unreadable message from the front-end: %s", err)
                return False
            log.debug("<- %s %s (%d fds)", msg.name(), msg.payload.hex(), len(msg.fds))
            try:
                replies = session.handle(msg)
            except (VhostUserError, SpecViolation) as err:
                log.error("front-end sent a bad %s: %s", msg.name(), err)
                return False
            try:
                for reply in replies:
                    send_message(conn, reply)
            except OSError as err:
                log.info("cannot reply: %s", err)
                return False

    def _flush(self) -> None:
        flush = getattr(self.device, "flush_backend", None)
        if callable(flush):
            flush()
