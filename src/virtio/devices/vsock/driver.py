"""The socket driver: a small guest-side vsock stack over any transport.

:class:`VsockDriver` keeps the rx and event queues stocked, turns the
packets the device returns into per-socket state, and offers
``connect``/``listen``/``accept``/``send``/``recv`` (and, with
VIRTIO_VSOCK_F_SEQPACKET, ``send_message``/``recv_message``) on
:class:`VsockSocket` objects. It keeps to the peer's credit when sending and
advertises its own; it does not trust the device: packets with bad lengths,
wrong addresses, unknown ops or types, or data past the credit given are
dropped or answered with RST, never raised from the pump.

Packets wait outside the tx queue while it is full, and the rx queue is
processed meanwhile (Virtqueue Flow Control). Only replies caused by rx
packets are bounded (:data:`MAX_REPLIES`): past that, rx packets wait until
the device takes tx buffers; data waits within the peer's credit anyway.
"""

from __future__ import annotations

import errno
import logging
from collections import Counter, deque
from dataclasses import dataclass, field

from virtio.core.driver import DriverTransport, NeedsReset, Request, UsedBuffer, VirtioDriver
from virtio.devices.vsock import wire as W
from virtio.devices.vsock.wire import Hdr, Op, Type
from virtio.errors import DeviceNeedsReset
from virtio.spec.device_ids import DeviceId

log = logging.getLogger("virtio.vsock.driver")

RX_BUFFER = 4096
RX_BUFFERS = 64
EVENT_BUFFERS = 4
DEFAULT_BUF_ALLOC = 256 << 10
#: The largest payload this driver puts in one packet.
MAX_PAYLOAD = 64 << 10
FIRST_PORT = 49152
#: Replies to rx packets (RST, RESPONSE, CREDIT_UPDATE) kept outside a full tx queue.
MAX_REPLIES = 1024

CONNECTING, CONNECTED, CLOSED = "connecting", "connected", "closed"


@dataclass(eq=False)
class VsockSocket:
    """One connection (or one being made) of the driver's stack."""

    local_port: int
    peer_cid: int
    peer_port: int
    type: int
    buf_alloc: int
    state: str = CONNECTING
    peer_buf_alloc: int = 0
    peer_fwd_cnt: int = 0
    tx_cnt: int = 0
    #: Payload bytes received, and how many the application took (our fwd_cnt).
    rx_cnt: int = 0
    fwd_cnt: int = 0
    reported_fwd: int = 0
    data: bytearray = field(default_factory=bytearray)
    messages: deque[tuple[bytes, int]] = field(default_factory=deque)
    partial: bytearray = field(default_factory=bytearray)
    peer_shutdown: int = 0
    shutdown_sent: int = 0
    #: Why the connection ended: None while it lives (or ended cleanly).
    error: int | None = None

    def peer_room(self) -> int:
        return W.peer_free(self.peer_buf_alloc, self.peer_fwd_cnt, self.tx_cnt)

    @property
    def eof(self) -> bool:
        """No more data will come."""
        return self.state == CLOSED or bool(self.peer_shutdown & W.SHUTDOWN_SEND)


class VsockDriver(VirtioDriver):
    device_id = DeviceId.VSOCK

    def __init__(
        self,
        transport: DriverTransport,
        *,
        features: int | None = None,
        queue_size: int | None = None,
        avoid_features: int = 0,
        buf_alloc: int = DEFAULT_BUF_ALLOC,
    ) -> None:
        super().__init__(
            transport, features=features, queue_size=queue_size, avoid_features=avoid_features
        )
        self.buf_alloc = buf_alloc
        self.guest_cid = 0
        self.sockets: dict[tuple[int, int, int], VsockSocket] = {}
        self.listeners: dict[int, tuple[int, deque[VsockSocket]]] = {}
        self.stats: Counter[str] = Counter()
        self.transport_resets = 0
        self._next_port = FIRST_PORT
        #: Packets the tx queue had no room for, each marked if it replies to an rx packet.
        self._tx_backlog: deque[tuple[bytes, bool]] = deque()
        self._replies = 0
        self._replying = False
        #: rx packets not yet taken: too many replies wait for the tx queue.
        self._rx_held: deque[Request] = deque()
        #: Set to a list to record the header of every packet the device returns.
        self.trace: list[Hdr] | None = None

    def supported_features(self) -> int:
        return 1 << W.STREAM_F | 1 << W.SEQPACKET_F | 1 << W.NO_IMPLIED_STREAM_F

    def queues_wanted(self) -> int:
        return 3

    def setup(self) -> None:
        self.guest_cid = self._read_cid()

    def _read_cid(self) -> int:
        # The upper 32 bits are reserved and zero.
        return int.from_bytes(self.read_config(0, 8), self.byteorder) & 0xFFFFFFFF

    def start(self) -> None:
        """After initialize(): stock the event and rx queues (the initialization steps 2-3)."""
        for _ in range(min(EVENT_BUFFERS, self.queues[W.EVENT].size)):
            self.submit(W.EVENT, [], [W.EVENT_MSG.size])
        self.kick(W.EVENT)
        for _ in range(min(RX_BUFFERS, self.queues[W.RX].size)):
            self.submit(W.RX, [], [W.HDR_SIZE + RX_BUFFER])
        self.kick(W.RX)

    def reset(self, timeout: float = 5.0) -> None:
        super().reset(timeout)
        # Packets for the old queues: a fresh device knows nothing of them.
        for request in self._rx_held:
            self.release(request)
        self._rx_held.clear()
        self._tx_backlog.clear()
        self._replies = 0

    def stream_ok(self) -> bool:
        return W.stream_offered(self.negotiated)

    # -- the application's side ------------------------------------------------------

    def connect(
        self, port: int, *, cid: int = W.HOST_CID, type: int = Type.STREAM, timeout: float = 10.0
    ) -> VsockSocket:
        """Connect to ``cid:port``; ConnectionRefusedError on an RST."""
        self._check_type(type)
        sock = VsockSocket(self._port(cid, port), cid, port, type, self.buf_alloc)
        self.sockets[self._key(sock)] = sock
        self._send(sock, Op.REQUEST)
        if not self._wait(lambda: sock.state != CONNECTING, timeout):
            self._forget(sock)
            self._send(sock, Op.RST)
            raise TimeoutError(f"connecting to {cid}:{port}: no answer in {timeout}s")
        if sock.state != CONNECTED:
            raise ConnectionRefusedError(errno.ECONNREFUSED, f"{cid}:{port} refused")
        return sock

    def listen(self, port: int, *, type: int = Type.STREAM) -> None:
        self._check_type(type)
        self.listeners[port] = (type, deque())

    def accept(self, port: int, *, timeout: float = 10.0) -> VsockSocket:
        _, backlog = self.listeners[port]
        if not self._wait(lambda: bool(backlog), timeout):
            raise TimeoutError(f"no connection to port {port} in {timeout}s")
        return backlog.popleft()

    def send(self, sock: VsockSocket, data: bytes, *, timeout: float = 30.0) -> None:
        """Send all of ``data`` on a stream socket, as the peer's credit allows."""
        if sock.type != Type.STREAM:
            raise ValueError("send() is for stream sockets; use send_message()")
        view = memoryview(data)
        while view:
            n = self._wait_credit(sock, len(view), timeout)
            self._send(sock, Op.RW, bytes(view[:n]))
            view = view[n:]

    def send_message(
        self, sock: VsockSocket, data: bytes, *, eor: bool = False, timeout: float = 30.0
    ) -> None:
        """One seqpacket message, in as many packets as it takes; EOM on the last."""
        if sock.type != Type.SEQPACKET:
            raise ValueError("send_message() is for seqpacket sockets")
        self._check_open(sock)
        if len(data) > sock.peer_buf_alloc:
            raise OSError(errno.EMSGSIZE, f"message of {len(data)} bytes exceeds the peer's buffer")
        view = memoryview(data)
        while True:
            n = self._wait_credit(sock, len(view), timeout) if view else 0
            last = n == len(view)
            flags = (W.SEQ_EOM | (W.SEQ_EOR if eor else 0)) if last else 0
            self._send(sock, Op.RW, bytes(view[:n]), flags=flags)
            view = view[n:]
            if last:
                return

    def recv(self, sock: VsockSocket, n: int = 1 << 16, *, timeout: float = 30.0) -> bytes:
        """Up to ``n`` bytes; b"" once the peer sends no more."""
        if not self._wait(lambda: bool(sock.data) or sock.eof, timeout):
            raise TimeoutError(f"no data on port {sock.local_port} in {timeout}s")
        if not sock.data and sock.error is not None:
            raise ConnectionResetError(sock.error, "connection reset")
        out = bytes(sock.data[:n])
        del sock.data[:n]
        self._consumed(sock, len(out))
        return out

    def recv_exactly(self, sock: VsockSocket, n: int, *, timeout: float = 30.0) -> bytes:
        chunks = bytearray()
        while len(chunks) < n:
            got = self.recv(sock, n - len(chunks), timeout=timeout)
            if not got:
                break
            chunks += got
        return bytes(chunks)

    def recv_message(self, sock: VsockSocket, *, timeout: float = 30.0) -> tuple[bytes, int]:
        """The next whole message and its flags (SEQ_EOM, SEQ_EOR)."""
        if not self._wait(lambda: bool(sock.messages) or sock.eof, timeout):
            raise TimeoutError(f"no message on port {sock.local_port} in {timeout}s")
        if not sock.messages:
            raise ConnectionResetError(sock.error or errno.EPIPE, "connection ended")
        msg, flags = sock.messages.popleft()
        self._consumed(sock, len(msg))
        return msg, flags

    def shutdown(self, sock: VsockSocket, flags: int = W.SHUTDOWN_SEND) -> None:
        self._send(sock, Op.SHUTDOWN, flags=flags & W.SHUTDOWN_BOTH)

    def close(self, sock: VsockSocket, *, timeout: float = 2.0) -> None:
        """Clean close: SHUTDOWN both ways, wait for the peer's RST (or send one)."""
        if sock.state == CONNECTED:
            self._send(sock, Op.SHUTDOWN, flags=W.SHUTDOWN_BOTH)
            if not self._wait(lambda: sock.state == CLOSED, timeout):
                self._send(sock, Op.RST)
        sock.state = CLOSED
        self._forget(sock)

    # -- the pump ------------------------------------------------------------------------------

    def pump(self) -> None:
        """Take what the device returned: packets, events, finished transmissions."""
        events = 0
        for event in self.poll():
            if isinstance(event, NeedsReset):
                raise DeviceNeedsReset(event.reason)
            if not isinstance(event, UsedBuffer):
                continue
            request = event.request
            if event.queue == W.RX:
                self._rx_held.append(request)
                continue
            if event.queue == W.EVENT:
                self._event(self.read_in(request))
                events += 1
            self.release(request)
        self._flush_tx()
        rx = self._take_rx()
        for _ in range(rx):
            self.submit(W.RX, [], [W.HDR_SIZE + RX_BUFFER])
        if rx:
            self.kick(W.RX)
        for _ in range(events):
            self.submit(W.EVENT, [], [W.EVENT_MSG.size])
        if events:
            self.kick(W.EVENT)
        self._flush_tx()

    def _take_rx(self) -> int:
        """Process returned rx packets while their replies have room to wait."""
        taken = 0
        self._replying = True
        try:
            while self._rx_held and self._replies < MAX_REPLIES:
                request = self._rx_held.popleft()
                self._rx_packet(self.read_in(request), request.written)
                self.release(request)
                taken += 1
        finally:
            self._replying = False
        if self._rx_held:
            self.stats["rx_held"] += 1
        return taken

    def _wait(self, done: object, timeout: float) -> bool:
        assert callable(done)

        def ready() -> bool:
            self.pump()
            return bool(done())

        return self.transport.wait_until(ready, timeout)

    def _event(self, data: bytes) -> None:
        if len(data) < W.EVENT_MSG.size:
            self.stats["bad_events"] += 1
            return
        (event_id,) = W.EVENT_MSG.unpack_from(data)
        if event_id != W.EVENT_TRANSPORT_RESET:
            self.stats["unknown_events"] += 1
            return
        # Connections end; listeners stay, with the CID read again.
        self.transport_resets += 1
        self.guest_cid = self._read_cid()
        for sock in list(self.sockets.values()):
            sock.state = CLOSED
            sock.error = errno.ECONNRESET
        self.sockets.clear()

    def _rx_packet(self, data: bytes, written: int) -> None:
        if written < W.HDR_SIZE or len(data) < W.HDR_SIZE:
            self._bad(f"rx packet of {written} bytes, shorter than a header")
            return
        hdr = Hdr.unpack(data)
        if self.trace is not None:
            self.trace.append(hdr)
        if hdr.len > len(data) - W.HDR_SIZE:
            self._bad(f"payload past what the device wrote: {hdr.describe()}")
            self._rst_for(hdr)
            return
        if hdr.dst_cid != self.guest_cid:
            self._bad(f"packet for another CID: {hdr.describe()}")
            return
        payload = data[W.HDR_SIZE : W.HDR_SIZE + hdr.len] if hdr.op == Op.RW else b""
        if hdr.type not in (Type.STREAM, Type.SEQPACKET) or hdr.op not in Op._value2member_map_:
            # An unknown type MUST be answered with RST.
            self._bad(f"unknown type or op: {hdr.describe()}")
            self._rst_for(hdr)
            return
        key = (hdr.dst_port, hdr.src_cid, hdr.src_port)
        sock = self.sockets.get(key)
        if hdr.op == Op.REQUEST:
            self._incoming(hdr, sock)
            return
        if sock is None:
            self._rst_for(hdr)
            return
        if hdr.op == Op.RST:
            if sock.state == CONNECTING:
                sock.error = errno.ECONNREFUSED
            elif sock.state == CONNECTED and sock.shutdown_sent != W.SHUTDOWN_BOTH:
                # An RST that does not answer our clean close aborts the connection.
                sock.error = errno.ECONNRESET
            sock.state = CLOSED
            self._forget(sock)
            return
        if hdr.type != sock.type:
            self._bad(f"packet of type {hdr.type} on a type {sock.type} socket")
            self._reset(sock)
            return
        sock.peer_buf_alloc, sock.peer_fwd_cnt = hdr.buf_alloc, hdr.fwd_cnt
        if sock.state == CONNECTING:
            if hdr.op == Op.RESPONSE:
                sock.state = CONNECTED
            else:
                self._reset(sock)
            return
        if hdr.op == Op.RW:
            self._data(sock, hdr, payload)
        elif hdr.op == Op.SHUTDOWN:
            sock.peer_shutdown |= hdr.flags & W.SHUTDOWN_BOTH
            if sock.peer_shutdown == W.SHUTDOWN_BOTH:
                # The peer is done both ways: the RST completes its clean close.
                self._send(sock, Op.RST)
                sock.state = CLOSED
                self._forget(sock)
        elif hdr.op == Op.CREDIT_REQUEST:
            self._send(sock, Op.CREDIT_UPDATE)
        elif hdr.op in (Op.RESPONSE, Op.INVALID):
            self._reset(sock)

    def _incoming(self, hdr: Hdr, existing: VsockSocket | None) -> None:
        listener = self.listeners.get(hdr.dst_port)
        if existing is not None or listener is None or listener[0] != hdr.type:
            self._rst_for(hdr)
            return
        sock = VsockSocket(
            hdr.dst_port, hdr.src_cid, hdr.src_port, hdr.type, self.buf_alloc, CONNECTED
        )
        sock.peer_buf_alloc, sock.peer_fwd_cnt = hdr.buf_alloc, hdr.fwd_cnt
        self.sockets[self._key(sock)] = sock
        self._send(sock, Op.RESPONSE)
        listener[1].append(sock)

    def _data(self, sock: VsockSocket, hdr: Hdr, payload: bytes) -> None:
        if ((sock.rx_cnt - sock.fwd_cnt) & 0xFFFFFFFF) + len(payload) > sock.buf_alloc:
            self.stats["credit_overruns"] += 1
            self._bad(f"device sent {len(payload)} bytes past our credit")
            self._reset(sock)
            return
        sock.rx_cnt = (sock.rx_cnt + len(payload)) & 0xFFFFFFFF
        if sock.type == Type.SEQPACKET:
            sock.partial += payload
            if hdr.flags & W.SEQ_EOM:
                sock.messages.append((bytes(sock.partial), hdr.flags & (W.SEQ_EOM | W.SEQ_EOR)))
                sock.partial.clear()
        else:
            sock.data += payload

    def _consumed(self, sock: VsockSocket, n: int) -> None:
        sock.fwd_cnt = (sock.fwd_cnt + n) & 0xFFFFFFFF
        if sock.state == CONNECTED and (sock.fwd_cnt - sock.reported_fwd) & 0xFFFFFFFF >= max(
            1, sock.buf_alloc // 4
        ):
            self._send(sock, Op.CREDIT_UPDATE)

    # -- sending ------------------------------------------------------------------------------

    def _wait_credit(self, sock: VsockSocket, want: int, timeout: float) -> int:
        self._check_open(sock)
        if sock.peer_room() == 0:
            self._send(sock, Op.CREDIT_REQUEST)
            if not self._wait(lambda: sock.peer_room() > 0 or sock.state != CONNECTED, timeout):
                raise TimeoutError(f"no credit from the peer of port {sock.local_port}")
            self._check_open(sock)
        # Only what the peer's credit allows goes out (Buffer Space Management).
        return min(want, sock.peer_room(), MAX_PAYLOAD)

    def _send(self, sock: VsockSocket, op: int, payload: bytes = b"", *, flags: int = 0) -> None:
        if op == Op.SHUTDOWN:
            sock.shutdown_sent |= flags
        if op == Op.RW:
            assert len(payload) <= sock.peer_room()
            sock.tx_cnt = (sock.tx_cnt + len(payload)) & 0xFFFFFFFF
        sock.reported_fwd = sock.fwd_cnt
        hdr = Hdr(
            self.guest_cid,
            sock.peer_cid,
            sock.local_port,
            sock.peer_port,
            len(payload),
            sock.type,
            op,
            flags,
            sock.buf_alloc,
            sock.fwd_cnt,
        )
        self._queue_tx(hdr.pack() + payload)

    def _rst_for(self, hdr: Hdr) -> None:
        if hdr.op == Op.RST:
            return
        self.stats["rst_sent"] += 1
        reply = Hdr(self.guest_cid, hdr.src_cid, hdr.dst_port, hdr.src_port, 0, hdr.type, Op.RST)
        self._queue_tx(reply.pack())

    def _reset(self, sock: VsockSocket) -> None:
        self._send(sock, Op.RST)
        sock.state = CLOSED
        sock.error = errno.ECONNRESET
        self._forget(sock)

    def _queue_tx(self, packet: bytes) -> None:
        # Behind what already waits: packets go out in the order they were made.
        self._tx_backlog.append((packet, self._replying))
        self._replies += self._replying
        self._flush_tx()

    def _flush_tx(self) -> None:
        sent = False
        while self._tx_backlog:
            packet, reply = self._tx_backlog[0]
            try:
                self.submit(W.TX, [packet])
            except (BufferError, MemoryError):
                break  # the queue (or memory) is full: what was used comes back in pump()
            self._tx_backlog.popleft()
            self._replies -= reply
            sent = True
        if sent:
            self.kick(W.TX)
        if self._tx_backlog:
            for done in self.harvest(W.TX):
                self.release(done)

    # -- helpers -------------------------------------------------------------------------------

    def _bad(self, reason: str) -> None:
        self.stats["bad_packets"] += 1
        log.warning("vsock driver: dropping %s", reason)

    def _check_type(self, type: int) -> None:
        if type == Type.STREAM and not self.stream_ok():
            raise OSError(errno.ESOCKTNOSUPPORT, "stream sockets were not negotiated")
        if type == Type.SEQPACKET and not self.has(W.SEQPACKET_F):
            raise OSError(errno.ESOCKTNOSUPPORT, "seqpacket sockets were not negotiated")
        if type not in (Type.STREAM, Type.SEQPACKET):
            raise ValueError(f"unknown socket type {type}")

    def _check_open(self, sock: VsockSocket) -> None:
        if sock.state != CONNECTED:
            raise ConnectionResetError(sock.error or errno.ENOTCONN, "not connected")
        if sock.peer_shutdown & W.SHUTDOWN_RCV:
            raise BrokenPipeError(errno.EPIPE, "the peer receives no more")

    def _key(self, sock: VsockSocket) -> tuple[int, int, int]:
        return sock.local_port, sock.peer_cid, sock.peer_port

    def _port(self, cid: int, port: int) -> int:
        while (self._next_port, cid, port) in self.sockets or self._next_port in self.listeners:
            self._next_port += 1
        p = self._next_port
        self._next_port = p + 1 if p < 0xFFFFFFFF else FIRST_PORT
        return p

    def _forget(self, sock: VsockSocket) -> None:
        if self.sockets.get(self._key(sock)) is sock:
            del self.sockets[self._key(sock)]


__all__ = ["VsockDriver", "VsockSocket"]
