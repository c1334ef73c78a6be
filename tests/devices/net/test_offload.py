"""virtio-net offloads in software: checksums, parsing, header checks, GSO, adapting frames."""

from __future__ import annotations

import struct
import time
from collections.abc import Callable
from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from virtio.devices.net import offload, wire
from virtio.devices.net.offload import OffloadError
from virtio.devices.net.wire import NetHdr

N_TX_DEV = "devicenormative:Device Types / Network Device / Device Operation / Packet Transmission"
N_TX_DRV = "drivernormative:Device Types / Network Device / Device Operation / Packet Transmission"
N_RX_DEV = "devicenormative:Device Types / Network Device / Device Operation / Processing of Incoming Packets"

# -- an independent reference and frame builders -------------------------------------


def ref_sum(data: bytes) -> int:
    """RFC 1071 the slow way: add 16-bit words, fold the carries."""
    if len(data) % 2:
        data += b"\0"
    total = 0
    for i in range(0, len(data), 2):
        total += data[i] << 8 | data[i + 1]
    while total > 0xFFFF:
        total = (total & 0xFFFF) + (total >> 16)
    return total


def ref_csum(data: bytes) -> int:
    return ~ref_sum(data) & 0xFFFF


MAC_DST = bytes.fromhex("525400000002")
MAC_SRC = bytes.fromhex("525400000001")
A4 = bytes([10, 0, 0, 1])
B4 = bytes([10, 0, 0, 2])
A6 = bytes.fromhex("fd000000000000000000000000000001")
B6 = bytes.fromhex("fd000000000000000000000000000002")

TCP_ACK = 0x10
TCP_PSH = 0x08
TCP_FIN = 0x01
TCP_CWR = 0x80
TCP_ECE = 0x40


def eth(ethertype: int, payload: bytes, vlan: int | None = None) -> bytes:
    head = MAC_DST + MAC_SRC
    if vlan is not None:
        head += struct.pack("!HH", 0x8100, vlan)
    return head + struct.pack("!H", ethertype) + payload


def ipv4(
    proto: int,
    payload: bytes,
    *,
    src: bytes = A4,
    dst: bytes = B4,
    ident: int = 0x1234,
    frag: int = 0x4000,
    options: bytes = b"",
) -> bytes:
    assert len(options) % 4 == 0
    ihl = 5 + len(options) // 4
    total = 4 * ihl + len(payload)
    head = bytearray(
        struct.pack("!BBHHHBBH4s4s", 0x40 | ihl, 0, total, ident, frag, 64, proto, 0, src, dst)
    )
    head += options
    head[10:12] = ref_csum(bytes(head)).to_bytes(2, "big")
    return bytes(head) + payload


def ipv6(nh: int, payload: bytes, *, src: bytes = A6, dst: bytes = B6, ext: bytes = b"") -> bytes:
    """IPv6 with ``ext`` (already chained) before the payload; ``nh`` names the first header."""
    return struct.pack("!IHBB16s16s", 0x60000000, len(ext) + len(payload), nh, 64, src, dst) + (
        ext + payload
    )


def pseudo4(proto: int, length: int, src: bytes = A4, dst: bytes = B4) -> bytes:
    return src + dst + bytes([0, proto]) + length.to_bytes(2, "big")


def pseudo6(proto: int, length: int, src: bytes = A6, dst: bytes = B6) -> bytes:
    return src + dst + length.to_bytes(4, "big") + bytes([0, 0, 0, proto])


def tcp(
    payload: bytes,
    *,
    seq: int = 1000,
    flags: int = TCP_ACK | TCP_PSH,
    options: bytes = b"",
    sport: int = 40000,
    dport: int = 80,
) -> bytes:
    assert len(options) % 4 == 0
    doff = 5 + len(options) // 4
    head = struct.pack("!HHIIBBHHH", sport, dport, seq, 1, doff << 4, flags, 8192, 0, 0)
    return head + options + payload


def udp(payload: bytes, *, sport: int = 5000, dport: int = 53) -> bytes:
    return struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload


def set_csum(segment: bytes, pseudo: bytes, at: int, *, partial: bool, is_udp: bool) -> bytes:
    """The transport ``segment`` with its checksum field: full, or the pseudo-header sum."""
    out = bytearray(segment)
    if partial:
        value = ref_sum(pseudo)
    else:
        value = ref_csum(pseudo + segment)
        if is_udp and value == 0:
            value = 0xFFFF
    out[at : at + 2] = value.to_bytes(2, "big")
    return bytes(out)


@dataclass
class Built:
    frame: bytes
    l4: int  # csum_start

    @property
    def payload_offset(self) -> int:
        info = offload.parse(self.frame)
        assert info is not None and info.payload_offset is not None
        return info.payload_offset


def tcp4_frame(
    payload: bytes,
    *,
    partial: bool = False,
    vlan: int | None = None,
    ip_options: bytes = b"",
    ident: int = 0x1234,
    seq: int = 1000,
    flags: int = TCP_ACK | TCP_PSH,
    options: bytes = b"",
) -> Built:
    seg = tcp(payload, seq=seq, flags=flags, options=options)
    seg = set_csum(seg, pseudo4(6, len(seg)), 16, partial=partial, is_udp=False)
    l4 = 14 + (4 if vlan is not None else 0) + 20 + len(ip_options)
    return Built(eth(0x0800, ipv4(6, seg, options=ip_options, ident=ident), vlan), l4)


def tcp6_frame(
    payload: bytes,
    *,
    partial: bool = False,
    ext: bytes = b"",
    nh: int = 6,
    seq: int = 1000,
    flags: int = TCP_ACK | TCP_PSH,
    src: bytes = A6,
    dst: bytes = B6,
    sport: int = 40000,
    dport: int = 80,
) -> Built:
    seg = tcp(payload, seq=seq, flags=flags, sport=sport, dport=dport)
    seg = set_csum(seg, pseudo6(6, len(seg), src, dst), 16, partial=partial, is_udp=False)
    return Built(eth(0x86DD, ipv6(nh, seg, ext=ext, src=src, dst=dst)), 14 + 40 + len(ext))


def udp4_frame(
    payload: bytes, *, partial: bool = False, ip_options: bytes = b"", ident: int = 0x1234
) -> Built:
    seg = udp(payload)
    seg = set_csum(seg, pseudo4(17, len(seg)), 6, partial=partial, is_udp=True)
    return Built(
        eth(0x0800, ipv4(17, seg, options=ip_options, ident=ident)), 14 + 20 + len(ip_options)
    )


def udp6_frame(payload: bytes, *, partial: bool = False, ext: bytes = b"", nh: int = 17) -> Built:
    seg = udp(payload)
    seg = set_csum(seg, pseudo6(17, len(seg)), 6, partial=partial, is_udp=True)
    return Built(eth(0x86DD, ipv6(nh, seg, ext=ext)), 14 + 40 + len(ext))


def hop_by_hop(next_header: int) -> bytes:
    return bytes([next_header, 0, 1, 4, 0, 0, 0, 0])  # a PadN option fills the 8 bytes


def dest_opts_home(next_header: int, home: bytes) -> bytes:
    """Destination options with a home address option (at 8n+6, after a PadN)."""
    return bytes([next_header, 2, 1, 2, 0, 0, 0xC9, 16]) + home


def routing_type2(next_header: int, address: bytes) -> bytes:
    return bytes([next_header, 2, 2, 1, 0, 0, 0, 0]) + address


def fragment_hdr(next_header: int, offset: int, more: bool, ident: int) -> bytes:
    return bytes([next_header, 0]) + (offset | more).to_bytes(2, "big") + ident.to_bytes(4, "big")


Builder = Callable[..., Built]


def payload_bytes(n: int, seed: int = 7) -> bytes:
    return bytes((i * 31 + seed) & 0xFF for i in range(n))


def tso_hdr(kind: int, built: Built, mss: int, *, hdr_len: int | None = None) -> NetHdr:
    return NetHdr(
        flags=wire.HDR_F_NEEDS_CSUM,
        gso_type=kind,
        hdr_len=built.payload_offset if hdr_len is None else hdr_len,
        gso_size=mss,
        csum_start=built.l4,
        csum_offset=6 if kind in (wire.GSO_UDP, wire.GSO_UDP_L4) else 16,
    )


def tcp_payload(seg: bytes | bytearray) -> bytes:
    info = offload.parse(seg)
    assert info is not None and info.payload_offset is not None
    return bytes(seg[info.payload_offset : info.l3_end])


# -- checksum -------------------------------------------------------------------------


def test_checksum_rfc1071_example() -> None:
    # RFC 1071 section 3's example words sum to 0xddf2.
    data = bytes.fromhex("0001f203f4f5f6f7")
    assert ref_sum(data) == 0xDDF2
    assert offload.checksum(data) == 0x220D
    assert offload.checksum(b"") == 0xFFFF
    assert offload.checksum(b"\xff\xff") == 0  # the sum is 0xFFFF, never folded to 0


@settings(max_examples=300)
@given(st.binary(max_size=3000), st.integers(0, 0xFFFF))
def test_checksum_matches_reference(data: bytes, initial: int) -> None:
    total = ref_sum(data) + initial
    while total > 0xFFFF:
        total = (total & 0xFFFF) + (total >> 16)
    expected = ~total & 0xFFFF
    assert offload.checksum(data, initial) == expected
    assert offload.checksum(memoryview(bytearray(data)), initial) == expected
    if not initial:
        assert expected == ref_csum(data)


@pytest.mark.parametrize("size", [8191, 8192, 8193, 12289, 65535, 65536, 65589])
def test_checksum_big_buffers(size: int) -> None:
    data = payload_bytes(size, seed=size)
    assert offload.checksum(data) == ref_csum(data)
    assert offload.checksum(memoryview(data)[1:]) == ref_csum(data[1:])


def test_checksum_of_64k_is_fast() -> None:
    data = payload_bytes(65536)
    best = float("inf")
    for _ in range(20):
        start = time.perf_counter()
        offload.checksum(data)
        best = min(best, time.perf_counter() - start)
    assert best < 1e-3


def test_checksum_rejects_negative_initial() -> None:
    with pytest.raises(ValueError):
        offload.checksum(b"ab", -1)


# -- parse ----------------------------------------------------------------------------


def test_parse_ipv4_tcp_with_options_and_vlan() -> None:
    ip_options = bytes([0x94, 4, 0, 0])
    built = tcp4_frame(b"hello", vlan=0x0064, ip_options=ip_options, options=bytes([1, 1, 1, 0]))
    info = offload.parse(built.frame)
    assert info is not None
    assert (info.vlan_tci, info.l3_proto, info.l3_offset) == (0x64, 0x0800, 18)
    assert (info.ip_version, info.l4_proto, info.l4_offset, info.l4_hlen) == (4, 6, 42, 24)
    assert info.payload_offset == 66 and info.l3_end == len(built.frame)
    assert info.length_ok and not info.fragment and not info.ipv6_ext


def test_parse_ignores_ethernet_padding() -> None:
    frame = udp4_frame(b"x").frame + bytes(20)
    info = offload.parse(frame)
    assert info is not None and info.l3_end == 14 + 20 + 9 and info.length_ok


def test_parse_ipv6_extension_headers() -> None:
    home = bytes.fromhex("20010db8000000000000000000000099")
    rt = bytes.fromhex("20010db80000000000000000000000aa")
    ext = hop_by_hop(60) + dest_opts_home(43, home) + routing_type2(6, rt)
    built = tcp6_frame(b"data", ext=ext, nh=0)
    info = offload.parse(built.frame)
    assert info is not None
    assert info.ip_version == 6 and info.ipv6_ext
    assert [kind for kind, _ in info.ipv6_ext_headers] == [0, 60, 43]
    assert (info.l4_proto, info.l4_offset, info.l4_hlen) == (6, built.l4, 20)
    assert info.home_address == home and info.rt2_address == rt
    plain = offload.parse(tcp6_frame(b"data").frame)
    assert plain is not None and not plain.ipv6_ext and plain.l4_offset == 54


def test_parse_fragments() -> None:
    first = eth(0x86DD, ipv6(44, fragment_hdr(17, 0, True, 9) + udp(b"abcdefgh")))
    info = offload.parse(first)
    assert info is not None and info.fragment and info.ipv6_ext and info.l4_hlen == 8
    later = eth(0x86DD, ipv6(44, fragment_hdr(17, 16, False, 9) + b"rest of it"))
    info = offload.parse(later)
    assert info is not None and info.fragment and info.l4_proto == 17 and info.l4_hlen is None
    v4_later = eth(0x0800, ipv4(17, b"12345678", frag=2))
    info = offload.parse(v4_later)
    assert info is not None and info.fragment and info.l4_hlen is None


def test_parse_non_ip_and_short() -> None:
    assert offload.parse(b"\0" * 13) is None
    arp = offload.parse(eth(0x0806, bytes(28)))
    assert arp is not None and arp.l3_proto == 0x0806 and arp.ip_version == 0
    bad_version = offload.parse(eth(0x0800, b"\x65" + bytes(30)))
    assert bad_version is not None and bad_version.ip_version == 0


@settings(max_examples=400)
@given(
    st.binary(max_size=200),
    st.sampled_from([b"\x08\x00", b"\x86\xdd", b"\x81\x00\x00\x01\x86\xdd"]),
)
def test_parse_never_raises_on_garbage(tail: bytes, ethertype: bytes) -> None:
    frame = MAC_DST + MAC_SRC + ethertype + tail
    info = offload.parse(frame)
    assert info is not None or len(frame) < 18
    if info is not None and info.payload_offset is not None:
        assert info.l4_offset is not None and info.payload_offset <= len(frame)


def test_parse_every_truncation() -> None:
    ext = hop_by_hop(60) + dest_opts_home(6, A6)
    frames = [
        tcp4_frame(b"abc", ip_options=bytes(4)).frame,
        tcp6_frame(b"abc", ext=ext, nh=0).frame,
    ]
    for frame in frames:
        for cut in range(len(frame)):
            info = offload.parse(frame[:cut])
            if info is not None and info.payload_offset is not None:
                assert info.payload_offset <= cut


# -- complete_checksum and verify -----------------------------------------------------


@pytest.mark.normative(N_TX_DEV)
@pytest.mark.parametrize("builder", [tcp4_frame, tcp6_frame, udp4_frame, udp6_frame])
def test_complete_checksum(builder: Builder) -> None:
    built = builder(payload_bytes(333), partial=True)
    assert not offload.verify(built.frame)
    frame = bytearray(built.frame)
    is_udp = builder in (udp4_frame, udp6_frame)
    offload.complete_checksum(frame, built.l4, 6 if is_udp else 16)
    assert offload.verify(frame)
    assert bytes(frame) == builder(payload_bytes(333)).frame


def test_complete_checksum_writes_udp_zero_as_ffff() -> None:
    # Pick the last two payload bytes so that the UDP checksum comes out as 0.
    payload = bytearray(payload_bytes(40))
    payload[-2:] = b"\0\0"
    seg = udp(bytes(payload))
    need = ~ref_sum(pseudo4(17, len(seg)) + seg) & 0xFFFF  # adding this makes the sum 0xFFFF
    payload[-2:] = need.to_bytes(2, "big")
    built = udp4_frame(bytes(payload), partial=True)
    frame = bytearray(built.frame)
    offload.complete_checksum(frame, built.l4, 6)
    assert frame[built.l4 + 6 : built.l4 + 8] == b"\xff\xff"
    assert offload.verify(frame)


@pytest.mark.parametrize("start,offset", [(60, 0), (0, 59), (59, 0), (-1, 4), (4, -1), (1000, 0)])
def test_complete_checksum_outside_frame(start: int, offset: int) -> None:
    frame = bytearray(60)
    with pytest.raises(OffloadError):
        offload.complete_checksum(frame, start, offset)
    assert frame == bytearray(60)
    assert issubclass(OffloadError, ValueError)


def test_verify() -> None:
    good = tcp4_frame(payload_bytes(100)).frame
    assert offload.verify(good)
    for at in (20, 30, 40, 80):  # IP header, TCP header, payload
        bad = bytearray(good)
        bad[at] ^= 0x40
        assert not offload.verify(bad)
    assert offload.verify(good + bytes(10))  # Ethernet padding is not checksummed
    assert not offload.verify(good[:-1])  # truncated
    assert not offload.verify(eth(0x0806, bytes(28)))
    assert offload.verify(udp6_frame(b"x" * 9).frame)


def test_verify_udp_zero_checksum() -> None:
    v4 = eth(0x0800, ipv4(17, udp(b"no checksum")))
    assert offload.verify(v4)  # IPv4: 0 means no checksum
    v6 = eth(0x86DD, ipv6(17, udp(b"no checksum")))
    assert not offload.verify(v6)  # IPv6 requires one


# -- check_tx_header --------------------------------------------------------------------

ALL_TX = (
    1 << wire.CSUM
    | 1 << wire.HOST_TSO4
    | 1 << wire.HOST_TSO6
    | 1 << wire.HOST_ECN
    | 1 << wire.HOST_UFO
    | 1 << wire.HOST_USO
    | 1 << wire.HOST_UDP_TUNNEL_GSO
    | 1 << wire.HOST_UDP_TUNNEL_GSO_CSUM
)
NEEDS = wire.HDR_F_NEEDS_CSUM


def tso(kind: int, **kw: int) -> NetHdr:
    fields = {
        "flags": NEEDS,
        "gso_type": kind,
        "gso_size": 1400,
        "csum_start": 34,
        "csum_offset": 16,
    }
    fields.update(kw)
    return NetHdr(**fields)


def tunnel(kind: int = wire.GSO_TCPV4 | wire.GSO_UDP_TUNNEL_IPV4, **kw: int) -> NetHdr:
    fields = {"outer_th_offset": 34, "inner_nh_offset": 62, "csum_start": 82}
    fields.update(kw)
    return tso(kind, **fields)


def test_tx_header_plain_and_valid_offloads_pass() -> None:
    assert offload.check_tx_header(NetHdr(), 60, 0, None) is None
    assert offload.check_tx_header(NetHdr(), 1514, 0, 1500) is None
    assert offload.check_tx_header(NetHdr(), 1518, 0, 1500, vlan_tagged=True) is None
    assert offload.check_tx_header(tso(wire.GSO_TCPV4), 60000, ALL_TX, 1500) is None
    assert offload.check_tx_header(tso(wire.GSO_TCPV6 | wire.GSO_ECN), 60000, ALL_TX, None) is None
    assert offload.check_tx_header(tso(wire.GSO_UDP_L4, csum_offset=6), 9000, ALL_TX, None) is None
    assert offload.check_tx_header(tunnel(), 9000, ALL_TX, None) is None
    tunnel_csum = tunnel(flags=NEEDS | wire.HDR_F_UDP_TUNNEL_CSUM)
    assert offload.check_tx_header(tunnel_csum, 9000, ALL_TX, None) is None


@pytest.mark.normative(N_TX_DEV)
def test_tx_header_unknown_flag_bits_are_ignored() -> None:
    for bit in (0x10, 0x20, 0x40, 0x80):
        assert offload.check_tx_header(NetHdr(flags=bit), 100, ALL_TX, None) is None
        assert (
            offload.check_tx_header(tso(wire.GSO_TCPV4, flags=NEEDS | bit), 9000, ALL_TX, None)
            is None
        )


@pytest.mark.normative(N_TX_DEV)
def test_tx_header_csum_fields_unused_without_needs_csum() -> None:
    hdr = NetHdr(csum_start=0xFFFF, csum_offset=0xFFFF)
    assert offload.check_tx_header(hdr, 100, ALL_TX, None) is None
    assert offload.check_tx_header(replace_flags(hdr, NEEDS), 100, ALL_TX, None) is not None


def replace_flags(hdr: NetHdr, flags: int) -> NetHdr:
    return NetHdr(**{**hdr.__dict__, "flags": flags})


@pytest.mark.normative(N_TX_DEV)
@pytest.mark.parametrize(
    "hdr",
    [
        tunnel(gso_type=wire.GSO_TCPV4 | wire.GSO_TUNNEL_BITS),  # both tunnel bits
        tunnel(flags=0),  # tunnel without NEEDS_CSUM
        tunnel(flags=NEEDS | wire.HDR_F_DATA_VALID),  # tunnel with DATA_VALID
        tunnel(gso_type=wire.GSO_UDP_TUNNEL_IPV6),  # tunnel bit, GSO NONE
        NetHdr(flags=wire.HDR_F_UDP_TUNNEL_CSUM),  # tunnel csum without tunnel bits
        tso(wire.GSO_TCPV4, flags=NEEDS | wire.HDR_F_UDP_TUNNEL_CSUM),
    ],
)
def test_tx_header_tunnel_rules(hdr: NetHdr) -> None:
    reason = offload.check_tx_header(hdr, 9000, ALL_TX, None)
    assert reason is not None and "tunnel" in reason.lower()


@pytest.mark.normative(N_TX_DRV)
@pytest.mark.parametrize(
    "hdr,missing",
    [
        (tso(wire.GSO_TCPV4), wire.HOST_TSO4),
        (tso(wire.GSO_TCPV6), wire.HOST_TSO6),
        (tso(wire.GSO_UDP, csum_offset=6), wire.HOST_UFO),
        (tso(wire.GSO_UDP_L4, csum_offset=6), wire.HOST_USO),
        (tso(wire.GSO_TCPV4 | wire.GSO_ECN), wire.HOST_ECN),
        (NetHdr(flags=NEEDS, csum_start=34, csum_offset=16), wire.CSUM),
        (tunnel(), wire.HOST_UDP_TUNNEL_GSO),
        (tunnel(flags=NEEDS | wire.HDR_F_UDP_TUNNEL_CSUM), wire.HOST_UDP_TUNNEL_GSO_CSUM),
    ],
)
def test_tx_header_needs_the_negotiated_offload(hdr: NetHdr, missing: int) -> None:
    assert offload.check_tx_header(hdr, 9000, ALL_TX, None) is None
    reason = offload.check_tx_header(hdr, 9000, ALL_TX & ~(1 << missing), None)
    assert reason is not None


@pytest.mark.normative(N_TX_DRV)
@pytest.mark.parametrize(
    "hdr,frame_len,mtu",
    [
        (tso(wire.GSO_TCPV4, gso_size=0), 9000, None),  # no MSS
        (tso(wire.GSO_TCPV4, flags=0), 9000, None),  # GSO without NEEDS_CSUM
        (NetHdr(flags=NEEDS, csum_start=50, csum_offset=9), 60, None),  # field past the end
        (NetHdr(flags=NEEDS, csum_start=58, csum_offset=0), 59, None),
        (NetHdr(), 1515, 1500),  # larger than the MTU without GSO
        (NetHdr(gso_type=2), 100, None),  # no such GSO type
        (tso(wire.GSO_UDP_L4 | wire.GSO_ECN, csum_offset=6), 9000, None),  # ECN is for TCP
        (tunnel(gso_type=wire.GSO_UDP | wire.GSO_UDP_TUNNEL_IPV4), 9000, None),
        (tunnel(inner_nh_offset=20), 9000, None),  # offsets out of order
    ],
)
def test_tx_header_driver_errors(hdr: NetHdr, frame_len: int, mtu: int | None) -> None:
    assert offload.check_tx_header(hdr, frame_len, ALL_TX, mtu) is not None


def test_tx_header_frame_sizes() -> None:
    assert offload.check_tx_header(NetHdr(), 13, ALL_TX, None) is not None
    assert offload.check_tx_header(NetHdr(), 14, ALL_TX, None) is None
    big = tso(wire.GSO_TCPV4)
    assert offload.check_tx_header(big, wire.MAX_GSO_FRAME, ALL_TX, 1500) is None
    assert offload.check_tx_header(big, wire.MAX_GSO_FRAME + 1, ALL_TX, 1500) is not None


@pytest.mark.normative(N_TX_DEV)
def test_tx_header_hdr_len_is_not_trusted() -> None:
    for hdr_len in (0, 1, 54, 0xFFFF):
        hdr = tso(wire.GSO_TCPV4, hdr_len=hdr_len)
        assert offload.check_tx_header(hdr, 9000, ALL_TX, None) is None


@settings(max_examples=300)
@given(
    st.builds(
        NetHdr,
        flags=st.integers(0, 0xFF),
        gso_type=st.integers(0, 0xFF),
        hdr_len=st.integers(0, 0xFFFF),
        gso_size=st.integers(0, 0xFFFF),
        csum_start=st.integers(0, 0xFFFF),
        csum_offset=st.integers(0, 0xFFFF),
        outer_th_offset=st.integers(0, 0xFFFF),
        inner_nh_offset=st.integers(0, 0xFFFF),
    ),
    st.integers(0, 70000),
    st.integers(0, (1 << 71) - 1),
    st.one_of(st.none(), st.integers(68, 65535)),
)
def test_tx_header_never_raises(
    hdr: NetHdr, frame_len: int, negotiated: int, mtu: int | None
) -> None:
    reason = offload.check_tx_header(hdr, frame_len, negotiated, mtu)
    assert reason is None or (isinstance(reason, str) and reason)
    if reason is None and hdr.needs_csum:
        assert hdr.csum_start + hdr.csum_offset + 2 <= frame_len


# -- segment: TSO -----------------------------------------------------------------------


def check_tcp_segments(segments: list[bytearray], built: Built, payload: bytes, mss: int) -> None:
    """The invariants of TCP segmentation, checked against the superframe."""
    original = offload.parse(built.frame, whole_frame=True)
    assert original is not None and original.l4_offset is not None
    l3, l4 = original.l3_offset, original.l4_offset
    seq0 = int.from_bytes(built.frame[l4 + 4 : l4 + 8], "big")
    flags0 = built.frame[l4 + 13]
    assert b"".join(tcp_payload(s) for s in segments) == payload
    assert len(segments) == max(1, -(-len(payload) // mss))
    offset = 0
    for i, seg in enumerate(segments):
        chunk = tcp_payload(seg)
        assert 0 < len(chunk) <= mss or len(payload) == 0
        assert offload.verify(seg)
        info = offload.parse(seg)
        assert info is not None and info.l3_end == len(seg)
        assert seg[:l3] == built.frame[:l3]  # Ethernet header copied
        assert int.from_bytes(seg[l4 + 4 : l4 + 8], "big") == (seq0 + offset) & 0xFFFFFFFF
        flags = seg[l4 + 13]
        last = i == len(segments) - 1
        assert flags & (TCP_FIN | TCP_PSH) == (flags0 & (TCP_FIN | TCP_PSH) if last else 0)
        assert flags & TCP_CWR == (flags0 & TCP_CWR if i == 0 else 0)
        assert flags & ~(TCP_FIN | TCP_PSH | TCP_CWR) == flags0 & ~(TCP_FIN | TCP_PSH | TCP_CWR)
        if original.ip_version == 4:
            ident0 = int.from_bytes(built.frame[l3 + 4 : l3 + 6], "big")
            assert int.from_bytes(seg[l3 + 4 : l3 + 6], "big") == (ident0 + i) & 0xFFFF
            assert int.from_bytes(seg[l3 + 2 : l3 + 4], "big") == len(seg) - l3
            assert ref_csum(bytes(seg[l3:l4])) == 0
        else:
            assert int.from_bytes(seg[l3 + 4 : l3 + 6], "big") == len(seg) - l3 - 40
        offset += len(chunk)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    size=st.integers(0, 20000),
    mss=st.integers(1, 9000),
    partial=st.booleans(),
    v6=st.booleans(),
    flags=st.sampled_from(
        [TCP_ACK, TCP_ACK | TCP_PSH | TCP_FIN, TCP_ACK | TCP_CWR | TCP_ECE | TCP_PSH]
    ),
    seq=st.integers(0, 0xFFFFFFFF),
    ident=st.integers(0, 0xFFFF),
)
def test_tso_invariants(
    size: int, mss: int, partial: bool, v6: bool, flags: int, seq: int, ident: int
) -> None:
    mss = max(mss, size // 300 + 1)  # at most a few hundred segments
    payload = payload_bytes(size, seed=size)
    if v6:
        built = tcp6_frame(payload, partial=partial, flags=flags, seq=seq)
        kind = wire.GSO_TCPV6
    else:
        built = tcp4_frame(payload, partial=partial, flags=flags, seq=seq, ident=ident)
        kind = wire.GSO_TCPV4
    if flags & TCP_CWR:
        kind |= wire.GSO_ECN
    segments = offload.segment(built.frame, tso_hdr(kind, built, mss))
    check_tcp_segments(segments, built, payload, mss)


def test_tso_v4_with_options_and_vlan() -> None:
    payload = payload_bytes(5000)
    built = tcp4_frame(
        payload,
        partial=True,
        vlan=5,
        ip_options=bytes([0x94, 4, 0, 0]),
        options=bytes([1, 1, 8, 2]) + bytes(8),
    )
    segments = offload.segment(built.frame, tso_hdr(wire.GSO_TCPV4, built, 1448))
    check_tcp_segments(segments, built, payload, 1448)
    assert [len(tcp_payload(s)) for s in segments] == [1448, 1448, 1448, 656]


def test_tso_v6_with_extension_headers() -> None:
    payload = payload_bytes(4000)
    built = tcp6_frame(payload, partial=True, ext=hop_by_hop(60) + dest_opts_home(6, A6), nh=0)
    segments = offload.segment(built.frame, tso_hdr(wire.GSO_TCPV6, built, 1000))
    check_tcp_segments(segments, built, payload, 1000)
    info = offload.parse(segments[0])
    assert info is not None and [k for k, _ in info.ipv6_ext_headers] == [0, 60]


@pytest.mark.normative(N_TX_DEV)
@pytest.mark.parametrize("hdr_len", [0, 1, 20, 54, 66, 1000, 0xFFFF])
def test_tso_does_not_trust_hdr_len(hdr_len: int) -> None:
    payload = payload_bytes(3000)
    built = tcp4_frame(payload, partial=True, options=bytes(12))
    expected = offload.segment(built.frame, tso_hdr(wire.GSO_TCPV4, built, 1000))
    got = offload.segment(built.frame, tso_hdr(wire.GSO_TCPV4, built, 1000, hdr_len=hdr_len))
    assert got == expected
    check_tcp_segments(got, built, payload, 1000)


def test_tso_sequence_wraps() -> None:
    payload = payload_bytes(3000)
    built = tcp4_frame(payload, seq=0xFFFFFC00)
    segments = offload.segment(built.frame, tso_hdr(wire.GSO_TCPV4, built, 1024))
    seqs = [int.from_bytes(s[38:42], "big") for s in segments]
    assert seqs == [0xFFFFFC00, 0, 1024]


@pytest.mark.parametrize(
    "kind,built",
    [
        (wire.GSO_TCPV4, tcp6_frame(b"x" * 100)),
        (wire.GSO_TCPV6, tcp4_frame(b"x" * 100)),
        (wire.GSO_TCPV4, udp4_frame(b"x" * 100)),
        (wire.GSO_UDP, tcp4_frame(b"x" * 100)),
        (wire.GSO_UDP_L4, tcp6_frame(b"x" * 100)),
        (wire.GSO_TCPV4, Built(eth(0x0806, bytes(100)), 14)),
        (wire.GSO_TCPV4, Built(tcp4_frame(b"").frame[:40], 34)),
        (
            wire.GSO_UDP,
            Built(eth(0x86DD, ipv6(44, fragment_hdr(17, 0, True, 1) + udp(b"ab" * 10))), 62),
        ),
        (2, tcp4_frame(b"x" * 100)),
    ],
)
def test_segment_rejects_frames_of_another_kind(kind: int, built: Built) -> None:
    hdr = NetHdr(flags=NEEDS, gso_type=kind, gso_size=10, csum_start=built.l4, csum_offset=16)
    with pytest.raises(OffloadError):
        offload.segment(built.frame, hdr)


def test_segment_rejects_tunnels_and_zero_mss() -> None:
    built = tcp4_frame(b"x" * 100)
    with pytest.raises(OffloadError, match="tunnel"):
        offload.segment(built.frame, tso_hdr(wire.GSO_TCPV4 | wire.GSO_UDP_TUNNEL_IPV4, built, 10))
    with pytest.raises(OffloadError, match="gso_size"):
        offload.segment(built.frame, tso_hdr(wire.GSO_TCPV4, built, 0))


@pytest.mark.normative(N_TX_DEV)
def test_segment_without_gso() -> None:
    built = tcp4_frame(payload_bytes(500), partial=True)
    hdr = NetHdr(flags=NEEDS, csum_start=built.l4, csum_offset=16)
    (out,) = offload.segment(built.frame, hdr)
    assert offload.verify(out) and bytes(out) == tcp4_frame(payload_bytes(500)).frame
    # Without NEEDS_CSUM, csum_start and csum_offset are not used, whatever they hold.
    (same,) = offload.segment(built.frame, NetHdr(csum_start=3, csum_offset=5))
    assert bytes(same) == built.frame


# -- segment: USO and UFO --------------------------------------------------------------


@settings(max_examples=40, deadline=None)
@given(
    size=st.integers(0, 12000), mss=st.integers(1, 4000), v6=st.booleans(), partial=st.booleans()
)
def test_uso_invariants(size: int, mss: int, v6: bool, partial: bool) -> None:
    mss = max(mss, size // 200 + 1)
    payload = payload_bytes(size, seed=3)
    built = udp6_frame(payload, partial=partial) if v6 else udp4_frame(payload, partial=partial)
    segments = offload.segment(built.frame, tso_hdr(wire.GSO_UDP_L4, built, mss))
    assert len(segments) == max(1, -(-size // mss))
    pieces = []
    for i, seg in enumerate(segments):
        assert offload.verify(seg)
        info = offload.parse(seg)
        assert info is not None and info.l4_offset == built.l4 and info.payload_offset is not None
        piece = bytes(seg[info.payload_offset :])
        assert len(piece) <= mss
        assert int.from_bytes(seg[built.l4 + 4 : built.l4 + 6], "big") == 8 + len(piece)
        assert seg[built.l4 + 6 : built.l4 + 8] != b"\0\0"
        if not v6:
            assert int.from_bytes(seg[18:20], "big") == (0x1234 + i) & 0xFFFF
        pieces.append(piece)
    assert b"".join(pieces) == payload


def reassemble_v4(fragments: list[bytearray]) -> tuple[bytes, bytes]:
    """(first fragment's IP header, reassembled IP payload) of IPv4 fragments."""
    parts: dict[int, bytes] = {}
    idents = set()
    for i, frag in enumerate(fragments):
        ihl = (frag[14] & 0xF) * 4
        assert ref_csum(bytes(frag[14 : 14 + ihl])) == 0
        field = int.from_bytes(frag[20:22], "big")
        more = bool(field & 0x2000)
        assert more == (i != len(fragments) - 1)
        assert int.from_bytes(frag[16:18], "big") == len(frag) - 14
        idents.add(bytes(frag[18:20]))
        parts[(field & 0x1FFF) * 8] = bytes(frag[14 + ihl :])
    assert len(idents) == 1
    data = b""
    for off in sorted(parts):
        assert off == len(data)
        data += parts[off]
    first = fragments[0]
    return bytes(first[14 : 14 + (first[14] & 0xF) * 4]), data


@pytest.mark.parametrize("gso_size,expected", [(1480, 1480), (1001, 1000), (8, 8)])
def test_ufo_ipv4(gso_size: int, expected: int) -> None:
    payload = payload_bytes(4000)
    # Router alert (copied into every fragment) and record route (first fragment only).
    options = bytes([0x94, 4, 0, 0, 0x07, 7, 4, 0, 0, 0, 0, 0])
    built = udp4_frame(payload, partial=True, ip_options=options)
    fragments = offload.segment(built.frame, tso_hdr(wire.GSO_UDP, built, gso_size))
    assert len(fragments) == -(-(len(payload) + 8) // expected)
    header, datagram = reassemble_v4(fragments)
    assert header[20:] == options
    assert all(f[14] & 0xF == 6 and f[34:38] == bytes([0x94, 4, 0, 0]) for f in fragments[1:])
    assert all(len(f) - 14 - (f[14] & 0xF) * 4 == expected for f in fragments[:-1])
    assert datagram[8:] == payload
    assert int.from_bytes(datagram[4:6], "big") == len(datagram)
    assert ref_csum(pseudo4(17, len(datagram)) + datagram) == 0
    assert all(not offload.verify(f) for f in fragments)  # fragments carry no checkable L4


def test_ufo_ipv4_small_datagram_is_not_fragmented() -> None:
    built = udp4_frame(payload_bytes(100), partial=True)
    (only,) = offload.segment(built.frame, tso_hdr(wire.GSO_UDP, built, 1480))
    assert offload.verify(only) and int.from_bytes(only[20:22], "big") & 0x3FFF == 0


def test_ufo_rejects_tiny_gso_size() -> None:
    built = udp4_frame(payload_bytes(100), partial=True)
    with pytest.raises(OffloadError):
        offload.segment(built.frame, tso_hdr(wire.GSO_UDP, built, 7))


@pytest.mark.parametrize("with_ext", [False, True])
def test_ufo_ipv6(with_ext: bool) -> None:
    payload = payload_bytes(3000, seed=11)
    ext = hop_by_hop(60) + dest_opts_home(17, A6) if with_ext else b""
    built = udp6_frame(payload, partial=True, ext=ext, nh=0 if with_ext else 17)
    fragments = offload.segment(built.frame, tso_hdr(wire.GSO_UDP, built, 1232), frag_id=0xABCD1234)
    unfrag = 54 + (8 if with_ext else 0)  # the fragment header goes after the hop-by-hop one
    parts: dict[int, bytes] = {}
    for i, frag in enumerate(fragments):
        assert int.from_bytes(frag[18:20], "big") == len(frag) - 54
        nh_field = 54 if with_ext else 20
        assert frag[nh_field] == 44
        fh = frag[unfrag : unfrag + 8]
        assert fh[0] == (60 if with_ext else 17)
        field = int.from_bytes(fh[2:4], "big")
        assert bool(field & 1) == (i != len(fragments) - 1)
        assert fh[4:8] == bytes.fromhex("abcd1234")
        piece = bytes(frag[unfrag + 8 :])
        assert len(piece) <= 1232 and (len(piece) % 8 == 0 or i == len(fragments) - 1)
        parts[field & ~7] = piece
    data = b"".join(parts[k] for k in sorted(parts))
    assert sorted(parts) == [1232 * i for i in range(len(parts))]
    datagram = data[len(ext) - 8 :] if with_ext else data
    assert datagram[8:] == payload
    assert ref_csum(pseudo6(17, len(datagram)) + datagram) == 0


def test_ufo_ipv6_identification_is_shared_and_fresh() -> None:
    built = udp6_frame(payload_bytes(3000), partial=True)
    hdr = tso_hdr(wire.GSO_UDP, built, 1000)
    first = offload.segment(built.frame, hdr)
    second = offload.segment(built.frame, hdr)
    assert len({bytes(f[58:62]) for f in first}) == 1
    assert first[0][58:62] != second[0][58:62]


# -- adapt ------------------------------------------------------------------------------

G_CSUM = 1 << wire.GUEST_CSUM
G_TSO4 = 1 << wire.GUEST_TSO4
G_TSO6 = 1 << wire.GUEST_TSO6
G_ECN = 1 << wire.GUEST_ECN
G_UFO = 1 << wire.GUEST_UFO
G_USO4 = 1 << wire.GUEST_USO4
G_USO6 = 1 << wire.GUEST_USO6


@pytest.mark.normative(N_RX_DEV)
@pytest.mark.parametrize(
    "kind,builder,accept",
    [
        (wire.GSO_TCPV4, tcp4_frame, G_CSUM | G_TSO4),
        (wire.GSO_TCPV6, tcp6_frame, G_CSUM | G_TSO6),
        (wire.GSO_TCPV4 | wire.GSO_ECN, tcp4_frame, G_CSUM | G_TSO4 | G_ECN),
        (wire.GSO_UDP, udp4_frame, G_CSUM | G_UFO),
        (wire.GSO_UDP_L4, udp4_frame, G_CSUM | G_USO4),
        (wire.GSO_UDP_L4, udp6_frame, G_CSUM | G_USO6),
    ],
)
def test_adapt_passes_what_the_receiver_takes(kind: int, builder: Builder, accept: int) -> None:
    built = builder(payload_bytes(5000), partial=True)
    hdr = tso_hdr(kind, built, 1400)
    assert offload.adapt(hdr, built.frame, accept) == [(hdr, built.frame)]
    assert offload.adapt(hdr, built.frame, wire.GUEST_OFFLOAD_BITS | 1 << 80)[0][0] is hdr


@pytest.mark.normative(N_RX_DEV)
@pytest.mark.parametrize(
    "kind,builder,accept",
    [
        (wire.GSO_TCPV4, tcp4_frame, 0),
        (wire.GSO_TCPV4, tcp4_frame, G_CSUM | G_TSO6),
        (wire.GSO_TCPV6, tcp6_frame, G_CSUM | G_TSO4 | G_ECN),
        (wire.GSO_TCPV4 | wire.GSO_ECN, tcp4_frame, G_CSUM | G_TSO4),  # no GUEST_ECN
        (wire.GSO_TCPV4, tcp4_frame, G_TSO4),  # no GUEST_CSUM: no partial checksum either
        (wire.GSO_UDP_L4, udp4_frame, G_CSUM | G_USO6),
        (wire.GSO_UDP_L4, udp6_frame, G_CSUM | G_USO4 | G_UFO),
    ],
)
def test_adapt_segments_for_a_receiver_without_the_offload(
    kind: int, builder: Builder, accept: int
) -> None:
    payload = payload_bytes(5000)
    built = builder(payload, partial=True)
    out = offload.adapt(tso_hdr(kind, built, 1400), built.frame, accept)
    assert len(out) == 4
    for hdr, frame in out:
        assert isinstance(frame, bytes) and offload.verify(frame)
        assert hdr.gso_type == wire.GSO_NONE and hdr.gso_size == 0
        # DATA_VALID only for a receiver with GUEST_CSUM; without it flags are 0.
        assert hdr.flags == (wire.HDR_F_DATA_VALID if accept & G_CSUM else 0)
    info = offload.parse(out[0][1])
    assert info is not None and info.payload_offset is not None
    assert b"".join(f[info.payload_offset :] for _, f in out) == payload


@pytest.mark.normative(N_RX_DEV)
def test_adapt_ufo_fragments_are_not_data_valid() -> None:
    built = udp4_frame(payload_bytes(3000), partial=True)
    out = offload.adapt(tso_hdr(wire.GSO_UDP, built, 1480), built.frame, G_CSUM | G_TSO4)
    assert len(out) == 3 and all(h == NetHdr() for h, _ in out)


@pytest.mark.normative(N_RX_DEV)
def test_adapt_partial_checksum() -> None:
    built = udp6_frame(payload_bytes(700), partial=True)
    hdr = NetHdr(flags=NEEDS, csum_start=built.l4, csum_offset=6)
    assert offload.adapt(hdr, built.frame, G_CSUM) == [(hdr, built.frame)]
    ((plain, frame),) = offload.adapt(hdr, built.frame, G_TSO4 | G_TSO6)
    # Without GUEST_CSUM: flags 0 and a fully checksummed packet.
    assert plain == NetHdr() and offload.verify(frame)
    assert frame == udp6_frame(payload_bytes(700)).frame


@pytest.mark.normative(N_RX_DEV)
def test_adapt_strips_flags_the_receiver_may_not_see() -> None:
    frame = tcp4_frame(b"checked").frame
    valid = NetHdr(flags=wire.HDR_F_DATA_VALID)
    assert offload.adapt(valid, frame, G_CSUM)[0][0] is valid
    assert offload.adapt(valid, frame, 0) == [(NetHdr(), frame)]
    odd = NetHdr(flags=wire.HDR_F_DATA_VALID | wire.HDR_F_RSC_INFO | 0x40)
    assert offload.adapt(odd, frame, G_CSUM) == [(valid, frame)]
    plain = NetHdr()
    assert offload.adapt(plain, frame, 0)[0][0] is plain


def test_adapt_rejects_what_cannot_be_segmented() -> None:
    built = tcp4_frame(payload_bytes(3000), partial=True)
    tunnel_hdr = tso_hdr(wire.GSO_TCPV4 | wire.GSO_UDP_TUNNEL_IPV4, built, 1000)
    with pytest.raises(OffloadError):
        offload.adapt(tunnel_hdr, built.frame, G_CSUM | G_TSO4)
    # A receiver taking UDP tunnel GSO gets it as it is.
    tunnel_ok = G_CSUM | G_TSO4 | 1 << wire.GUEST_UDP_TUNNEL_GSO
    assert offload.adapt(tunnel_hdr, built.frame, tunnel_ok) == [(tunnel_hdr, built.frame)]
    with pytest.raises(OffloadError):
        offload.adapt(tso_hdr(wire.GSO_TCPV6, built, 1000), built.frame, G_CSUM)


def test_host_to_guest_bits() -> None:
    assert offload.host_to_guest_bits(0) == 0
    assert offload.host_to_guest_bits(wire.HOST_OFFLOAD_BITS) == wire.GUEST_OFFLOAD_BITS
    assert offload.host_to_guest_bits(1 << wire.HOST_USO) == G_USO4 | G_USO6
    assert offload.host_to_guest_bits(1 << wire.CSUM | 1 << wire.MRG_RXBUF) == G_CSUM
    assert (
        offload.host_to_guest_bits(1 << wire.HOST_UDP_TUNNEL_GSO) == 1 << wire.GUEST_UDP_TUNNEL_GSO
    )
    # A TAP taking TSO4 gets TSO4 frames through unchanged.
    built = tcp4_frame(payload_bytes(3000), partial=True)
    hdr = tso_hdr(wire.GSO_TCPV4, built, 1000)
    tap = offload.host_to_guest_bits(1 << wire.CSUM | 1 << wire.HOST_TSO4)
    assert offload.adapt(hdr, built.frame, tap) == [(hdr, built.frame)]


@settings(max_examples=300, deadline=None)
@given(
    frame=st.binary(min_size=0, max_size=300),
    flags=st.integers(0, 0xFF),
    gso_type=st.integers(0, 0xFF),
    gso_size=st.integers(0, 0xFFFF),
    csum_start=st.integers(0, 400),
    csum_offset=st.integers(0, 400),
    accept=st.integers(0, (1 << 70) - 1),
    head=st.sampled_from([b"", tcp4_frame(b"").frame[:54], udp6_frame(b"").frame[:62]]),
)
def test_garbage_raises_only_offload_error(
    frame: bytes,
    flags: int,
    gso_type: int,
    gso_size: int,
    csum_start: int,
    csum_offset: int,
    accept: int,
    head: bytes,
) -> None:
    data = head + frame
    hdr = NetHdr(
        flags=flags,
        gso_type=gso_type,
        gso_size=gso_size,
        csum_start=csum_start,
        csum_offset=csum_offset,
    )
    try:
        out = offload.adapt(hdr, data, accept)
    except OffloadError:
        out = None
    assert out is None or all(isinstance(f, bytes) for _, f in out)
    try:
        segs = offload.segment(data, hdr)
    except OffloadError:
        segs = None
    assert segs is None or len(segs) >= 1
    assert isinstance(offload.verify(data), bool)


def test_pseudo_header_sum_is_what_needs_csum_stores() -> None:
    for built, pseudo, at in (
        (tcp4_frame(payload_bytes(99), partial=True), pseudo4(6, 20 + 99), 16),
        (udp6_frame(payload_bytes(99), partial=True), pseudo6(17, 8 + 99), 6),
    ):
        info = offload.parse(built.frame)
        assert info is not None
        value = offload.pseudo_header_sum(built.frame, info, len(built.frame) - built.l4)
        assert value == ref_sum(pseudo)
        assert built.frame[built.l4 + at : built.l4 + at + 2] == value.to_bytes(2, "big")
    arp = offload.parse(eth(0x0806, bytes(28)))
    assert arp is not None
    with pytest.raises(OffloadError):
        offload.pseudo_header_sum(eth(0x0806, bytes(28)), arp, 8)
