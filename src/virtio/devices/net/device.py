"""The network device model: transmit and receive queues in pairs, and the control queue.

Transmit chains are served as they come (``handle_chain``): the header is
checked, the frame is segmented and checksummed where the back-end cannot
take an offload, and each frame goes to the back-end. Receive buffers are
not popped when the driver makes them available, but when a frame arrives
for the guest (:meth:`NetDevice.deliver`): the device pops as many as the
frame needs (one, or several with VIRTIO_NET_F_MRG_RXBUF), fills them and
pushes them back together. Frames that find no buffer wait in a short
backlog, drained when the driver adds buffers.

Used buffers of the frames delivered from one back-end wake-up are pushed as
one batch with one notification decision: the back-end's event callbacks run
through :class:`_BatchingEvents`, which flushes once each callback returns.

The control queue also serves device statistics (``stats.py``: per-queue
counters kept with plain increments), RSS contexts (kept and checked; see
:meth:`NetDevice.context_queue`) and the inner header hash (``tunnel.py``).
"""

from __future__ import annotations

import logging
import struct
from collections import deque
from dataclasses import dataclass, field, replace

from virtio.core.device import DeviceHooks, RingOptions, VirtioDevice
from virtio.core.events import Callback, EventSources, Timer
from virtio.devices.net import offload, rss, stats, tunnel
from virtio.devices.net import wire as W
from virtio.devices.net.backend import NetBackend, NullBackend
from virtio.errors import SpecViolation
from virtio.queue import Chain
from virtio.spec.device_ids import DeviceId

log = logging.getLogger("virtio.net")

_NET = "Device Types / Network Device"
N_CONFIG_DEV = f"devicenormative:{_NET} / Device configuration layout"
N_CONFIG_DRV = f"drivernormative:{_NET} / Device configuration layout"
N_TX_DEV = f"devicenormative:{_NET} / Device Operation / Packet Transmission"
N_TX_DRV = f"drivernormative:{_NET} / Device Operation / Packet Transmission"
N_RXBUF_DEV = f"devicenormative:{_NET} / Device Operation / Setting Up Receive Buffers"
N_RXBUF_DRV = f"drivernormative:{_NET} / Device Operation / Setting Up Receive Buffers"
N_RX_DEV = f"devicenormative:{_NET} / Device Operation / Processing of Incoming Packets"
_CVQ = f"{_NET} / Device Operation / Control Virtqueue"
N_FILTER_DEV = f"devicenormative:{_CVQ} / Packet Receive Filtering"
N_FILTER_DRV = f"drivernormative:{_CVQ} / Packet Receive Filtering"
N_MAC_DEV = f"devicenormative:{_CVQ} / Setting MAC Address Filtering"
N_MAC_DRV = f"drivernormative:{_CVQ} / Setting MAC Address Filtering"
N_VLAN_DEV = f"devicenormative:{_CVQ} / VLAN Filtering"
N_ANNOUNCE_DEV = f"devicenormative:{_CVQ} / Gratuitous Packet Sending"
N_MQ_DEV = f"devicenormative:{_CVQ} / Automatic receive steering in multiqueue mode"
N_MQ_DRV = f"drivernormative:{_CVQ} / Automatic receive steering in multiqueue mode"
N_RSS_DRV = f"drivernormative:{_CVQ} / Receive-side scaling (RSS)"
N_RSS_DEV = f"devicenormative:{_CVQ} / Receive-side scaling (RSS) / RSS processing"
N_OFFLOADS_DRV = f"drivernormative:{_CVQ} / Offloads State Configuration / Setting Offloads State"
N_COAL_DEV = f"devicenormative:{_CVQ} / Notifications Coalescing"
N_COAL_DRV = f"drivernormative:{_CVQ} / Notifications Coalescing"
N_STATS_DEV = f"devicenormative:{_CVQ} / Device Statistics"
N_STATS_DRV = f"drivernormative:{_CVQ} / Device Statistics"
N_RSS_CTX_DEV = f"devicenormative:{_CVQ} / RSS Context"
N_RSS_CTX_DRV = f"drivernormative:{_CVQ} / RSS Context"
N_TUNNEL_DEV = f"devicenormative:{_CVQ} / Inner Header Hash"
N_TUNNEL_DRV = f"drivernormative:{_CVQ} / Inner Header Hash"
N_FRAMING_DRV = "drivernormative:Basic Facilities of a Virtio Device / Message Framing"

#: Frames kept per receive queue while the guest has no buffer for them.
BACKLOG = 256
#: Flows remembered for automatic receive steering.
FLOW_TABLE = 4096
#: Hash types this device computes (every type the spec defines).
SUPPORTED_HASH_TYPES = W.HASH_TYPES_ALL
RSS_MAX_KEY = 40
RSS_MAX_TABLE = 128
#: RSS contexts besides the default configuration (``max_rss_contexts``), by default.
RSS_MAX_CONTEXTS = 8
#: Encapsulation types this device hashes the inner headers of (every type the spec defines).
SUPPORTED_TUNNEL_TYPES = W.HASH_TUNNEL_TYPES_ALL

# The control command bits of the offload bitmask (GUEST_OFFLOADS_SET) this device
# knows; 46 and 47 are the UDP tunnel offloads, which it does not offer.
_CTRL_OFFLOAD_BITS = W.GUEST_OFFLOAD_BITS

_LE16 = struct.Struct("<H")
_LE32 = struct.Struct("<I")
_LE64 = struct.Struct("<Q")
_COAL = struct.Struct("<II")
_COAL_VQ = struct.Struct("<HHII")
# virtnet_rss_ctx_add_modify: le16 rss_ctx_id, u8 reserved[6], then virtio_net_rss_config.
_RSS_CTX_HEAD = 8


@dataclass
class NetCounters:
    """What the device did, for logs and tests."""

    tx_frames: int = 0
    tx_bytes: int = 0
    tx_dropped: int = 0
    tx_segmented: int = 0
    #: Frames the guest sent with a GSO type, and frames delivered to it as GSO.
    tx_gso: int = 0
    rx_gso: int = 0
    rx_frames: int = 0
    rx_bytes: int = 0
    rx_dropped: int = 0
    rx_filtered: int = 0
    rx_backlogged: int = 0
    ctrl_ok: int = 0
    ctrl_err: int = 0
    #: Why frames were dropped, with counts (tx and rx).
    reasons: dict[str, int] = field(default_factory=dict)

    def drop(self, reason: str) -> None:
        self.reasons[reason] = self.reasons.get(reason, 0) + 1


@dataclass
class RxFilter:
    """The receive filter set through the control queue (all off and empty on reset)."""

    promisc: bool = True
    allmulti: bool = False
    alluni: bool = False
    nomulti: bool = False
    nouni: bool = False
    nobcast: bool = False
    unicast: set[bytes] = field(default_factory=set)
    multicast: set[bytes] = field(default_factory=set)
    vlans: set[int] = field(default_factory=set)


class _BatchingEvents(EventSources):
    """The back-end's view of the device's event sources: each callback ends in a flush.

    Watches and timers go to the device's own :class:`EventSources` (its host
    serves those); the callbacks are wrapped so that the receive buffers
    filled during one wake-up are pushed, and notified, once.
    """

    def __init__(self, inner: EventSources, flush: Callback) -> None:
        super().__init__()
        self.inner = inner
        self.flush = flush

    def _wrap(self, callback: Callback) -> Callback:
        flush = self.flush

        def run(now: float) -> None:
            try:
                callback(now)
            finally:
                flush(now)

        return run

    def watch(self, fd: int, callback: Callback) -> None:
        self.inner.watch(fd, self._wrap(callback))

    def unwatch(self, fd: int) -> None:
        self.inner.unwatch(fd)

    def call_at(self, deadline: float, callback: Callback) -> Timer:
        return self.inner.call_at(deadline, self._wrap(callback))

    def call_later(self, delay: float, callback: Callback) -> Timer:
        return self.inner.call_later(delay, self._wrap(callback))

    def cancel(self, timer: Timer) -> None:
        self.inner.cancel(timer)


class _CountingHooks(DeviceHooks):
    """The transport's hooks, counting used buffer notifications per queue for the statistics."""

    def __init__(self, inner: DeviceHooks, device: NetDevice) -> None:
        self.inner = inner
        self.device = device

    def notify_used(self, queue_index: int) -> None:
        self.device._note_interrupt(queue_index)
        self.inner.notify_used(queue_index)

    def notify_config(self) -> None:
        self.inner.notify_config()


class _RxQueue:
    """A receive queue's state beyond the ring: spare chains, backlog, batch, counters."""

    __slots__ = ("backlog", "done", "spare", "stats")

    def __init__(self) -> None:
        self.stats = stats.RxStats()
        #: Chains popped for a frame that did not fit; used first for the next one.
        self.spare: deque[Chain] = deque()
        self.backlog: deque[tuple[W.NetHdr, bytes]] = deque()
        #: Filled chains not yet pushed (one batch per back-end wake-up).
        self.done: list[tuple[Chain, int]] = []


class NetDevice(VirtioDevice):
    """virtio-net: ``queue_pairs`` receive/transmit pairs, a control queue, a back-end."""

    device_id = DeviceId.NET
    #: Transmit chains served per batch: frames are small and cheap to serve.
    batch_limit = 64

    def __init__(
        self,
        backend: NetBackend | None = None,
        *,
        mac: bytes | None = b"\x52\x54\x00\x12\x34\x56",
        mtu: int | None = None,
        queue_pairs: int = 1,
        speed: int | None = None,
        duplex: int = W.DUPLEX_FULL,
        standby: bool = False,
        link_up: bool = True,
        offer_mask: int | None = None,
        queue_max_size: int = 256,
        ring: RingOptions | None = None,
        rss_contexts: int = RSS_MAX_CONTEXTS,
    ) -> None:
        if not 1 <= queue_pairs <= W.MQ_VQ_PAIRS_MAX:
            # max_virtqueue_pairs between 1 and 0x8000.
            raise ValueError(f"queue pairs must be 1..{W.MQ_VQ_PAIRS_MAX} ({N_CONFIG_DEV})")
        if mtu is not None and not 68 <= mtu <= 65535:
            raise ValueError(f"mtu must be 68..65535 ({N_CONFIG_DEV})")
        if mac is not None and len(mac) != 6:
            raise ValueError("a MAC address has 6 bytes")
        if not 0 <= rss_contexts <= 0xFFFF:
            raise ValueError("max_rss_contexts is a 16-bit count")
        self.backend: NetBackend = backend or NullBackend()
        self.mac = mac
        self.mtu = mtu
        self.queue_pairs = queue_pairs
        self.speed = speed
        self.duplex = duplex
        self.standby = standby
        self.link_up = link_up
        self.offer_mask = offer_mask
        self.counters = NetCounters()
        self.filter = RxFilter()
        self.active_pairs = 1
        self.rss: rss.RssConfig | None = None
        self.hash_config: rss.RssConfig | None = None
        self.guest_offloads = 0
        self.coalescing: dict[int, tuple[int, int]] = {}
        self.tx_coalescing = (0, 0)
        self.rx_coalescing = (0, 0)
        #: ``max_rss_contexts``; 0 does not offer VIRTIO_NET_F_RSS_CONTEXT.
        self.max_rss_contexts = rss_contexts
        #: RSS contexts by ``rss_ctx_id`` (VIRTNET_RSS_CTX_CTRL_ADD/_MOD/_DEL).
        self.rss_contexts: dict[int, rss.RssConfig] = {}
        #: ``enabled_tunnel_types`` (VIRTIO_NET_CTRL_HASH_TUNNEL_SET); 0: outer headers only.
        self.tunnel_types = 0
        self._rx = [_RxQueue() for _ in range(queue_pairs)]
        self._tx_stats = [stats.TxStats() for _ in range(queue_pairs)]
        self._cvq_stats = stats.CvqStats()
        # Queue indexes below this are data queues (receive even, transmit odd).
        self._data_queues = 2 * queue_pairs
        self._dirty: set[int] = set()
        self._flows: dict[bytes, int] = {}
        self._hdr_size = 12
        self._ctrl = -1
        self._plain_max = W.MAX_GSO_FRAME
        self._plain_heads: dict[int, bytes] = {}
        self._backend_started = False
        self._logged = (0, 0, 0, 0)
        super().__init__(num_queues=2 * queue_pairs + 1, queue_max_size=queue_max_size, ring=ring)
        self._backend_events = _BatchingEvents(self.events, self._flush)

    # The transport installs its hooks here; wrapped, its interrupts are counted per queue.
    @property
    def hooks(self) -> DeviceHooks:
        return self._hooks

    @hooks.setter
    def hooks(self, value: DeviceHooks) -> None:
        self._hooks = value if isinstance(value, _CountingHooks) else _CountingHooks(value, self)

    # -- what the device offers ----------------------------------------------------

    def device_features(self) -> int:
        bits = (
            W.GUEST_OFFLOAD_BITS
            | W.HOST_OFFLOAD_BITS
            | 1 << W.MRG_RXBUF
            | 1 << W.STATUS
            | 1 << W.CTRL_VQ
            | 1 << W.CTRL_RX
            | 1 << W.CTRL_VLAN
            | 1 << W.CTRL_RX_EXTRA
            | 1 << W.GUEST_ANNOUNCE
            | 1 << W.CTRL_MAC_ADDR
            | 1 << W.CTRL_GUEST_OFFLOADS
            | 1 << W.NOTF_COAL
            | 1 << W.VQ_NOTF_COAL
            | 1 << W.HASH_REPORT
            | 1 << W.GUEST_HDRLEN
            | 1 << W.DEVICE_STATS
            | 1 << W.HASH_TUNNEL
        )
        if self.mac is not None:
            bits |= 1 << W.MAC
        if self.mtu is not None:
            bits |= 1 << W.MTU
        if self.queue_pairs > 1:
            bits |= 1 << W.MQ | 1 << W.RSS
            if self.max_rss_contexts:
                # max_rss_contexts is at least 1 whenever the feature is offered.
                bits |= 1 << W.RSS_CONTEXT
        if self.speed is not None:
            bits |= 1 << W.SPEED_DUPLEX
        if self.standby:
            bits |= 1 << W.STANDBY
        if self.offer_mask is not None:
            bits &= self.offer_mask
        # Commands without the control queue (or the hash they refine) cannot be offered.
        if not bits >> W.CTRL_VQ & 1:
            bits &= ~(1 << W.DEVICE_STATS | 1 << W.HASH_TUNNEL | 1 << W.RSS_CONTEXT)
        if not bits & (1 << W.RSS | 1 << W.HASH_REPORT):
            bits &= ~(1 << W.HASH_TUNNEL)
        if not bits >> W.RSS & 1:
            bits &= ~(1 << W.RSS_CONTEXT)
        return bits

    def config_size(self) -> int:
        return W.CONFIG_SIZE

    def build_config(self) -> None:
        order = self.byteorder
        c = self.config
        c[W.CFG_MAC : W.CFG_MAC + 6] = self.mac or bytes(6)
        status = W.S_LINK_UP if self.link_up else 0
        c[W.CFG_STATUS : W.CFG_STATUS + 2] = status.to_bytes(2, order)
        c[W.CFG_MAX_PAIRS : W.CFG_MAX_PAIRS + 2] = self.queue_pairs.to_bytes(2, order)
        c[W.CFG_MTU : W.CFG_MTU + 2] = (self.mtu or 0).to_bytes(2, order)
        speed = W.SPEED_UNKNOWN if self.speed is None else self.speed
        c[W.CFG_SPEED : W.CFG_SPEED + 4] = speed.to_bytes(4, "little")
        c[W.CFG_DUPLEX] = self.duplex
        c[W.CFG_RSS_MAX_KEY] = RSS_MAX_KEY
        c[W.CFG_RSS_MAX_TABLE : W.CFG_RSS_MAX_TABLE + 2] = RSS_MAX_TABLE.to_bytes(2, "little")
        c[W.CFG_HASH_TYPES : W.CFG_HASH_TYPES + 4] = SUPPORTED_HASH_TYPES.to_bytes(4, "little")
        c[W.CFG_TUNNEL_TYPES : W.CFG_TUNNEL_TYPES + 4] = SUPPORTED_TUNNEL_TYPES.to_bytes(
            4, "little"
        )

    def queues_for_features(self, features: int) -> int:
        pairs = self.queue_pairs if features >> W.MQ & 1 or features >> W.RSS & 1 else 1
        return 2 * pairs + (features >> W.CTRL_VQ & 1)

    @property
    def ctrl_index(self) -> int | None:
        if not self.has(W.CTRL_VQ):
            return None
        return self.queue_count - 1

    def describe(self) -> str:
        mac = W.mac_text(self.mac) if self.mac else "no MAC"
        mtu = f", mtu {self.mtu}" if self.mtu else ""
        return f"virtio-net {mac}, {self.queue_pairs} queue pairs{mtu}, {self.backend.name}"

    # -- lifecycle ---------------------------------------------------------------------

    def on_features_ok(self) -> None:
        self._hdr_size = W.header_size(self.negotiated, legacy=self.legacy)
        self._ctrl = self.queue_count - 1 if self.has(W.CTRL_VQ) else -1
        # The largest plain frame the fast transmit path takes without more checks.
        mtu = self._mtu()
        self._plain_max = W.MAX_GSO_FRAME if mtu is None else mtu + W.ETH_HLEN
        self._data_queues = 2 * self.active_pairs_possible()
        self._plain_heads.clear()
        self.guest_offloads = self.negotiated & W.GUEST_OFFLOAD_BITS
        self.backend.set_rx_offloads(self.guest_offloads)

    def on_driver_ok(self) -> None:
        if not self._backend_started:
            self._backend_started = True
            self.backend.start(self._backend_events, self.deliver)

    def on_reset(self) -> None:
        self._ctrl = -1
        self._plain_max = W.MAX_GSO_FRAME
        c = self.counters
        seen = (c.tx_frames, c.rx_frames, c.tx_dropped, c.rx_dropped)
        if any(seen) and seen != self._logged:
            self._logged = seen
            log.info(
                "%s: sent %d frames (%d GSO, %d segmented here), received %d (%d GSO, "
                "%d waited for buffers, %d still waiting), dropped %d sent and %d received %s",
                W.mac_text(self.mac) if self.mac else "net",
                c.tx_frames,
                c.tx_gso,
                c.tx_segmented,
                c.rx_frames,
                c.rx_gso,
                c.rx_backlogged,
                sum(len(rx.backlog) for rx in self._rx),
                c.tx_dropped,
                c.rx_dropped,
                c.reasons or "",
            )
        if self._backend_started:
            self._backend_started = False
            self.backend.stop()
        self.filter = RxFilter()
        self.active_pairs = 1
        self.rss = None
        self.hash_config = None
        self.guest_offloads = 0
        self.coalescing.clear()
        self.tx_coalescing = self.rx_coalescing = (0, 0)
        # Every RSS context goes, and inner header hash is off for every type.
        self.rss_contexts.clear()
        self.tunnel_types = 0
        # A reset device is a new one to the next driver: its statistics start at 0.
        self._tx_stats = [stats.TxStats() for _ in range(self.queue_pairs)]
        self._cvq_stats = stats.CvqStats()
        self._data_queues = 2 * self.queue_pairs
        for rx in self._rx:
            rx.spare.clear()
            rx.backlog.clear()
            rx.done.clear()
            rx.stats = stats.RxStats()
        self._dirty.clear()
        self._flows.clear()

    def close(self) -> None:
        self.backend.close()

    def quiesce(self, queue_index: int) -> None:
        # Spare receive chains were popped and hold nothing: give them back empty
        # so the ring position reported covers them.
        if queue_index % 2 == 0 and queue_index // 2 < len(self._rx):
            rx = self._rx[queue_index // 2]
            self._push_rx(queue_index)
            spare = list(rx.spare)
            rx.spare.clear()
            if spare:
                self.complete_many(queue_index, [(c, 0) for c in spare])

    def stop_queue(self, index: int) -> None:
        super().stop_queue(index)
        if index % 2 == 0 and index // 2 < len(self._rx):
            rx = self._rx[index // 2]
            rx.spare.clear()
            rx.done.clear()
        self.coalescing.pop(index, None)

    # -- the device's own changes --------------------------------------------------------

    def set_link(self, up: bool) -> None:
        """Carrier up or down (VIRTIO_NET_F_STATUS): a configuration change."""
        self.link_up = up
        self._update_status()

    def announce(self) -> None:
        """Ask the driver to announce itself (after a migration): VIRTIO_NET_S_ANNOUNCE."""
        if not self.has(W.GUEST_ANNOUNCE):
            return
        self._update_status(announce=True)

    def _update_status(self, *, announce: bool | None = None) -> None:
        order = self.byteorder
        old = int.from_bytes(self.config[W.CFG_STATUS : W.CFG_STATUS + 2], order)
        new = (old & ~W.S_LINK_UP) | (W.S_LINK_UP if self.link_up else 0)
        if announce is not None:
            new = (new & ~W.S_ANNOUNCE) | (W.S_ANNOUNCE if announce else 0)
        if new != old:
            self.update_config(W.CFG_STATUS, new.to_bytes(2, order))

    # -- queues -------------------------------------------------------------------------

    def notify(self, index: int, *, rearm: bool = True) -> int:
        # Driver notifications per data queue, for the basic statistics.
        if 0 <= index < self._data_queues:
            (
                self._tx_stats[index >> 1] if index & 1 else self._rx[index >> 1].stats
            ).notifications += 1
        return super().notify(index, rearm=rearm)

    def _note_interrupt(self, index: int) -> None:
        """A used buffer notification went out for queue ``index`` (see :class:`_CountingHooks`)."""
        if 0 <= index < self._data_queues:
            (
                self._tx_stats[index >> 1] if index & 1 else self._rx[index >> 1].stats
            ).interrupts += 1

    def process_queue(self, index: int, *, rearm: bool = True) -> int:
        if index < 2 * self.queue_pairs and index % 2 == 0 and index < self.queue_count:
            # A receive queue: buffers are taken when frames arrive, not now.
            return self._rx_kicked(index)
        return super().process_queue(index, rearm=rearm)

    def rearm_queue(self, index: int) -> int:
        if index < 2 * self.queue_pairs and index % 2 == 0 and index < self.queue_count:
            return self._rx_kicked(index)
        return super().rearm_queue(index)

    def handle_chain(self, queue_index: int, chain: Chain) -> int | None:
        if queue_index & 1 and queue_index != self._ctrl:
            self._transmit(queue_index, chain)
            return 0
        if queue_index == self._ctrl:
            return self._control(chain)
        self.fail(f"queue {queue_index} has no role", N_FRAMING_DRV)
        return 0

    # -- transmit -------------------------------------------------------------------------

    def _transmit(self, queue_index: int, chain: Chain) -> None:
        size = self._hdr_size
        if chain.write_len:
            self.fail("transmit buffer has device-writable parts", N_FRAMING_DRV)
            return
        data = chain.read()
        qs = self._tx_stats[queue_index >> 1]
        n = len(data) - size
        if W.ETH_HLEN <= n <= self._plain_max and not data[0] and not data[1]:
            # The common frame: no flags, no GSO, within the MTU. Nothing in the
            # header needs reading or checking.
            self._send_plain(queue_index, qs, data[size:])
            return
        if len(data) < size:
            self._drop_tx(qs, "buffer shorter than the header")
            return
        hdr = W.decode_header(data, size, self.byteorder)
        frame = data[size:]
        reason = offload.check_tx_header(
            hdr, len(frame), self.negotiated, self._mtu(), vlan_tagged=frame[12:14] == b"\x81\x00"
        )
        if reason is not None:
            # The device MUST NOT accept such a packet: it is dropped, the buffer used.
            log.debug("dropping a transmitted frame: %s", reason)
            self._drop_tx(qs, reason)
            return
        if hdr.gso_type == W.GSO_NONE and not hdr.flags & W.HDR_F_NEEDS_CSUM:
            self._send_plain(queue_index, qs, frame)
            return
        if self.queue_pairs > 1:
            self._learn_flow(frame, queue_index >> 1)
        c = self.counters
        backend = self.backend
        if hdr.gso_type:
            c.tx_gso += 1
        accept = offload.host_to_guest_bits(backend.tx_offloads)
        try:
            frames = offload.adapt(hdr, frame, accept)
        except offload.OffloadError as err:
            self._drop_tx(qs, str(err), malformed=False)
            return
        if len(frames) > 1:
            c.tx_segmented += 1
        if hdr.flags & W.HDR_F_NEEDS_CSUM:
            qs.needs_csum += 1
        else:
            qs.csum_none += 1
        if hdr.gso_type:
            qs.gso_packets += 1
            qs.gso_bytes += len(frame)
            if frames[0][0].gso_type:
                # The back-end takes the GSO frame whole.
                qs.gso_packets_noseg += 1
                qs.gso_bytes_noseg += len(frame)
            else:
                qs.gso_segments += len(frames)
                qs.gso_segments_bytes += sum(len(out) for _, out in frames)
        for out_hdr, out in frames:
            c.tx_frames += 1
            c.tx_bytes += len(out)
            qs.packets += 1
            qs.bytes += len(out)
            backend.transmit(out_hdr, out)

    def _send_plain(self, queue_index: int, qs: stats.TxStats, frame: bytes) -> None:
        """A frame that needs nothing done to it: count it and hand it over."""
        if self.queue_pairs > 1:
            self._learn_flow(frame, queue_index >> 1)
        c = self.counters
        n = len(frame)
        c.tx_frames += 1
        c.tx_bytes += n
        qs.packets += 1
        qs.bytes += n
        qs.csum_none += 1
        self.backend.transmit(_PLAIN, frame)

    def _drop_tx(self, qs: stats.TxStats, reason: str, *, malformed: bool = True) -> None:
        c = self.counters
        c.tx_dropped += 1
        c.drop(f"tx: {reason}")
        qs.drops += 1
        if malformed:
            qs.drop_malformed += 1

    def _mtu(self) -> int | None:
        return self.mtu if self.has(W.MTU) else None

    def _learn_flow(self, frame: bytes, pair: int) -> None:
        key = _flow_key(frame, outgoing=True)
        if key is None:
            return
        flows = self._flows
        if key not in flows and len(flows) >= FLOW_TABLE:
            flows.pop(next(iter(flows)))
        flows[key] = pair

    # -- receive ---------------------------------------------------------------------------

    def deliver(self, hdr: W.NetHdr, frame: bytes) -> bool:
        """Hand a frame from the back-end to the guest; False if it was dropped.

        Call from the device's host thread (a back-end's event callback). The
        used buffers are pushed at the end of the callback (or by :meth:`flush`).
        """
        c = self.counters
        if not self.live or not self.link_up:
            c.rx_dropped += 1
            c.drop("rx: device not live or link down")
            return False
        if not self._accepts(frame):
            c.rx_filtered += 1
            return False
        pair = self._steer(frame)
        if pair is None:
            c.rx_dropped += 1
            c.drop("rx: no receive queue")
            return False
        rx = self._rx[pair]
        mtu = self._mtu()
        if mtu is not None and hdr.gso_type == W.GSO_NONE and len(frame) > mtu + W.ETH_HLEN:
            # No received packet larger than mtu + Ethernet header with gso NONE.
            c.rx_dropped += 1
            c.drop("rx: frame larger than the MTU")
            rx.stats.drops += 1
            return False
        if hdr.gso_type or hdr.flags:
            try:
                frames = offload.adapt(hdr, frame, self.guest_offloads)
            except offload.OffloadError as err:
                c.rx_dropped += 1
                c.drop(f"rx: {err}")
                rx.stats.drops += 1
                return False
        else:
            frames = [(hdr, frame)]
        index = 2 * pair
        delivered = True
        for out_hdr, out in frames:
            if rx.backlog or not self._fill(index, rx, out_hdr, out):
                if len(rx.backlog) >= BACKLOG:
                    c.rx_dropped += 1
                    c.drop("rx: no receive buffers")
                    rx.stats.drops += 1
                    rx.stats.drop_overruns += 1
                    delivered = False
                    continue
                rx.backlog.append((out_hdr, out))
                c.rx_backlogged += 1
                self._want_buffers(index)
        return delivered

    def flush(self) -> None:
        """Push the receive buffers filled since the last flush (one batch per queue)."""
        self._flush(0.0)

    def _flush(self, now: float) -> None:
        dirty = self._dirty
        while dirty:
            self._push_rx(dirty.pop())

    def _push_rx(self, index: int) -> None:
        rx = self._rx[index // 2]
        if rx.done:
            done, rx.done = rx.done, []
            self.push_used(index, done)

    def _rx_kicked(self, index: int) -> int:
        """The driver added receive buffers: drain the backlog into them."""
        if not self.live or index >= 2 * self.active_pairs_possible():
            return 0
        rx = self._rx[index // 2]
        served = 0
        while rx.backlog:
            hdr, frame = rx.backlog[0]
            if not self._fill(index, rx, hdr, frame):
                self._want_buffers(index)
                break
            rx.backlog.popleft()
            served += 1
        self._push_rx(index)
        self._dirty.discard(index)
        ring = self.queues[index].ring
        if ring is not None and not rx.backlog:
            ring.disable_notifications()  # no kicks needed until a frame waits
        return served

    def active_pairs_possible(self) -> int:
        return (self.queue_count - (1 if self.has(W.CTRL_VQ) else 0)) // 2

    def _want_buffers(self, index: int) -> None:
        ring = self.queues[index].ring
        if ring is not None:
            try:
                if ring.enable_notifications():
                    # Buffers arrived meanwhile: a kick may never come, so look now.
                    self.events.call_later(0.0, lambda _now: self._look_again(index))
            except SpecViolation as err:
                self.fail(err.message, err.normative)

    def _look_again(self, index: int) -> None:
        self._rx_kicked(index)

    def _take(self, index: int, rx: _RxQueue) -> Chain | None:
        if rx.spare:
            return rx.spare.popleft()
        chain = self.pop_receive_buffer(index, N_FRAMING_DRV)
        if chain is None:
            return None
        if chain.write_len < self._hdr_size:
            # Each buffer MUST be at least the header's size.
            self.fail(
                f"receive buffer of {chain.write_len} bytes, smaller than the "
                f"{self._hdr_size}-byte header",
                N_RXBUF_DRV,
            )
            return None
        return chain

    def _fill(self, index: int, rx: _RxQueue, hdr: W.NetHdr, frame: bytes) -> bool:
        """Write one frame into receive buffers; False if there are not enough."""
        size = self._hdr_size
        total = size + len(frame)
        first = self._take(index, rx)
        if first is None:
            return False
        if not self.has(W.MRG_RXBUF):
            if first.write_len < total:
                # A single buffer is all a frame may use without MRG_RXBUF.
                self.counters.rx_dropped += 1
                self.counters.drop("rx: receive buffer too small")
                rx.stats.drops += 1
                rx.done.append((first, 0))
                self._dirty.add(index)
                return True
            chains = [first]
        else:
            chains = [first]
            room = first.write_len
            while room < total:
                more = self._take(index, rx)
                if more is None:
                    # Not enough buffers yet: keep what was popped for next time.
                    rx.spare.extendleft(reversed(chains))
                    return False
                chains.append(more)
                room += more.write_len
        n = len(chains)
        if self.has(W.HASH_REPORT):
            out_hdr = replace(hdr, num_buffers=n)
            self._report_hash(out_hdr, frame)
            head = W.encode_header(out_hdr, size, self.byteorder)
        elif hdr.flags or hdr.gso_type:
            head = W.encode_header(replace(hdr, num_buffers=n), size, self.byteorder)
        else:
            # The common header: all zero but num_buffers.
            head = self._plain_heads.get(n) or self._plain_head(n)
        if len(chains) == 1:
            first.write(head)
            first.write(frame, size)
            rx.done.append((first, total))
        else:
            data = memoryview(head + frame)
            pos = 0
            for chain in chains:
                n = min(chain.write_len, total - pos)
                chain.write(data[pos : pos + n])
                rx.done.append((chain, n))
                pos += n
        self._dirty.add(index)
        c = self.counters
        c.rx_frames += 1
        c.rx_bytes += len(frame)
        qs = rx.stats
        qs.packets += 1
        qs.bytes += len(frame)
        flags = hdr.flags
        # The device does not verify received checksums itself, so none is counted bad.
        if flags & W.HDR_F_DATA_VALID:
            qs.csum_valid += 1
        elif flags & W.HDR_F_NEEDS_CSUM:
            qs.needs_csum += 1
        else:
            qs.csum_none += 1
        if hdr.gso_type:
            c.rx_gso += 1
            qs.gso_packets += 1
            qs.gso_bytes += len(frame)
        return True

    def _plain_head(self, n: int) -> bytes:
        head = W.encode_header(W.NetHdr(num_buffers=n), self._hdr_size, self.byteorder)
        if len(self._plain_heads) < 64:
            self._plain_heads[n] = head
        return head

    def _report_hash(self, hdr: W.NetHdr, frame: bytes) -> None:
        config = self.hash_config or self.rss
        hdr.hash_value = 0
        hdr.hash_report = W.HASH_REPORT_NONE
        if config is None or not config.hash_types:
            return
        if self.tunnel_types:
            found = tunnel.hash_frame(frame, config.key, config.hash_types, self.tunnel_types)
        else:
            found = rss.hash_packet(frame, config.key, config.hash_types)
        if found is not None:
            hdr.hash_value, hdr.hash_report = found

    def _steer(self, frame: bytes) -> int | None:
        """The receive pair for a frame: RSS, the flow's transmit pair, or pair 0."""
        if self.rss is not None:
            if self.tunnel_types:
                return tunnel.select_queue(self.rss, frame, self.tunnel_types)
            return rss.select_queue(self.rss, frame)
        if self.active_pairs == 1:
            return 0
        key = _flow_key(frame, outgoing=False)
        if key is not None:
            pair = self._flows.get(key)
            if pair is not None and pair < self.active_pairs:
                return pair
            return hash(key) % self.active_pairs
        return 0

    def _accepts(self, frame: bytes) -> bool:
        """The receive filter (control queue RX, MAC and VLAN classes)."""
        if len(frame) < W.ETH_HLEN:
            return False
        f = self.filter
        if self.has(W.CTRL_VLAN) and frame[12:14] == b"\x81\x00" and len(frame) >= 16:
            vid = int.from_bytes(frame[14:16], "big") & 0x0FFF
            if vid not in f.vlans:
                return False
        if f.promisc or not self.has(W.CTRL_RX):
            return True
        dst = frame[0:6]
        if dst == W.BROADCAST:
            return not f.nobcast
        if dst[0] & 1:
            if f.nomulti:
                return False
            return f.allmulti or dst in f.multicast
        if f.nouni:
            return False
        return f.alluni or dst == self._current_mac() or dst in f.unicast

    def _current_mac(self) -> bytes:
        return bytes(self.config[W.CFG_MAC : W.CFG_MAC + 6])

    # -- control queue -----------------------------------------------------------------

    def _control(self, chain: Chain) -> int:
        c = self.counters
        if chain.write_len < 1 or chain.read_len < 2:
            self.fail(
                f"control command with {chain.read_len} readable and {chain.write_len} "
                "writable bytes (needs class, command and an ack byte)",
                N_FRAMING_DRV,
            )
            return 0
        cvq = self._cvq_stats
        cvq.commands += 1
        if chain.read_len > W.MAX_CTRL_PAYLOAD + 2:
            c.ctrl_err += 1
            chain.write(bytes([W.ERR]))
            return 1
        data = chain.read()
        cls, cmd, payload = data[0], data[1], data[2:]
        room = chain.write_len - 1
        try:
            result = self._command(cls, cmd, payload, room)
            if len(result) > room:
                # Each command checks its room; this only keeps a slip from raising.
                raise ValueError(f"a {len(result)}-byte result for {room} bytes of room")
        except ValueError as err:
            log.info("control command %d/%d refused: %s", cls, cmd, err)
            c.ctrl_err += 1
            chain.write(bytes([W.ERR]))
            return 1
        c.ctrl_ok += 1
        cvq.ok += 1
        chain.write(bytes([W.OK]) + result)
        return 1 + len(result)

    def _u16(self, data: bytes) -> int:
        return int.from_bytes(data[:2], self.byteorder)

    def _command(self, cls: int, cmd: int, payload: bytes, room: int) -> bytes:
        """Apply one command; returns its result bytes. ValueError answers VIRTIO_NET_ERR."""
        if cls == W.CTRL_RX_CLASS:
            return self._rx_mode(cmd, payload)
        if cls == W.CTRL_MAC_CLASS:
            return self._mac_command(cmd, payload)
        if cls == W.CTRL_VLAN_CLASS:
            if not self.has(W.CTRL_VLAN):
                raise ValueError("VLAN filtering was not negotiated")
            if len(payload) != 2:
                raise ValueError(f"VLAN command with {len(payload)} bytes, not 2")
            vid = self._u16(payload)
            if vid >= 4096:
                raise ValueError(f"VLAN id {vid} out of range")
            if cmd == W.VLAN_ADD:
                self.filter.vlans.add(vid)
            elif cmd == W.VLAN_DEL:
                self.filter.vlans.discard(vid)
            else:
                raise ValueError(f"unknown VLAN command {cmd}")
            return b""
        if cls == W.CTRL_ANNOUNCE_CLASS:
            if cmd != W.ANNOUNCE_ACK or not self.has(W.GUEST_ANNOUNCE):
                raise ValueError("announce ack without VIRTIO_NET_F_GUEST_ANNOUNCE")
            # Cleared before the buffer is used.
            self._update_status(announce=False)
            return b""
        if cls == W.CTRL_MQ_CLASS:
            return self._mq_command(cmd, payload)
        if cls == W.CTRL_GUEST_OFFLOADS_CLASS:
            if cmd != W.GUEST_OFFLOADS_SET or not self.has(W.CTRL_GUEST_OFFLOADS):
                raise ValueError("offload command without VIRTIO_NET_F_CTRL_GUEST_OFFLOADS")
            if len(payload) != 8:
                raise ValueError(f"offloads of {len(payload)} bytes, not 8")
            offloads = int.from_bytes(payload, self.byteorder)
            allowed = self.negotiated & _CTRL_OFFLOAD_BITS
            if offloads & ~allowed:
                raise ValueError(
                    f"offloads {offloads & ~allowed:#x} not negotiated ({N_OFFLOADS_DRV})"
                )
            self.guest_offloads = offloads
            self.backend.set_rx_offloads(offloads)
            return b""
        if cls == W.CTRL_NOTF_COAL_CLASS:
            return self._coalescing(cmd, payload, room)
        if cls == W.CTRL_STATS_CLASS:
            return self._stats_command(cmd, payload, room)
        if cls == W.CTRL_HASH_TUNNEL_CLASS:
            return self._hash_tunnel(cmd, payload)
        if cls == W.CTRL_RSS_CTX_CLASS:
            return self._rss_context(cmd, payload, room)
        raise ValueError(f"unknown control class {cls}")

    def _rx_mode(self, cmd: int, payload: bytes) -> bytes:
        names = {
            W.RX_PROMISC: ("promisc", W.CTRL_RX),
            W.RX_ALLMULTI: ("allmulti", W.CTRL_RX),
            W.RX_ALLUNI: ("alluni", W.CTRL_RX_EXTRA),
            W.RX_NOMULTI: ("nomulti", W.CTRL_RX_EXTRA),
            W.RX_NOUNI: ("nouni", W.CTRL_RX_EXTRA),
            W.RX_NOBCAST: ("nobcast", W.CTRL_RX_EXTRA),
        }
        if cmd not in names:
            raise ValueError(f"unknown RX command {cmd}")
        name, bit = names[cmd]
        if not self.has(bit):
            raise ValueError(f"RX {name} without its feature ({N_FILTER_DRV})")
        if len(payload) != 1 or payload[0] > 1:
            raise ValueError(f"RX {name} takes one byte 0 or 1")
        setattr(self.filter, name, bool(payload[0]))
        return b""

    def _mac_command(self, cmd: int, payload: bytes) -> bytes:
        if cmd == W.MAC_ADDR_SET:
            if not self.has(W.CTRL_MAC_ADDR):
                raise ValueError("MAC_ADDR_SET without VIRTIO_NET_F_CTRL_MAC_ADDR")
            if len(payload) != 6:
                raise ValueError(f"MAC address of {len(payload)} bytes")
            # The config space's mac changes before the command is used.
            self.config[W.CFG_MAC : W.CFG_MAC + 6] = payload
            return b""
        if cmd != W.MAC_TABLE_SET:
            raise ValueError(f"unknown MAC command {cmd}")
        if not self.has(W.CTRL_RX):
            raise ValueError(f"MAC table without VIRTIO_NET_F_CTRL_RX ({N_MAC_DRV})")
        order = self.byteorder
        tables: list[set[bytes]] = []
        pos = 0
        for _ in range(2):
            if pos + 4 > len(payload):
                raise ValueError("MAC table shorter than its entry count")
            n = int.from_bytes(payload[pos : pos + 4], order)
            pos += 4
            if pos + 6 * n > len(payload):
                raise ValueError(f"MAC table says {n} entries, has fewer")
            tables.append({payload[pos + 6 * i : pos + 6 * i + 6] for i in range(n)})
            pos += 6 * n
        if pos != len(payload):
            raise ValueError("MAC table with trailing bytes")
        # The table is updated before the command is used.
        self.filter.unicast, self.filter.multicast = tables
        return b""

    def _mq_command(self, cmd: int, payload: bytes) -> bytes:
        if cmd == W.MQ_VQ_PAIRS_SET:
            if not self.has(W.MQ):
                raise ValueError("VQ_PAIRS_SET without VIRTIO_NET_F_MQ")
            if len(payload) != 2:
                raise ValueError(f"VQ_PAIRS_SET with {len(payload)} bytes")
            pairs = self._u16(payload)
            if not 1 <= pairs <= self.queue_pairs:
                raise ValueError(f"{pairs} queue pairs requested, 1..{self.queue_pairs} exist")
            if self.rss_contexts:
                raise ValueError(
                    f"VQ_PAIRS_SET while {len(self.rss_contexts)} RSS contexts are configured "
                    f"({N_RSS_CTX_DRV})"
                )
            self.active_pairs = pairs
            self.rss = None  # automatic steering again
            return b""
        if cmd in (W.MQ_RSS_CONFIG, W.MQ_HASH_CONFIG):
            if cmd == W.MQ_RSS_CONFIG and not self.has(W.RSS):
                raise ValueError(f"RSS_CONFIG without VIRTIO_NET_F_RSS ({N_RSS_DRV})")
            if cmd == W.MQ_HASH_CONFIG and not self.has(W.HASH_REPORT):
                raise ValueError("HASH_CONFIG without VIRTIO_NET_F_HASH_REPORT")
            if self.byteorder != "little":
                raise ValueError("RSS through a big-endian legacy interface")
            if cmd == W.MQ_RSS_CONFIG:
                config = rss.decode_rss_config(
                    payload,
                    max_key=RSS_MAX_KEY,
                    max_table=RSS_MAX_TABLE,
                    supported_hash_types=SUPPORTED_HASH_TYPES,
                    rx_queues=self.active_pairs_possible(),
                )
                self.rss = config
                self.active_pairs = max(1, min(config.max_tx_vq, self.queue_pairs))
            else:
                self.hash_config = rss.decode_hash_config(
                    payload, max_key=RSS_MAX_KEY, supported_hash_types=SUPPORTED_HASH_TYPES
                )
            return b""
        raise ValueError(f"unknown MQ command {cmd}")

    def _coalescing(self, cmd: int, payload: bytes, room: int) -> bytes:
        # Parameters are kept and reported; notifications are best-effort and the
        # device notifies per batch as it always does.
        if cmd in (W.NOTF_COAL_TX_SET, W.NOTF_COAL_RX_SET):
            if not self.has(W.NOTF_COAL):
                raise ValueError(f"coalescing without VIRTIO_NET_F_NOTF_COAL ({N_COAL_DRV})")
            if len(payload) != 8:
                raise ValueError(f"coalescing parameters of {len(payload)} bytes")
            params = _COAL.unpack(payload)
            if cmd == W.NOTF_COAL_TX_SET:
                self.tx_coalescing = params
            else:
                self.rx_coalescing = params
            for vq in range(2 * self.active_pairs_possible()):
                if vq % 2 == (1 if cmd == W.NOTF_COAL_TX_SET else 0):
                    self.coalescing[vq] = params
            return b""
        if cmd in (W.NOTF_COAL_VQ_SET, W.NOTF_COAL_VQ_GET):
            if not self.has(W.VQ_NOTF_COAL):
                raise ValueError(f"per-queue coalescing not negotiated ({N_COAL_DRV})")
            if len(payload) < 4:
                raise ValueError("per-queue coalescing command too short")
            vq = self._u16(payload)
            if vq >= 2 * self.active_pairs_possible() or not self.queues[vq].enabled:
                # ERR for a queue that is not an enabled transmit or receive queue.
                raise ValueError(f"queue {vq} is not an enabled data queue ({N_COAL_DEV})")
            if cmd == W.NOTF_COAL_VQ_GET:
                if room < 8:
                    raise ValueError("no room for the coalescing parameters")
                default = self.tx_coalescing if vq % 2 else self.rx_coalescing
                usecs, packets = self.coalescing.get(vq, default)
                return _COAL.pack(usecs, packets)
            if len(payload) != _COAL_VQ.size:
                raise ValueError(f"VQ_SET with {len(payload)} bytes")
            _vq, _reserved, usecs, packets = _COAL_VQ.unpack(payload)  # reserved ignored
            self.coalescing[vq] = (usecs, packets)
            return b""
        raise ValueError(f"unknown coalescing command {cmd}")

    # -- device statistics -------------------------------------------------------------

    def stats_types(self) -> int:
        """``supported_stats_types``: what this device counts that the negotiated features allow.

        The csum and gso types need their offload features; answering only what
        a STATS_GET may ask for spares a driver that trusts the answer an ERR.
        """
        return stats.obtainable(stats.DEVICE_TYPES, self.negotiated)

    def _stats_command(self, cmd: int, payload: bytes, room: int) -> bytes:
        if not self.has(W.DEVICE_STATS):
            raise ValueError(f"statistics without VIRTIO_NET_F_DEVICE_STATS ({N_STATS_DRV})")
        if cmd == W.STATS_QUERY:
            if payload:
                raise ValueError(f"STATS_QUERY with {len(payload)} bytes of data")
            if room < stats.CAPABILITIES.size:
                raise ValueError("no room for virtio_net_stats_capabilities")
            return stats.CAPABILITIES.pack(self.stats_types())
        if cmd != W.STATS_GET:
            raise ValueError(f"unknown statistics command {cmd}")
        entries = stats.decode_request(payload)
        supported = self.stats_types()
        ctrl = self.ctrl_index
        # Every entry is checked before any reply: one error fails the whole command.
        for vq, types in entries:
            if vq >= self.queue_count:
                raise ValueError(f"vq_index {vq} is not a queue (0..{self.queue_count - 1})")
            if types & ~stats.KNOWN_TYPES:
                raise ValueError(f"unknown statistics types {types & ~stats.KNOWN_TYPES:#x}")
            if vq == ctrl:
                kind = W.STATS_TYPES_CVQ
            else:
                kind = W.STATS_TYPES_TX if vq & 1 else W.STATS_TYPES_RX
            if types & ~kind:
                raise ValueError(f"statistics types {types & ~kind:#x} are not for queue {vq}")
            if types & ~supported:
                raise ValueError(
                    f"statistics types {types & ~supported:#x} are not supported with the "
                    "negotiated features"
                )
        out = bytearray()
        for vq, types in entries:
            for reply_type in stats.type_bits(types):
                reply = self._stats_reply(reply_type, vq)
                if len(out) + len(reply) > room:
                    # The driver's buffer is full: only whole replies, up to the valid bytes.
                    return bytes(out)
                out += reply
        return bytes(out)

    def _stats_reply(self, reply_type: int, vq: int) -> bytes:
        if reply_type == W.STATS_REPLY_CVQ:
            cvq = self._cvq_stats
            # ok_num counts this command, which is answered OK.
            values: tuple[int, ...] = (cvq.commands, cvq.ok + 1)
        elif vq & 1:
            values = self._tx_stats[vq >> 1].values(reply_type)
        else:
            values = self._rx[vq >> 1].stats.values(reply_type)
        return stats.encode_reply(reply_type, vq, values)

    def queue_stats(self, vq: int) -> stats.RxStats | stats.TxStats:
        """The counters of a data queue (for tests and logs)."""
        return self._tx_stats[vq >> 1] if vq & 1 else self._rx[vq >> 1].stats

    # -- inner header hash and RSS contexts ---------------------------------------------

    def _hash_tunnel(self, cmd: int, payload: bytes) -> bytes:
        if not self.has(W.HASH_TUNNEL):
            raise ValueError(f"HASH_TUNNEL_SET without VIRTIO_NET_F_HASH_TUNNEL ({N_TUNNEL_DRV})")
        if cmd != W.HASH_TUNNEL_SET:
            raise ValueError(f"unknown hash tunnel command {cmd}")
        if len(payload) != 4:
            raise ValueError(f"virtnet_hash_tunnel of {len(payload)} bytes, not 4")
        types = int.from_bytes(payload, "little")
        if types & ~SUPPORTED_TUNNEL_TYPES:
            raise ValueError(
                f"encapsulation types {types & ~SUPPORTED_TUNNEL_TYPES:#x} are not in "
                f"supported_tunnel_types ({N_TUNNEL_DEV})"
            )
        self.tunnel_types = types
        return b""

    def _rss_context(self, cmd: int, payload: bytes, room: int) -> bytes:
        if not self.has(W.RSS_CONTEXT):
            raise ValueError(
                f"RSS context command without VIRTIO_NET_F_RSS_CONTEXT ({N_RSS_CTX_DRV})"
            )
        if cmd == W.RSS_CTX_CAP_GET:
            if payload:
                raise ValueError(f"RSS context CAP_GET with {len(payload)} bytes of data")
            if room < 2:
                raise ValueError("no room for virtnet_rss_ctx_cap")
            return self.max_rss_contexts.to_bytes(2, "little")
        if cmd not in (W.RSS_CTX_ADD, W.RSS_CTX_MOD, W.RSS_CTX_DEL):
            raise ValueError(f"unknown RSS context command {cmd}")
        if len(payload) < 2:
            raise ValueError(f"RSS context command with {len(payload)} bytes")
        ctx = int.from_bytes(payload[:2], "little")
        if not 1 <= ctx <= self.max_rss_contexts:
            raise ValueError(
                f"rss_ctx_id {ctx} is outside 1..{self.max_rss_contexts} ({N_RSS_CTX_DRV})"
            )
        exists = ctx in self.rss_contexts
        if cmd == W.RSS_CTX_DEL:
            if len(payload) != 2:
                raise ValueError(f"virtnet_rss_ctx_del of {len(payload)} bytes, not 2")
            if not exists:
                raise ValueError(f"RSS context {ctx} does not exist")
            del self.rss_contexts[ctx]
            return b""
        if cmd == W.RSS_CTX_ADD and exists:
            raise ValueError(f"RSS context {ctx} already exists")
        if cmd == W.RSS_CTX_MOD and not exists:
            raise ValueError(f"RSS context {ctx} does not exist")
        if len(payload) < _RSS_CTX_HEAD:
            raise ValueError(f"virtnet_rss_ctx_add_modify of {len(payload)} bytes")
        # The reserved bytes are ignored; the parameters are checked as RSS_CONFIG's are.
        self.rss_contexts[ctx] = rss.decode_rss_config(
            payload[_RSS_CTX_HEAD:],
            max_key=RSS_MAX_KEY,
            max_table=RSS_MAX_TABLE,
            supported_hash_types=SUPPORTED_HASH_TYPES,
            rx_queues=self.active_pairs_possible(),
        )
        return b""

    def context_queue(self, ctx_id: int, frame: bytes) -> int:
        """The receive pair RSS context ``ctx_id`` selects for ``frame`` (KeyError if none).

        VIRTIO 1.4 gives a received packet no way to pick a context: no flow
        filter action names one, and this device has no flow filters. So
        :meth:`deliver` always steers with the default RSS configuration; this
        is the choice a context would make, with the same hash (inner header
        hash included).
        """
        return tunnel.select_queue(self.rss_contexts[ctx_id], frame, self.tunnel_types)


_PLAIN = W.NetHdr()


def _flow_key(frame: bytes, *, outgoing: bool) -> bytes | None:
    """Addresses and ports of an IPv4/IPv6 TCP/UDP frame, oriented as a received frame."""
    if len(frame) < 34:
        return None
    ethertype = frame[12:14]
    if ethertype == b"\x08\x00":
        ihl = (frame[14] & 0x0F) * 4
        proto = frame[23]
        src, dst = frame[26:30], frame[30:34]
        l4 = 14 + ihl
    elif ethertype == b"\x86\xdd" and len(frame) >= 58:
        proto = frame[20]
        src, dst = frame[22:38], frame[38:54]
        l4 = 54
    else:
        return None
    if proto in (6, 17) and len(frame) >= l4 + 4:
        sport, dport = frame[l4 : l4 + 2], frame[l4 + 2 : l4 + 4]
    else:
        sport = dport = b""
    if outgoing:
        # What the guest sends from (src, sport) comes back addressed to it.
        src, dst, sport, dport = dst, src, dport, sport
    return bytes([proto]) + src + dst + sport + dport
