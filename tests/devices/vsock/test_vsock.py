"""virtio-vsock: the device model and the driver, in process (register-level loopback)."""

from __future__ import annotations

import argparse
import errno
import socket
import threading
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from virtio.core.events import EventSources
from virtio.devices.registry import DeviceSettings, device_type
from virtio.devices.vsock import VsockDevice, VsockDriver
from virtio.devices.vsock import wire as W
from virtio.devices.vsock.device import MAX_CONTROL, Endpoint, MessageTooLarge, VsockBackend
from virtio.devices.vsock.driver import RX_BUFFER, RX_BUFFERS
from virtio.devices.vsock.uds import UdsBackend
from virtio.devices.vsock.wire import Hdr, Op, Type
from virtio.spec.status import DeviceStatus as S
from virtio.transport.loopback import Loopback

VSOCK = "Device Types / Socket Device"
N_FEAT_DEV = f"devicenormative:{VSOCK} / Feature bits"
N_FEAT_DRV = f"drivernormative:{VSOCK} / Feature bits"
N_FLOW_DEV = f"devicenormative:{VSOCK} / Device Operation / Virtqueue Flow Control"
N_FLOW_DRV = f"drivernormative:{VSOCK} / Device Operation / Virtqueue Flow Control"
N_CREDIT_DEV = f"devicenormative:{VSOCK} / Device Operation / Buffer Space Management"
N_CREDIT_DRV = f"drivernormative:{VSOCK} / Device Operation / Buffer Space Management"
N_RXTX_DEV = f"devicenormative:{VSOCK} / Device Operation / Receive and Transmit"
N_RXTX_DRV = f"drivernormative:{VSOCK} / Device Operation / Receive and Transmit"
N_EVENTS_DRV = f"drivernormative:{VSOCK} / Device Operation / Device Events"
N_FRAMING_DRV = "drivernormative:Basic Facilities of a Virtio Device / Message Framing"

CID = 7


class FakeEnd:
    """A host end in memory: records what the guest sent, hands it data on demand."""

    def __init__(self, events: EventSources, *, take: int | None = None, message: bool = False):
        self.events = events
        self.take = take
        self.message = message
        self.received = bytearray()
        self.messages: list[bytes] = []
        self.incoming: deque[bytes] = deque()
        self.eof = False
        self.reading = False
        self.closed = False
        self.write_shut = False
        self.accepted_port: int | None = None
        self._cb: Callable[[], None] | None = None

    def start(self, on_readable: Callable[[], None]) -> None:
        self._cb = on_readable

    def set_reading(self, on: bool) -> None:
        self.reading = on
        if on:
            self._poke()

    def _poke(self) -> None:
        # Level-triggered, as the host loop is: call back (later) while data waits.
        if self.reading and (self.incoming or self.eof) and self._cb is not None:
            cb = self._cb

            def later(_now: float) -> None:
                if self.reading:
                    cb()

            self.events.call_later(0.0, later)

    def feed(self, data: bytes = b"", *, eof: bool = False) -> None:
        if data:
            self.incoming.append(data)
        self.eof = self.eof or eof
        self._poke()

    def read(self, n: int) -> bytes | None:
        if not self.incoming:
            return b"" if self.eof else None
        head = self.incoming[0]
        if self.message:
            if len(head) > n:
                raise MessageTooLarge(len(head))
            self.incoming.popleft()
            out = head
        else:
            out = head[:n]
            if len(head) > n:
                self.incoming[0] = head[n:]
            else:
                self.incoming.popleft()
        self._poke()
        return out

    def write(self, data: bytes) -> int:
        n = len(data) if self.take is None else min(self.take, len(data))
        if self.message:
            self.messages.append(data)
        else:
            self.received += data[:n]
        return n

    def shutdown_write(self) -> None:
        self.write_shut = True

    def accepted(self, local_port: int) -> None:
        self.accepted_port = local_port

    def close(self) -> None:
        self.closed = True


class FakeBackend:
    """Host ports: an end per guest connection to a listening port."""

    def __init__(self, ports: tuple[int, ...] = (5000,), **end_kw: object) -> None:
        self.ports = ports
        self.end_kw = end_kw
        self.ends: list[FakeEnd] = []
        self.events: EventSources | None = None
        self.device: VsockDevice | None = None
        self.stopped = 0

    def start(self, events: EventSources, device: VsockDevice) -> None:
        self.events = events
        self.device = device

    def stop(self) -> None:
        self.stopped += 1

    def close(self) -> None:
        pass

    def end(self, **kw: object) -> FakeEnd:
        assert self.events is not None
        end = FakeEnd(self.events, **{**self.end_kw, **kw})  # type: ignore[arg-type]
        self.ends.append(end)
        return end

    def connect(self, port: int, type: int) -> Endpoint | None:
        if port not in self.ports:
            return None
        return self.end(message=type == Type.SEQPACKET)


@contextmanager
def vsock(
    backend: VsockBackend | None = None,
    *,
    start: bool = True,
    buf_alloc: int = 256 << 10,
    **device_kw: object,
) -> Iterator[tuple[VsockDevice, VsockDriver]]:
    device = VsockDevice(backend or FakeBackend(), guest_cid=CID, **device_kw)  # type: ignore[arg-type]
    with Loopback(device) as lb:
        driver = VsockDriver(lb, buf_alloc=buf_alloc)
        driver.initialize()
        if start:
            driver.start()
        yield device, driver


def raw(driver: VsockDriver, hdr: Hdr, payload: bytes = b"", *, pump: bool = True) -> None:
    """Send one packet exactly as given (a hostile or careless driver)."""
    driver.submit(W.TX, [hdr.pack() + payload])
    driver.kick(W.TX)
    if pump:
        settle(driver)


def settle(driver: VsockDriver, rounds: int = 3) -> None:
    for _ in range(rounds):
        driver.transport.wait_until(lambda: False, 0.01)
        driver.pump()


def hdr(op: int, *, src: int = 1234, dst: int = 5000, length: int = 0, **kw: int) -> Hdr:
    fields = {"type": Type.STREAM, "buf_alloc": 1 << 16, "fwd_cnt": 0, "flags": 0}
    fields.update(kw)
    return Hdr(
        fields.pop("src_cid", CID),
        fields.pop("dst_cid", W.HOST_CID),
        src,
        dst,
        length,
        op=op,
        **fields,
    )


def rsts(driver: VsockDriver) -> list[Hdr]:
    assert driver.trace is not None
    return [h for h in driver.trace if h.op == Op.RST]


# -- configuration and features ---------------------------------------------------------


@pytest.mark.normative(N_FEAT_DEV, N_RXTX_DEV)
def test_config_and_features() -> None:
    with vsock() as (device, driver):
        assert driver.guest_cid == CID
        assert device.config[:8] == CID.to_bytes(8, "little")
        for bit in (W.STREAM_F, W.SEQPACKET_F, W.NO_IMPLIED_STREAM_F):
            assert driver.has(bit)
            assert device.offered_features >> bit & 1
    for cid in (0, 1, 2, 0xFFFFFFFF, 0xFFFFFFFFFFFFFFFF, 1 << 32):
        with pytest.raises(ValueError):
            VsockDevice(guest_cid=cid)


@pytest.mark.normative(N_FEAT_DEV, N_FEAT_DRV)
def test_stream_implied_rules() -> None:
    assert W.stream_offered(0)
    assert W.stream_offered(1 << W.SEQPACKET_F)
    assert not W.stream_offered(1 << W.SEQPACKET_F | 1 << W.NO_IMPLIED_STREAM_F)
    assert W.stream_offered(1 << W.STREAM_F | 1 << W.NO_IMPLIED_STREAM_F)
    # A driver wanting only seqpacket (NO_IMPLIED_STREAM): stream sockets are refused locally.
    device = VsockDevice(guest_cid=CID)
    with Loopback(device) as lb:
        want = 1 << W.SEQPACKET_F | 1 << W.NO_IMPLIED_STREAM_F
        driver = VsockDriver(lb, features=want)
        driver.initialize()
        driver.start()
        assert not driver.stream_ok()
        with pytest.raises(OSError) as err:
            driver.connect(5000)
        assert err.value.errno == errno.ESOCKTNOSUPPORT
        # A stream REQUEST sent anyway gets an RST from the device.
        driver.trace = []
        raw(driver, hdr(Op.REQUEST))
        assert len(rsts(driver)) == 1


# -- stream connections --------------------------------------------------------------------


@pytest.mark.normative(N_RXTX_DEV, N_RXTX_DRV, N_CREDIT_DEV, N_CREDIT_DRV)
def test_guest_connects_and_data_flows_both_ways() -> None:
    backend = FakeBackend()
    with vsock(backend) as (device, driver):
        sock = driver.connect(5000)
        assert sock.peer_buf_alloc == device.buf_alloc
        (end,) = backend.ends
        driver.send(sock, b"hello host")
        settle(driver)
        assert bytes(end.received) == b"hello host"
        end.feed(b"hello guest")
        assert driver.recv(sock) == b"hello guest"
        big = bytes(range(256)) * 1024  # 256 KiB: many packets, credit updates
        driver.send(sock, big)
        settle(driver)
        assert bytes(end.received[10:]) == big
        end.feed(big)
        assert driver.recv_exactly(sock, len(big)) == big
        # Host end of file: SHUTDOWN(send) to the guest, which reads EOF.
        end.feed(eof=True)
        assert driver.recv(sock) == b""
        assert sock.peer_shutdown == W.SHUTDOWN_SEND
        driver.close(sock)
        assert sock.error is None  # the device's RST ended the clean close
        assert end.closed and end.write_shut
        assert not device.conns


def test_connection_refused_without_listener() -> None:
    with vsock() as (device, driver):
        with pytest.raises(ConnectionRefusedError):
            driver.connect(4444)
        assert device.stats["refused"] == 1


@pytest.mark.normative(N_RXTX_DEV)
def test_host_connects_to_guest_listener() -> None:
    backend = FakeBackend()
    with vsock(backend) as (device, driver):
        driver.listen(6000)
        end = backend.end()
        assert device.host_connect(6000, end)
        sock = driver.accept(6000)
        settle(driver)
        assert end.accepted_port is not None and end.accepted_port >= 1 << 30
        assert sock.peer_port == end.accepted_port
        end.feed(b"ping")
        assert driver.recv(sock) == b"ping"
        driver.send(sock, b"pong")
        settle(driver)
        assert bytes(end.received) == b"pong"
        # No listener: the guest resets, the host end is closed.
        other = backend.end()
        assert device.host_connect(6001, other)
        settle(driver)
        assert other.closed and other.accepted_port is None


def test_host_connect_refused_before_driver_ok() -> None:
    device = VsockDevice(FakeBackend(), guest_cid=CID)
    assert not device.host_connect(1, FakeEnd(EventSources()))


# -- credit ---------------------------------------------------------------------------------------


@pytest.mark.normative(N_CREDIT_DEV)
def test_device_never_sends_past_guest_credit() -> None:
    backend = FakeBackend()
    with vsock(backend, buf_alloc=3000) as (_device, driver):
        sock = driver.connect(5000)
        (end,) = backend.ends
        data = bytes(range(256)) * 80  # 20480 bytes, seven times the credit
        end.feed(data)
        settle(driver, 6)
        # Without reading, the guest holds no more than its buffer.
        assert len(sock.data) == 3000
        assert end.incoming  # the rest waits on the host end
        got = bytearray()
        while len(got) < len(data):
            got += driver.recv(sock, 1000)
            assert (sock.rx_cnt - sock.fwd_cnt) <= 3000
        assert bytes(got) == data
        assert driver.stats["credit_overruns"] == 0


@pytest.mark.normative(N_CREDIT_DEV, N_CREDIT_DRV)
def test_device_credit_and_credit_request() -> None:
    backend = FakeBackend(take=0)  # a host end that takes nothing yet
    with vsock(backend, buf_alloc=4096) as (device, driver):
        device.buf_alloc = 8192
        sock = driver.connect(5000)
        (end,) = backend.ends
        driver.send(sock, b"x" * 8192)
        settle(driver)
        assert sock.peer_room() == 0
        # Credit exhausted: the driver asks, the device answers, nothing is free yet.
        driver.trace = []
        driver._send(sock, Op.CREDIT_REQUEST)
        settle(driver)
        updates = [h for h in driver.trace if h.op == Op.CREDIT_UPDATE]
        assert updates and updates[-1].fwd_cnt == 0 and updates[-1].buf_alloc == 8192
        end.take = None  # the host reads: fwd_cnt moves, the device says so
        settle(driver, 5)
        assert bytes(end.received) == b"x" * 8192
        assert sock.peer_fwd_cnt == 8192
        assert sock.peer_room() == 8192


@pytest.mark.normative(N_CREDIT_DRV, N_CREDIT_DEV)
def test_driver_credit_overrun_gets_rst() -> None:
    backend = FakeBackend(take=0)
    with vsock(backend) as (device, driver):
        device.buf_alloc = 1000
        sock = driver.connect(5000)
        (end,) = backend.ends
        driver.trace = []
        # 1500 bytes against a credit of 1000: the device resets the connection.
        h = hdr(Op.RW, src=sock.local_port, length=1500)
        raw(driver, h, b"z" * 1500)
        assert device.stats["credit_overruns"] == 1
        assert [(r.src_port, r.dst_port) for r in rsts(driver)] == [(5000, sock.local_port)]
        assert end.closed and not device.conns
        assert sock.error == errno.ECONNRESET


# -- hostile drivers ----------------------------------------------------------------------------


@pytest.mark.normative(N_RXTX_DEV)
def test_bad_packets_are_dropped_or_reset() -> None:
    backend = FakeBackend()
    with vsock(backend) as (device, driver):
        driver.trace = []
        # len past the buffer: dropped, RST to the flow.
        raw(driver, hdr(Op.RW, length=100), b"short")
        assert len(rsts(driver)) == 1 and device.stats["dropped"] == 1
        # A header cut short: dropped, nothing to answer.
        driver.submit(W.TX, [b"\x01" * 20])
        driver.kick(W.TX)
        settle(driver)
        assert len(rsts(driver)) == 1 and device.stats["dropped"] == 2
        # Unknown op and unknown type: RST (the type case is a MUST).
        raw(driver, hdr(99))
        raw(driver, hdr(Op.REQUEST, type=7))
        raw(driver, hdr(Op.INVALID))
        assert len(rsts(driver)) == 4
        assert {r.type for r in rsts(driver)} == {Type.STREAM, 7}
        # Wrong source or destination CID: dropped without an answer.
        raw(driver, hdr(Op.REQUEST, src_cid=CID + 1))
        raw(driver, hdr(Op.REQUEST, dst_cid=CID))
        raw(driver, hdr(Op.REQUEST, src_cid=CID | 1 << 32))
        assert len(rsts(driver)) == 4 and not backend.ends
        # RW or SHUTDOWN for no connection: RST; an RST for none: silence.
        raw(driver, hdr(Op.RW, length=3), b"abc")
        raw(driver, hdr(Op.SHUTDOWN, flags=3))
        raw(driver, hdr(Op.RST))
        assert len(rsts(driver)) == 6
        # The device still works.
        assert device.status & S.DRIVER_OK and not device.status & S.DEVICE_NEEDS_RESET
        sock = driver.connect(5000)
        driver.send(sock, b"still fine")
        settle(driver)
        assert bytes(backend.ends[0].received) == b"still fine"


def test_duplicate_request_and_wrong_type_reset_the_connection() -> None:
    backend = FakeBackend()
    with vsock(backend) as (device, driver):
        sock = driver.connect(5000)
        driver.trace = []
        raw(driver, hdr(Op.REQUEST, src=sock.local_port))
        assert len(rsts(driver)) == 1 and backend.ends[0].closed and not device.conns
        sock = driver.connect(5000)
        raw(driver, hdr(Op.RW, src=sock.local_port, type=Type.SEQPACKET, length=1), b"q")
        assert len(rsts(driver)) == 2 and backend.ends[1].closed
        sock = driver.connect(5000)
        driver.shutdown(sock, W.SHUTDOWN_SEND)
        settle(driver)
        assert backend.ends[2].write_shut
        raw(driver, hdr(Op.RW, src=sock.local_port, length=1), b"q")  # data after SHUTDOWN
        assert len(rsts(driver)) == 3 and backend.ends[2].closed


@pytest.mark.normative(N_FRAMING_DRV)
def test_writable_tx_buffer_needs_reset() -> None:
    with vsock() as (device, driver):
        driver.submit(W.TX, [hdr(Op.REQUEST).pack()], [16])
        driver.kick(W.TX)
        assert device.status & S.DEVICE_NEEDS_RESET
        assert "device-writable" in (device.needs_reset_reason or "")


def test_small_rx_buffer_needs_reset() -> None:
    with vsock(start=False) as (device, driver):
        driver.submit(W.RX, [], [W.HDR_SIZE - 1])
        driver.kick(W.RX)
        assert device.status & S.DEVICE_NEEDS_RESET


@pytest.mark.normative(N_FLOW_DEV)
def test_tx_waits_when_replies_pile_up() -> None:
    with vsock(start=False, queue_max_size=256) as (device, driver):
        driver.trace = []
        # No rx buffers: every RST waits in the device; past MAX_CONTROL tx waits too.
        sent = 0
        while sent < MAX_CONTROL + 100:
            for _ in range(100):
                driver.submit(W.TX, [hdr(Op.RW, src=sent, length=0).pack()])
                sent += 1
            driver.kick(W.TX)
            for request in driver.harvest(W.TX):
                driver.release(request)
        assert device.stats["tx_stalled"] > 0
        assert len(device._control) == MAX_CONTROL
        # Buffers arrive: replies flow, the waiting tx buffers are served.
        for _ in range(64):
            driver.submit(W.RX, [], [W.HDR_SIZE + 64])
        driver.kick(W.RX)
        rounds = 0
        while len(rsts(driver)) < sent and rounds < 200:
            settle(driver, 1)  # the pump gives every rx buffer used back
            rounds += 1
        assert len(rsts(driver)) == sent
        assert not device._tx_stalled


def stall_tx(monkeypatch: pytest.MonkeyPatch, device: VsockDevice) -> Callable[[], None]:
    """Make the device stop consuming tx buffers; the returned call lets it go on."""
    serve = device.process_queue
    stalled = [True]

    def process_queue(index: int, *, rearm: bool = True) -> int:
        if index == W.TX and stalled[0]:
            return 0  # the buffers stay available, untouched
        return serve(index, rearm=rearm)

    def resume() -> None:
        stalled[0] = False
        serve(W.TX)

    monkeypatch.setattr(device, "process_queue", process_queue)
    return resume


@pytest.mark.normative(N_FLOW_DRV)
def test_driver_takes_rx_while_tx_is_full(monkeypatch: pytest.MonkeyPatch) -> None:
    backend = FakeBackend()
    with vsock(backend, buf_alloc=1 << 20) as (device, driver):
        sock = driver.connect(5000)
        (end,) = backend.ends
        resume = stall_tx(monkeypatch, device)
        tx_size = driver.queues[W.TX].size
        chunks = [i.to_bytes(4, "little") * 25 for i in range(tx_size + 50)]
        for chunk in chunks:
            driver.send(sock, chunk)
        # The tx queue is full; the rest waits outside it, in order.
        assert driver.queues[W.TX].num_free == 0 and len(driver._tx_backlog) == 50
        # Meanwhile the device sends 1 MiB: four times the rx buffers the driver keeps.
        down = bytes(range(256)) * 4096
        assert len(down) == 4 * RX_BUFFERS * RX_BUFFER
        end.feed(down)
        assert driver.recv_exactly(sock, len(down)) == down
        assert device.stats["packets_to_guest"] > 4 * RX_BUFFERS
        assert not end.received and driver.queues[W.TX].num_free == 0  # still stalled
        assert len(driver._tx_backlog) > 50  # CREDIT_UPDATEs queued behind the data
        # The device takes tx again: every queued packet goes, in order.
        resume()
        rounds = 0
        while (driver._tx_backlog or len(end.received) < 100 * len(chunks)) and rounds < 100:
            settle(driver, 1)
            rounds += 1
        assert bytes(end.received) == b"".join(chunks)
        assert not driver._tx_backlog and sock.state == "connected"
        conn = device.conns[(5000, sock.local_port)]
        assert conn.peer_fwd_cnt == sock.fwd_cnt  # the queued CREDIT_UPDATEs arrived
        driver.close(sock)
        assert not device.conns


@pytest.mark.normative(N_FLOW_DRV)
def test_driver_bounds_replies_outside_a_full_tx_queue(monkeypatch: pytest.MonkeyPatch) -> None:
    from virtio.devices.vsock import driver as DRV

    monkeypatch.setattr(DRV, "MAX_REPLIES", 8)
    backend = FakeBackend()
    with vsock(backend) as (device, driver):
        sock = driver.connect(5000)
        resume = stall_tx(monkeypatch, device)
        for _ in range(driver.queues[W.TX].size):
            driver.send(sock, b"x")
        assert driver.queues[W.TX].num_free == 0 and not driver._tx_backlog
        # The device connects to 30 ports nobody listens on: each REQUEST needs an RST.
        for port in range(7000, 7030):
            assert device.host_connect(port, backend.end())
        settle(driver)
        # Eight replies wait outside the full queue; the other requests wait in rx.
        assert driver._replies == 8 and len(driver._tx_backlog) == 8
        assert len(driver._rx_held) == 22 and driver.stats["rx_held"] > 0
        resume()
        rounds = 0
        while len(device.conns) > 1 and rounds < 100:
            settle(driver, 1)
            rounds += 1
        # Every request got its RST, nothing was lost; the data went too.
        assert list(device.conns) == [(5000, sock.local_port)]
        assert all(end.closed for end in backend.ends[1:])
        assert bytes(backend.ends[0].received) == b"x" * driver.queues[W.TX].size
        assert driver._replies == 0 and not driver._rx_held


# -- seqpacket ---------------------------------------------------------------------------------------


@pytest.mark.normative(N_RXTX_DEV, N_CREDIT_DEV)
def test_seqpacket_keeps_message_boundaries() -> None:
    backend = FakeBackend()
    with vsock(backend) as (_device, driver):
        sock = driver.connect(5000, type=Type.SEQPACKET)
        (end,) = backend.ends
        assert end.message
        big = bytes(range(256)) * 40  # 10 KiB: several packets, one message
        for msg in (b"one", b"", big, b"three"):
            driver.send_message(sock, msg)
        settle(driver)
        assert end.messages == [b"one", b"", big, b"three"]
        end.feed(b"alpha")
        end.feed(big)
        assert driver.recv_message(sock) == (b"alpha", W.SEQ_EOM)
        assert driver.recv_message(sock) == (big, W.SEQ_EOM)
        # A message that ends a record (EOR) still arrives as one message.
        driver.send_message(sock, b"rec", eor=True)
        settle(driver)
        assert end.messages[-1] == b"rec"
        with pytest.raises(OSError) as err:
            driver.send_message(sock, b"x" * (sock.peer_buf_alloc + 1))
        assert err.value.errno == errno.EMSGSIZE


def test_seqpacket_not_offered() -> None:
    with vsock(seqpacket=False) as (_device, driver):
        assert not driver.has(W.SEQPACKET_F)
        driver.trace = []
        raw(driver, hdr(Op.REQUEST, type=Type.SEQPACKET))
        assert len(rsts(driver)) == 1


# -- events and reset ---------------------------------------------------------------------------


@pytest.mark.normative(N_EVENTS_DRV)
def test_transport_reset_event() -> None:
    backend = FakeBackend()
    with vsock(backend) as (device, driver):
        driver.listen(6000)
        sock = driver.connect(5000)
        device.transport_reset()
        settle(driver)
        assert driver.transport_resets == 1
        assert sock.error == errno.ECONNRESET and not driver.sockets
        assert backend.ends[0].closed and not device.conns
        # The listener still works, and so do new connections.
        end = backend.end()
        assert device.host_connect(6000, end)
        accepted = driver.accept(6000)
        assert accepted.state == "connected"
        # A front-end leaving drops connections the same way.
        device.flush_backend()
        settle(driver)
        assert driver.transport_resets == 2 and end.closed


def test_device_reset_closes_connections() -> None:
    backend = FakeBackend()
    with vsock(backend) as (device, driver):
        driver.connect(5000)
        driver.reset()
        assert backend.ends[0].closed and not device.conns and backend.stopped == 1


# -- a hostile device ----------------------------------------------------------------------------


def test_driver_survives_hostile_device_packets() -> None:
    backend = FakeBackend()
    with vsock(backend, buf_alloc=100) as (_device, driver):
        sock = driver.connect(5000)
        driver.trace = []
        sent_before = driver.stats["rst_sent"]
        base = Hdr(W.HOST_CID, CID, 5000, sock.local_port, 0, Type.STREAM, Op.RW, 0, 1 << 16, 0)
        # Too short, len past what was written, another CID, unknown type / op.
        driver._rx_packet(b"\x00" * 10, 10)
        driver._rx_packet(Hdr(**{**base.__dict__, "len": 50}).pack() + b"ab", W.HDR_SIZE + 2)
        driver._rx_packet(Hdr(**{**base.__dict__, "dst_cid": 99}).pack(), W.HDR_SIZE)
        driver._rx_packet(Hdr(**{**base.__dict__, "type": 9}).pack(), W.HDR_SIZE)
        driver._rx_packet(Hdr(**{**base.__dict__, "op": 42}).pack(), W.HDR_SIZE)
        assert driver.stats["bad_packets"] == 5
        assert driver.stats["rst_sent"] - sent_before == 3
        assert sock.state == "connected"
        # Data past the credit the driver gave: RST, the socket is reset.
        over = Hdr(**{**base.__dict__, "len": 101})
        driver._rx_packet(over.pack() + b"o" * 101, W.HDR_SIZE + 101)
        assert driver.stats["credit_overruns"] == 1
        assert sock.state == "closed" and sock.error == errno.ECONNRESET
        settle(driver)
        assert backend.ends[0].closed  # the device took the driver's RST


# -- the hybrid Unix-socket host side --------------------------------------------------------


def _accept_in_thread(listener: socket.socket) -> tuple[threading.Thread, list[socket.socket]]:
    got: list[socket.socket] = []

    def run() -> None:
        conn, _ = listener.accept()
        got.append(conn)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, got


@pytest.mark.normative(N_RXTX_DEV)
def test_unix_socket_host_side(tmp_path: Path) -> None:
    uds = tmp_path / "v.sock"
    with vsock(UdsBackend(uds)) as (_device, driver):
        # Guest -> host: port 5000 is the Unix socket v.sock_5000.
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(f"{uds}_5000")
        listener.listen(1)
        listener.settimeout(10)
        thread, got = _accept_in_thread(listener)
        sock = driver.connect(5000)
        thread.join(10)
        (host,) = got
        host.settimeout(10)
        driver.send(sock, b"from guest")
        settle(driver)
        assert host.recv(100) == b"from guest"
        host.sendall(b"from host")
        assert driver.recv(sock) == b"from host"
        host.close()
        assert driver.recv(sock) == b""  # the host's end of file
        driver.close(sock)
        with pytest.raises(ConnectionRefusedError):
            driver.connect(5001)  # nobody listens on v.sock_5001
        # Host -> guest: CONNECT 6000 on v.sock, OK <port> back.
        driver.listen(6000)
        client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        client.settimeout(10)
        client.connect(str(uds))
        client.sendall(b"CONNECT 6000\nearly data")
        accepted = driver.accept(6000)
        settle(driver)
        line = client.recv(64)
        assert line == f"OK {accepted.peer_port}\n".encode()
        assert driver.recv_exactly(accepted, 10) == b"early data"
        driver.send(accepted, b"reply")
        settle(driver)
        assert client.recv(64) == b"reply"
        # A bad request line is dropped.
        bad = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        bad.settimeout(10)
        bad.connect(str(uds))
        bad.sendall(b"HELLO\n")
        settle(driver)
        assert bad.recv(10) == b""
        for s in (client, bad, listener):
            s.close()
        assert uds.exists()
        driver.reset()
        assert not uds.exists()  # a device reset stops the host side


def test_unix_socket_seqpacket(tmp_path: Path) -> None:
    uds = tmp_path / "v.sock"
    with vsock(UdsBackend(uds)) as (_device, driver):
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        listener.bind(f"{uds}_7000")
        listener.listen(1)
        listener.settimeout(10)
        thread, got = _accept_in_thread(listener)
        sock = driver.connect(7000, type=Type.SEQPACKET)
        thread.join(10)
        (host,) = got
        host.settimeout(10)
        driver.send_message(sock, b"a" * 9000)
        driver.send_message(sock, b"b")
        settle(driver)
        assert host.recv(20000) == b"a" * 9000
        assert host.recv(20000) == b"b"
        host.send(b"c" * 7000)
        host.send(b"d")
        assert driver.recv_message(sock)[0] == b"c" * 7000
        assert driver.recv_message(sock)[0] == b"d"
        host.close()
        listener.close()


def test_serve_options(tmp_path: Path) -> None:
    kind = device_type("vsock")
    parser = argparse.ArgumentParser()
    kind.add_arguments(parser)
    args = parser.parse_args(
        ["--guest-cid", "42", "--uds-path", str(tmp_path / "u"), "--no-seqpacket"]
    )
    device = kind.from_arguments(args, DeviceSettings())
    assert isinstance(device, VsockDevice)
    assert device.guest_cid == 42 and not device.seqpacket
    with pytest.raises(ValueError):
        kind.from_arguments(
            parser.parse_args(["--guest-cid", "2", "--uds-path", "x"]), DeviceSettings()
        )
    assert isinstance(kind.example(tmp_path, DeviceSettings()), VsockDevice)
    long_path = ["--uds-path", "/" + "d" * 120]
    with pytest.raises(ValueError, match="longer than"):
        kind.from_arguments(parser.parse_args(long_path), DeviceSettings())


def test_unix_host_side_without_a_listener(tmp_path: Path) -> None:
    # A directory that does not exist: no CONNECT, but the guest still reaches host ports.
    uds = tmp_path / "missing" / "v.sock"
    with vsock(UdsBackend(uds)) as (device, driver):
        assert device.status & S.DRIVER_OK and not uds.exists()
        with pytest.raises(ConnectionRefusedError):
            driver.connect(5000)


def test_resources_are_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    from virtio.devices.vsock import device as D

    monkeypatch.setattr(D, "MAX_CONNECTIONS", 3)
    backend = FakeBackend()
    with vsock(backend) as (device, driver):
        socks = [driver.connect(5000) for _ in range(3)]
        with pytest.raises(ConnectionRefusedError):
            driver.connect(5000)  # insufficient resources: RST
        assert not device.host_connect(6000, backend.end())
        # A guest claiming a huge credit but not taking its packets: the device holds
        # at most MAX_PENDING bytes of the host's data, the rest stays on the host end.
        sock = socks[0]
        raw(driver, hdr(Op.CREDIT_UPDATE, src=sock.local_port, buf_alloc=0xFFFFFFFF))
        end = backend.ends[0]
        conn = device.conns[(5000, sock.local_port)]
        end.feed(b"m" * (4 * D.MAX_PENDING))
        for _ in range(20):
            driver.transport.wait_until(lambda: False, 0.01)  # the device runs, no pump
        assert not device._spare  # every rx buffer filled
        assert 0 < conn.waiting_for_guest() <= D.MAX_PENDING
        assert sum(len(c) for c in end.incoming) >= 4 * D.MAX_PENDING - 64 * 4096 - D.MAX_PENDING


@pytest.mark.normative(N_CREDIT_DEV)
def test_seqpacket_messages_wait_for_credit() -> None:
    backend = FakeBackend()
    with vsock(backend, buf_alloc=4000) as (device, driver):
        sock = driver.connect(5000, type=Type.SEQPACKET)
        (end,) = backend.ends
        end.feed(b"1" * 3000)
        end.feed(b"2" * 3000)  # does not fit beside the first: waits on the host end
        settle(driver, 4)
        assert [m for m, _ in sock.messages] == [b"1" * 3000]
        assert len(end.incoming) == 1
        assert driver.recv_message(sock)[0] == b"1" * 3000
        settle(driver, 2)
        assert driver.recv_message(sock)[0] == b"2" * 3000
        # A message larger than the guest's whole buffer can never go: RST.
        end.feed(b"3" * 5000)
        settle(driver, 4)
        assert end.closed and not device.conns
        assert sock.state == "closed" and sock.error == errno.ECONNRESET


@pytest.mark.normative(N_CREDIT_DEV)
def test_bogus_guest_credit_stops_the_device_sending() -> None:
    backend = FakeBackend()
    with vsock(backend) as (device, driver):
        sock = driver.connect(5000)
        (end,) = backend.ends
        driver.trace = []
        # fwd_cnt ahead of what the device sent: u32 arithmetic leaves no credit.
        raw(driver, hdr(Op.CREDIT_UPDATE, src=sock.local_port, buf_alloc=1 << 16, fwd_cnt=10))
        conn = device.conns[(5000, sock.local_port)]
        assert conn.guest_room() == 0
        end.feed(b"held back")
        settle(driver, 3)
        assert not [h for h in driver.trace if h.op == Op.RW]
        assert end.incoming == deque([b"held back"]) and not conn.reading
        # Honest credit again: the data goes.
        raw(driver, hdr(Op.CREDIT_UPDATE, src=sock.local_port, buf_alloc=1 << 16, fwd_cnt=0))
        assert driver.recv(sock) == b"held back"


def test_threaded_loopback_with_unix_sockets(tmp_path: Path) -> None:
    """The device in its own thread, as a vhost-user back-end runs: both ends race."""
    uds = tmp_path / "t.sock"
    device = VsockDevice(UdsBackend(uds), guest_cid=CID)
    with Loopback(device, threaded=True) as lb:
        driver = VsockDriver(lb)
        driver.initialize()
        driver.start()
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(f"{uds}_5000")
        listener.listen(1)
        listener.settimeout(10)
        data = bytes(range(256)) * 4096  # 1 MiB each way
        echoed: list[bytes] = []

        def echo() -> None:
            conn, _ = listener.accept()
            conn.settimeout(10)
            got = bytearray()
            while len(got) < len(data):
                chunk = conn.recv(1 << 16)
                if not chunk:
                    break
                got += chunk
                conn.sendall(chunk)
            echoed.append(bytes(got))
            conn.close()

        thread = threading.Thread(target=echo, daemon=True)
        thread.start()
        sock = driver.connect(5000)
        back = bytearray()
        for i in range(0, len(data), 1 << 16):
            driver.send(sock, data[i : i + (1 << 16)])
            while len(back) < i:  # keep reading: the echo waits on our credit
                back += driver.recv(sock)
        while len(back) < len(data):
            got = driver.recv(sock)
            assert got
            back += got
        thread.join(10)
        assert echoed == [data] and bytes(back) == data
        assert driver.recv(sock) == b""  # the echo closed its end
        driver.close(sock)
        listener.close()
    # Reset once the device thread is gone: it may be waiting on the sockets a reset closes.
    device.reset()
    assert not uds.exists()
    device.close()
