"""Device statistics (VIRTIO_NET_F_DEVICE_STATS): per-queue counters and the command codecs.

VIRTIO_NET_CTRL_STATS_QUERY answers ``struct virtio_net_stats_capabilities``
(one le64 of VIRTIO_NET_STATS_TYPE_* bits); VIRTIO_NET_CTRL_STATS_GET takes
``struct virtio_net_ctrl_queue_stats`` (16-byte entries: le16 vq_index, three
reserved le16, le64 types_bitmap) and answers one reply per requested type,
each an 8-byte ``struct virtio_net_stats_reply_hdr`` (u8 type, u8 reserved,
le16 vq_index, le16 reserved1, le16 size) followed by the type's le64
counters. Everything is little-endian: the feature needs VIRTIO_F_VERSION_1.

The counter classes are plain objects with ``__slots__`` so the device's
per-frame paths count with attribute increments; counters are Python ints and
wrap to 64 bits only when encoded (the spec's wrap-around on overflow).
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass, field

from virtio.devices.net import wire as W

#: The le64 counters after the reply header of each reply type, in the spec's order.
FIELDS: dict[int, tuple[str, ...]] = {
    W.STATS_REPLY_CVQ: ("command_num", "ok_num"),
    W.STATS_REPLY_RX_BASIC: (
        "rx_notifications",
        "rx_packets",
        "rx_bytes",
        "rx_interrupts",
        "rx_drops",
        "rx_drop_overruns",
    ),
    W.STATS_REPLY_RX_CSUM: ("rx_csum_valid", "rx_needs_csum", "rx_csum_none", "rx_csum_bad"),
    W.STATS_REPLY_RX_GSO: (
        "rx_gso_packets",
        "rx_gso_bytes",
        "rx_gso_packets_coalesced",
        "rx_gso_bytes_coalesced",
    ),
    W.STATS_REPLY_RX_SPEED: ("rx_packets_allowance_exceeded", "rx_bytes_allowance_exceeded"),
    W.STATS_REPLY_TX_BASIC: (
        "tx_notifications",
        "tx_packets",
        "tx_bytes",
        "tx_interrupts",
        "tx_drops",
        "tx_drop_malformed",
    ),
    W.STATS_REPLY_TX_CSUM: ("tx_csum_none", "tx_needs_csum"),
    W.STATS_REPLY_TX_GSO: (
        "tx_gso_packets",
        "tx_gso_bytes",
        "tx_gso_segments",
        "tx_gso_segments_bytes",
        "tx_gso_packets_noseg",
        "tx_gso_bytes_noseg",
    ),
    W.STATS_REPLY_TX_SPEED: ("tx_packets_allowance_exceeded", "tx_bytes_allowance_exceeded"),
}
#: Every VIRTIO_NET_STATS_TYPE_* bit the spec defines.
KNOWN_TYPES = sum(1 << t for t in FIELDS)

REPLY_HDR = struct.Struct("<BBHHH")
REQUEST = struct.Struct("<H6xQ")
CAPABILITIES = struct.Struct("<Q")
_U64 = (1 << 64) - 1


def reply_size(reply_type: int) -> int:
    """The bytes of one reply of this type, header included."""
    return REPLY_HDR.size + 8 * len(FIELDS[reply_type])


def type_bits(types: int) -> list[int]:
    """The bit numbers set in a types bitmap, lowest first (the order replies come in)."""
    return [bit for bit in range(types.bit_length()) if types >> bit & 1]


def required_features(reply_type: int) -> int:
    """Feature bits of which at least one must be negotiated to get this type (0: none)."""
    if reply_type == W.STATS_REPLY_RX_CSUM:
        return 1 << W.GUEST_CSUM
    if reply_type == W.STATS_REPLY_RX_GSO:
        return 1 << W.GUEST_TSO4 | 1 << W.GUEST_TSO6
    if reply_type == W.STATS_REPLY_TX_CSUM:
        return 1 << W.CSUM
    if reply_type == W.STATS_REPLY_TX_GSO:
        return 1 << W.HOST_TSO4 | 1 << W.HOST_TSO6 | 1 << W.HOST_USO
    # The basic, controlq and speed types need no feature.
    return 0


def obtainable(types: int, negotiated: int) -> int:
    """The subset of ``types`` whose feature requirement ``negotiated`` meets."""
    out = 0
    for bit in type_bits(types):
        need = required_features(bit)
        if not need or negotiated & need:
            out |= 1 << bit
    return out


def encode_reply(reply_type: int, vq_index: int, values: Sequence[int]) -> bytes:
    """One reply: its header (with the real size) and its counters, wrapped to 64 bits."""
    n = len(values)
    return REPLY_HDR.pack(reply_type, 0, vq_index, 0, REPLY_HDR.size + 8 * n) + struct.pack(
        f"<{n}Q", *(v & _U64 for v in values)
    )


def encode_request(entries: Sequence[tuple[int, int]]) -> bytes:
    """``struct virtio_net_ctrl_queue_stats`` for (vq_index, types_bitmap) pairs."""
    return b"".join(REQUEST.pack(vq, types) for vq, types in entries)


def decode_request(payload: bytes) -> list[tuple[int, int]]:
    """The (vq_index, types_bitmap) entries of a STATS_GET payload; ValueError if ragged."""
    if len(payload) % REQUEST.size:
        raise ValueError(
            f"STATS_GET payload of {len(payload)} bytes is not a whole number of "
            f"{REQUEST.size}-byte entries"
        )
    return [(int(vq), int(types)) for vq, types in REQUEST.iter_unpack(payload)]


@dataclass(frozen=True)
class StatsReply:
    """One decoded statistics reply: its type (bit number), queue and named counters."""

    type: int
    vq_index: int
    values: dict[str, int] = field(default_factory=dict)


def decode_replies(data: bytes) -> list[StatsReply]:
    """The replies in a STATS_GET result; ValueError for a header or size that is wrong.

    A reply of a type this code does not know is kept with no values (its
    ``size`` says how far to skip); a known type longer than its layout has
    later fields this code does not know, which are ignored.
    """
    out: list[StatsReply] = []
    pos = 0
    while pos < len(data):
        if pos + REPLY_HDR.size > len(data):
            raise ValueError(f"{len(data) - pos} bytes at {pos} are too few for a reply header")
        reply_type, _reserved, vq_index, _reserved1, size = REPLY_HDR.unpack_from(data, pos)
        if size < REPLY_HDR.size or pos + size > len(data):
            raise ValueError(
                f"reply at {pos} claims {size} bytes ({len(data) - pos} left, header is 8)"
            )
        names = FIELDS.get(reply_type, ())
        if size < REPLY_HDR.size + 8 * len(names):
            raise ValueError(f"reply type {reply_type} of {size} bytes is shorter than its layout")
        counts = struct.unpack_from(f"<{len(names)}Q", data, pos + REPLY_HDR.size)
        out.append(StatsReply(reply_type, vq_index, dict(zip(names, counts, strict=True))))
        pos += size
    return out


class RxStats:
    """One receive queue's counters (the receiveq basic, csum and gso replies)."""

    __slots__ = (
        "bytes",
        "csum_bad",
        "csum_none",
        "csum_valid",
        "drop_overruns",
        "drops",
        "gso_bytes",
        "gso_packets",
        "interrupts",
        "needs_csum",
        "notifications",
        "packets",
    )

    def __init__(self) -> None:
        self.notifications = self.packets = self.bytes = self.interrupts = 0
        self.drops = self.drop_overruns = 0
        self.csum_valid = self.needs_csum = self.csum_none = self.csum_bad = 0
        self.gso_packets = self.gso_bytes = 0

    def values(self, reply_type: int) -> tuple[int, ...]:
        if reply_type == W.STATS_REPLY_RX_BASIC:
            return (
                self.notifications,
                self.packets,
                self.bytes,
                self.interrupts,
                self.drops,
                self.drop_overruns,
            )
        if reply_type == W.STATS_REPLY_RX_CSUM:
            return (self.csum_valid, self.needs_csum, self.csum_none, self.csum_bad)
        if reply_type == W.STATS_REPLY_RX_GSO:
            # This device never coalesces received packets (no RSC).
            return (self.gso_packets, self.gso_bytes, 0, 0)
        raise ValueError(f"stats type {reply_type} is not kept for a receive queue")


class TxStats:
    """One transmit queue's counters (the transmitq basic, csum and gso replies)."""

    __slots__ = (
        "bytes",
        "csum_none",
        "drop_malformed",
        "drops",
        "gso_bytes",
        "gso_bytes_noseg",
        "gso_packets",
        "gso_packets_noseg",
        "gso_segments",
        "gso_segments_bytes",
        "interrupts",
        "needs_csum",
        "notifications",
        "packets",
    )

    def __init__(self) -> None:
        self.notifications = self.packets = self.bytes = self.interrupts = 0
        self.drops = self.drop_malformed = 0
        self.csum_none = self.needs_csum = 0
        self.gso_packets = self.gso_bytes = self.gso_segments = self.gso_segments_bytes = 0
        self.gso_packets_noseg = self.gso_bytes_noseg = 0

    def values(self, reply_type: int) -> tuple[int, ...]:
        if reply_type == W.STATS_REPLY_TX_BASIC:
            return (
                self.notifications,
                self.packets,
                self.bytes,
                self.interrupts,
                self.drops,
                self.drop_malformed,
            )
        if reply_type == W.STATS_REPLY_TX_CSUM:
            return (self.csum_none, self.needs_csum)
        if reply_type == W.STATS_REPLY_TX_GSO:
            return (
                self.gso_packets,
                self.gso_bytes,
                self.gso_segments,
                self.gso_segments_bytes,
                self.gso_packets_noseg,
                self.gso_bytes_noseg,
            )
        raise ValueError(f"stats type {reply_type} is not kept for a transmit queue")


class CvqStats:
    """The control queue's counters: commands answered, and those answered OK."""

    __slots__ = ("commands", "ok")

    def __init__(self) -> None:
        self.commands = self.ok = 0


#: The types this device counts (the speed types are not: it never drops for speed).
DEVICE_TYPES = (
    W.STATS_TYPE_CVQ
    | W.STATS_TYPE_RX_BASIC
    | W.STATS_TYPE_RX_CSUM
    | W.STATS_TYPE_RX_GSO
    | W.STATS_TYPE_TX_BASIC
    | W.STATS_TYPE_TX_CSUM
    | W.STATS_TYPE_TX_GSO
)
