"""Receive-side scaling: the Toeplitz hash, its configuration, queue selection.

Spec 5.1.6.4.3 (hash calculation for incoming packets) says which fields of a
packet are hashed for each enabled hash type; 5.1.6.5.7 (RSS) says how the hash
picks a receive queue through the indirection table. The hash is the Toeplitz
hash of Microsoft's RSS: for every set bit of the input, most significant bit
first, the 32 key bits starting at that bit position are XORed into the result.

The per-packet cost is one table lookup per input byte: for a key, each of the
36 input byte positions (the longest input: two IPv6 addresses and two ports)
gets a 256-entry table of the XOR its byte values contribute, built once per key
and cached.
"""

from __future__ import annotations

import functools
import struct
from dataclasses import dataclass, field

from virtio.devices.net import wire
from virtio.devices.net.offload import IPPROTO_TCP, IPPROTO_UDP, Buffer, parse

#: The longest hash input: IPv6 source and destination addresses and two ports.
MAX_INPUT = 36


@functools.lru_cache(maxsize=32)
def _tables(key: bytes) -> tuple[tuple[int, ...], ...]:
    """Per input byte position, the hash contribution of each of the 256 byte values.

    Key bits past the key's end count as 0 (a key shorter than the input + 4 bytes).
    """
    padded = key[: MAX_INPUT + 4].ljust(MAX_INPUT + 4, b"\0")
    bits = int.from_bytes(padded, "big")
    top = len(padded) * 8 - 32
    tables: list[tuple[int, ...]] = []
    for position in range(MAX_INPUT):
        # windows[b]: the 32 key bits starting at the input's bit 8*position + b (b=0: MSB).
        windows = [bits >> (top - 8 * position - b) & 0xFFFFFFFF for b in range(8)]
        table = [0] * 256
        for value in range(1, 256):
            low = value & -value
            table[value] = table[value ^ low] ^ windows[8 - low.bit_length()]
        tables.append(tuple(table))
    return tuple(tables)


def toeplitz(key: bytes, data: Buffer) -> int:
    """The 32-bit Toeplitz hash of ``data`` (at most 36 bytes) with ``key``."""
    if len(data) > MAX_INPUT:
        raise ValueError(f"hash input of {len(data)} bytes (at most {MAX_INPUT})")
    value = 0
    for table, byte in zip(_tables(bytes(key)), data, strict=False):
        value ^= table[byte]
    return value


def hash_packet(frame: Buffer, key: bytes, hash_types: int) -> tuple[int, int] | None:
    """(hash value, VIRTIO_NET_HASH_REPORT_*) of a received frame, or None if none applies.

    Follows the spec's order per packet kind: TCP, else UDP, else addresses only,
    each if its VIRTIO_NET_HASH_TYPE_* is in ``hash_types``. IPv6 packets with
    extension headers use the _EX types (with the home address option and the
    type 2 routing header address in place of source and destination when present)
    and, failing those, the plain IPv6 rules. An IP fragment has no transport
    header to hash, so all fragments of a datagram hash alike (addresses only).
    """
    info = parse(frame)
    if info is None or info.ip_version == 0:
        return None
    l3 = info.l3_offset
    l4 = info.l4_offset
    proto = info.l4_proto
    ports = b""
    if info.l4_hlen is not None and not info.fragment and l4 is not None:
        ports = bytes(frame[l4 : l4 + 4])
    tcp = bool(ports) and proto == IPPROTO_TCP
    udp = bool(ports) and proto == IPPROTO_UDP
    if info.ip_version == 4:
        addrs = bytes(frame[l3 + 12 : l3 + 20])
        if tcp and hash_types & wire.HASH_TYPE_TCPV4:
            return toeplitz(key, addrs + ports), wire.HASH_REPORT_TCPV4
        if udp and hash_types & wire.HASH_TYPE_UDPV4:
            return toeplitz(key, addrs + ports), wire.HASH_REPORT_UDPV4
        if hash_types & wire.HASH_TYPE_IPV4:
            return toeplitz(key, addrs), wire.HASH_REPORT_IPV4
        return None
    if info.ipv6_ext:
        src = info.home_address or bytes(frame[l3 + 8 : l3 + 24])
        dst = info.rt2_address or bytes(frame[l3 + 24 : l3 + 40])
        if tcp and hash_types & wire.HASH_TYPE_TCP_EX:
            return toeplitz(key, src + dst + ports), wire.HASH_REPORT_TCPV6_EX
        if udp and hash_types & wire.HASH_TYPE_UDP_EX:
            return toeplitz(key, src + dst + ports), wire.HASH_REPORT_UDPV6_EX
        if hash_types & wire.HASH_TYPE_IP_EX:
            return toeplitz(key, src + dst), wire.HASH_REPORT_IPV6_EX
    addrs = bytes(frame[l3 + 8 : l3 + 40])
    if tcp and hash_types & wire.HASH_TYPE_TCPV6:
        return toeplitz(key, addrs + ports), wire.HASH_REPORT_TCPV6
    if udp and hash_types & wire.HASH_TYPE_UDPV6:
        return toeplitz(key, addrs + ports), wire.HASH_REPORT_UDPV6
    if hash_types & wire.HASH_TYPE_IPV6:
        return toeplitz(key, addrs), wire.HASH_REPORT_IPV6
    return None


@dataclass
class RssConfig:
    """What VIRTIO_NET_CTRL_MQ_RSS_CONFIG (or _HASH_CONFIG) set.

    Queue numbers are receive queue indexes counted from 0 (receiveq1 is 0): the
    ``rss_rq_id`` on the wire holds bits 1..16 of the receive virtqueue's index,
    which is twice the pair number, so it is the pair number itself. A
    HASH_CONFIG (hash reporting without RSS) leaves the one-entry table and
    unclassified queue 0.
    """

    hash_types: int = 0
    indirection_table: list[int] = field(default_factory=lambda: [0])
    unclassified_queue: int = 0
    key: bytes = b""
    max_tx_vq: int = 1

    def __post_init__(self) -> None:
        n = len(self.indirection_table)
        if n == 0 or n & (n - 1):
            raise ValueError(f"an indirection table of {n} entries (a power of two is needed)")

    @property
    def mask(self) -> int:
        """``indirection_table_mask``: applied to the hash to index the table."""
        return len(self.indirection_table) - 1


_RSS_HEAD = struct.Struct("<IHH")
_HASH_HEAD = struct.Struct("<I8sB")


def _queue(value: int, what: str, rx_queues: int) -> int:
    if value & 0x8000:
        raise ValueError(f"{what} {value:#06x} has its reserved bit set")
    if value >= rx_queues:
        raise ValueError(f"{what} {value} is not a receive queue (0..{rx_queues - 1})")
    return value


def _check_hash_types(hash_types: int, supported_hash_types: int) -> None:
    extra = hash_types & ~supported_hash_types
    if extra:
        raise ValueError(
            f"hash types {extra:#x} are not supported (supported: {supported_hash_types:#x})"
        )


def _key(payload: bytes, at: int, max_key: int) -> bytes:
    length = payload[at]
    if length > max_key:
        raise ValueError(f"a hash key of {length} bytes (at most {max_key})")
    if len(payload) < at + 1 + length:
        raise ValueError(f"the hash key of {length} bytes is cut short at {len(payload) - at - 1}")
    return bytes(payload[at + 1 : at + 1 + length])


def decode_rss_config(
    payload: bytes, *, max_key: int, max_table: int, supported_hash_types: int, rx_queues: int
) -> RssConfig:
    """``struct virtio_net_rss_config`` from a VIRTIO_NET_CTRL_MQ_RSS_CONFIG command.

    ``max_key``/``max_table``/``supported_hash_types`` are the device's
    ``rss_max_key_size``, ``rss_max_indirection_table_length`` and
    ``supported_hash_types``; ``rx_queues`` is how many receive queues the
    device has (``max_virtqueue_pairs``): every queue id and ``max_tx_vq`` must
    be below / within it. Raises ValueError naming what is wrong. Bytes after
    the key are ignored.
    """
    if len(payload) < _RSS_HEAD.size:
        raise ValueError(f"RSS_CONFIG of {len(payload)} bytes is shorter than its header")
    hash_types, mask, unclassified = _RSS_HEAD.unpack_from(payload)
    entries = mask + 1
    if entries & mask:
        raise ValueError(
            f"indirection_table_mask {mask:#x}: {entries} entries is not a power of two"
        )
    if mask >= max_table:
        raise ValueError(
            f"indirection_table_mask {mask} is not below the maximum table {max_table}"
        )
    tail = _RSS_HEAD.size + 2 * entries
    if len(payload) < tail + 3:
        raise ValueError(
            f"RSS_CONFIG of {len(payload)} bytes is too short for {entries} table entries"
        )
    _check_hash_types(hash_types, supported_hash_types)
    table = [
        _queue(q, f"indirection_table[{i}]", rx_queues)
        for i, q in enumerate(struct.unpack_from(f"<{entries}H", payload, _RSS_HEAD.size))
    ]
    (max_tx_vq,) = struct.unpack_from("<H", payload, tail)
    if not 1 <= max_tx_vq <= rx_queues:
        raise ValueError(f"max_tx_vq {max_tx_vq} is outside 1..{rx_queues}")
    return RssConfig(
        hash_types=hash_types,
        indirection_table=table,
        unclassified_queue=_queue(unclassified, "unclassified_queue", rx_queues),
        key=_key(payload, tail + 2, max_key),
        max_tx_vq=max_tx_vq,
    )


def decode_hash_config(payload: bytes, *, max_key: int, supported_hash_types: int) -> RssConfig:
    """``struct virtio_net_hash_config`` from VIRTIO_NET_CTRL_MQ_HASH_CONFIG (hash reporting).

    The result has the one-entry table of queue 0: only ``hash_types`` and
    ``key`` matter. The reserved words must be zero. Raises ValueError.
    """
    if len(payload) < _HASH_HEAD.size:
        raise ValueError(f"HASH_CONFIG of {len(payload)} bytes is shorter than its header")
    hash_types, reserved, _length = _HASH_HEAD.unpack_from(payload)
    if any(reserved):
        raise ValueError("HASH_CONFIG reserved words are not zero")
    _check_hash_types(hash_types, supported_hash_types)
    return RssConfig(hash_types=hash_types, key=_key(payload, _HASH_HEAD.size - 1, max_key))


def select_queue(config: RssConfig, frame: Buffer) -> int:
    """The receive queue (pair index from 0) RSS puts ``frame`` on.

    The hash masked by ``indirection_table_mask`` indexes the table; a frame
    with no hash goes to ``unclassified_queue``.
    """
    found = hash_packet(frame, config.key, config.hash_types)
    if found is None:
        return config.unclassified_queue
    table = config.indirection_table
    return table[found[0] & (len(table) - 1)]
