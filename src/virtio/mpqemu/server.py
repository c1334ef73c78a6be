"""The I/O adapter for QEMU's proxy: a listening socket, one epoll loop, memfd mappings.

:class:`PciServer` listens on a Unix socket for ``virtio qemu``. Each
connection is one VM: the server answers the hello with a description of its
PCI function and one end of a fresh socket pair, which the launcher hands to
QEMU as the proxy's socket. The server then serves the proxy's messages on
its end, the device model's own events, and polls the rings for a while after
serving (as the vhost-user server does), sending interrupts up the
connection. When either socket closes the VM is gone: the function resets,
the backend is flushed and the next VM is served. Whatever one VM does wrong
ends that VM's session with a one-line log, never the server.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import socket
import time
from collections.abc import Callable

from virtio.core.device import VirtioDevice
from virtio.core.events import EventSources
from virtio.hosting import AdaptivePolling, DeviceFds, UnixServer
from virtio.hosting import log_failure as _log_failure
from virtio.memory import Buffer, FileMappings
from virtio.mpqemu.control import HELLO, MAX_LINE, FunctionInfo, encode_intx, encode_msi
from virtio.mpqemu.remote import RemoteSession
from virtio.mpqemu.wire import HEADER, MAX_FDS, Message, MpqemuError, parse_header
from virtio.transport.pci import PciFunction

log = logging.getLogger("virtio.mpqemu.server")

#: A message that has begun arrives whole within this long; the hello too.
MESSAGE_TIMEOUT = 5.0


class PeerClosed(Exception):
    """The proxy's socket closed (QEMU exited or dropped the device)."""


class OsMemory:
    """The session's :class:`~virtio.mpqemu.remote.MemoryHost`: real mmaps and fds."""

    def __init__(self) -> None:
        self._mappings = FileMappings()

    def map(self, fd: int, size: int, offset: int) -> Buffer:
        return self._mappings.map(fd, size, offset)

    def unmap(self, buffer: Buffer) -> None:
        self._mappings.unmap(buffer)

    def file_identity(self, fd: int) -> tuple[int, int]:
        st = os.fstat(fd)
        return st.st_dev, st.st_ino

    def close(self, fd: int) -> None:
        with contextlib.suppress(OSError):
            os.close(fd)


def recv_message(sock: socket.socket) -> Message:
    """One whole message (the fds come with the header). Raises PeerClosed, MpqemuError."""
    header = b""
    fds: list[int] = []
    while len(header) < HEADER.size:
        data, more_fds, _flags, _addr = socket.recv_fds(sock, HEADER.size - len(header), MAX_FDS)
        fds.extend(more_fds)
        if not data:
            for fd in fds:
                os.close(fd)
            raise PeerClosed("connection closed" if not header else "closed inside a header")
        header += data
    try:
        cmd, size = parse_header(header)
        payload = b""
        while len(payload) < size:
            chunk = sock.recv(size - len(payload))
            if not chunk:
                raise PeerClosed("closed inside a message")
            payload += chunk
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise
    return Message(cmd, payload, fds)


class PciServer(UnixServer):
    """Serves ``device`` as a PCI function to VMs that ``virtio qemu`` attaches.

    ``transitional`` gives the function the transitional id and the legacy
    I/O BAR; ``poll_us`` is the longest the loop polls the rings after serving
    (adaptive; 0: never).
    """

    peer = "`virtio qemu`"
    logger = log

    def __init__(
        self,
        path: str | os.PathLike[str],
        device: VirtioDevice,
        *,
        name: str,
        transitional: bool = False,
        poll_us: float = 100.0,
    ) -> None:
        super().__init__(path, backlog=4)
        self.device = device
        self.name = name
        self.poll_us = poll_us
        vectors = min(len(device.queues) + 1, 0x800)  # one per queue and the config's
        self.function = PciFunction(device, transitional=transitional, msix_vectors=vectors)
        self.info = FunctionInfo(
            device=name,
            pci_id=f"1af4:{self.function.pci_device_id:04x}",
            transitional=transitional,
            msix_vectors=vectors,
        )

    def connection_ended(self) -> None:
        try:
            self.device.flush_backend()
        except Exception as err:
            _fail("cannot flush the device", err)

    def idle_events(self) -> EventSources:
        return self.device.events

    def serve_connection(self, conn: socket.socket) -> None:
        conn.settimeout(MESSAGE_TIMEOUT)
        try:
            hello = _read_line(conn)
        except (OSError, ValueError) as err:
            log.warning("connection %d: no hello (%s); closed", self.connections, err)
            return
        if hello != HELLO:
            log.warning(
                "connection %d: not `virtio qemu` (%r); closed", self.connections, hello[:40]
            )
            return
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        with ours:
            try:
                socket.send_fds(conn, [self.info.encode()], [theirs.fileno()])
            finally:
                theirs.close()
            log.info("VM %d attached (%s %s)", self.connections, self.name, self.info.pci_id)
            self._serve_vm(conn, ours)

    def _serve_vm(self, conn: socket.socket, proxy: socket.socket) -> None:
        function = self.function
        session = RemoteSession(function, OsMemory())

        interrupts = 0

        def send(line: bytes) -> None:
            nonlocal interrupts
            interrupts += 1
            try:
                conn.sendall(line)
            except OSError as err:
                log.warning("cannot send an interrupt to `virtio qemu`: %s", err)

        function.msi = lambda address, data: send(encode_msi(address, data))
        function.intx = lambda level: send(encode_intx(level, function.interrupt_line))
        with select.epoll() as poller, DeviceFds(poller, self.device.events) as fds:
            poller.register(proxy.fileno(), select.EPOLLIN)
            poller.register(conn.fileno(), select.EPOLLIN)
            try:
                self._loop(session, conn, proxy, poller, fds)
            finally:
                function.msi = lambda _address, _data: None
                function.intx = lambda _level: None
                session.close()
                log.info(
                    "VM %d: %d register accesses, %d notifications, %d interrupts",
                    self.connections,
                    session.accesses,
                    session.notifications,
                    interrupts,
                )

    def _loop(
        self,
        session: RemoteSession,
        conn: socket.socket,
        proxy: socket.socket,
        poller: select.epoll,
        fds: DeviceFds,
    ) -> None:
        events = self.device.events
        poll = AdaptivePolling(self.poll_us / 1e6)
        while not self.stop_event.is_set():
            timeout = 0.2
            deadline = events.next_deadline(time.monotonic())
            if deadline is not None:
                timeout = max(0.0, min(timeout, deadline - time.monotonic()))
            if poll.active:
                timeout = 0.0
            served = 0
            for fd, _mask in poller.poll(timeout):
                if fd == proxy.fileno():
                    count = self._read_messages(session, proxy, poll)
                    if count is None:
                        return
                    served += count
                elif fd == conn.fileno():
                    if not conn.recv(MAX_LINE):  # the launcher is gone: so is the VM
                        log.info("`virtio qemu` closed the connection")
                        return
                elif fd in fds.watched and not _guarded(
                    "the device failed serving its own event", events.fd_ready, fd, time.monotonic()
                ):
                    return
            if deadline is not None and not _guarded(
                "the device failed serving a timer", lambda: events.run_due(time.monotonic())
            ):
                return
            if (poll.active or served) and not _guarded(
                "polling the rings failed", self._poll_step, session, poll, served
            ):
                return

    @staticmethod
    def _poll_step(session: RemoteSession, poll: AdaptivePolling, served: int) -> None:
        if not served:
            served = session.poll()
        if not poll.step(time.monotonic(), served):
            session.rearm()

    def _read_messages(
        self, session: RemoteSession, proxy: socket.socket, poll: AdaptivePolling
    ) -> int | None:
        """Answer every message waiting; the chains served, None to end the session."""
        served = 0
        while True:
            proxy.setblocking(False)
            try:
                if not proxy.recv(1, socket.MSG_PEEK):
                    log.info("QEMU closed the proxy socket")
                    return None
            except BlockingIOError:
                return served
            proxy.settimeout(MESSAGE_TIMEOUT)
            try:
                msg = recv_message(proxy)
            except PeerClosed as err:
                log.info("QEMU went away: %s", err)
                return None
            except (MpqemuError, OSError) as err:
                _fail("unreadable message from QEMU, closing", err)
                return None
            try:
                reply = session.handle(msg)
            except MpqemuError as err:
                _fail("QEMU sent a bad message, closing", err)
                return None
            if reply is not None:
                try:
                    proxy.sendall(reply)
                except OSError as err:
                    log.info("cannot reply to %s: %s", msg.name(), err)
                    return None
            if session.pending:
                poll.kicked(time.monotonic())
                try:
                    served += session.serve_notifications(rearm=poll.window == 0)
                except Exception as err:  # a device model bug: this VM's session ends
                    _fail("serving a notification failed, closing", err)
                    return None


def _guarded(what: str, action: Callable[..., object], *args: object) -> bool:
    """Run ``action``; a failure is logged and ends the session (False)."""
    try:
        if args:
            action(*args)
        else:
            action()
    except Exception as err:
        _fail(f"{what}, closing", err)
        return False
    return True


def _fail(what: str, err: Exception) -> None:
    _log_failure(what, err, logger=log)


def _read_line(conn: socket.socket) -> bytes:
    line = b""
    while not line.endswith(b"\n"):
        chunk = conn.recv(1)
        if not chunk:
            raise ValueError("closed before a whole line")
        line += chunk
        if len(line) > MAX_LINE:
            raise ValueError("line too long")
    return line
