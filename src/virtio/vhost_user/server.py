"""The vhost-user back-end's I/O adapter: a Unix socket, eventfds, mmap, one epoll loop.

:class:`VhostUserServer` listens on a socket path, serves one front-end
connection at a time with a :class:`~virtio.vhost_user.backend.BackendSession`,
and keeps listening when that front-end goes away, so a VM can reconnect
(QEMU ``reconnect=1``) or a new one can attach. Whatever goes wrong while
serving one front-end (a broken message, a message no check foresaw, a bug
in the device model while serving a kick) closes that connection with a
one-line log, releases everything the session held, and the server goes on
to the next front-end. Only KeyboardInterrupt and SystemExit stop it.

The same epoll loop is the device model's host: the file descriptors and
timers the device asks for (``device.events``: a worker pool's completion
eventfd, a rate limiter's timer) are watched and fired here, with the
loop's clock passed in.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import socket
import time

from virtio.core.device import VirtioDevice
from virtio.core.events import EventSources
from virtio.hosting import AdaptivePolling, DeviceFds, UnixServer
from virtio.hosting import log_failure as _log_failure
from virtio.memory import Buffer, FileMappings
from virtio.vhost_user.backend import BackendSession
from virtio.vhost_user.io import PeerClosed, recv_message, send_message
from virtio.vhost_user.wire import Message, encode

log = logging.getLogger("virtio.vhost_user.server")

_ONE = (1).to_bytes(8, "little")
_POLL_INTERVAL = 0.001  # seconds between polls of rings without a kick fd


class OsHost:
    """The session's window on the operating system."""

    def __init__(self, poller: select.epoll) -> None:
        self.poller = poller
        self.kick_fds: dict[int, int] = {}  # fd -> ring index
        self.polled: set[int] = set()
        self._mappings = FileMappings()

    def map(self, fd: int, size: int, offset: int) -> Buffer:
        return self._mappings.map(fd, size, offset)

    def unmap(self, buffer: Buffer) -> None:
        self._mappings.unmap(buffer)

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


class VhostUserServer(UnixServer):
    """Serves a device model to vhost-user front-ends on a Unix socket.

    ``poll_us`` is the longest the loop polls the rings for after serving
    (adaptive, see :class:`AdaptivePolling`; 0: never poll).
    """

    peer = "front-end"
    logger = log

    def __init__(
        self, path: str | os.PathLike[str], device: VirtioDevice, *, poll_us: float = 100.0
    ) -> None:
        super().__init__(path)
        self.device = device
        self.poll_us = poll_us

    def idle_events(self) -> EventSources:
        return self.device.events

    def serve_connection(self, conn: socket.socket) -> None:
        with select.epoll() as poller:
            host = OsHost(poller)
            session = BackendSession(self.device, host)
            try:
                conn.setblocking(False)
                poller.register(conn.fileno(), select.EPOLLIN)
                self._serve_session(conn, session, host, poller)
            except Exception as err:
                _fail("closing the connection", err)
            finally:
                self._release(session)

    def _serve_session(
        self, conn: socket.socket, session: BackendSession, host: OsHost, poller: select.epoll
    ) -> None:
        """Serve one front-end until it goes away or must be dropped."""
        events = self.device.events
        poll = AdaptivePolling(self.poll_us / 1e6)
        with DeviceFds(poller, events) as fds:
            while not self.stop_event.is_set():
                timeout = _POLL_INTERVAL if host.polled else 0.2
                deadline = events.next_deadline(time.monotonic())
                if deadline is not None:
                    timeout = max(0.0, min(timeout, deadline - time.monotonic()))
                if poll.active:
                    timeout = 0.0  # polling the rings: only look at the fds
                served = 0
                unarmed = False  # a kick was served leaving kicks off: rearm them later
                for fd, _mask in poller.poll(timeout):
                    if fd == conn.fileno():
                        if not self._read_messages(conn, session):
                            return
                    elif fd in host.kick_fds:
                        with contextlib.suppress(BlockingIOError):
                            os.read(fd, 8)
                        poll.kicked(time.monotonic())
                        polling = poll.window > 0
                        count = self._kick(session, host.kick_fds[fd], polling)
                        if count is None:
                            return
                        served += count
                        unarmed = unarmed or polling
                    elif fd in fds.watched and not self._device_event(fd):
                        return
                for index in list(host.polled):
                    if self._kick(session, index, True) is None:
                        return
                if deadline is not None and not self._device_event(None):
                    return
                if (poll.active or unarmed) and not self._poll_rings(session, poll, served):
                    return

    def _poll_rings(self, session: BackendSession, poll: AdaptivePolling, served: int) -> bool:
        """One polling step; kicks go back on when the window passes with nothing new."""
        now = time.monotonic()
        try:
            if not served:
                served = session.poll()
            if not poll.step(now, served):
                session.rearm()
        except Exception as err:
            _fail("polling the rings failed, closing the connection", err)
            return False
        return True

    def _device_event(self, fd: int | None) -> bool:
        """Serve a device fd that became readable (None: the due timers); False to drop."""
        events = self.device.events
        try:
            if fd is None:
                events.run_due(time.monotonic())
            else:
                events.fd_ready(fd, time.monotonic())
        except Exception as err:
            _fail("the device failed serving its own event, closing the connection", err)
            return False
        return True

    def _release(self, session: BackendSession) -> None:
        # Runs after any failure: a second one must not take the server down.
        try:
            session.close()
        except Exception as err:
            _fail("cannot release the connection's resources", err)
        try:
            self._flush()
        except Exception as err:
            _fail("cannot flush the device", err)

    def _kick(self, session: BackendSession, index: int, polling: bool) -> int | None:
        """Serve ring ``index``; the chains served, or None when the connection should close."""
        try:
            return session.kick(index, rearm=not polling)
        except Exception as err:
            _fail(f"ring {index}: serving a kick failed, closing the connection", err)
            return None

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
            except PeerClosed as err:
                if str(err) != "connection closed":
                    log.info("front-end went away: %s", err)
                return False
            except Exception as err:
                _fail("unreadable message from the front-end", err)
                return False
            log.debug("<- %s %s (%d fds)", msg.name(), msg.payload.hex(), len(msg.fds))
            try:
                replies = session.handle(msg)
            except Exception as err:
                _fail(f"front-end sent a bad {msg.name()}", err, msg.name())
                return False
            try:
                for reply in replies:
                    send_message(conn, reply)
            except OSError as err:
                log.info("cannot reply to %s: %s", msg.name(), err)
                return False
            except Exception as err:
                _fail(f"cannot reply to {msg.name()}", err)
                return False

    def _flush(self) -> None:
        self.device.flush_backend()


def _fail(what: str, err: Exception, name: str = "") -> None:
    _log_failure(what, err, name, logger=log)
