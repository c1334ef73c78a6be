"""Forwarding vsock ports to and from host TCP addresses.

* ``--forward-tcp PORT=HOST:TCPPORT``: a guest stream connection to host
  port PORT is connected to ``HOST:TCPPORT``; a refused connect is the
  guest's RST.
* ``--listen-tcp [HOST:]TCPPORT=PORT``: each TCP connection accepted on
  ``HOST:TCPPORT`` (HOST defaults to 127.0.0.1) reaches the guest's port
  PORT; if the guest refuses, the TCP connection is closed.

Ports without a rule go to the fallback back-end (the hybrid Unix-socket
one), if any. Seqpacket connections are never forwarded to TCP, which has
no message boundaries. Sockets are non-blocking and watched through the
device's ``EventSources``, as in :mod:`virtio.devices.vsock.uds`.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import functools
import logging
import os
import select
import socket
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from virtio.core.events import EventSources, Timer
from virtio.devices.vsock.device import Endpoint, VsockBackend, VsockDevice
from virtio.devices.vsock.uds import UnixEndpoint
from virtio.devices.vsock.wire import Type

log = logging.getLogger("virtio.vsock.tcp")

#: Checks of a TCP connect on its way start this often and slow down to MAX.
CONNECT_POLL, CONNECT_POLL_MAX = 0.001, 0.05
DEFAULT_LISTEN_HOST = "127.0.0.1"


@dataclass(frozen=True)
class TcpAddress:
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    def resolve(self, what: str, *, passive: bool = False) -> tuple[int, tuple[object, ...]]:
        """(address family, sockaddr); ValueError naming ``what`` if the host is unknown."""
        flags = socket.AI_PASSIVE if passive else 0
        try:
            info = socket.getaddrinfo(self.host, self.port, type=socket.SOCK_STREAM, flags=flags)
        except (socket.gaierror, UnicodeError) as err:
            raise ValueError(f"{what}: cannot resolve {self.host!r}: {err}") from None
        family, _, _, _, sockaddr = info[0]
        return family, sockaddr


def _number(text: str, what: str, low: int, high: int) -> int:
    if not text.isdigit() or not low <= int(text) <= high:
        raise argparse.ArgumentTypeError(f"{what} must be {low}..{high}, not {text!r}")
    return int(text)


def _vsock_port(text: str) -> int:
    return _number(text, "the vsock port", 0, 0xFFFFFFFF)


def _address(text: str, *, default_host: str | None, low_port: int) -> TcpAddress:
    host, sep, port = text.rpartition(":")
    if not sep:
        if default_host is None:
            raise argparse.ArgumentTypeError("no :TCPPORT after the host")
        host = default_host
    elif host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise argparse.ArgumentTypeError("an IPv6 address goes in brackets: [ADDRESS]:TCPPORT")
    if not host:
        raise argparse.ArgumentTypeError("no host before :TCPPORT")
    return TcpAddress(host, _number(port, "the TCP port", low_port, 0xFFFF))


def parse_forward(text: str) -> tuple[int, TcpAddress]:
    """``PORT=HOST:TCPPORT`` (argparse type of ``--forward-tcp``)."""
    port, sep, target = text.partition("=")
    try:
        if not sep:
            raise argparse.ArgumentTypeError("no '='")
        return _vsock_port(port), _address(target, default_host=None, low_port=1)
    except argparse.ArgumentTypeError as err:
        raise argparse.ArgumentTypeError(f"{text!r} is not PORT=HOST:TCPPORT: {err}") from None


def parse_listen(text: str) -> tuple[TcpAddress, int]:
    """``[HOST:]TCPPORT=PORT`` (argparse type of ``--listen-tcp``); TCPPORT 0 picks one."""
    address, sep, port = text.rpartition("=")
    try:
        if not sep:
            raise argparse.ArgumentTypeError("no '='")
        listen = _address(address, default_host=DEFAULT_LISTEN_HOST, low_port=0)
        return listen, _vsock_port(port)
    except argparse.ArgumentTypeError as err:
        raise argparse.ArgumentTypeError(f"{text!r} is not [HOST:]TCPPORT=PORT: {err}") from None


class TcpEndpoint(UnixEndpoint):
    """One TCP connection as a connection's host end (a stream socket as the Unix one).

    ``connecting``: the non-blocking connect is on its way; :meth:`when_open`
    tells the device how it ends, checked on timers so the device never waits.
    """

    def __init__(
        self,
        sock: socket.socket,
        events: EventSources,
        *,
        connecting: bool = False,
        target: str = "",
    ) -> None:
        # vsock packets already batch the data: Nagle would only add delay.
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        super().__init__(sock, events)
        self.connecting = connecting
        self.target = target
        self._done: Callable[[str | None], None] | None = None
        self._delay = CONNECT_POLL
        self._timer: Timer | None = None

    def when_open(self, done: Callable[[str | None], None]) -> None:
        self._done = done
        self._check(0.0)

    def _check(self, _now: float) -> None:
        self._timer = None
        if self._closed or self._done is None:
            return
        if self.connecting:
            poller = select.poll()
            poller.register(self.sock, select.POLLOUT)
            if not poller.poll(0):
                self._timer = self.events.call_later(self._delay, self._check)
                self._delay = min(self._delay * 2, CONNECT_POLL_MAX)
                return
            self.connecting = False
            err = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        else:
            err = 0
        done, self._done = self._done, None
        done(f"{self.target}: {os.strerror(err)}" if err else None)

    def accepted(self, local_port: int) -> None:
        pass  # a TCP client learns nothing in-band: no "OK" line

    def close(self) -> None:
        if self._timer is not None:
            self.events.cancel(self._timer)
            self._timer = None
        super().close()


class TcpBackend:
    """Ports with a TCP rule go to TCP; every other one to ``fallback``."""

    def __init__(
        self,
        forwards: Mapping[int, TcpAddress] | Sequence[tuple[int, TcpAddress]] = (),
        listens: Sequence[tuple[TcpAddress, int]] = (),
        fallback: VsockBackend | None = None,
    ) -> None:
        rules = list(forwards.items()) if isinstance(forwards, Mapping) else list(forwards)
        self.forwards: dict[int, tuple[TcpAddress, int, tuple[object, ...]]] = {}
        for port, target in rules:
            if port in self.forwards:
                raise ValueError(f"--forward-tcp: port {port} is forwarded twice")
            self.forwards[port] = (target, *target.resolve(f"--forward-tcp {port}={target}"))
        self.listens: list[tuple[TcpAddress, int, tuple[object, ...], int]] = []
        seen: set[TcpAddress] = set()
        for address, port in listens:
            if address in seen and address.port != 0:
                raise ValueError(f"--listen-tcp: {address} is given twice")
            seen.add(address)
            where = f"--listen-tcp {address}={port}"
            self.listens.append((address, *address.resolve(where, passive=True), port))
        self.fallback = fallback
        self.events: EventSources | None = None
        self.device: VsockDevice | None = None
        self._listeners: list[socket.socket] = []

    def start(self, events: EventSources, device: VsockDevice) -> None:
        self.events = events
        self.device = device
        if self.fallback is not None:
            self.fallback.start(events, device)
        for address, family, sockaddr, guest_port in self.listens:
            listener = socket.socket(family, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
            try:
                listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                listener.bind(sockaddr)
                listener.listen(64)
            except OSError as err:
                # As with --uds-path: the rest of the host side still works.
                log.error("cannot listen on %s for guest port %d: %s", address, guest_port, err)
                listener.close()
                continue
            listener.setblocking(False)
            self._listeners.append(listener)
            bound = listener.getsockname()
            log.info("listening on %s:%d for guest port %d", bound[0], bound[1], guest_port)
            events.watch(listener.fileno(), functools.partial(self._accept, listener, guest_port))

    def listening(self) -> list[tuple[str, int]]:
        """The (host, port) each listener is bound to (TCPPORT 0 picked one)."""
        return [s.getsockname()[:2] for s in self._listeners]

    def stop(self) -> None:
        for listener in self._listeners:
            if self.events is not None:
                self.events.unwatch(listener.fileno())
            listener.close()
        self._listeners.clear()
        if self.fallback is not None:
            self.fallback.stop()

    def close(self) -> None:
        self.stop()
        if self.fallback is not None:
            self.fallback.close()

    def connect(self, port: int, type: int) -> Endpoint | None:
        rule = self.forwards.get(port)
        if rule is None:
            return None if self.fallback is None else self.fallback.connect(port, type)
        target, family, sockaddr = rule
        if type != Type.STREAM:
            log.warning(
                "guest seqpacket connection to port %d refused: %s is TCP, a stream", port, target
            )
            return None
        assert self.events is not None
        sock = socket.socket(
            family, socket.SOCK_STREAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK
        )
        err = sock.connect_ex(sockaddr)
        if err not in (0, errno.EINPROGRESS):
            log.info("guest connection to port %d refused: %s: %s", port, target, os.strerror(err))
            sock.close()
            return None
        # On its way: the device answers the guest once the connect ends (when_open).
        connecting = err == errno.EINPROGRESS
        return TcpEndpoint(sock, self.events, connecting=connecting, target=str(target))

    def _accept(self, listener: socket.socket, guest_port: int, _now: float) -> None:
        assert self.events is not None and self.device is not None
        try:
            conn, peer = listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        except OSError as err:
            log.warning("cannot accept a TCP connection for guest port %d: %s", guest_port, err)
            return
        endpoint = TcpEndpoint(conn, self.events)
        if not self.device.host_connect(guest_port, endpoint):
            log.info(
                "TCP connection from %s to guest port %d refused: the guest is not ready",
                peer,
                guest_port,
            )
            endpoint.close()
