"""What the I/O adapters (vhost-user, QEMU's proxy) share.

A Unix socket server that serves one peer at a time and survives it
(:class:`UnixServer`), adaptive ring polling (:class:`AdaptivePolling`) and
one-line failure logs (:func:`log_failure`).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import select
import socket
import threading
import time
from pathlib import Path

from virtio.core.events import EventSources
from virtio.errors import VirtioError, one_line

log = logging.getLogger("virtio.host")


class DeviceFds:
    """Keeps an epoll set watching exactly the fds a device model asked for.

    ``with DeviceFds(poller, device.events) as fds:`` registers them, follows
    every change the device makes, and unregisters them at the end;
    ``fd in fds.watched`` tells the loop an fd is the device's.
    """

    def __init__(self, poller: select.epoll, events: EventSources) -> None:
        self.poller = poller
        self.events = events
        self.watched: set[int] = set()

    def sync(self) -> None:
        wanted = set(self.events.fds)
        for fd in self.watched - wanted:
            with contextlib.suppress(OSError, ValueError):
                self.poller.unregister(fd)
        for fd in wanted - self.watched:
            self.poller.register(fd, select.EPOLLIN)
        self.watched = wanted

    def __enter__(self) -> DeviceFds:
        self.events.add_listener(self.sync)
        self.sync()
        return self

    def __exit__(self, *exc: object) -> None:
        self.events.remove_listener(self.sync)
        for fd in self.watched:
            with contextlib.suppress(OSError, ValueError):
                self.poller.unregister(fd)
        self.watched = set()


class UnixServer:
    """Listens on a socket path and serves one connection at a time, forever.

    Subclasses serve a connection in :meth:`serve_connection`; whatever it
    raises (not ^C or exit) ends that connection with a log line, and the
    server goes on to the next one. :meth:`stop` ends the loop within 0.2 s.
    """

    #: The peer, as log lines call it.
    peer = "peer"
    logger = log

    def __init__(self, path: str | os.PathLike[str], backlog: int = 1) -> None:
        self.path = Path(path)
        self.backlog = backlog
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
        listener.listen(self.backlog)
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
                if not self._wait_for_peer(self.listener):
                    break
                try:
                    conn, _ = self.listener.accept()
                except OSError as err:  # e.g. out of fds: retry shortly
                    self.logger.warning("cannot accept a %s: %s", self.peer, err)
                    self.stop_event.wait(0.1)
                    continue
                self.connections += 1
                self.logger.info("%s connected (connection %d)", self.peer, self.connections)
                with conn:
                    try:
                        self.serve_connection(conn)
                    except Exception as err:  # not BaseException: ^C and exit still stop us
                        log_failure(
                            f"connection {self.connections} failed", err, logger=self.logger
                        )
                    finally:
                        self.connection_ended()
                self.logger.info("%s disconnected; waiting for the next one", self.peer)
        finally:
            self.close()

    def _wait_for_peer(self, listener: socket.socket) -> bool:
        """Wait for a peer (True: one waits; False: stop() was called), in steps of at
        most 0.2 s; the device's own events are served meanwhile, so a control socket
        answers while no peer is connected."""
        events = self.idle_events()
        if events is None:
            while not self.stop_event.is_set():
                ready, _, _ = select.select([listener], [], [], 0.2)
                if ready:
                    return True
            return False
        with select.epoll() as poller, DeviceFds(poller, events) as fds:
            poller.register(listener.fileno(), select.EPOLLIN)
            while not self.stop_event.is_set():
                deadline = events.next_deadline(time.monotonic())
                timeout = 0.2
                if deadline is not None:
                    timeout = max(0.0, min(timeout, deadline - time.monotonic()))
                for fd, _mask in poller.poll(timeout):
                    if fd == listener.fileno():
                        return True
                    if fd in fds.watched:
                        self._idle_event(events, fd)
                if deadline is not None:
                    self._idle_event(events, None)
        return False

    def _idle_event(self, events: EventSources, fd: int | None) -> None:
        try:
            if fd is None:
                events.run_due(time.monotonic())
            else:
                events.fd_ready(fd, time.monotonic())
        except Exception as err:  # the device's own failure must not stop the server
            log_failure("the device failed serving its own event", err, logger=self.logger)

    def idle_events(self) -> EventSources | None:
        """The device's own fds and timers, to serve while no peer is connected."""
        return None

    def serve_connection(self, conn: socket.socket) -> None:
        raise NotImplementedError

    def connection_ended(self) -> None:
        """After every connection, however it ended (flush a backend, say)."""


class AdaptivePolling:
    """When to poll the rings instead of sleeping until a kick (as QEMU's poll-max-ns).

    After serving a kick the loop keeps polling the rings, kicks off, for up to
    ``window`` seconds; work found keeps it polling. The window adapts to the
    driver: if the next kick after giving up came within ``max_window`` (polling
    a little longer would have caught it), the window doubles; if it came later
    (the poll was wasted), it halves, down to 0 (no polling). A guest that sends
    requests milliseconds apart is never polled for; a driver waiting on its
    requests microseconds apart is polled for, and spared its kicks and our wake-up.
    """

    def __init__(self, max_window: float) -> None:
        self.max_window = max(0.0, max_window)
        self.window = self.max_window / 4
        self.active = False
        self._last_work = 0.0
        self._gave_up: float | None = None

    def kicked(self, now: float) -> None:
        if self._gave_up is not None and self.max_window:
            idle = now - self._gave_up
            if idle < self.max_window:
                self.window = min(self.max_window, max(2 * self.window, 2e-6))
            else:
                self.window = self.window / 2 if self.window > 2e-6 else 0.0
            self._gave_up = None

    def step(self, now: float, served: int) -> bool:
        """After a poll that served ``served`` chains: True to keep polling."""
        if served:
            self._last_work = now
            self.active = self.window > 0
            return self.active
        if self.active and now - self._last_work < self.window:
            return True
        self.active = False
        self._gave_up = now
        return False


def log_failure(what: str, err: Exception, name: str = "", *, logger: logging.Logger = log) -> None:
    """One error line, ``what: reason``; the full traceback of the cause at debug level.

    A reason that begins with the message's ``name`` (as the session's do) is not
    made to repeat it.
    """
    reason = one_line(err)
    if name and reason.startswith(f"{name}: "):
        reason = reason[len(name) + 2 :]
    logger.error("%s: %s", what, reason)
    cause = err.__cause__ if isinstance(err, VirtioError) else err
    if cause is not None:
        logger.debug("the cause, in full:", exc_info=cause)
