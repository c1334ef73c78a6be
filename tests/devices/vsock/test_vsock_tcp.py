"""virtio-vsock's TCP host side: our driver plays the guest, a TCP server on 127.0.0.1 the host."""

from __future__ import annotations

import argparse
import errno
import hashlib
import logging
import socket
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.devices.vsock.test_vsock import settle, vsock
from virtio.devices.registry import DeviceSettings, device_type
from virtio.devices.vsock import VsockDevice, VsockDriver, tcp
from virtio.devices.vsock import device as D
from virtio.devices.vsock import wire as W
from virtio.devices.vsock.driver import VsockSocket
from virtio.devices.vsock.options import backend as options_backend
from virtio.devices.vsock.tcp import TcpAddress, TcpBackend, parse_forward, parse_listen
from virtio.devices.vsock.uds import UdsBackend
from virtio.devices.vsock.wire import Type
from virtio.spec.status import DeviceStatus as S

VSOCK = "Device Types / Socket Device"
N_RXTX_DEV = f"devicenormative:{VSOCK} / Device Operation / Receive and Transmit"
N_CREDIT_DEV = f"devicenormative:{VSOCK} / Device Operation / Buffer Space Management"
LOCAL = "127.0.0.1"


class TcpServer:
    """One TCP connection on 127.0.0.1, served by ``handler`` in a thread."""

    def __init__(self, handler: Callable[[socket.socket], None]) -> None:
        self.listener = socket.create_server((LOCAL, 0))
        self.listener.settimeout(10)
        self.port: int = self.listener.getsockname()[1]
        self.handler = handler
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            conn, _ = self.listener.accept()
            with conn:
                conn.settimeout(10)
                self.handler(conn)
        except BaseException as err:
            self.error = err

    def join(self) -> None:
        self.thread.join(10)
        self.listener.close()
        assert not self.thread.is_alive()
        assert self.error is None, repr(self.error)


def echo(conn: socket.socket) -> None:
    while chunk := conn.recv(1 << 16):
        conn.sendall(chunk)


def recv_all(conn: socket.socket) -> bytes:
    chunks = bytearray()
    while chunk := conn.recv(1 << 16):
        chunks += chunk
    return bytes(chunks)


def forward(port: int, **kw: object) -> TcpBackend:
    return TcpBackend({5000: TcpAddress(LOCAL, port)}, **kw)  # type: ignore[arg-type]


def closed_port() -> int:
    """A TCP port on 127.0.0.1 nobody listens on (it was just bound and closed)."""
    with socket.create_server((LOCAL, 0)) as s:
        port: int = s.getsockname()[1]
    return port


def recv_until(driver: VsockDriver, sock: VsockSocket, n: int) -> bytes:
    data = driver.recv_exactly(sock, n)
    assert len(data) == n
    return data


# -- guest to host: --forward-tcp ------------------------------------------------------------


@pytest.mark.normative(N_RXTX_DEV)
def test_guest_connects_to_tcp_echo() -> None:
    server = TcpServer(echo)
    with vsock(forward(server.port)) as (_device, driver):
        sock = driver.connect(5000)
        driver.send(sock, b"ping over tcp")
        assert recv_until(driver, sock, 13) == b"ping over tcp"
        driver.close(sock)
    server.join()


def test_refused_tcp_connect_is_an_rst() -> None:
    with vsock(forward(closed_port())) as (device, driver):
        driver.trace = []
        with pytest.raises(ConnectionRefusedError):
            driver.connect(5000)
        assert [h.op for h in driver.trace] == [W.Op.RST]
        assert not device.conns and device.stats["refused"] == 1
        with pytest.raises(ConnectionRefusedError):
            driver.connect(5001)  # no rule and no --uds-path


def test_seqpacket_is_not_forwarded(caplog: pytest.LogCaptureFixture) -> None:
    server = TcpServer(echo)
    with vsock(forward(server.port)) as (device, driver):
        with (
            caplog.at_level(logging.WARNING, "virtio.vsock.tcp"),
            pytest.raises(ConnectionRefusedError),
        ):
            driver.connect(5000, type=Type.SEQPACKET)
        assert "seqpacket connection to port 5000 refused" in caplog.text
        assert not device.conns
        sock = driver.connect(5000)  # the stream one still goes
        driver.send(sock, b"x")
        assert recv_until(driver, sock, 1) == b"x"
        driver.close(sock)
    server.join()


def test_ports_without_a_rule_go_to_the_unix_sockets(tmp_path: Path) -> None:
    uds = tmp_path / "v.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(f"{uds}_5001")
    listener.listen(1)
    server = TcpServer(echo)
    with vsock(forward(server.port, fallback=UdsBackend(uds))) as (_device, driver):
        tcp = driver.connect(5000)
        unix = driver.connect(5001)
        host, _ = listener.accept()
        host.settimeout(10)
        driver.send(unix, b"to unix")
        driver.send(tcp, b"to tcp")
        assert recv_until(driver, tcp, 6) == b"to tcp"
        settle(driver)
        assert host.recv(64) == b"to unix"
        assert uds.exists()  # the fallback's CONNECT socket is up too
        driver.close(tcp)
        host.close()
        driver.reset()
        assert not uds.exists()  # stop() reaches the fallback
    listener.close()
    server.join()


def full_listener() -> tuple[socket.socket, socket.socket]:
    """A listener whose accept queue is full: the kernel drops new SYNs (retried in ~1 s)."""
    listener = socket.socket()
    listener.bind((LOCAL, 0))
    listener.listen(0)
    listener.settimeout(10)
    filler = socket.create_connection(listener.getsockname(), timeout=10)
    return listener, filler


@pytest.mark.normative(N_RXTX_DEV)
def test_slow_tcp_connect_answers_the_guest_once_connected() -> None:
    listener, filler = full_listener()
    result: list[bytes] = []

    def serve() -> None:
        listener.accept()[0].close()  # the filler: now the retried SYN gets in
        conn, _ = listener.accept()
        with conn:
            conn.settimeout(10)
            data = conn.recv(64)
            result.append(data)
            conn.sendall(data.upper())

    thread = threading.Thread(target=serve, daemon=True)
    with vsock(forward(listener.getsockname()[1])) as (device, driver):
        thread.start()
        # The device's RESPONSE waits for the TCP connect, which waits for the retried SYN;
        # the device loop goes on meanwhile (the driver's wait runs it).
        sock = driver.connect(5000)
        endpoint = device.conns[(5000, sock.local_port)].endpoint
        assert isinstance(endpoint, tcp.TcpEndpoint)
        assert not endpoint.connecting
        assert endpoint.sock.getpeername() == listener.getsockname()
        driver.send(sock, b"early")
        assert recv_until(driver, sock, 5) == b"EARLY"
        driver.close(sock)
    thread.join(10)
    assert result == [b"early"]
    filler.close()
    listener.close()


@pytest.mark.normative(N_RXTX_DEV)
def test_tcp_connect_that_never_ends_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(D, "CONNECT_TIMEOUT", 0.3)
    listener, filler = full_listener()  # never accepted: the SYN is dropped again and again
    with vsock(forward(listener.getsockname()[1])) as (device, driver):
        with pytest.raises(ConnectionRefusedError):
            driver.connect(5000)
        assert device.stats["refused"] == 1
        assert not device.conns
    filler.close()
    listener.close()


def test_guest_half_close_reaches_tcp() -> None:
    def answer(conn: socket.socket) -> None:
        question = recv_all(conn)  # until the guest's SHUTDOWN (send)
        conn.sendall(b"answer to " + question)

    server = TcpServer(answer)
    with vsock(forward(server.port)) as (_device, driver):
        sock = driver.connect(5000)
        driver.send(sock, b"question")
        driver.shutdown(sock, W.SHUTDOWN_SEND)
        got = bytearray()
        while chunk := driver.recv(sock):
            got += chunk
        assert got == b"answer to question"  # then the server's FIN: b""
        assert sock.eof
        driver.close(sock)
    server.join()


@pytest.mark.normative(N_CREDIT_DEV)
def test_large_echo_both_ways() -> None:
    data = bytes(range(256)) * (8 << 12)  # 8 MiB
    server = TcpServer(echo)
    with vsock(forward(server.port)) as (_device, driver):
        sock = driver.connect(5000)
        back = bytearray()
        for i in range(0, len(data), 1 << 16):
            driver.send(sock, data[i : i + (1 << 16)])
            while len(back) < i:  # keep reading: the echo waits on our credit
                back += driver.recv(sock)
        back += recv_until(driver, sock, len(data) - len(back))
        assert bytes(back) == data
        driver.close(sock)
    server.join()


@pytest.mark.normative(N_CREDIT_DEV)
def test_tcp_to_guest_back_pressure() -> None:
    data = bytes(range(251)) * (16 << 12)  # ~16 MiB: more than the kernel's buffers hold
    server = TcpServer(lambda conn: conn.sendall(data))
    with vsock(forward(server.port)) as (device, driver):
        sock = driver.connect(5000)
        settle(driver, 30)  # the guest reads nothing meanwhile
        (conn,) = device.conns.values()
        # No credit: the device stopped reading the TCP socket, holding at most MAX_PENDING.
        assert not conn.reading and conn.guest_room() == 0
        assert conn.waiting_for_guest() <= D.MAX_PENDING
        assert len(sock.data) <= driver.buf_alloc
        assert server.thread.is_alive()  # the rest waits in the sender
        got = recv_until(driver, sock, len(data))
        assert hashlib.sha256(got).digest() == hashlib.sha256(data).digest()
        assert driver.recv(sock) == b""  # the server closed
        driver.close(sock)
    server.join()


@pytest.mark.normative(N_CREDIT_DEV)
def test_guest_to_tcp_back_pressure() -> None:
    go = threading.Event()
    received: list[bytes] = []

    def slow_reader(conn: socket.socket) -> None:
        go.wait(30)
        received.append(recv_all(conn))

    server = TcpServer(slow_reader)
    chunk = bytes(range(256)) * 256
    sent = 0
    with vsock(forward(server.port)) as (device, driver):
        sock = driver.connect(5000)
        (conn,) = device.conns.values()
        stalled = 0
        while stalled < 20 and sent < 256 << 20:
            if sock.peer_room() == 0:
                stalled += 1
                settle(driver, 1)
                continue
            stalled = 0
            n = min(sock.peer_room(), len(chunk))
            driver.send(sock, chunk[:n])
            sent += n
            settle(driver, 1)
        # The TCP socket takes no more: the device holds the guest's credit's worth, no more.
        assert stalled == 20 and sent < 256 << 20
        assert 0 < len(conn.to_host) <= device.buf_alloc
        go.set()
        driver.send(sock, b"end")
        sent += 3
        driver.shutdown(sock, W.SHUTDOWN_SEND)
        # The device's loop runs while the driver waits: it drains to_host into TCP.
        assert driver.transport.wait_until(lambda: not server.thread.is_alive(), 30)
        driver.close(sock)
    server.join()
    (got,) = received
    assert len(got) == sent and got.endswith(b"end")


# -- host to guest: --listen-tcp ---------------------------------------------------------------


def listen_backend() -> TcpBackend:
    return TcpBackend(listens=[(TcpAddress(LOCAL, 0), 6000)])


@pytest.mark.normative(N_RXTX_DEV)
def test_tcp_client_reaches_guest_listener() -> None:
    backend = listen_backend()
    with vsock(backend) as (_device, driver):
        ((host, port),) = backend.listening()
        assert host == LOCAL and port > 0
        driver.listen(6000)
        client = socket.create_connection((LOCAL, port), timeout=10)
        client.sendall(b"early data")
        sock = driver.accept(6000)
        assert recv_until(driver, sock, 10) == b"early data"
        driver.send(sock, b"reply")
        settle(driver)
        assert client.recv(64) == b"reply"  # no "OK" line on TCP
        # The client's half-close: the guest reads end of file and may still send.
        client.shutdown(socket.SHUT_WR)
        assert driver.recv(sock) == b""
        driver.send(sock, b"after eof")
        settle(driver)
        assert client.recv(64) == b"after eof"
        driver.close(sock)
        assert client.recv(64) == b""  # the guest closed: so is the TCP connection
        client.close()
        driver.reset()
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection((LOCAL, port), timeout=10)  # reset stops listening


def test_guest_refusal_closes_the_tcp_connection() -> None:
    backend = listen_backend()
    with vsock(backend) as (device, driver):
        ((_, port),) = backend.listening()
        driver.trace = []
        client = socket.create_connection((LOCAL, port), timeout=10)  # nobody listens on 6000
        settle(driver)
        try:
            tail = client.recv(64)
        except ConnectionResetError:
            tail = b""
        assert tail == b""
        assert not device.conns and [h.op for h in driver.trace] == [W.Op.REQUEST]
        client.close()


def test_large_transfer_from_tcp_client() -> None:
    backend = listen_backend()
    data = bytes(range(253)) * (4 << 12)  # ~4 MiB each way
    with vsock(backend) as (_device, driver):
        ((_, port),) = backend.listening()
        driver.listen(6000)
        client = socket.create_connection((LOCAL, port), timeout=10)
        received: list[bytes] = []
        reader = threading.Thread(target=lambda: received.append(recv_all(client)), daemon=True)
        sender = threading.Thread(target=lambda: client.sendall(data), daemon=True)
        reader.start()
        sender.start()
        sock = driver.accept(6000)
        got = bytearray()
        for i in range(0, len(data), 1 << 16):
            driver.send(sock, data[i : i + (1 << 16)])
            got += driver.recv(sock) if len(got) < len(data) else b""
        got += recv_until(driver, sock, len(data) - len(got))
        assert bytes(got) == data
        sender.join(10)
        driver.close(sock)
        reader.join(10)
        assert received == [data]
        client.close()


# -- options ---------------------------------------------------------------------------------------


def test_rule_syntax() -> None:
    assert parse_forward("5000=127.0.0.1:80") == (5000, TcpAddress(LOCAL, 80))
    assert parse_forward("1=[::1]:8080") == (1, TcpAddress("::1", 8080))
    assert parse_forward("7=localhost:22") == (7, TcpAddress("localhost", 22))
    assert parse_listen("2222=22") == (TcpAddress(LOCAL, 2222), 22)
    assert parse_listen("0.0.0.0:2222=22") == (TcpAddress("0.0.0.0", 2222), 22)
    assert parse_listen("[::]:0=4294967295") == (TcpAddress("::", 0), 0xFFFFFFFF)
    for bad in ("5000", "x=1.2.3.4:80", "5=1.2.3.4", "5=1.2.3.4:0", "5=::1:80", "5=:80"):
        with pytest.raises(argparse.ArgumentTypeError):
            parse_forward(bad)
    for bad in ("2222", "70000=22", "2222=4294967296", "2222=-1", "h:x=1"):
        with pytest.raises(argparse.ArgumentTypeError):
            parse_listen(bad)


def test_serve_options(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    kind = device_type("vsock")
    parser = argparse.ArgumentParser(prog="virtio serve vsock")
    kind.add_arguments(parser)
    args = parser.parse_args(
        [
            *("--forward-tcp", "5000=127.0.0.1:80"),
            *("--forward-tcp", "5001=[::1]:81"),
            *("--listen-tcp", "2222=22"),
        ]
    )
    device = kind.from_arguments(args, DeviceSettings())
    assert isinstance(device, VsockDevice) and isinstance(device.backend, TcpBackend)
    assert set(device.backend.forwards) == {5000, 5001} and device.backend.fallback is None
    with_uds = parser.parse_args(["--uds-path", str(tmp_path / "u"), "--listen-tcp", "1=2"])
    tcp = options_backend(with_uds)
    assert isinstance(tcp, TcpBackend) and isinstance(tcp.fallback, UdsBackend)
    assert isinstance(options_backend(parser.parse_args(["--uds-path", "u"])), UdsBackend)
    with pytest.raises(ValueError, match="give --uds-path, --forward-tcp or --listen-tcp"):
        kind.from_arguments(parser.parse_args([]), DeviceSettings())
    with pytest.raises(ValueError, match="forwarded twice"):
        options_backend(
            parser.parse_args(["--forward-tcp", "1=127.0.0.1:1", "--forward-tcp", "1=127.0.0.1:2"])
        )
    with pytest.raises(ValueError, match="given twice"):
        options_backend(parser.parse_args(["--listen-tcp", "5=1", "--listen-tcp", "5=2"]))
    with pytest.raises(ValueError, match="cannot resolve"):
        options_backend(parser.parse_args(["--forward-tcp", "1=no-such-host.invalid:1"]))
    with pytest.raises(SystemExit):
        parser.parse_args(["--forward-tcp", "5000=localhost"])
    err = capsys.readouterr().err
    assert "argument --forward-tcp: '5000=localhost' is not PORT=HOST:TCPPORT" in err


def test_listen_failure_is_logged(caplog: pytest.LogCaptureFixture) -> None:
    with socket.create_server((LOCAL, 0)) as taken:
        port = taken.getsockname()[1]
        backend = TcpBackend(listens=[(TcpAddress(LOCAL, port), 6000)])
        with caplog.at_level(logging.ERROR, "virtio.vsock.tcp"), vsock(backend) as (device, driver):
            assert backend.listening() == []
            assert device.status & S.DRIVER_OK  # the device still works
            with pytest.raises(ConnectionRefusedError):
                driver.connect(5000)
        assert f"cannot listen on {LOCAL}:{port} for guest port 6000" in caplog.text


def test_refused_error_names_the_target(caplog: pytest.LogCaptureFixture) -> None:
    port = closed_port()
    with vsock(forward(port)) as (_device, driver):
        with (
            caplog.at_level(logging.INFO, "virtio.vsock"),
            pytest.raises(ConnectionRefusedError) as info,
        ):
            driver.connect(5000)
        assert info.value.errno == errno.ECONNREFUSED
        assert f"{LOCAL}:{port}: Connection refused" in caplog.text
