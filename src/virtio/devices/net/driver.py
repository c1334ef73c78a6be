"""The network driver: send and receive Ethernet frames through any device's queues.

Receive and transmit buffers are allocated once, in slots of guest memory
(:class:`NetDriver.start`), and reused: a frame is copied into a free
transmit slot, and a receive slot goes back to the device as soon as its
frame is read. The packet API is small:

    driver = NetDriver(transport); driver.initialize(); driver.start()
    driver.send(frame)                       # or send_many(frames), with a NetHdr for offloads
    for hdr, frame in driver.receive(timeout=1.0): ...

A device that breaks the rules (a used length past the buffer, ``num_buffers``
of 0 or more buffers than it could have used) costs the frame, not the driver:
the frame is dropped and counted in ``errors``; a ring the device corrupts
stops the driver (``broken``).

The control queue side covers the filters, queue pairs, offloads, device
statistics (:meth:`NetDriver.query_stats`, :meth:`NetDriver.get_stats`), RSS
contexts and the inner header hash (:meth:`NetDriver.set_hash_tunnel`).
"""

from __future__ import annotations

import logging
import struct
from collections import Counter, deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from virtio.core.driver import VirtioDriver
from virtio.devices.net import rss, stats
from virtio.devices.net import wire as W
from virtio.errors import NegotiationError, SpecViolation
from virtio.layout import ByteOrder
from virtio.spec.device_ids import DeviceId

log = logging.getLogger("virtio.net.driver")

_NET = "Device Types / Network Device"
N_RX_DRV = f"drivernormative:{_NET} / Device Operation / Processing of Incoming Packets"
N_TX_DRV = f"drivernormative:{_NET} / Device Operation / Packet Transmission"
N_CONFIG_DRV = f"drivernormative:{_NET} / Device configuration layout"
_CVQ = f"{_NET} / Device Operation / Control Virtqueue"
N_FILTER_DRV = f"drivernormative:{_CVQ} / Packet Receive Filtering"
N_MAC_DRV = f"drivernormative:{_CVQ} / Setting MAC Address Filtering"
N_RSS_DRV = f"drivernormative:{_CVQ} / Receive-side scaling (RSS)"
N_STATS_DEV = f"devicenormative:{_CVQ} / Device Statistics"
N_STATS_DRV = f"drivernormative:{_CVQ} / Device Statistics"
N_RSS_CTX_DRV = f"drivernormative:{_CVQ} / RSS Context"
N_TUNNEL_DRV = f"drivernormative:{_CVQ} / Inner Header Hash"

#: The feature bits this driver knows and takes when offered.
DRIVER_FEATURES = (
    1 << W.MAC
    | 1 << W.MTU
    | 1 << W.STATUS
    | 1 << W.MRG_RXBUF
    | 1 << W.CTRL_VQ
    | 1 << W.CTRL_RX
    | 1 << W.CTRL_VLAN
    | 1 << W.CTRL_RX_EXTRA
    | 1 << W.CTRL_MAC_ADDR
    | 1 << W.GUEST_ANNOUNCE
    | 1 << W.MQ
    | 1 << W.CTRL_GUEST_OFFLOADS
    | 1 << W.NOTF_COAL
    | 1 << W.VQ_NOTF_COAL
    | 1 << W.SPEED_DUPLEX
    | 1 << W.STANDBY
    | 1 << W.DEVICE_STATS
    # These two need RSS or HASH_REPORT, so they are taken only with those (below).
    | 1 << W.HASH_TUNNEL
    | 1 << W.RSS_CONTEXT
    | W.GUEST_OFFLOAD_BITS
    | W.HOST_OFFLOAD_BITS
)
#: Known but taken only when ``features`` asks for them: they change the header
#: size (HASH_REPORT) or how received frames are steered (RSS).
OPT_IN_FEATURES = 1 << W.RSS | 1 << W.HASH_REPORT


def encode_rss_config(config: rss.RssConfig) -> bytes:
    """``struct virtio_net_rss_config`` (little-endian: RSS needs VIRTIO_F_VERSION_1)."""
    table = config.indirection_table
    return (
        struct.pack("<IHH", config.hash_types, config.mask, config.unclassified_queue)
        + struct.pack(f"<{len(table)}H", *table)
        + struct.pack("<HB", config.max_tx_vq, len(config.key))
        + config.key
    )


@dataclass
class DriverCounters:
    tx_packets: int = 0
    tx_bytes: int = 0
    rx_packets: int = 0
    rx_bytes: int = 0
    #: Frames the device returned malformed (dropped here).
    errors: int = 0
    #: Frames not sent because every transmit slot was in use.
    tx_full: int = 0
    reasons: dict[str, int] = field(default_factory=dict)

    def error(self, reason: str) -> None:
        self.errors += 1
        self.reasons[reason] = self.reasons.get(reason, 0) + 1


class NetDriver(VirtioDriver):
    """A virtio-net driver for tests, benchmarks and tools."""

    device_id = DeviceId.NET

    def __init__(
        self,
        transport: object,
        *,
        features: int | None = None,
        queue_size: int | None = None,
        avoid_features: int = 0,
        queue_pairs: int | None = None,
        rx_buffer_size: int | None = None,
        max_tx_frame: int | None = None,
    ) -> None:
        super().__init__(
            transport,  # type: ignore[arg-type]
            features=features,
            queue_size=queue_size,
            avoid_features=avoid_features,
        )
        self.want_pairs = queue_pairs
        self.rx_buffer_size = rx_buffer_size
        #: The largest frame to send (a GSO frame is up to wire.MAX_GSO_FRAME).
        self.max_tx_frame = max_tx_frame
        self.counters = DriverCounters()
        self.pairs = 1
        self.hdr_size = 12
        self.mac = b"\x02\x00\x00\x00\x00\x01"
        self.mtu: int | None = None
        self._tx_free: list[deque[tuple[int, int]]] = []
        self._rx_slots: list[int] = []
        self._rx_partial: list[list[bytes]] = []
        self._rx_expect: list[int] = []
        self._plain_rx: dict[bytes, W.NetHdr] = {}
        #: ``supported_stats_types`` from :meth:`query_stats` (None: not queried yet).
        self.stats_types: int | None = None
        #: ``max_rss_contexts`` from :meth:`rss_context_cap` (None: not queried yet).
        self.max_rss_contexts: int | None = None
        #: The RSS contexts the device accepted.
        self.rss_contexts: set[int] = set()

    # -- negotiation -------------------------------------------------------------------

    def supported_features(self) -> int:
        if self.wanted is None:
            return DRIVER_FEATURES
        return DRIVER_FEATURES | self.wanted & OPT_IN_FEATURES

    def _max_pairs(self) -> int:
        if not (self.has(W.MQ) or self.has(W.RSS)):
            return 1
        raw = self.read_config(W.CFG_MAX_PAIRS, 2)
        pairs = int.from_bytes(raw, self.byteorder)
        return max(1, min(pairs, W.MQ_VQ_PAIRS_MAX))

    def queues_wanted(self) -> int:
        count = 2 * self._max_pairs()
        if self.has(W.CTRL_VQ):
            count += 1
        # A vhost-user back-end may serve data queues only (its front-end keeps the
        # control queue): take what the transport has.
        return min(count, self.transport.num_queues())

    def choose_features(self, offered: int) -> int:
        accept = super().choose_features(offered)
        if accept >> W.MTU & 1:
            # A device MUST set mtu to 68..65535 when it offers VIRTIO_NET_F_MTU; one that
            # does not (DPDK's vhost PMD offers the bit with no config space behind it
            # over vhost-user) gets no MTU taken from it.
            mtu = int.from_bytes(self.read_config(W.CFG_MTU, 2), self.byteorder)
            if mtu < 68:
                log.info("device offers VIRTIO_NET_F_MTU with mtu %d: not taking it", mtu)
                accept &= ~(1 << W.MTU)
        return accept

    def setup(self) -> None:
        self.hdr_size = W.header_size(self.negotiated, legacy=self.transport.legacy)
        self._plain_rx.clear()
        # A (re)initialized device has forgotten its contexts and may count other types.
        self.stats_types = None
        self.max_rss_contexts = None
        self.rss_contexts = set()
        if self.has(W.MAC):
            # The NIC's address is the device's mac when MAC is negotiated.
            self.mac = self.read_config(W.CFG_MAC, 6)
        if self.has(W.MTU):
            self.mtu = int.from_bytes(self.read_config(W.CFG_MTU, 2), self.byteorder)

    @property
    def ctrl_queue(self) -> int | None:
        if not self.has(W.CTRL_VQ) or len(self.queues) % 2 == 0:
            return None
        return len(self.queues) - 1

    @property
    def max_pairs(self) -> int:
        return len(self.queues) // 2

    def link_up(self) -> bool:
        """The link state: the bottom bit of status, or up without VIRTIO_NET_F_STATUS."""
        if not self.has(W.STATUS):
            return True
        status = int.from_bytes(self.read_config(W.CFG_STATUS, 2), self.byteorder)
        return bool(status & W.S_LINK_UP)

    # -- buffers ---------------------------------------------------------------------------

    def start(self, *, tx_slots: int | None = None) -> None:
        """Fill every receive queue and set aside transmit slots; set the queue pairs."""
        gso = self.negotiated & W.GUEST_OFFLOAD_BITS & ~(1 << W.GUEST_CSUM)
        if self.rx_buffer_size is not None:
            size = self.rx_buffer_size
        elif self.has(W.MRG_RXBUF):
            size = 2048
        else:
            # Without merging, one buffer holds the largest frame the device may send.
            size = self.hdr_size + (W.MAX_GSO_FRAME if gso else 1514 + 4)
        self._rx_slots = []
        pairs = self.max_pairs
        alloc = self.transport.allocator
        for pair in range(pairs):
            q = self.queues[2 * pair]
            count = q.ring.size
            base = alloc.alloc(size * count, 64)
            self._rx_slots.append(size)
            for i in range(count):
                q.add((), [(base + i * size, size)], base + i * size)
            self._rx_partial.append([])
            self._rx_expect.append(0)
            self.kick(2 * pair)
        tx_size = self.hdr_size + (self.max_tx_frame or max(1518, (self.mtu or 0) + 18))
        self._tx_free = []
        for pair in range(pairs):
            n = tx_slots or self.queues[2 * pair + 1].ring.size
            base = alloc.alloc(tx_size * n, 64)
            self._tx_free.append(deque((base + i * tx_size, tx_size) for i in range(n)))
        if not self.has(W.MAC) and self.has(W.CTRL_MAC_ADDR) and self.ctrl_queue is not None:
            # The address this driver made up, so a filtering device lets its frames in.
            self.set_mac(self.mac)
        want = self.want_pairs or 1
        if want > 1 and self.has(W.MQ) and self.ctrl_queue is not None:
            self.set_queue_pairs(min(want, pairs))

    # -- transmit --------------------------------------------------------------------------

    def send(self, frame: bytes, hdr: W.NetHdr | None = None, *, pair: int = 0) -> bool:
        """Queue one frame and notify; False if no transmit slot was free."""
        sent = self.send_many([frame], hdr, pair=pair)
        return sent == 1

    def send_many(
        self, frames: Iterable[bytes], hdr: W.NetHdr | None = None, *, pair: int = 0
    ) -> int:
        """Queue frames on a transmit queue with one notification; returns how many."""
        self._check_usable()
        qi = 2 * pair + 1
        q = self.queues[qi]
        free = self._tx_free[pair]
        memory = self.transport.memory
        head = W.encode_header(hdr or W.NetHdr(), self.hdr_size, self.byteorder)
        size = self.hdr_size
        c = self.counters
        sent = 0
        limit = None
        if self.mtu is not None and (hdr is None or hdr.gso_type == W.GSO_NONE):
            limit = self.mtu + W.ETH_HLEN
        self._reclaim_tx(pair)
        for frame in frames:
            if not free:
                self._reclaim_tx(pair)
                if not free:
                    c.tx_full += 1
                    break
            if limit is not None and len(frame) > limit:
                raise ValueError(
                    f"a {len(frame)}-byte frame exceeds the MTU {self.mtu} ({N_CONFIG_DRV})"
                )
            addr, room = free.popleft()
            n = size + len(frame)
            if n > room:
                free.appendleft((addr, room))
                raise ValueError(f"a {len(frame)}-byte frame does not fit a transmit slot")
            memory.write(addr, head + frame)
            q.add([(addr, n)], (), (addr, room))
            sent += 1
            c.tx_packets += 1
            c.tx_bytes += len(frame)
        if sent:
            self.kick(qi)
        return sent

    def _reclaim_tx(self, pair: int) -> None:
        try:
            used = self.queues[2 * pair + 1].get_used()
        except SpecViolation as err:
            self._break(f"device corrupted transmit queue {2 * pair + 1}: {err}")
            raise
        free = self._tx_free[pair]
        for token, _written in used:
            assert isinstance(token, tuple)
            free.append(token)

    def tx_in_flight(self, pair: int = 0) -> int:
        self._reclaim_tx(pair)
        return self.queues[2 * pair + 1].outstanding if self.queues else 0

    # -- receive ----------------------------------------------------------------------------

    def poll_received(self, pair: int | None = None) -> list[tuple[W.NetHdr, bytes]]:
        """Frames the device has delivered (no waiting); their buffers go back at once."""
        self._check_usable()
        out: list[tuple[W.NetHdr, bytes]] = []
        pairs = range(self.max_pairs) if pair is None else (pair,)
        for p in pairs:
            self._harvest_rx(p, out)
        return out

    def receive(
        self, timeout: float = 1.0, *, pair: int | None = None
    ) -> list[tuple[W.NetHdr, bytes]]:
        """Wait up to ``timeout`` for frames; an empty list if none came."""
        got: list[tuple[W.NetHdr, bytes]] = []

        def arrived() -> bool:
            got.extend(self.poll_received(pair))
            if got:
                return True
            pairs = range(self.max_pairs) if pair is None else (pair,)
            if any(self.queues[2 * p].enable_interrupts() for p in pairs):
                got.extend(self.poll_received(pair))
            return bool(got)

        self.transport.wait_until(arrived, timeout)
        return got

    def _harvest_rx(self, pair: int, out: list[tuple[W.NetHdr, bytes]]) -> None:
        qi = 2 * pair
        q = self.queues[qi]
        try:
            used = q.get_used()
        except SpecViolation as err:
            self._break(f"device corrupted receive queue {qi}: {err}")
            raise
        if not used:
            return
        memory = self.transport.memory
        size = self.hdr_size
        order = self.byteorder
        slot = self._rx_slots[pair]
        c = self.counters
        partial = self._rx_partial[pair]
        mergeable = self.has(W.MRG_RXBUF)
        for token, written in used:
            assert isinstance(token, int)
            data = memory.read(token, written) if written else b""
            q.add((), [(token, slot)], token)  # the slot goes straight back
            if partial:
                partial.append(data)
                if len(partial) == self._rx_expect[pair]:
                    whole = b"".join(partial)
                    partial.clear()
                    self._accept(whole, size, order, out)
                continue
            if written < size:
                c.error("used length shorter than the header")
                continue
            if mergeable:
                nbuf = int.from_bytes(data[10:12], order)
                if nbuf == 0:
                    c.error("num_buffers of 0")
                    continue
                if nbuf > q.ring.size:
                    c.error(f"num_buffers {nbuf} larger than the receive queue")
                    continue
                if nbuf > 1:
                    partial.append(data)
                    self._rx_expect[pair] = nbuf
                    continue
            self._accept(data, size, order, out)
        self.kick(qi)

    def _accept(
        self, data: bytes, size: int, order: ByteOrder, out: list[tuple[W.NetHdr, bytes]]
    ) -> None:
        c = self.counters
        if size <= 12 and not data[0] and not data[1] and len(data) >= size + W.ETH_HLEN:
            # The common frame: no flags, no GSO. One shared header per num_buffers
            # value (callers do not change the headers they are handed).
            key = data[10:12] if size == 12 else b""
            hdr = self._plain_rx.get(key)
            if hdr is None:
                hdr = W.decode_header(data, size, order)
                if len(self._plain_rx) < 64:
                    self._plain_rx[key] = hdr
            c.rx_packets += 1
            c.rx_bytes += len(data) - size
            out.append((hdr, data[size:]))
            return
        hdr = W.decode_header(data, size, order)
        if hdr.gso_type & W.GSO_TUNNEL_BITS == W.GSO_TUNNEL_BITS:
            # Both tunnel bits: the driver MUST NOT accept the packet.
            c.error("both UDP tunnel bits set")
            return
        if hdr.gso_type != W.GSO_NONE and not self.negotiated & W.GUEST_OFFLOAD_BITS:
            c.error(f"gso_type {hdr.gso_type} without a guest offload negotiated")
            return
        frame = data[size:]
        if len(frame) < W.ETH_HLEN:
            c.error("frame shorter than an Ethernet header")
            return
        c.rx_packets += 1
        c.rx_bytes += len(frame)
        out.append((hdr, frame))

    # -- control queue -----------------------------------------------------------------------

    def command(
        self, cls: int, cmd: int, payload: bytes = b"", result: int = 0
    ) -> tuple[int, bytes]:
        """Send one control command; returns (ack, result bytes)."""
        ctrl = self.ctrl_queue
        if ctrl is None:
            raise ValueError("no control queue (VIRTIO_NET_F_CTRL_VQ not negotiated)")
        written, back = self.call(ctrl, [bytes([cls, cmd]) + payload], [1 + result])
        if written < 1:
            raise SpecViolation("the device did not write the ack byte")
        return back[0], back[1:written]

    def set_queue_pairs(self, pairs: int) -> None:
        if self.rss_contexts:
            raise NegotiationError(
                f"VQ_PAIRS_SET with RSS contexts {sorted(self.rss_contexts)} configured",
                N_RSS_CTX_DRV,
            )
        ack, _ = self.command(W.CTRL_MQ_CLASS, W.MQ_VQ_PAIRS_SET, pairs.to_bytes(2, self.byteorder))
        if ack != W.OK:
            raise ValueError(f"device refused {pairs} queue pairs")
        self.pairs = pairs

    def set_rx_mode(self, cmd: int, on: bool) -> int:
        """An RX class command; refused here unless its feature was negotiated."""
        need = W.CTRL_RX if cmd in (W.RX_PROMISC, W.RX_ALLMULTI) else W.CTRL_RX_EXTRA
        if not self.has(need):
            # The driver MUST NOT issue the command without the feature.
            raise NegotiationError(f"RX command {cmd} needs feature bit {need}", N_FILTER_DRV)
        return self.command(W.CTRL_RX_CLASS, cmd, bytes([1 if on else 0]))[0]

    def set_mac_table(self, unicast: Sequence[bytes], multicast: Sequence[bytes]) -> int:
        """MAC_TABLE_SET: non-multicast addresses, then multicast ones (CTRL_RX only)."""
        if not self.has(W.CTRL_RX):
            raise NegotiationError("MAC table without VIRTIO_NET_F_CTRL_RX", N_MAC_DRV)
        if any(len(m) != 6 or m[0] & 1 for m in unicast) or any(
            len(m) != 6 or not m[0] & 1 for m in multicast
        ):
            raise ValueError("unicast entries must be unicast and multicast ones multicast")
        order = self.byteorder
        payload = len(unicast).to_bytes(4, order) + b"".join(unicast)
        payload += len(multicast).to_bytes(4, order) + b"".join(multicast)
        return self.command(W.CTRL_MAC_CLASS, W.MAC_TABLE_SET, payload)[0]

    def set_mac(self, mac: bytes) -> int:
        if not self.has(W.CTRL_MAC_ADDR):
            raise NegotiationError("MAC_ADDR_SET without VIRTIO_NET_F_CTRL_MAC_ADDR", N_MAC_DRV)
        ack = self.command(W.CTRL_MAC_CLASS, W.MAC_ADDR_SET, mac)[0]
        if ack == W.OK:
            self.mac = mac
        return ack

    def vlan(self, vid: int, add: bool = True) -> int:
        cmd = W.VLAN_ADD if add else W.VLAN_DEL
        return self.command(W.CTRL_VLAN_CLASS, cmd, vid.to_bytes(2, self.byteorder))[0]

    def announce_ack(self) -> int:
        return self.command(W.CTRL_ANNOUNCE_CLASS, W.ANNOUNCE_ACK)[0]

    def set_offloads(self, offloads: int) -> int:
        return self.command(
            W.CTRL_GUEST_OFFLOADS_CLASS, W.GUEST_OFFLOADS_SET, offloads.to_bytes(8, self.byteorder)
        )[0]

    # -- device statistics ------------------------------------------------------------------

    def query_stats(self) -> int:
        """VIRTIO_NET_CTRL_STATS_QUERY: the device's ``supported_stats_types`` (kept)."""
        if not self.has(W.DEVICE_STATS):
            raise NegotiationError("statistics without VIRTIO_NET_F_DEVICE_STATS")
        ack, result = self.command(
            W.CTRL_STATS_CLASS, W.STATS_QUERY, result=stats.CAPABILITIES.size
        )
        if ack != W.OK:
            raise ValueError("the device refused VIRTIO_NET_CTRL_STATS_QUERY")
        if len(result) < stats.CAPABILITIES.size:
            raise SpecViolation(f"STATS_QUERY answered {len(result)} bytes, not 8", N_STATS_DEV)
        (self.stats_types,) = stats.CAPABILITIES.unpack_from(result)
        return self.stats_types

    def _stats_kind(self, vq_index: int) -> int:
        """The statistics types that exist for a queue (receiveq, transmitq or controlq)."""
        if vq_index == self.ctrl_queue:
            return W.STATS_TYPES_CVQ
        if not 0 <= vq_index < 2 * self.max_pairs:
            raise ValueError(f"queue {vq_index} is not a queue of this driver")
        return W.STATS_TYPES_TX if vq_index & 1 else W.STATS_TYPES_RX

    def stats_types_for(self, vq_index: int) -> int:
        """What a STATS_GET may ask of this queue: queried, valid for it, features negotiated."""
        if self.stats_types is None:
            self.query_stats()
        assert self.stats_types is not None
        types = self.stats_types & self._stats_kind(vq_index) & stats.KNOWN_TYPES
        return stats.obtainable(types, self.negotiated)

    def get_stats(self, requests: Sequence[tuple[int, int]]) -> list[stats.StatsReply]:
        """VIRTIO_NET_CTRL_STATS_GET for (vq_index, types_bitmap) pairs; the decoded replies.

        The types must come from :meth:`query_stats` and suit their queue; the
        result buffer holds every requested reply. Raises ValueError if the
        device answers ERR and SpecViolation if its replies are malformed or
        answer something not asked.
        """
        if self.stats_types is None:
            raise NegotiationError("STATS_GET before STATS_QUERY", N_STATS_DRV)
        expected: list[tuple[int, int]] = []
        for vq, types in requests:
            kind = self._stats_kind(vq)
            if types & ~self.stats_types:
                raise NegotiationError(
                    f"statistics types {types & ~self.stats_types:#x} were not in "
                    "supported_stats_types",
                    N_STATS_DRV,
                )
            if types & ~kind:
                raise NegotiationError(
                    f"statistics types {types & ~kind:#x} are not valid for queue {vq}",
                    N_STATS_DRV,
                )
            if types & ~stats.KNOWN_TYPES:
                raise ValueError(f"statistics types {types & ~stats.KNOWN_TYPES:#x} are unknown")
            expected += [(t, vq) for t in stats.type_bits(types)]
        # Room for every reply (and so for every reply header).
        size = sum(stats.reply_size(t) for t, _ in expected)
        ack, result = self.command(
            W.CTRL_STATS_CLASS, W.STATS_GET, stats.encode_request(requests), result=size
        )
        if ack != W.OK:
            raise ValueError(f"the device refused STATS_GET for {list(requests)}")
        try:
            replies = stats.decode_replies(result)
        except ValueError as err:
            raise SpecViolation(f"malformed statistics reply: {err}", N_STATS_DEV) from None
        wanted = Counter(expected)
        for reply in replies:
            key = (reply.type, reply.vq_index)
            if not wanted[key]:
                raise SpecViolation(
                    f"statistics reply of type {reply.type} for queue {reply.vq_index} "
                    "was not requested",
                    N_STATS_DEV,
                )
            wanted[key] -= 1
        if len(replies) < len(expected):
            log.warning("STATS_GET: %d of %d replies came", len(replies), len(expected))
        return replies

    def queue_stats(self, vq_index: int) -> dict[str, int]:
        """Every statistic this queue has that the device and the features allow, by name."""
        types = self.stats_types_for(vq_index)
        out: dict[str, int] = {}
        if types:
            for reply in self.get_stats([(vq_index, types)]):
                out.update(reply.values)
        return out

    # -- inner header hash -------------------------------------------------------------------

    def supported_tunnel_types(self) -> int:
        """``supported_tunnel_types`` (0 without VIRTIO_NET_F_HASH_TUNNEL)."""
        if not self.has(W.HASH_TUNNEL):
            return 0
        raw = int.from_bytes(self.read_config(W.CFG_TUNNEL_TYPES, 4), "little")
        # Bits this specification does not document are ignored.
        return raw & W.HASH_TUNNEL_TYPES_ALL

    def set_hash_tunnel(self, types: int) -> int:
        """VIRTIO_NET_CTRL_HASH_TUNNEL_SET: hash the inner headers of these encapsulations."""
        if not self.has(W.HASH_TUNNEL):
            raise NegotiationError("HASH_TUNNEL_SET without VIRTIO_NET_F_HASH_TUNNEL", N_TUNNEL_DRV)
        extra = types & ~self.supported_tunnel_types()
        if extra:
            raise NegotiationError(
                f"encapsulation types {extra:#x} are not in supported_tunnel_types", N_TUNNEL_DRV
            )
        return self.command(
            W.CTRL_HASH_TUNNEL_CLASS, W.HASH_TUNNEL_SET, types.to_bytes(4, "little")
        )[0]

    # -- RSS --------------------------------------------------------------------------------

    def _check_rss_config(self, config: rss.RssConfig) -> None:
        """The driver's side of Setting RSS parameters, against the device's limits."""
        max_key = self.read_config(W.CFG_RSS_MAX_KEY, 1)[0]
        max_table = int.from_bytes(self.read_config(W.CFG_RSS_MAX_TABLE, 2), "little")
        supported = int.from_bytes(self.read_config(W.CFG_HASH_TYPES, 4), "little")
        if config.mask >= max_table:
            raise NegotiationError(
                f"indirection_table_mask {config.mask} is not below {max_table}", N_RSS_DRV
            )
        if config.hash_types & ~supported:
            raise NegotiationError(
                f"hash types {config.hash_types & ~supported:#x} are not supported", N_RSS_DRV
            )
        queues = [*config.indirection_table, config.unclassified_queue]
        if any(not 0 <= q < self.max_pairs for q in queues):
            raise NegotiationError("a receive queue id is not an enabled receive queue", N_RSS_DRV)
        if len(config.key) > max_key:
            raise ValueError(f"a {len(config.key)}-byte key (rss_max_key_size {max_key})")
        if not 1 <= config.max_tx_vq <= self.max_pairs:
            raise ValueError(f"max_tx_vq {config.max_tx_vq} is outside 1..{self.max_pairs}")

    def set_rss(self, config: rss.RssConfig) -> int:
        """VIRTIO_NET_CTRL_MQ_RSS_CONFIG (VIRTIO_NET_F_RSS)."""
        if not self.has(W.RSS):
            raise NegotiationError("RSS_CONFIG without VIRTIO_NET_F_RSS", N_RSS_DRV)
        self._check_rss_config(config)
        return self.command(W.CTRL_MQ_CLASS, W.MQ_RSS_CONFIG, encode_rss_config(config))[0]

    def _require_rss_context(self) -> None:
        if not self.has(W.RSS_CONTEXT):
            raise NegotiationError(
                "RSS context command without VIRTIO_NET_F_RSS_CONTEXT", N_RSS_CTX_DRV
            )

    def rss_context_cap(self) -> int:
        """VIRTNET_RSS_CTX_CTRL_CAP_GET: ``max_rss_contexts`` (kept)."""
        self._require_rss_context()
        ack, result = self.command(W.CTRL_RSS_CTX_CLASS, W.RSS_CTX_CAP_GET, result=2)
        if ack != W.OK or len(result) < 2:
            raise ValueError("the device did not answer VIRTNET_RSS_CTX_CTRL_CAP_GET")
        self.max_rss_contexts = int.from_bytes(result[:2], "little")
        return self.max_rss_contexts

    def _context_id(self, ctx_id: int) -> bytes:
        self._require_rss_context()
        limit = self.max_rss_contexts
        if limit is None:
            limit = self.rss_context_cap()
        if not 1 <= ctx_id <= limit:
            raise NegotiationError(f"rss_ctx_id {ctx_id} is outside 1..{limit}", N_RSS_CTX_DRV)
        return ctx_id.to_bytes(2, "little")

    def add_rss_context(self, ctx_id: int, config: rss.RssConfig) -> int:
        """VIRTNET_RSS_CTX_CTRL_ADD: a new context ``ctx_id`` with these parameters."""
        return self._rss_context(W.RSS_CTX_ADD, ctx_id, config)

    def modify_rss_context(self, ctx_id: int, config: rss.RssConfig) -> int:
        """VIRTNET_RSS_CTX_CTRL_MOD: new parameters for context ``ctx_id``."""
        return self._rss_context(W.RSS_CTX_MOD, ctx_id, config)

    def _rss_context(self, cmd: int, ctx_id: int, config: rss.RssConfig) -> int:
        head = self._context_id(ctx_id)
        self._check_rss_config(config)
        payload = head + bytes(6) + encode_rss_config(config)
        ack = self.command(W.CTRL_RSS_CTX_CLASS, cmd, payload)[0]
        if ack == W.OK:
            self.rss_contexts.add(ctx_id)
        return ack

    def delete_rss_context(self, ctx_id: int) -> int:
        """VIRTNET_RSS_CTX_CTRL_DEL."""
        ack = self.command(W.CTRL_RSS_CTX_CLASS, W.RSS_CTX_DEL, self._context_id(ctx_id))[0]
        if ack == W.OK:
            self.rss_contexts.discard(ctx_id)
        return ack
