"""The socket device: the host end of a guest's vsock connections.

The device is the host (CID 2) of the guest's flows. Each connection joins
one guest port to one host end (an :class:`Endpoint`: a Unix socket of the
hybrid convention, see :mod:`virtio.devices.vsock.uds`, or a test's fake)
that a :class:`VsockBackend` makes and accepts. The device stays sans-IO:
the back-end watches its sockets through ``self.events`` and calls back.

Flow control runs both ways. Towards the guest, the device reads from a
host end only as much as the guest's credit (``buf_alloc`` less what is in
flight) leaves room for, so it never sends more than that credit; towards
the host, it advertises ``buf_alloc`` bytes per connection, counts what it
handed on in ``fwd_cnt``, and answers a driver that sends past that with
RST. Control replies wait in a bounded queue when the rx queue is full; once
that queue is full too, the tx queue waits for the driver to take packets
(the "additional resources" of Virtqueue Flow Control).
"""

from __future__ import annotations

import logging
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from virtio.core.device import DEFERRED, RingOptions, VirtioDevice
from virtio.core.events import EventSources, Timer
from virtio.devices.vsock import wire as W
from virtio.devices.vsock.wire import Hdr, Op, Type
from virtio.queue import Chain, ChainReader, ChainWriter
from virtio.spec.device_ids import DeviceId
from virtio.spec.status import DeviceStatus

log = logging.getLogger("virtio.vsock")

VSOCK = "Device Types / Socket Device"
N_RXTX_DEV = f"devicenormative:{VSOCK} / Device Operation / Receive and Transmit"
N_RXTX_DRV = f"drivernormative:{VSOCK} / Device Operation / Receive and Transmit"
N_CREDIT_DEV = f"devicenormative:{VSOCK} / Device Operation / Buffer Space Management"
N_CREDIT_DRV = f"drivernormative:{VSOCK} / Device Operation / Buffer Space Management"
N_FLOW_DEV = f"devicenormative:{VSOCK} / Device Operation / Virtqueue Flow Control"
N_FRAMING_DRV = "drivernormative:Basic Facilities of a Virtio Device / Message Framing"

DEFAULT_BUF_ALLOC = 256 << 10
#: The largest payload the device puts in one packet (Linux's VIRTIO_VSOCK_MAX_PKT_BUF_SIZE).
MAX_PAYLOAD = 64 << 10
#: Control packets kept while the rx queue is full; past this the tx queue waits.
MAX_CONTROL = 1024
#: How long a host-initiated connection waits for the guest's RESPONSE.
CONNECT_TIMEOUT = 5.0
#: How soon a host end that took only part of the data is tried again.
RETRY_DELAY = 0.005
MAX_RETRY_DELAY = 0.2
#: Bytes read from one host end and held for the guest, at most (whatever credit
#: the guest claims: it is the guest's rx buffers that drain them).
MAX_PENDING = 256 << 10
#: Connections at once; a REQUEST past this gets an RST (insufficient resources).
MAX_CONNECTIONS = 1024
#: Ports handed to host-initiated connections start here (as Firecracker's do).
FIRST_LOCAL_PORT = 1 << 30


class MessageTooLarge(Exception):
    """The next message on a host end is larger than the device asked for."""


class Endpoint(Protocol):
    """The host end of one connection."""

    def start(self, on_readable: Callable[[], None]) -> None:
        """The device is ready: call ``on_readable()`` while reading is on and data waits."""

    def set_reading(self, on: bool) -> None:
        """Whether the device wants ``on_readable`` calls (off: it has no credit)."""

    def read(self, n: int) -> bytes | None:
        """At most ``n`` bytes; None when nothing waits, b"" at end of file; OSError if
        broken. A message socket returns one whole message, or raises
        :class:`MessageTooLarge` when the next one is larger than ``n``."""

    def write(self, data: bytes) -> int:
        """Bytes taken (a message socket: all or 0); OSError once the peer is gone."""

    def shutdown_write(self) -> None:
        """The guest sends no more: end of file for the host."""

    def accepted(self, local_port: int) -> None:
        """A host-initiated connection was accepted by the guest."""

    def close(self) -> None: ...


@runtime_checkable
class OpeningEndpoint(Endpoint, Protocol):
    """A host end that opens in the background (a TCP connect on its way)."""

    def when_open(self, done: Callable[[str | None], None]) -> None:
        """Call ``done(None)`` once open or ``done(reason)`` if it failed: exactly once,
        possibly before returning. The guest gets its RESPONSE or RST only then."""


class VsockBackend(Protocol):
    """Makes and accepts host ends: the device's host side."""

    def start(self, events: EventSources, device: VsockDevice) -> None: ...

    def stop(self) -> None: ...

    def connect(self, port: int, type: int) -> Endpoint | None:
        """The guest connects to host port ``port``: a host end, or None to refuse."""

    def close(self) -> None: ...


class NoBackend:
    """No host side: every guest connection is refused."""

    def start(self, events: EventSources, device: VsockDevice) -> None:
        pass

    def stop(self) -> None:
        pass

    def connect(self, port: int, type: int) -> Endpoint | None:
        return None

    def close(self) -> None:
        pass


# CONNECTING: the host asked the guest; OPENING: the guest asked, its host end is opening.
CONNECTING, OPENING, CONNECTED, CLOSING = "connecting", "opening", "connected", "closing"


@dataclass(eq=False)
class Conn:
    """One flow between host port ``local_port`` and guest port ``peer_port``."""

    local_port: int
    peer_port: int
    type: int
    endpoint: Endpoint
    state: str = CONNECTED
    peer_buf_alloc: int = 0
    peer_fwd_cnt: int = 0
    #: Payload bytes sent to the guest (free-running, u32).
    tx_cnt: int = 0
    #: Payload bytes received from the guest, and how many reached the host end.
    rx_cnt: int = 0
    fwd_cnt: int = 0
    #: The fwd_cnt the guest last saw.
    reported_fwd: int = 0
    #: Stream data from the host end not yet sent (seqpacket: whole messages).
    to_guest: bytearray = field(default_factory=bytearray)
    msgs_to_guest: deque[bytearray] = field(default_factory=deque)
    #: Data from the guest not yet taken by the host end (seqpacket: whole messages).
    to_host: bytearray = field(default_factory=bytearray)
    msgs_to_host: deque[bytes] = field(default_factory=deque)
    partial_msg: bytearray = field(default_factory=bytearray)
    #: SHUTDOWN flags the guest sent, and those the device sent.
    peer_shutdown: int = 0
    shutdown_sent: int = 0
    host_eof: bool = False
    reading: bool = False
    timer: Timer | None = None
    retry_delay: float = RETRY_DELAY

    @property
    def key(self) -> tuple[int, int]:
        return self.local_port, self.peer_port

    def guest_room(self) -> int:
        """Bytes the guest's credit still allows."""
        return W.peer_free(self.peer_buf_alloc, self.peer_fwd_cnt, self.tx_cnt)

    def waiting_for_guest(self) -> int:
        return len(self.to_guest) + sum(len(m) for m in self.msgs_to_guest)

    def read_room(self) -> int:
        """Bytes the device may take from the host end now."""
        waiting = self.waiting_for_guest()
        # A message is read whole (and sent in pieces): it may be larger than a packet.
        cap = MAX_PENDING if self.type == Type.SEQPACKET else MAX_PAYLOAD
        return min(self.guest_room() - waiting, MAX_PENDING - waiting, cap)

    def waiting_for_host(self) -> int:
        return (self.rx_cnt - self.fwd_cnt) & 0xFFFFFFFF


class VsockDevice(VirtioDevice):
    """rx, tx and event queues; ``guest_cid`` in the configuration space."""

    device_id = DeviceId.VSOCK

    def __init__(
        self,
        backend: VsockBackend | None = None,
        *,
        guest_cid: int = 3,
        seqpacket: bool = True,
        buf_alloc: int = DEFAULT_BUF_ALLOC,
        queue_max_size: int = 256,
        ring: RingOptions | None = None,
    ) -> None:
        if guest_cid in W.RESERVED_CIDS or not 0 < guest_cid < 1 << 32:
            # The guest_cid field MUST NOT contain a reserved CID (upper 32 bits zero too).
            raise ValueError(f"guest CID {guest_cid} is reserved or out of range ({N_RXTX_DEV})")
        if not 1 <= buf_alloc <= 0xFFFFFFFF:
            raise ValueError("buf_alloc must be 1..2^32-1")
        self.guest_cid = guest_cid
        self.seqpacket = seqpacket
        self.buf_alloc = buf_alloc
        self.backend: VsockBackend = backend or NoBackend()
        #: Called by :meth:`close` (a control socket's own close, for one).
        self.closers: list[Callable[[], None]] = []
        self.conns: dict[tuple[int, int], Conn] = {}
        self.stats: Counter[str] = Counter()
        self._control: deque[Hdr] = deque()
        self._ready: dict[Conn, None] = {}
        self._spare: deque[Chain] = deque()
        self._event_chains: deque[Chain] = deque()
        self._events_pending = 0
        self._tx_stalled: deque[Chain] = deque()
        self._next_port = FIRST_LOCAL_PORT
        self._started = False
        super().__init__(num_queues=3, queue_max_size=queue_max_size, ring=ring)

    # -- what the device declares ---------------------------------------------

    def device_features(self) -> int:
        bits = 1 << W.STREAM_F | 1 << W.NO_IMPLIED_STREAM_F
        if self.seqpacket:
            bits |= 1 << W.SEQPACKET_F
        return bits

    def config_size(self) -> int:
        return 8

    def build_config(self) -> None:
        self.config[0:8] = self.guest_cid.to_bytes(8, self.byteorder)

    def validate_features(self, features: int) -> str | None:
        if not W.stream_offered(features) and not features >> W.SEQPACKET_F & 1:
            return "driver accepted NO_IMPLIED_STREAM with neither STREAM nor SEQPACKET"
        return None

    def describe(self) -> str:
        kinds = "stream" + (", seqpacket" if self.seqpacket else "")
        return f"vsock, guest CID {self.guest_cid}, {kinds}"

    def on_driver_ok(self) -> None:
        if not self._started:
            self._started = True
            self.backend.start(self.events, self)

    def on_reset(self) -> None:
        self._drop_all("device reset")
        self._spare.clear()
        self._event_chains.clear()
        self._events_pending = 0
        self._tx_stalled.clear()
        if self._started:
            self._started = False
            self.backend.stop()

    def flush_backend(self) -> None:
        # The front-end went away: the guest's connections cannot survive it. A
        # driver that resumes without a reset learns so from the event queue.
        if self.conns:
            self.transport_reset()

    def close(self) -> None:
        self._drop_all("device closed")
        self.backend.close()
        for closer in reversed(self.closers):
            closer()
        self.closers.clear()

    def quiesce(self, queue_index: int) -> None:
        # Held buffers go back empty: a Linux driver drops or requeues them.
        if queue_index == W.RX and self._spare:
            spare, self._spare = list(self._spare), deque()
            self.complete_many(W.RX, [(c, 0) for c in spare])
        elif queue_index == W.EVENT and self._event_chains:
            held, self._event_chains = list(self._event_chains), deque()
            self.complete_many(W.EVENT, [(c, 0) for c in held])
        elif queue_index == W.TX and self._tx_stalled:
            # Packets that waited for room are served now: none is lost.
            stalled, self._tx_stalled = list(self._tx_stalled), deque()
            self.complete_many(W.TX, [(c, self._transmit(c, pump=False)) for c in stalled])

    def stop_queue(self, index: int) -> None:
        super().stop_queue(index)
        {W.RX: self._spare, W.EVENT: self._event_chains, W.TX: self._tx_stalled}[index].clear()

    # -- the host side asks ------------------------------------------------------

    def transport_reset(self) -> None:
        """Drop every connection and send VIRTIO_VSOCK_EVENT_TRANSPORT_RESET."""
        self._drop_all("transport reset")
        self._control.clear()
        self._events_pending = 1  # one event says it all
        self.stats["transport_resets"] += 1
        self._send_events()

    def host_connect(self, guest_port: int, endpoint: Endpoint) -> bool:
        """A host process connects to the guest's ``guest_port``; False if impossible now."""
        if not self.live or not W.stream_offered(self.negotiated):
            return False
        if len(self.conns) >= MAX_CONNECTIONS:
            return False
        port = self._free_port(guest_port)
        if port is None:
            return False
        conn = Conn(port, guest_port, Type.STREAM, endpoint, state=CONNECTING)
        self._add(conn)
        conn.timer = self.events.call_later(CONNECT_TIMEOUT, lambda _now: self._expire(conn))
        self._send(conn, Op.REQUEST)
        self._pump()
        return True

    def _free_port(self, guest_port: int) -> int | None:
        for _ in range(1 << 16):
            port = self._next_port
            self._next_port = port + 1 if port < 0xFFFFFFFF else FIRST_LOCAL_PORT
            if (port, guest_port) not in self.conns:
                return port
        return None

    def _expire(self, conn: Conn) -> None:
        conn.timer = None
        if self.conns.get(conn.key) is not conn:
            return
        if conn.state == CONNECTING:
            log.info("guest port %d did not answer a connection request", conn.peer_port)
            self._reset_conn(conn, "connection request timed out")
        elif conn.state == OPENING:
            log.info("host end for port %d did not open in time", conn.local_port)
            self.stats["refused"] += 1
            self._reset_conn(conn, "host end did not open in time")
        self._pump()

    # -- queues ---------------------------------------------------------------------

    def process_queue(self, index: int, *, rearm: bool = True) -> int:
        served = super().process_queue(index, rearm=rearm)
        if index == W.RX:
            self._pump()
        elif index == W.EVENT:
            self._send_events()
        return served

    def handle_chain(self, queue_index: int, chain: Chain) -> int | None:
        if queue_index == W.TX:
            if len(self._control) >= MAX_CONTROL:
                # Out of room for replies: tx waits until the driver takes rx packets.
                self._tx_stalled.append(chain)
                self.stats["tx_stalled"] += 1
                return DEFERRED
            return self._transmit(chain)
        if chain.read_len:
            self.fail(f"queue {queue_index} buffer has device-readable parts", N_FRAMING_DRV)
            return 0
        if queue_index == W.RX:
            if chain.write_len < W.HDR_SIZE:
                self.fail(
                    f"rx buffer of {chain.write_len} bytes cannot hold a "
                    f"{W.HDR_SIZE}-byte packet header"
                )
                return 0
            self._spare.append(chain)
            return DEFERRED
        if chain.write_len < W.EVENT_MSG.size:
            self.fail(f"event buffer of {chain.write_len} bytes cannot hold an event")
            return 0
        self._event_chains.append(chain)
        return DEFERRED

    def _send_events(self) -> None:
        done: list[tuple[Chain, int]] = []
        while self._events_pending and self._event_chains:
            chain = self._event_chains.popleft()
            ChainWriter(chain).write(W.EVENT_MSG.pack(W.EVENT_TRANSPORT_RESET))
            done.append((chain, W.EVENT_MSG.size))
            self._events_pending -= 1
        if done:
            self.complete_many(W.EVENT, done)

    # -- transmit: packets from the guest -------------------------------------------------

    def _transmit(self, chain: Chain, *, pump: bool = True) -> int:
        """Serve one tx packet; nothing is written into a tx buffer."""
        if chain.write_len:
            self.fail("tx buffer has device-writable parts", N_FRAMING_DRV)
            return 0
        self._tx_packet(chain)
        if pump:
            self._pump()
        return 0

    def _tx_packet(self, chain: Chain) -> None:
        if chain.read_len < W.HDR_SIZE:
            self._drop(f"tx packet of {chain.read_len} bytes, shorter than its header")
            return
        reader = ChainReader(chain)
        hdr = Hdr.unpack(reader.read(W.HDR_SIZE))
        if hdr.src_cid != self.guest_cid or hdr.dst_cid != W.HOST_CID:
            # Not this guest's, or not for the host: no flow of ours to reset.
            self._drop(f"packet with wrong addresses: {hdr.describe()}")
            return
        if hdr.len > reader.remaining:
            self._drop(f"payload past the buffer ({reader.remaining} bytes): {hdr.describe()}")
            self._rst_for(hdr)
            return
        payload = reader.read(hdr.len) if hdr.op == Op.RW else b""
        self._packet(hdr, payload)

    def _drop(self, reason: str) -> None:
        self.stats["dropped"] += 1
        log.warning("vsock: dropping %s", reason)

    def _type_ok(self, type_: int) -> bool:
        if type_ == Type.STREAM:
            return W.stream_offered(self.negotiated)
        if type_ == Type.SEQPACKET:
            return self.has(W.SEQPACKET_F)
        return False

    def _packet(self, hdr: Hdr, payload: bytes) -> None:
        if not self._type_ok(hdr.type):
            # An unknown (or not negotiated) type MUST get an RST reply.
            self._drop(f"packet of socket type {hdr.type}: {hdr.describe()}")
            self._rst_for(hdr)
            return
        if hdr.op not in Op._value2member_map_ or hdr.op == Op.INVALID:
            self._drop(f"packet with unknown op: {hdr.describe()}")
            self._rst_for(hdr)
            return
        conn = self.conns.get((hdr.dst_port, hdr.src_port))
        if hdr.op == Op.REQUEST:
            self._request(hdr, conn)
            return
        if conn is None:
            self._rst_for(hdr)  # no such connection: RST (but never for an RST)
            return
        if hdr.type != conn.type:
            self._drop(f"packet of type {hdr.type} on a type {conn.type} connection")
            self._reset_conn(conn, "wrong socket type")
            return
        if hdr.op == Op.RST:
            self._remove(conn, "guest reset the connection")
            return
        self._credit(conn, hdr)
        if conn.state == CONNECTING:
            if hdr.op == Op.RESPONSE:
                conn.state = CONNECTED
                if conn.timer is not None:
                    self.events.cancel(conn.timer)
                    conn.timer = None
                conn.endpoint.accepted(conn.local_port)
                self._set_reading(conn, True)
            else:
                self._reset_conn(conn, f"{Op(hdr.op).name} before RESPONSE")
            return
        if conn.state == OPENING:
            # Only credit may move before the device's RESPONSE (taken above).
            if hdr.op == Op.CREDIT_REQUEST:
                self._send(conn, Op.CREDIT_UPDATE)
            elif hdr.op != Op.CREDIT_UPDATE:
                self._reset_conn(conn, f"{Op(hdr.op).name} before the device's RESPONSE")
            return
        if hdr.op == Op.RW:
            self._receive(conn, hdr, payload)
        elif hdr.op == Op.SHUTDOWN:
            self._peer_shutdown(conn, hdr.flags & W.SHUTDOWN_BOTH)
        elif hdr.op == Op.CREDIT_REQUEST:
            self._send(conn, Op.CREDIT_UPDATE)
        elif hdr.op == Op.RESPONSE:
            self._reset_conn(conn, "RESPONSE on an established connection")
        # CREDIT_UPDATE: _credit took it.

    def _request(self, hdr: Hdr, conn: Conn | None) -> None:
        if conn is not None:
            self._reset_conn(conn, "REQUEST on a connection in use")
            return
        if len(self.conns) >= MAX_CONNECTIONS:
            log.warning("vsock: %d connections open, refusing %s", len(self.conns), hdr.describe())
            self.stats["refused"] += 1
            self._rst_for(hdr)
            return
        endpoint = self.backend.connect(hdr.dst_port, hdr.type)
        if endpoint is None:
            self.stats["refused"] += 1
            self._rst_for(hdr)
            return
        conn = Conn(hdr.dst_port, hdr.src_port, hdr.type, endpoint, state=OPENING)
        self._add(conn)
        self._credit(conn, hdr)
        if isinstance(endpoint, OpeningEndpoint):
            conn.timer = self.events.call_later(CONNECT_TIMEOUT, lambda _now: self._expire(conn))
            endpoint.when_open(lambda error: self._opened(conn, error))
        else:
            self._opened(conn, None)

    def _opened(self, conn: Conn, error: str | None) -> None:
        """The host end of a guest's connection is open (``error`` None) or failed."""
        if self.conns.get(conn.key) is not conn or conn.state != OPENING:
            return
        if conn.timer is not None:
            self.events.cancel(conn.timer)
            conn.timer = None
        if error is not None:
            log.info("guest connection to port %d refused: %s", conn.local_port, error)
            self.stats["refused"] += 1
            self._reset_conn(conn, error)
        else:
            conn.state = CONNECTED
            self._send(conn, Op.RESPONSE)
            self._set_reading(conn, True)
        self._pump()

    def _credit(self, conn: Conn, hdr: Hdr) -> None:
        conn.peer_buf_alloc, conn.peer_fwd_cnt = hdr.buf_alloc, hdr.fwd_cnt
        self._ready[conn] = None  # more credit may let held data go
        if not conn.host_eof and conn.state == CONNECTED and conn.read_room() > 0:
            self._set_reading(conn, True)

    def _receive(self, conn: Conn, hdr: Hdr, payload: bytes) -> None:
        if conn.peer_shutdown & W.SHUTDOWN_SEND:
            self._reset_conn(conn, "data after the guest's SHUTDOWN (send)")
            return
        if conn.waiting_for_host() + len(payload) > self.buf_alloc:
            # The driver MUST NOT send past the credit it was given.
            self.stats["credit_overruns"] += 1
            log.warning(
                "vsock %d->%d: %d bytes past the credit of %d (%s)",
                conn.peer_port,
                conn.local_port,
                len(payload),
                self.buf_alloc - conn.waiting_for_host(),
                N_CREDIT_DRV,
            )
            self._reset_conn(conn, "credit overrun")
            return
        conn.rx_cnt = (conn.rx_cnt + len(payload)) & 0xFFFFFFFF
        self.stats["rx_bytes"] += len(payload)
        if conn.type == Type.SEQPACKET:
            conn.partial_msg += payload
            if hdr.flags & W.SEQ_EOM:
                conn.msgs_to_host.append(bytes(conn.partial_msg))
                conn.partial_msg.clear()
        else:
            conn.to_host += payload
        self._flush_to_host(conn)

    def _flush_to_host(self, conn: Conn) -> None:
        moved = 0
        try:
            if conn.type == Type.SEQPACKET:
                while conn.msgs_to_host:
                    msg = conn.msgs_to_host[0]
                    if conn.endpoint.write(msg) == 0 and msg:
                        break
                    conn.msgs_to_host.popleft()
                    moved += len(msg)
            elif conn.to_host:
                moved = conn.endpoint.write(bytes(conn.to_host))
                del conn.to_host[:moved]
        except OSError as err:
            self._reset_conn(conn, f"host end failed: {err}")
            return
        # fwd_cnt counts what reached the host end; a partial message is not there yet.
        conn.fwd_cnt = (conn.fwd_cnt + moved) & 0xFFFFFFFF
        if conn.to_host or conn.msgs_to_host:
            if conn.timer is None:
                # A host end that reads slowly is tried less and less often.
                conn.retry_delay = (
                    RETRY_DELAY if moved else min(conn.retry_delay * 2, MAX_RETRY_DELAY)
                )
                conn.timer = self.events.call_later(conn.retry_delay, lambda _n: self._retry(conn))
        elif conn.peer_shutdown & W.SHUTDOWN_SEND:
            conn.endpoint.shutdown_write()
            if conn.state == CLOSING:
                self._reset_conn(conn, "clean close")  # the RST that ends a clean close
                return
        told = W.peer_free(self.buf_alloc, conn.reported_fwd, conn.rx_cnt)
        if moved and told < self.buf_alloc // 2:
            self._send(conn, Op.CREDIT_UPDATE)

    def _retry(self, conn: Conn) -> None:
        conn.timer = None
        if self.conns.get(conn.key) is conn:
            self._flush_to_host(conn)
            self._pump()

    def _peer_shutdown(self, conn: Conn, flags: int) -> None:
        conn.peer_shutdown |= flags  # permanent: later packets do not clear them
        if conn.peer_shutdown & W.SHUTDOWN_RCV:
            conn.to_guest.clear()
            conn.msgs_to_guest.clear()
            self._set_reading(conn, False)
        if conn.peer_shutdown == W.SHUTDOWN_BOTH:
            conn.state = CLOSING
        self._flush_to_host(conn)

    # -- receive: packets to the guest -----------------------------------------------------

    def host_readable(self, conn: Conn) -> None:
        """The host end has data (or end of file) for the guest."""
        if self.conns.get(conn.key) is not conn or conn.state != CONNECTED:
            return
        if conn.peer_shutdown & W.SHUTDOWN_RCV:
            self._set_reading(conn, False)
            return
        room = conn.read_room()
        if room <= 0:
            self._set_reading(conn, False)  # back when the guest gives credit
            return
        try:
            data = conn.endpoint.read(room)
        except MessageTooLarge:
            if not conn.waiting_for_guest() and conn.guest_room() >= min(
                conn.peer_buf_alloc, MAX_PENDING
            ):
                # All the credit there can be, and the message still does not fit.
                self._reset_conn(conn, "host message larger than the guest's buffer")
                self._pump()
            else:
                self._set_reading(conn, False)  # it waits for more credit
            return
        except OSError as err:
            self._reset_conn(conn, f"host end failed: {err}")
            self._pump()
            return
        if data is None:
            return
        if data == b"":
            conn.host_eof = True
            self._set_reading(conn, False)
        elif conn.type == Type.SEQPACKET:
            conn.msgs_to_guest.append(bytearray(data))
        else:
            conn.to_guest += data
        self._ready[conn] = None
        self._pump()

    def _set_reading(self, conn: Conn, on: bool) -> None:
        if conn.reading != on:
            conn.reading = on
            conn.endpoint.set_reading(on)

    def _send(self, conn: Conn, op: int, flags: int = 0) -> None:
        self._control.append(self._hdr(conn, op, flags=flags))

    def _hdr(self, conn: Conn, op: int, *, length: int = 0, flags: int = 0) -> Hdr:
        conn.reported_fwd = conn.fwd_cnt
        return Hdr(
            W.HOST_CID,
            self.guest_cid,
            conn.local_port,
            conn.peer_port,
            length,
            conn.type,
            op,
            flags,
            self.buf_alloc,
            conn.fwd_cnt,
        )

    def _rst_for(self, hdr: Hdr) -> None:
        if hdr.op == Op.RST:
            return  # an RST is never answered
        self.stats["rst_sent"] += 1
        self._control.append(
            Hdr(W.HOST_CID, self.guest_cid, hdr.dst_port, hdr.src_port, 0, hdr.type, Op.RST)
        )

    def _pump(self) -> None:
        """Fill held rx buffers with control packets, then data within each guest's credit."""
        if not self.live:
            return
        done: list[tuple[Chain, int]] = []
        spare = self._spare
        while True:
            while spare:
                chain = spare[0]
                packet = self._next_packet(min(chain.write_len - W.HDR_SIZE, MAX_PAYLOAD))
                if packet is None:
                    break
                spare.popleft()
                hdr, payload = packet
                writer = ChainWriter(chain)
                writer.write(hdr.pack())
                if payload:
                    writer.write(payload)
                done.append((chain, W.HDR_SIZE + len(payload)))
                self.stats["packets_to_guest"] += 1
            if not self._tx_stalled or len(self._control) >= MAX_CONTROL // 2:
                break
            # Room for replies again: serve the tx buffers that waited for it.
            resumed: list[tuple[Chain, int]] = []
            while self._tx_stalled and len(self._control) < MAX_CONTROL:
                stalled = self._tx_stalled.popleft()
                resumed.append((stalled, self._transmit(stalled, pump=False)))
            self.complete_many(W.TX, resumed)
            if self.status & DeviceStatus.DEVICE_NEEDS_RESET:  # a resumed packet broke a rule
                return
        if done:
            self.complete_many(W.RX, done)

    def _next_packet(self, room: int) -> tuple[Hdr, bytes] | None:
        if self._control:
            return self._control.popleft(), b""
        for conn in list(self._ready):
            packet = self._data_packet(conn, room)
            if packet is not None:
                # Round robin: this connection goes to the back.
                del self._ready[conn]
                self._ready[conn] = None
                return packet
            del self._ready[conn]
        return None

    def _data_packet(self, conn: Conn, room: int) -> tuple[Hdr, bytes] | None:
        if self.conns.get(conn.key) is not conn or conn.state in (CONNECTING, OPENING):
            return None
        credit = conn.guest_room()
        if conn.type == Type.SEQPACKET and conn.msgs_to_guest:
            msg = conn.msgs_to_guest[0]
            n = min(len(msg), credit, room)
            if n == 0 and msg:
                return None  # wait for credit (or a larger buffer)
            payload = bytes(msg[:n])
            del msg[:n]
            flags = 0
            if not msg:
                conn.msgs_to_guest.popleft()
                flags = W.SEQ_EOM
            return self._rw(conn, payload, flags)
        if conn.to_guest:
            n = min(len(conn.to_guest), credit, room)
            if n == 0:
                return None
            payload = bytes(conn.to_guest[:n])
            del conn.to_guest[:n]
            return self._rw(conn, payload, 0)
        if conn.host_eof and not conn.shutdown_sent & W.SHUTDOWN_SEND:
            conn.shutdown_sent |= W.SHUTDOWN_SEND
            return self._hdr(conn, Op.SHUTDOWN, flags=W.SHUTDOWN_SEND), b""
        return None

    def _rw(self, conn: Conn, payload: bytes, flags: int) -> tuple[Hdr, bytes]:
        assert len(payload) <= conn.guest_room()  # never past the guest's credit
        conn.tx_cnt = (conn.tx_cnt + len(payload)) & 0xFFFFFFFF
        self.stats["tx_bytes"] += len(payload)
        if not conn.host_eof and conn.read_room() > 0:
            self._set_reading(conn, True)
        return self._hdr(conn, Op.RW, length=len(payload), flags=flags), payload

    # -- connections ------------------------------------------------------------------------

    def _add(self, conn: Conn) -> None:
        self.conns[conn.key] = conn
        conn.endpoint.start(lambda: self.host_readable(conn))
        self.stats["connections"] += 1

    def _reset_conn(self, conn: Conn, reason: str) -> None:
        """Send RST for a connection and forget it."""
        self._control.append(self._hdr(conn, Op.RST))
        self.stats["rst_sent"] += 1
        self._remove(conn, reason)

    def _remove(self, conn: Conn, reason: str) -> None:
        if self.conns.get(conn.key) is not conn:
            return
        log.debug("vsock %d<->%d closed: %s", conn.local_port, conn.peer_port, reason)
        del self.conns[conn.key]
        self._ready.pop(conn, None)
        if conn.timer is not None:
            self.events.cancel(conn.timer)
            conn.timer = None
        self._set_reading(conn, False)
        conn.endpoint.close()

    def _drop_all(self, reason: str) -> None:
        for conn in list(self.conns.values()):
            self._remove(conn, reason)
        self._control.clear()
        self._ready.clear()
