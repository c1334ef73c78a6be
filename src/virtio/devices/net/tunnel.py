"""Inner header hash (VIRTIO_NET_F_HASH_TUNNEL): the inner packet of an encapsulated frame.

When the outer header of a received frame matches an encapsulation type the
driver enabled (VIRTIO_NET_CTRL_HASH_TUNNEL_SET), the hash of RSS and of hash
reporting is taken over the inner headers instead: one level only, so the
inner packet is hashed as a plain packet. How each type is recognized:

* GRE (IP protocol 47; version 0, no routing bit, bits 4 and 5 zero): an IPv4
  delivery header carrying a non-IPv6 payload is GRE_2784 without the key
  and sequence bits and GRE_2890 with either; an IPv6 delivery header or an
  IPv6 payload is GRE_7676 (RFC 7676 adds IPv6 without changing the header).
  A GRE header with only the key bit and Transparent Ethernet Bridging
  payload (0x6558) is also NVGRE (RFC 7637), over either IP version.
* GRE-in-UDP: a GRE header after UDP destination port 4754 (RFC 8086).
* VXLAN: UDP destination port 4789 with the I flag; the payload is Ethernet.
* VXLAN-GPE: UDP destination port 4790, version 0 with the P flag; next
  protocol IPv4 (1), IPv6 (2) or Ethernet (3).
* GENEVE: UDP destination port 6081, version 0, options skipped; protocol
  0x6558, IPv4 or IPv6.
* IPIP: IP protocol 4 (IPv4 inside) or 41 (IPv6 inside), over IPv4 or IPv6.

Anything else, an outer IP fragment, or an inner packet cut short is not an
encapsulation here: its outer header is hashed. An inner IP packet (with no
Ethernet header of its own) is hashed behind a synthetic all-zero Ethernet
header, which the hash never reads.
"""

from __future__ import annotations

from virtio.devices.net import rss
from virtio.devices.net import wire as W
from virtio.devices.net.offload import (
    ETH_P_IPV4,
    ETH_P_IPV6,
    IPPROTO_UDP,
    Buffer,
    parse,
)

IPPROTO_IPIP = 4
IPPROTO_IPV6 = 41
IPPROTO_GRE = 47
ETH_P_TEB = 0x6558

PORT_GRE_UDP = 4754
PORT_VXLAN = 4789
PORT_VXLAN_GPE = 4790
PORT_GENEVE = 6081

_GRE_C = 0x80
_GRE_K = 0x20
_GRE_S = 0x10
# Routing (bit 1) and bits 4-5 make a header RFC 2784/2890 receivers discard.
_GRE_MUST_BE_ZERO = 0x4C

_GPE_NEXT = {1: ETH_P_IPV4, 2: ETH_P_IPV6, 3: ETH_P_TEB}
_ZERO_MACS = bytes(12)


def _inner(frame: Buffer, start: int, end: int, ethertype: int) -> Buffer | None:
    """The inner packet at ``frame[start:end]`` as an Ethernet frame, None if cut short."""
    if ethertype == ETH_P_TEB:
        if end - start < W.ETH_HLEN:
            return None
        return memoryview(frame)[start:end]
    if ethertype not in (ETH_P_IPV4, ETH_P_IPV6) or end <= start:
        return None
    return _ZERO_MACS + ethertype.to_bytes(2, "big") + bytes(frame[start:end])


def _gre(
    frame: Buffer, at: int, end: int, enabled: int, *, outer_v6: bool, in_udp: bool
) -> Buffer | None:
    if at + 4 > end:
        return None
    flags, version = frame[at], frame[at + 1] & 0x07
    if flags & _GRE_MUST_BE_ZERO or version:
        return None
    ethertype = frame[at + 2] << 8 | frame[at + 3]
    keyed = flags & (_GRE_K | _GRE_S)
    if in_udp:
        kinds = W.HASH_TUNNEL_TYPE_GRE_UDP
    elif outer_v6 or ethertype == ETH_P_IPV6:
        kinds = W.HASH_TUNNEL_TYPE_GRE_7676
    else:
        kinds = W.HASH_TUNNEL_TYPE_GRE_2890 if keyed else W.HASH_TUNNEL_TYPE_GRE_2784
    if not in_udp and flags & (_GRE_C | _GRE_K | _GRE_S) == _GRE_K and ethertype == ETH_P_TEB:
        kinds |= W.HASH_TUNNEL_TYPE_NVGRE
    if not kinds & enabled:
        return None
    # The optional checksum, key and sequence number words, in that order.
    start = at + 4 + 4 * sum(1 for bit in (_GRE_C, _GRE_K, _GRE_S) if flags & bit)
    return _inner(frame, start, end, ethertype)


def inner_frame(frame: Buffer, enabled: int) -> Buffer | None:
    """The inner packet of ``frame`` if its outer header is an encapsulation in ``enabled``.

    ``enabled`` is an ``enabled_tunnel_types`` bitmask. The result is an
    Ethernet frame (a view into ``frame``, or a copy behind a zero Ethernet
    header for an inner IP packet); None means: hash the outer header.
    """
    if not enabled:
        return None
    info = parse(frame)
    if info is None or info.ip_version == 0 or info.fragment or info.l4_offset is None:
        return None
    proto, at, end = info.l4_proto, info.l4_offset, info.l3_end
    if proto in (IPPROTO_IPIP, IPPROTO_IPV6):
        if not enabled & W.HASH_TUNNEL_TYPE_IPIP:
            return None
        return _inner(frame, at, end, ETH_P_IPV4 if proto == IPPROTO_IPIP else ETH_P_IPV6)
    if proto == IPPROTO_GRE:
        return _gre(frame, at, end, enabled, outer_v6=info.ip_version == 6, in_udp=False)
    if proto != IPPROTO_UDP or info.l4_hlen is None:
        return None
    port = frame[at + 2] << 8 | frame[at + 3]
    body = at + 8
    if port == PORT_VXLAN:
        if not enabled & W.HASH_TUNNEL_TYPE_VXLAN or body + 8 > end or not frame[body] & 0x08:
            return None
        return _inner(frame, body + 8, end, ETH_P_TEB)
    if port == PORT_VXLAN_GPE:
        if not enabled & W.HASH_TUNNEL_TYPE_VXLAN_GPE or body + 8 > end:
            return None
        flags = frame[body]
        if flags & 0x30 or not flags & 0x04:  # version 0, next protocol present
            return None
        ethertype = _GPE_NEXT.get(frame[body + 3])
        return None if ethertype is None else _inner(frame, body + 8, end, ethertype)
    if port == PORT_GENEVE:
        if not enabled & W.HASH_TUNNEL_TYPE_GENEVE or body + 8 > end or frame[body] >> 6:
            return None
        options = (frame[body] & 0x3F) * 4
        ethertype = frame[body + 2] << 8 | frame[body + 3]
        return _inner(frame, body + 8 + options, end, ethertype)
    if port == PORT_GRE_UDP:
        return _gre(frame, body, end, enabled, outer_v6=info.ip_version == 6, in_udp=True)
    return None


def hash_frame(
    frame: Buffer, key: bytes, hash_types: int, tunnel_types: int
) -> tuple[int, int] | None:
    """:func:`rss.hash_packet` over the inner headers of an enabled encapsulation, else the outer."""
    inner = inner_frame(frame, tunnel_types)
    return rss.hash_packet(frame if inner is None else inner, key, hash_types)


def select_queue(config: rss.RssConfig, frame: Buffer, tunnel_types: int) -> int:
    """:func:`rss.select_queue` with the inner header hash of ``tunnel_types``."""
    found = hash_frame(frame, config.key, config.hash_types, tunnel_types)
    if found is None:
        return config.unclassified_queue
    table = config.indirection_table
    return table[found[0] & (len(table) - 1)]
