"""virtio-net offloads in software: checksums, frame parsing, GSO, header checks.

A device that serves a guest has to do, for every frame, what the offload
features promise the other side: complete a partial checksum the driver left
(VIRTIO_NET_HDR_F_NEEDS_CSUM), cut a TSO/UFO/USO superframe into wire-sized
packets for a receiver that cannot take it, and refuse headers the driver was
not allowed to send (spec 5.1.6.2, Packet Transmission; 5.1.6.4, Processing of
Incoming Packets).

Everything here works on plain ``bytes``/``bytearray`` frames (Ethernet II,
optionally with one 802.1Q tag) and is standard library only. The hot paths
avoid per-byte Python loops: a checksum is ``int.from_bytes`` (in 4 KiB chunks
for big buffers) and one modulo, as 2**16 is 1 modulo 0xFFFF and so a big-endian
integer is congruent to the sum of its 16-bit words.

Feature masks: :func:`adapt` takes the receiver's offloads as GUEST_* feature
bits (a guest's negotiated features can be passed as they are); a host side
that speaks HOST_* bits (a TAP's ``tx_offloads``) goes through
:func:`host_to_guest_bits` first.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Iterator
from dataclasses import dataclass, replace

from virtio.devices.net import wire
from virtio.devices.net.wire import NetHdr

Buffer = bytes | bytearray | memoryview

ETH_P_IPV4 = 0x0800
ETH_P_IPV6 = 0x86DD
ETH_P_8021Q = 0x8100

IPPROTO_HOPOPTS = 0
IPPROTO_TCP = 6
IPPROTO_UDP = 17
IPPROTO_ROUTING = 43
IPPROTO_FRAGMENT = 44
IPPROTO_DSTOPTS = 60
#: The IPv6 extension headers the parser steps over (the others end the chain).
IPV6_EXT_HEADERS = frozenset({IPPROTO_HOPOPTS, IPPROTO_ROUTING, IPPROTO_FRAGMENT, IPPROTO_DSTOPTS})
#: A chain longer than this is hostile, not a packet.
_MAX_EXT_HEADERS = 16

TCP_FIN = 0x01
TCP_PSH = 0x08
TCP_CWR = 0x80

_IP4_MF = 0x2000
_IP4_DF = 0x4000
_IP4_OFFSET = 0x1FFF
_IP6_OPT_HOME_ADDRESS = 0xC9


class OffloadError(ValueError):
    """A frame cannot be processed as its header asks (wrong kind, bad offsets)."""


# -- checksums ----------------------------------------------------------------------


_CHUNK = 4096


def _word_sum(data: Buffer) -> int:
    """An integer congruent (mod 0xFFFF) to the sum of ``data``'s big-endian 16-bit words.

    Big buffers are converted in even-sized chunks whose integers are added: that
    keeps the final modulo on a 4 KiB integer instead of the whole buffer's.
    """
    n = len(data)
    if n <= 2 * _CHUNK:
        value = int.from_bytes(data, "big")
        return value << 8 if n & 1 else value
    view = memoryview(data)
    even = n & ~1
    value = sum(
        int.from_bytes(view[i : min(i + _CHUNK, even)], "big") for i in range(0, even, _CHUNK)
    )
    return value + (view[n - 1] << 8) if n & 1 else value


def checksum(data: Buffer, initial: int = 0) -> int:
    """The Internet checksum (RFC 1071) of ``data``: the complement of its ones' complement sum.

    ``initial`` is added to the sum first: a pseudo-header sum, as any non-negative
    integer (only its value modulo 0xFFFF matters). The result is the 16-bit value
    to store big-endian; over data whose checksum field is right it is 0. Odd
    lengths are padded with a zero byte; the host's byte order plays no part.
    """
    if initial < 0:
        raise ValueError("initial must not be negative")
    total = _word_sum(data) + initial
    folded = total % 0xFFFF
    if folded == 0 and total:
        folded = 0xFFFF  # end-around carry never turns a non-zero sum into 0
    return ~folded & 0xFFFF


def _ip4_pseudo(frame: Buffer, l3: int, proto: int, length: int) -> int:
    """The IPv4 pseudo-header sum (addresses, protocol, transport length), unfolded."""
    return int.from_bytes(frame[l3 + 12 : l3 + 20], "big") + proto + length


def _ip6_pseudo(frame: Buffer, l3: int, proto: int, length: int) -> int:
    """The IPv6 pseudo-header sum (addresses, upper-layer length, next header), unfolded."""
    return (
        int.from_bytes(frame[l3 + 8 : l3 + 40], "big") + (length >> 16) + (length & 0xFFFF) + proto
    )


def pseudo_header_sum(frame: Buffer, info: FrameInfo, length: int) -> int:
    """The folded TCP/UDP pseudo-header sum of ``frame``'s transport (what NEEDS_CSUM stores)."""
    if info.l4_proto is None:
        raise OffloadError("no transport header")
    if info.ip_version == 4:
        total = _ip4_pseudo(frame, info.l3_offset, info.l4_proto, length)
    elif info.ip_version == 6:
        total = _ip6_pseudo(frame, info.l3_offset, info.l4_proto, length)
    else:
        raise OffloadError("not an IP packet")
    return ~checksum(b"", total) & 0xFFFF


def complete_checksum(frame: bytearray, csum_start: int, csum_offset: int) -> None:
    """Do VIRTIO_NET_HDR_F_NEEDS_CSUM: checksum ``frame[csum_start:]`` into its field.

    The field at ``csum_start + csum_offset`` holds the pseudo-header sum the
    driver put there, so the ones' complement sum from ``csum_start`` to the end
    of the frame, complemented, is the transport checksum. A result of 0 is
    stored as 0xFFFF (the same value in ones' complement, and what UDP needs,
    where 0 means "no checksum").
    """
    at = csum_start + csum_offset
    if csum_start < 0 or csum_offset < 0 or at + 2 > len(frame):
        raise OffloadError(
            f"checksum field at {csum_start}+{csum_offset} is outside the {len(frame)}-byte frame"
        )
    value = checksum(memoryview(frame)[csum_start:]) or 0xFFFF
    frame[at : at + 2] = value.to_bytes(2, "big")


# -- parsing ------------------------------------------------------------------------


@dataclass(slots=True)
class FrameInfo:
    """Where the headers of an Ethernet frame are (offsets from the frame's start).

    Fields past the layer that failed to parse stay ``None`` (or 0/False):
    ``ip_version`` is 4 or 6 only when the IP header is complete and sane, and
    ``l4_hlen``/``payload_offset`` are set only when the whole TCP/UDP header is
    there (so its ports can be read). A non-first fragment has ``l4_proto`` and
    ``l4_offset`` (its data) but no ``l4_hlen``.
    """

    #: The EtherType after any VLAN tag (0x0800, 0x86DD, ...): the layer-3 protocol.
    l3_proto: int
    l3_offset: int
    #: The 802.1Q tag control information, if the frame had a tag.
    vlan_tci: int | None = None
    ip_version: int = 0
    #: The end of the IP packet its length field declares, clamped to the frame.
    l3_end: int = 0
    #: False if the IP length field is 0, shorter than the headers or past the frame.
    length_ok: bool = False
    l4_proto: int | None = None
    l4_offset: int | None = None
    l4_hlen: int | None = None
    payload_offset: int | None = None
    #: IPv6: any of hop-by-hop, routing, fragment or destination options was present.
    ipv6_ext: bool = False
    #: (next-header value, offset) of every IPv6 extension header, in order.
    ipv6_ext_headers: tuple[tuple[int, int], ...] = ()
    #: IPv6 home address option (destination options), routing header type 2 address.
    home_address: bytes | None = None
    rt2_address: bytes | None = None
    #: The packet is an IP fragment (IPv4 MF/offset, or an IPv6 fragment header).
    fragment: bool = False


def parse(frame: Buffer, *, whole_frame: bool = False) -> FrameInfo | None:
    """The header layout of an Ethernet II frame; None if it is shorter than its L2 header.

    Never raises on garbage: whatever does not parse is left out of the result.
    With ``whole_frame`` the IP packet is taken to run to the frame's end whatever
    its length field says (a GSO superframe, whose lengths the device rewrites).
    """
    n = len(frame)
    if n < wire.ETH_HLEN:
        return None
    l3_proto = frame[12] << 8 | frame[13]
    l3 = wire.ETH_HLEN
    tci: int | None = None
    if l3_proto == ETH_P_8021Q:
        if n < l3 + 4:
            return None
        tci = frame[14] << 8 | frame[15]
        l3_proto = frame[16] << 8 | frame[17]
        l3 += 4
    info = FrameInfo(l3_proto, l3, tci, l3_end=n)
    if l3_proto == ETH_P_IPV4:
        _parse_ipv4(frame, info, whole_frame)
    elif l3_proto == ETH_P_IPV6:
        _parse_ipv6(frame, info, whole_frame)
    return info


def _parse_ipv4(frame: Buffer, info: FrameInfo, whole_frame: bool) -> None:
    n, l3 = len(frame), info.l3_offset
    if n < l3 + 20 or frame[l3] >> 4 != 4:
        return
    hlen = (frame[l3] & 0xF) * 4
    if hlen < 20 or l3 + hlen > n:
        return
    total = frame[l3 + 2] << 8 | frame[l3 + 3]
    info.ip_version = 4
    info.length_ok = hlen <= total and l3 + total <= n
    info.l3_end = l3 + total if info.length_ok and not whole_frame else n
    frag = frame[l3 + 6] << 8 | frame[l3 + 7]
    info.fragment = bool(frag & (_IP4_MF | _IP4_OFFSET))
    info.l4_proto = frame[l3 + 9]
    info.l4_offset = l3 + hlen
    if frag & _IP4_OFFSET == 0:
        _parse_l4(frame, info)


def _parse_ipv6(frame: Buffer, info: FrameInfo, whole_frame: bool) -> None:
    n, l3 = len(frame), info.l3_offset
    if n < l3 + 40 or frame[l3] >> 4 != 6:
        return
    plen = frame[l3 + 4] << 8 | frame[l3 + 5]
    info.ip_version = 6
    info.length_ok = plen != 0 and l3 + 40 + plen <= n
    end = l3 + 40 + plen if info.length_ok and not whole_frame else n
    info.l3_end = end
    nh, off = frame[l3 + 6], l3 + 40
    exts: list[tuple[int, int]] = []
    while nh in IPV6_EXT_HEADERS:
        if len(exts) == _MAX_EXT_HEADERS or off + 8 > end:
            info.ipv6_ext, info.ipv6_ext_headers = True, tuple(exts)
            return
        exts.append((nh, off))
        nxt = frame[off]
        if nh == IPPROTO_FRAGMENT:
            info.fragment = True
            if (frame[off + 2] << 8 | frame[off + 3]) >> 3:  # not the first fragment
                info.ipv6_ext, info.ipv6_ext_headers = True, tuple(exts)
                info.l4_proto, info.l4_offset = nxt, off + 8
                return
            hlen = 8
        else:
            hlen = (frame[off + 1] + 1) * 8
            if off + hlen > end:
                info.ipv6_ext, info.ipv6_ext_headers = True, tuple(exts)
                return
            if nh == IPPROTO_DSTOPTS:
                home = _home_address(frame, off + 2, off + hlen)
                if home is not None:
                    info.home_address = home
            elif nh == IPPROTO_ROUTING and frame[off + 2] == 2 and hlen >= 24:
                info.rt2_address = bytes(frame[off + 8 : off + 24])
        off += hlen
        nh = nxt
    info.ipv6_ext, info.ipv6_ext_headers = bool(exts), tuple(exts)
    info.l4_proto, info.l4_offset = nh, off
    _parse_l4(frame, info)


def _home_address(frame: Buffer, start: int, end: int) -> bytes | None:
    """The address of a home address option among the options in ``frame[start:end]``."""
    i = start
    while i < end:
        kind = frame[i]
        if kind == 0:  # Pad1
            i += 1
            continue
        if i + 2 > end:
            return None
        length = frame[i + 1]
        if kind == _IP6_OPT_HOME_ADDRESS and length == 16 and i + 18 <= end:
            return bytes(frame[i + 2 : i + 18])
        i += 2 + length
    return None


def _parse_l4(frame: Buffer, info: FrameInfo) -> None:
    off, end = info.l4_offset, info.l3_end
    assert off is not None
    if info.l4_proto == IPPROTO_TCP:
        if off + 20 <= end:
            hlen = (frame[off + 12] >> 4) * 4
            if hlen >= 20 and off + hlen <= end:
                info.l4_hlen, info.payload_offset = hlen, off + hlen
    elif info.l4_proto == IPPROTO_UDP and off + 8 <= end:
        info.l4_hlen, info.payload_offset = 8, off + 8


# -- checks of transmitted headers (Packet Transmission) ----------------------------

#: The HOST_* feature each GSO kind needs on transmit.
_TX_GSO_FEATURE = {
    wire.GSO_TCPV4: (wire.HOST_TSO4, "VIRTIO_NET_F_HOST_TSO4"),
    wire.GSO_TCPV6: (wire.HOST_TSO6, "VIRTIO_NET_F_HOST_TSO6"),
    wire.GSO_UDP: (wire.HOST_UFO, "VIRTIO_NET_F_HOST_UFO"),
    wire.GSO_UDP_L4: (wire.HOST_USO, "VIRTIO_NET_F_HOST_USO"),
}


def check_tx_header(
    hdr: NetHdr, frame_len: int, negotiated: int, mtu: int | None, *, vlan_tagged: bool = False
) -> str | None:
    """Why the device must drop a frame the driver transmitted, or None if it may go.

    ``negotiated`` is the negotiated feature bits, ``mtu`` the config space MTU when
    VIRTIO_NET_F_MTU was negotiated (else None), ``frame_len`` the length of the
    frame after the header. ``vlan_tagged`` allows the 4 bytes of an 802.1Q tag
    on top of ``mtu`` + 14. Flag bits this module does not know are ignored, and
    so is ``hdr_len`` (never trusted; the GSO code parses the real headers).
    """

    def has(bit: int) -> bool:
        return bool(negotiated >> bit & 1)

    if frame_len < wire.ETH_HLEN:
        return f"frame of {frame_len} bytes is shorter than an Ethernet header"
    if frame_len > wire.MAX_GSO_FRAME:
        return f"frame of {frame_len} bytes is larger than {wire.MAX_GSO_FRAME}"
    kind, tunnel = hdr.gso_kind, hdr.gso_type & wire.GSO_TUNNEL_BITS
    flags = hdr.flags
    if kind not in wire.GSO_NAMES:
        return f"unknown gso_type {hdr.gso_type:#x}"
    if tunnel == wire.GSO_TUNNEL_BITS:
        return "both UDP tunnel bits are set in gso_type"
    if flags & wire.HDR_F_UDP_TUNNEL_CSUM:
        if not tunnel:
            return "VIRTIO_NET_HDR_F_UDP_TUNNEL_CSUM without a UDP tunnel bit in gso_type"
        if not has(wire.HOST_UDP_TUNNEL_GSO_CSUM):
            return "VIRTIO_NET_HDR_F_UDP_TUNNEL_CSUM without VIRTIO_NET_F_HOST_UDP_TUNNEL_GSO_CSUM"
    if tunnel:
        if not has(wire.HOST_UDP_TUNNEL_GSO):
            return "UDP tunnel bit in gso_type without VIRTIO_NET_F_HOST_UDP_TUNNEL_GSO"
        if kind == wire.GSO_NONE:
            return "UDP tunnel bit in gso_type without a GSO type"
        if kind == wire.GSO_UDP:
            return "UDP tunnel bit together with VIRTIO_NET_HDR_GSO_UDP"
        if not flags & wire.HDR_F_NEEDS_CSUM:
            return "UDP tunnel bit in gso_type without VIRTIO_NET_HDR_F_NEEDS_CSUM"
        if flags & wire.HDR_F_DATA_VALID:
            return "VIRTIO_NET_HDR_F_DATA_VALID with a UDP tunnel bit in gso_type"
        if not (hdr.outer_th_offset < hdr.inner_nh_offset <= hdr.csum_start):
            return "UDP tunnel offsets out of order (outer transport, inner network, csum_start)"
        if hdr.outer_th_offset < wire.ETH_HLEN or hdr.outer_th_offset + 8 > frame_len:
            return f"outer_th_offset {hdr.outer_th_offset} does not hold a UDP header"
    if flags & wire.HDR_F_NEEDS_CSUM:
        if not has(wire.CSUM):
            return "VIRTIO_NET_HDR_F_NEEDS_CSUM without VIRTIO_NET_F_CSUM"
        if hdr.csum_start + hdr.csum_offset + 2 > frame_len:
            return (
                f"checksum field at {hdr.csum_start}+{hdr.csum_offset} is past"
                f" the {frame_len}-byte frame"
            )
    if kind != wire.GSO_NONE:
        bit, name = _TX_GSO_FEATURE[kind]
        if not has(bit):
            return f"gso_type {wire.GSO_NAMES[kind]} without {name}"
        if not flags & wire.HDR_F_NEEDS_CSUM:
            return "GSO without VIRTIO_NET_HDR_F_NEEDS_CSUM"
        if hdr.gso_size == 0:
            return "GSO with gso_size 0"
    if hdr.gso_type & wire.GSO_ECN:
        if kind not in (wire.GSO_TCPV4, wire.GSO_TCPV6):
            return "VIRTIO_NET_HDR_GSO_ECN without TCP segmentation"
        if not has(wire.HOST_ECN):
            return "VIRTIO_NET_HDR_GSO_ECN without VIRTIO_NET_F_HOST_ECN"
    if kind == wire.GSO_NONE and mtu is not None:
        limit = mtu + wire.ETH_HLEN + (4 if vlan_tagged else 0)
        if frame_len > limit:
            return f"frame of {frame_len} bytes without GSO exceeds the MTU ({mtu} + L2 header)"
    return None


# -- segmentation (GSO in software) --------------------------------------------------

#: IPv6 fragment identifications for UFO (the header carries none): a counter from a random start.
_frag_ids: Iterator[int] = itertools.count(random.getrandbits(32))


def segment(frame: Buffer, hdr: NetHdr, *, frag_id: int | None = None) -> list[bytearray]:
    """Software GSO: the wire packets ``frame`` stands for, each fully checksummed.

    TCPV4/TCPV6 cut the TCP payload into ``gso_size`` pieces (sequence numbers,
    IPv4 length/ID/header checksum or IPv6 payload length per segment; FIN and PSH
    stay on the last segment only, CWR on the first only); UDP (UFO) fragments
    the whole UDP datagram at the IP layer (``gso_size`` is the fragmentable bytes
    per fragment, rounded down to a multiple of 8; IPv6 gets a fragment header with
    ``frag_id`` or a fresh identification); UDP_L4 (USO) cuts the UDP payload into
    ``gso_size`` datagrams. Header lengths come from parsing, never from
    ``hdr_len``. With GSO_NONE it returns one frame, its checksum completed if
    NEEDS_CSUM is set. Raises :class:`OffloadError` when the frame is not what
    ``gso_type`` says or UDP tunnel GSO is asked for (not done in software).
    """
    kind = hdr.gso_kind
    if hdr.gso_type & wire.GSO_TUNNEL_BITS:
        raise OffloadError("UDP tunnel GSO is not done in software")
    if kind == wire.GSO_NONE:
        out = bytearray(frame)
        if hdr.needs_csum:
            complete_checksum(out, hdr.csum_start, hdr.csum_offset)
        return [out]
    if kind not in wire.GSO_NAMES:
        raise OffloadError(f"unknown gso_type {hdr.gso_type:#x}")
    if hdr.gso_size == 0:
        raise OffloadError("GSO with gso_size 0")
    info = parse(frame, whole_frame=True)
    name = wire.GSO_NAMES[kind]
    want_version = {wire.GSO_TCPV4: 4, wire.GSO_TCPV6: 6}.get(kind)
    want_proto = IPPROTO_TCP if kind in (wire.GSO_TCPV4, wire.GSO_TCPV6) else IPPROTO_UDP
    if (
        info is None
        or info.ip_version == 0
        or (want_version is not None and info.ip_version != want_version)
        or info.l4_proto != want_proto
        or info.payload_offset is None
    ):
        raise OffloadError(f"gso_type {name}: the frame is not such a packet")
    if info.fragment:
        raise OffloadError(f"gso_type {name}: the frame is already an IP fragment")
    if len(frame) - info.l3_offset > 0xFFFF + (40 if info.ip_version == 6 else 0):
        raise OffloadError(f"gso_type {name}: the packet is too long for its IP header")
    if kind == wire.GSO_UDP:
        if info.ip_version == 4:
            return _ufo4(frame, info, hdr.gso_size)
        ident = next(_frag_ids) if frag_id is None else frag_id
        return _ufo6(frame, info, hdr.gso_size, ident & 0xFFFFFFFF)
    return _split_l4(frame, info, hdr.gso_size)


def _split_l4(frame: Buffer, info: FrameInfo, mss: int) -> list[bytearray]:
    """TSO and USO: one packet per ``mss`` bytes of transport payload."""
    l3, l4, pay = info.l3_offset, info.l4_offset, info.payload_offset
    assert l4 is not None and pay is not None
    tcp = info.l4_proto == IPPROTO_TCP
    v4 = info.ip_version == 4
    header = bytes(frame[:pay])
    view = memoryview(frame)
    total, l4_hlen = len(frame) - pay, pay - l4
    count = max(1, -(-total // mss))
    if v4:
        addr_sum = int.from_bytes(header[l3 + 12 : l3 + 20], "big")
        ip_id = header[l3 + 4] << 8 | header[l3 + 5]
    else:
        addr_sum = int.from_bytes(header[l3 + 8 : l3 + 40], "big")
    proto = IPPROTO_TCP if tcp else IPPROTO_UDP
    seq = int.from_bytes(header[l4 + 4 : l4 + 8], "big") if tcp else 0
    tcp_flags = header[l4 + 13] if tcp else 0
    csum_at = l4 + (16 if tcp else 6)
    out: list[bytearray] = []
    for i in range(count):
        start = pay + i * mss
        size = min(mss, len(frame) - start)
        seg = bytearray(header)
        seg += view[start : start + size]
        l4_len = l4_hlen + size
        if v4:
            seg[l3 + 2 : l3 + 6] = ((l4 - l3 + l4_len) << 16 | (ip_id + i) & 0xFFFF).to_bytes(
                4, "big"
            )
            seg[l3 + 10 : l3 + 12] = b"\0\0"
            seg[l3 + 10 : l3 + 12] = checksum(seg[l3:l4]).to_bytes(2, "big")
        else:
            seg[l3 + 4 : l3 + 6] = (l4 - l3 - 40 + l4_len).to_bytes(2, "big")
        if tcp:
            seg[l4 + 4 : l4 + 8] = ((seq + i * mss) & 0xFFFFFFFF).to_bytes(4, "big")
            flags = tcp_flags
            if i:
                flags &= ~TCP_CWR
            if i != count - 1:
                flags &= ~(TCP_FIN | TCP_PSH)
            seg[l4 + 13] = flags
        else:
            seg[l4 + 4 : l4 + 6] = l4_len.to_bytes(2, "big")
        seg[csum_at : csum_at + 2] = b"\0\0"
        pseudo = addr_sum + proto + (l4_len >> 16) + (l4_len & 0xFFFF)
        value = checksum(memoryview(seg)[l4:], pseudo)
        seg[csum_at : csum_at + 2] = (value if tcp else value or 0xFFFF).to_bytes(2, "big")
        out.append(seg)
    return out


def _full_udp(frame: Buffer, info: FrameInfo) -> bytearray:
    """A copy of ``frame`` whose UDP length and checksum cover the whole datagram."""
    l4 = info.l4_offset
    assert l4 is not None
    out = bytearray(frame)
    length = len(out) - l4
    if length > 0xFFFF:
        raise OffloadError("gso_type udp: the datagram is longer than UDP allows")
    out[l4 + 4 : l4 + 8] = (length << 16).to_bytes(4, "big")
    if info.ip_version == 4:
        pseudo = _ip4_pseudo(out, info.l3_offset, IPPROTO_UDP, length)
    else:
        pseudo = _ip6_pseudo(out, info.l3_offset, IPPROTO_UDP, length)
    value = checksum(memoryview(out)[l4:], pseudo) or 0xFFFF
    out[l4 + 6 : l4 + 8] = value.to_bytes(2, "big")
    return out


def _fragment_size(gso_size: int) -> int:
    size = gso_size & ~7
    if size < 8:
        raise OffloadError(f"gso_type udp: gso_size {gso_size} leaves no room for a fragment")
    return size


def _copied_options(options: bytes) -> bytes:
    """The IPv4 options a non-first fragment carries (those with the copied flag), padded."""
    out = bytearray()
    i = 0
    while i < len(options):
        kind = options[i]
        if kind == 0:  # end of option list
            break
        if kind == 1:  # no-operation
            i += 1
            continue
        if i + 1 >= len(options):
            break
        length = options[i + 1]
        if length < 2 or i + length > len(options):
            break
        if kind & 0x80:
            out += options[i : i + length]
        i += length
    out += bytes(-len(out) % 4)
    return bytes(out)


def _ufo4(frame: Buffer, info: FrameInfo, gso_size: int) -> list[bytearray]:
    """UFO over IPv4: the checksummed datagram, cut into IP fragments."""
    full = _full_udp(frame, info)
    l3, l4 = info.l3_offset, info.l4_offset
    assert l4 is not None
    if l4 - l3 + len(full) - l4 > 0xFFFF:
        raise OffloadError("gso_type udp: the datagram does not fit an IPv4 packet")
    size = _fragment_size(gso_size)
    body = memoryview(full)[l4:]
    first = bytes(full[:l4])
    later_options = _copied_options(bytes(full[l3 + 20 : l4]))
    later = first[: l3 + 20] + later_options
    df = (full[l3 + 6] << 8) & _IP4_DF
    out: list[bytearray] = []
    for off in range(0, len(body), size):
        piece = body[off : off + size]
        head = first if off == 0 else later
        seg = bytearray(head)
        seg += piece
        hlen = len(head) - l3
        last = off + size >= len(body)
        seg[l3] = 0x40 | hlen // 4
        seg[l3 + 2 : l3 + 4] = (hlen + len(piece)).to_bytes(2, "big")
        seg[l3 + 6 : l3 + 8] = (df | (0 if last else _IP4_MF) | off >> 3).to_bytes(2, "big")
        seg[l3 + 10 : l3 + 12] = b"\0\0"
        seg[l3 + 10 : l3 + 12] = checksum(seg[l3 : l3 + hlen]).to_bytes(2, "big")
        out.append(seg)
    return out


def _ufo6(frame: Buffer, info: FrameInfo, gso_size: int, ident: int) -> list[bytearray]:
    """UFO over IPv6: the checksummed datagram, cut into fragments with a fragment header."""
    full = _full_udp(frame, info)
    l3 = info.l3_offset
    # The unfragmentable part runs through the last routing header, else the hop-by-hop
    # header, else the fixed header (RFC 8200 4.5); the fragment header goes after it.
    insert, nh_field = l3 + 40, l3 + 6
    for kind, off in info.ipv6_ext_headers:
        if kind == IPPROTO_ROUTING or (kind == IPPROTO_HOPOPTS and off == l3 + 40):
            insert, nh_field = off + (full[off + 1] + 1) * 8, off
    body = memoryview(full)[insert:]
    size = _fragment_size(gso_size)
    if len(body) <= size:
        full[l3 + 4 : l3 + 6] = (len(full) - l3 - 40).to_bytes(2, "big")
        return [full]
    next_header = full[nh_field]
    head = bytearray(full[:insert])
    head[nh_field] = IPPROTO_FRAGMENT
    out: list[bytearray] = []
    for off in range(0, len(body), size):
        piece = body[off : off + size]
        more = 0 if off + size >= len(body) else 1
        seg = bytearray(head)
        seg += bytes((next_header, 0)) + (off | more).to_bytes(2, "big") + ident.to_bytes(4, "big")
        seg += piece
        seg[l3 + 4 : l3 + 6] = (len(seg) - l3 - 40).to_bytes(2, "big")
        out.append(seg)
    return out


# -- adapting frames to a receiver (Processing of Incoming Packets) ----------------

_HOST_TO_GUEST = (
    (wire.CSUM, wire.GUEST_CSUM),
    (wire.HOST_TSO4, wire.GUEST_TSO4),
    (wire.HOST_TSO6, wire.GUEST_TSO6),
    (wire.HOST_ECN, wire.GUEST_ECN),
    (wire.HOST_UFO, wire.GUEST_UFO),
    (wire.HOST_USO, wire.GUEST_USO4),
    (wire.HOST_USO, wire.GUEST_USO6),
    (wire.HOST_UDP_TUNNEL_GSO, wire.GUEST_UDP_TUNNEL_GSO),
    (wire.HOST_UDP_TUNNEL_GSO_CSUM, wire.GUEST_UDP_TUNNEL_GSO_CSUM),
)


def host_to_guest_bits(mask: int) -> int:
    """The GUEST_* offload bits meaning the same as the HOST_* bits in ``mask``.

    A host side (a TAP) that takes VIRTIO_NET_F_HOST_TSO4 frames accepts what a
    guest with VIRTIO_NET_F_GUEST_TSO4 accepts; HOST_USO covers both USO4 and
    USO6. Bits other than HOST_* offloads are dropped.
    """
    out = 0
    for host, guest in _HOST_TO_GUEST:
        if mask >> host & 1:
            out |= 1 << guest
    return out


def _gso_needs(hdr: NetHdr, frame: Buffer) -> int | None:
    """The GUEST_* bits a receiver needs to take ``hdr``'s GSO kind, None if unknowable."""
    kind = hdr.gso_kind
    tunnel = hdr.gso_type & wire.GSO_TUNNEL_BITS
    if kind == wire.GSO_TCPV4:
        bit = wire.GUEST_TSO4
    elif kind == wire.GSO_TCPV6:
        bit = wire.GUEST_TSO6
    elif kind == wire.GSO_UDP:
        bit = wire.GUEST_UFO
    elif kind == wire.GSO_UDP_L4:
        if tunnel:
            version = 4 if tunnel == wire.GSO_UDP_TUNNEL_IPV4 else 6
        else:
            info = parse(frame, whole_frame=True)
            version = 0 if info is None else info.ip_version
        if version == 0:
            return None
        bit = wire.GUEST_USO4 if version == 4 else wire.GUEST_USO6
    else:
        return None
    need = 1 << bit | 1 << wire.GUEST_CSUM
    if hdr.gso_type & wire.GSO_ECN:
        need |= 1 << wire.GUEST_ECN
    if tunnel:
        need |= 1 << wire.GUEST_UDP_TUNNEL_GSO
        if hdr.flags & wire.HDR_F_UDP_TUNNEL_CSUM:
            need |= 1 << wire.GUEST_UDP_TUNNEL_GSO_CSUM
    return need


def _passed_header(hdr: NetHdr, accept: int) -> NetHdr:
    """``hdr`` as is, or a copy without the flags the receiver may not see."""
    allowed = 0
    if accept >> wire.GUEST_CSUM & 1:
        allowed |= wire.HDR_F_NEEDS_CSUM | wire.HDR_F_DATA_VALID
    if hdr.gso_type & wire.GSO_TUNNEL_BITS and accept >> wire.GUEST_UDP_TUNNEL_GSO_CSUM & 1:
        allowed |= wire.HDR_F_UDP_TUNNEL_CSUM
    if hdr.flags & ~allowed:
        return replace(hdr, flags=hdr.flags & allowed)
    return hdr


def adapt(hdr: NetHdr, frame: bytes, accept: int) -> list[tuple[NetHdr, bytes]]:
    """Make a frame fit a receiver that takes the GUEST_* offload bits in ``accept``.

    ``accept`` is a feature mask (bit n set for feature n: a guest's negotiated
    features, or :func:`host_to_guest_bits` of a host side's HOST_* bits). A frame
    whose GSO kind (with its ECN and tunnel bits) and partial checksum the
    receiver takes goes through unchanged (only flags it may not see are
    cleared). Otherwise the device's own work is done here: segmentation or
    checksum completion, giving plain frames with GSO_NONE and flags 0, or
    VIRTIO_NET_HDR_F_DATA_VALID when the receiver takes VIRTIO_NET_F_GUEST_CSUM
    and every checksum of the packet was computed here (TSO and USO segments,
    not UFO fragments). Raises :class:`OffloadError` for a GSO frame that is not
    what its header says.
    """
    guest_csum = bool(accept >> wire.GUEST_CSUM & 1)
    if hdr.gso_kind != wire.GSO_NONE or hdr.gso_type & wire.GSO_TUNNEL_BITS:
        need = _gso_needs(hdr, frame)
        if need is not None and hdr.needs_csum and accept & need == need:
            return [(_passed_header(hdr, accept), frame)]
        segments = segment(frame, hdr)
        flags = wire.HDR_F_DATA_VALID if guest_csum and hdr.gso_kind != wire.GSO_UDP else 0
        return [(NetHdr(flags=flags), bytes(seg)) for seg in segments]
    if hdr.needs_csum and not guest_csum:
        out = bytearray(frame)
        complete_checksum(out, hdr.csum_start, hdr.csum_offset)
        return [(NetHdr(), bytes(out))]
    return [(_passed_header(hdr, accept), frame)]


# -- verification -----------------------------------------------------------------


def verify(frame: Buffer) -> bool:
    """True if ``frame`` is an unfragmented IPv4/IPv6 TCP or UDP packet whose checksums are right.

    That is the IPv4 header checksum and the TCP or UDP checksum (over the
    length the IP header declares, so Ethernet padding is left out). A UDP
    checksum of 0 over IPv4 means "none" and passes; over IPv6 it fails. Anything
    else (not IP, a fragment, truncated, another protocol) is False: there is no
    checksum here to vouch for.
    """
    info = parse(frame)
    if info is None or info.ip_version == 0 or not info.length_ok or info.fragment:
        return False
    l3, l4, end = info.l3_offset, info.l4_offset, info.l3_end
    if info.l4_hlen is None or l4 is None:
        return False
    if info.ip_version == 4 and checksum(memoryview(frame)[l3:l4]) != 0:
        return False
    length = end - l4
    if info.l4_proto == IPPROTO_UDP:
        if (frame[l4 + 4] << 8 | frame[l4 + 5]) != length:
            return False
        if frame[l4 + 6] == frame[l4 + 7] == 0:
            return info.ip_version == 4
    assert info.l4_proto is not None
    if info.ip_version == 4:
        pseudo = _ip4_pseudo(frame, l3, info.l4_proto, length)
    else:
        pseudo = _ip6_pseudo(frame, l3, info.l4_proto, length)
    return checksum(memoryview(frame)[l4:end], pseudo) == 0
