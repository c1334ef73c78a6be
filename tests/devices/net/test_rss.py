"""Receive-side scaling: the Toeplitz hash, the hashed fields, RSS config decoding, steering."""

from __future__ import annotations

import ipaddress
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.devices.net.test_offload import (
    dest_opts_home,
    eth,
    fragment_hdr,
    hop_by_hop,
    ipv4,
    ipv6,
    routing_type2,
    tcp,
    udp,
)
from virtio.devices.net import rss, wire

N_RSS_DEV = (
    "devicenormative:Device Types / Network Device / Device Operation / Control Virtqueue"
    " / Receive-side scaling (RSS) / RSS processing"
)
# The spec's label for "Setting RSS parameters" ends in a space; normative.json strips it.
N_RSS_DRV = (
    "drivernormative:Device Types / Network Device / Device Operation / Control Virtqueue"
    " / Receive-side scaling (RSS)"
)
N_RX_DEV = "devicenormative:Device Types / Network Device / Device Operation / Processing of Incoming Packets"

#: The key of Microsoft's RSS verification suite.
MS_KEY = bytes.fromhex(
    "6d5a56da255b0ec24167253d43a38fb0d0ca2bcbae7b30b477cb2da38030f20c6a42b73bbeac01fa"
)

# (source, source port, destination, destination port, hash of addresses, with ports):
# Microsoft's published verification values for that key.
MS_IPV4 = [
    ("66.9.149.187", 2794, "161.142.100.80", 1766, 0x323E8FC2, 0x51CCC178),
    ("199.92.111.2", 14230, "65.69.140.83", 4739, 0xD718262A, 0xC626B0EA),
    ("24.19.198.95", 12898, "12.22.207.184", 38024, 0xD2D0A5DE, 0x5C2B394A),
    ("38.27.205.30", 48228, "209.142.163.6", 2217, 0x82989176, 0xAFC7327F),
    ("153.39.163.191", 44251, "202.188.127.2", 1303, 0x5D1809C5, 0x10E828A2),
]
MS_IPV6 = [
    ("3ffe:2501:200:1fff::7", 2794, "3ffe:2501:200:3::1", 1766, 0x2CC18CD5, 0x40207D3D),
    ("3ffe:501:8::260:97ff:fe40:efab", 14230, "ff02::1", 4739, 0x0F0C461C, 0xDDE51BBF),
    (
        "3ffe:1900:4545:3:200:f8ff:fe21:67cf",
        44251,
        "fe80::200:f8ff:fe21:67cf",
        38024,
        0x4B61E985,
        0x02D1FEEF,
    ),
]

ALL = wire.HASH_TYPES_ALL


def addr(text: str) -> bytes:
    return ipaddress.ip_address(text).packed


def ports(sport: int, dport: int) -> bytes:
    return struct.pack("!HH", sport, dport)


def transport(proto: int, sport: int, dport: int) -> bytes:
    if proto == 6:
        return tcp(b"payload", sport=sport, dport=dport)
    if proto == 17:
        return udp(b"payload", sport=sport, dport=dport)
    return b"\x08\x00" + bytes(10)  # an ICMP echo request, say


def v4_frame(src: str, sport: int, dst: str, dport: int, proto: int = 6, frag: int = 0) -> bytes:
    l4 = transport(proto, sport, dport)
    return eth(0x0800, ipv4(proto, l4, src=addr(src), dst=addr(dst), frag=frag))


def v6_frame(
    src: str,
    sport: int,
    dst: str,
    dport: int,
    proto: int = 6,
    ext: bytes = b"",
    nh: int | None = None,
) -> bytes:
    l4 = transport(proto, sport, dport)
    first = proto if nh is None else nh
    return eth(0x86DD, ipv6(first, l4, src=addr(src), dst=addr(dst), ext=ext))


def ref_toeplitz(key: bytes, data: bytes) -> int:
    """The definition, bit by bit: XOR the 32 key bits at each set input bit's position."""
    key_bits = int.from_bytes(key, "big")
    key_len = len(key) * 8
    result = 0
    for i in range(len(data) * 8):
        if data[i // 8] >> (7 - i % 8) & 1:
            shift = key_len - 32 - i
            window = key_bits >> shift if shift >= 0 else key_bits << -shift
            result ^= window & 0xFFFFFFFF
    return result


# -- the Toeplitz hash -------------------------------------------------------------------


@pytest.mark.parametrize("src,sport,dst,dport,ip_hash,port_hash", MS_IPV4 + MS_IPV6)
def test_toeplitz_microsoft_vectors(
    src: str, sport: int, dst: str, dport: int, ip_hash: int, port_hash: int
) -> None:
    addrs = addr(src) + addr(dst)
    assert rss.toeplitz(MS_KEY, addrs) == ip_hash
    assert rss.toeplitz(MS_KEY, addrs + ports(sport, dport)) == port_hash
    assert ref_toeplitz(MS_KEY, addrs + ports(sport, dport)) == port_hash


@settings(max_examples=200)
@given(st.binary(min_size=0, max_size=60), st.binary(min_size=0, max_size=36))
def test_toeplitz_matches_the_definition(key: bytes, data: bytes) -> None:
    # Key bits past the end of a short key count as zero.
    assert rss.toeplitz(key, data) == ref_toeplitz(key.ljust(40, b"\0")[:40], data)


@given(
    st.binary(min_size=40, max_size=40),
    st.binary(min_size=12, max_size=12),
    st.binary(min_size=12, max_size=12),
)
def test_toeplitz_is_linear(key: bytes, a: bytes, b: bytes) -> None:
    xor = bytes(x ^ y for x, y in zip(a, b, strict=True))
    assert rss.toeplitz(key, xor) == rss.toeplitz(key, a) ^ rss.toeplitz(key, b)


def test_toeplitz_input_limit() -> None:
    with pytest.raises(ValueError):
        rss.toeplitz(MS_KEY, bytes(37))


# -- which fields are hashed ------------------------------------------------------------


@pytest.mark.normative(N_RX_DEV)
@pytest.mark.parametrize("src,sport,dst,dport,ip_hash,port_hash", MS_IPV4)
def test_hash_ipv4_packets(
    src: str, sport: int, dst: str, dport: int, ip_hash: int, port_hash: int
) -> None:
    tcp_frame = v4_frame(src, sport, dst, dport, 6)
    udp_frame = v4_frame(src, sport, dst, dport, 17)
    assert rss.hash_packet(tcp_frame, MS_KEY, ALL) == (port_hash, wire.HASH_REPORT_TCPV4)
    assert rss.hash_packet(udp_frame, MS_KEY, ALL) == (port_hash, wire.HASH_REPORT_UDPV4)
    ip_only = wire.HASH_TYPE_IPV4
    assert rss.hash_packet(tcp_frame, MS_KEY, ip_only) == (ip_hash, wire.HASH_REPORT_IPV4)
    # TCP hashing enabled does not cover UDP: it falls back to the addresses, or nothing.
    assert rss.hash_packet(udp_frame, MS_KEY, wire.HASH_TYPE_TCPV4 | ip_only) == (
        ip_hash,
        wire.HASH_REPORT_IPV4,
    )
    assert rss.hash_packet(udp_frame, MS_KEY, wire.HASH_TYPE_TCPV4) is None
    # IPv6 types do not apply to IPv4.
    assert rss.hash_packet(tcp_frame, MS_KEY, ALL & ~0b111) is None


@pytest.mark.normative(N_RX_DEV)
@pytest.mark.parametrize("src,sport,dst,dport,ip_hash,port_hash", MS_IPV6)
def test_hash_ipv6_packets(
    src: str, sport: int, dst: str, dport: int, ip_hash: int, port_hash: int
) -> None:
    tcp_frame = v6_frame(src, sport, dst, dport, 6)
    udp_frame = v6_frame(src, sport, dst, dport, 17)
    assert rss.hash_packet(tcp_frame, MS_KEY, ALL) == (port_hash, wire.HASH_REPORT_TCPV6)
    assert rss.hash_packet(udp_frame, MS_KEY, ALL) == (port_hash, wire.HASH_REPORT_UDPV6)
    assert rss.hash_packet(tcp_frame, MS_KEY, wire.HASH_TYPE_IPV6) == (
        ip_hash,
        wire.HASH_REPORT_IPV6,
    )
    assert rss.hash_packet(udp_frame, MS_KEY, wire.HASH_TYPE_TCPV6) is None
    # Without extension headers the _EX types do not apply.
    ex = wire.HASH_TYPE_IP_EX | wire.HASH_TYPE_TCP_EX | wire.HASH_TYPE_UDP_EX
    assert rss.hash_packet(tcp_frame, MS_KEY, ex) is None
    both = rss.hash_packet(tcp_frame, MS_KEY, ex | wire.HASH_TYPE_TCPV6)
    assert both == (port_hash, wire.HASH_REPORT_TCPV6)


@pytest.mark.normative(N_RX_DEV)
def test_hash_ipv6_with_extension_headers_uses_home_and_routing_addresses() -> None:
    src, sport, dst, dport, ip_hash, port_hash = MS_IPV6[0]
    # The wire addresses are someone else's: the home address option and the type 2
    # routing header carry the addresses the _EX hash types use.
    ext = hop_by_hop(60) + dest_opts_home(43, addr(src)) + routing_type2(6, addr(dst))
    frame = v6_frame("2001:db8::1", sport, "2001:db8::2", dport, 6, ext=ext, nh=0)
    assert rss.hash_packet(frame, MS_KEY, ALL) == (port_hash, wire.HASH_REPORT_TCPV6_EX)
    assert rss.hash_packet(frame, MS_KEY, wire.HASH_TYPE_IP_EX) == (
        ip_hash,
        wire.HASH_REPORT_IPV6_EX,
    )
    udp_ext = hop_by_hop(60) + dest_opts_home(43, addr(src)) + routing_type2(17, addr(dst))
    udp_frame = v6_frame("2001:db8::1", sport, "2001:db8::2", dport, 17, ext=udp_ext, nh=0)
    assert rss.hash_packet(udp_frame, MS_KEY, ALL) == (port_hash, wire.HASH_REPORT_UDPV6_EX)
    # No _EX type enabled: extension headers skipped, the plain IPv6 rules on the wire addresses.
    plain = addr("2001:db8::1") + addr("2001:db8::2")
    expected = rss.toeplitz(MS_KEY, plain + ports(sport, dport))
    assert rss.hash_packet(frame, MS_KEY, wire.HASH_TYPE_TCPV6) == (
        expected,
        wire.HASH_REPORT_TCPV6,
    )


@pytest.mark.normative(N_RX_DEV)
def test_hash_ipv6_ex_without_mobility_headers_uses_wire_addresses() -> None:
    src, sport, dst, dport, ip_hash, port_hash = MS_IPV6[1]
    frame = v6_frame(src, sport, dst, dport, 17, ext=hop_by_hop(17), nh=0)
    assert rss.hash_packet(frame, MS_KEY, ALL) == (port_hash, wire.HASH_REPORT_UDPV6_EX)
    assert rss.hash_packet(frame, MS_KEY, wire.HASH_TYPE_IPV6) == (ip_hash, wire.HASH_REPORT_IPV6)


def test_hash_fragments_and_other_packets() -> None:
    src, sport, dst, dport, ip_hash, _ = MS_IPV4[0]
    # Any IP fragment hashes on addresses only, so a datagram's fragments stay together.
    first = v4_frame(src, sport, dst, dport, 6, frag=0x2000)
    later = v4_frame(src, sport, dst, dport, 6, frag=0x0010)
    for frame in (first, later):
        assert rss.hash_packet(frame, MS_KEY, ALL) == (ip_hash, wire.HASH_REPORT_IPV4)
    src6, sport6, dst6, dport6, ip6_hash, _ = MS_IPV6[0]
    frag6 = v6_frame(src6, sport6, dst6, dport6, 6, ext=fragment_hdr(6, 0, True, 7), nh=44)
    assert rss.hash_packet(frag6, MS_KEY, ALL) == (ip6_hash, wire.HASH_REPORT_IPV6_EX)
    icmp = v4_frame(src, sport, dst, dport, 1)
    assert rss.hash_packet(icmp, MS_KEY, ALL) == (ip_hash, wire.HASH_REPORT_IPV4)
    assert rss.hash_packet(eth(0x0806, bytes(28)), MS_KEY, ALL) is None
    assert rss.hash_packet(b"short", MS_KEY, ALL) is None
    assert rss.hash_packet(v4_frame(src, sport, dst, dport), MS_KEY, 0) is None


@settings(max_examples=300)
@given(st.binary(max_size=120), st.sampled_from([b"\x08\x00", b"\x86\xdd"]), st.integers(0, 0x1FF))
def test_hash_never_raises(tail: bytes, ethertype: bytes, hash_types: int) -> None:
    result = rss.hash_packet(bytes(12) + ethertype + tail, MS_KEY, hash_types)
    assert result is None or (0 <= result[0] < 1 << 32 and 1 <= result[1] <= 9)
    if result is not None:
        assert hash_types & 1 << (result[1] - 1)  # VIRTIO_NET_HASH_TYPE_XXX = 1 << (REPORT_XXX - 1)


# -- RSS configuration ------------------------------------------------------------------


def rss_payload(
    hash_types: int = ALL,
    table: list[int] | None = None,
    unclassified: int = 0,
    max_tx_vq: int = 4,
    key: bytes = MS_KEY,
    mask: int | None = None,
) -> bytes:
    table = [0, 1, 2, 3] if table is None else table
    mask = len(table) - 1 if mask is None else mask
    return (
        struct.pack("<IHH", hash_types, mask, unclassified)
        + struct.pack(f"<{len(table)}H", *table)
        + struct.pack("<HB", max_tx_vq, len(key))
        + key
    )


def decode(payload: bytes, *, rx_queues: int = 4, supported: int = ALL) -> rss.RssConfig:
    return rss.decode_rss_config(
        payload, max_key=40, max_table=128, supported_hash_types=supported, rx_queues=rx_queues
    )


def test_decode_rss_config() -> None:
    config = decode(rss_payload(table=[3, 1, 2, 0, 0, 1, 2, 3], unclassified=2, max_tx_vq=3))
    assert config == rss.RssConfig(
        hash_types=ALL,
        indirection_table=[3, 1, 2, 0, 0, 1, 2, 3],
        unclassified_queue=2,
        key=MS_KEY,
        max_tx_vq=3,
    )
    assert config.mask == 7
    # The largest table, a shorter key, trailing bytes after the key.
    big = decode(rss_payload(table=[1] * 128, key=b"k" * 10) + b"extra")
    assert big.mask == 127 and big.key == b"k" * 10


@pytest.mark.normative(N_RSS_DRV)
@pytest.mark.parametrize(
    "payload,message",
    [
        (b"", "shorter"),
        (rss_payload()[:7], "shorter"),
        (rss_payload(table=[0, 1, 2]), "power of two"),
        (rss_payload(table=[0] * 6), "power of two"),
        (rss_payload(table=[0] * 256), "maximum table"),
        (rss_payload(mask=0x7FFF)[:20], "maximum table"),
        (rss_payload()[:-41], "too short"),
        (rss_payload(hash_types=1 << 9), "not supported"),
        (rss_payload(key=bytes(41)), "at most 40"),
        (rss_payload()[:-1], "cut short"),
        (rss_payload(table=[0, 1, 2, 4]), "not a receive queue"),
        (rss_payload(unclassified=4), "not a receive queue"),
        (rss_payload(table=[0, 0x8001, 0, 0]), "reserved"),
        (rss_payload(max_tx_vq=0), "max_tx_vq"),
        (rss_payload(max_tx_vq=5), "max_tx_vq"),
    ],
)
def test_decode_rss_config_rejects(payload: bytes, message: str) -> None:
    with pytest.raises(ValueError, match=message) as refused:
        decode(payload)
    assert str(refused.value)  # a clear message for the VIRTIO_NET_ERR log line


@pytest.mark.normative(N_RSS_DRV)
def test_decode_rss_config_rejects_unsupported_hash_types() -> None:
    only_v4 = wire.HASH_TYPE_IPV4 | wire.HASH_TYPE_TCPV4
    assert decode(rss_payload(hash_types=only_v4), supported=only_v4).hash_types == only_v4
    with pytest.raises(ValueError, match="0x10 are not supported"):
        decode(rss_payload(hash_types=only_v4 | wire.HASH_TYPE_TCPV6), supported=only_v4)


def mutated(valid: bytes, at: int, value: int, keep: int) -> bytes:
    """``valid`` with one byte replaced, cut to ``keep`` bytes."""
    out = bytearray(valid)
    out[at % len(out)] = value
    return bytes(out[:keep])


PAYLOADS = st.one_of(
    st.binary(max_size=300),
    st.builds(
        mutated,
        st.sampled_from([rss_payload(), rss_payload(table=[1] * 16, key=b"short")]),
        st.integers(0, 100),
        st.integers(0, 255),
        st.integers(0, 100),
    ),
)


@settings(max_examples=500)
@given(PAYLOADS)
def test_decode_garbage_raises_only_value_error(payload: bytes) -> None:
    configs: list[rss.RssConfig] = []
    try:
        configs.append(decode(payload))
    except ValueError as err:
        assert str(err)
    try:
        configs.append(rss.decode_hash_config(payload, max_key=40, supported_hash_types=ALL))
    except ValueError as err:
        assert str(err)
    for config in configs:
        assert len(config.key) <= 40 and config.hash_types & ~ALL == 0
        assert all(0 <= q < 4 for q in [*config.indirection_table, config.unclassified_queue])


def test_decode_hash_config() -> None:
    payload = struct.pack("<I8sB", wire.HASH_TYPE_TCPV4, bytes(8), 40) + MS_KEY
    config = rss.decode_hash_config(payload, max_key=40, supported_hash_types=ALL)
    assert (config.hash_types, config.key, config.indirection_table) == (
        wire.HASH_TYPE_TCPV4,
        MS_KEY,
        [0],
    )
    with pytest.raises(ValueError, match="reserved"):
        rss.decode_hash_config(
            struct.pack("<I8sB", 1, b"\1" + bytes(7), 0), max_key=40, supported_hash_types=ALL
        )
    with pytest.raises(ValueError, match="shorter"):
        rss.decode_hash_config(payload[:12], max_key=40, supported_hash_types=ALL)
    with pytest.raises(ValueError, match="not supported"):
        rss.decode_hash_config(payload, max_key=40, supported_hash_types=wire.HASH_TYPE_IPV4)
    with pytest.raises(ValueError, match="at most"):
        rss.decode_hash_config(payload, max_key=39, supported_hash_types=ALL)


def test_rss_config_table_must_be_a_power_of_two() -> None:
    with pytest.raises(ValueError):
        rss.RssConfig(indirection_table=[])
    with pytest.raises(ValueError):
        rss.RssConfig(indirection_table=[0, 1, 2])
    assert rss.RssConfig().mask == 0


# -- queue selection ----------------------------------------------------------------------


@pytest.mark.normative(N_RSS_DEV)
@pytest.mark.parametrize("src,sport,dst,dport,ip_hash,port_hash", MS_IPV4 + MS_IPV6)
def test_select_queue_through_the_indirection_table(
    src: str, sport: int, dst: str, dport: int, ip_hash: int, port_hash: int
) -> None:
    table = [(i * 7) % 5 for i in range(128)]
    config = rss.RssConfig(
        hash_types=ALL, indirection_table=table, unclassified_queue=4, key=MS_KEY, max_tx_vq=5
    )
    frame = (v6_frame if ":" in src else v4_frame)(src, sport, dst, dport)
    assert rss.select_queue(config, frame) == table[port_hash & 127]
    ip_types = wire.HASH_TYPE_IPV4 | wire.HASH_TYPE_IPV6
    ip_config = rss.RssConfig(hash_types=ip_types, indirection_table=table, key=MS_KEY)
    assert rss.select_queue(ip_config, frame) == table[ip_hash & 127]


@pytest.mark.normative(N_RSS_DEV)
def test_select_queue_unclassified() -> None:
    config = decode(rss_payload(hash_types=wire.HASH_TYPE_TCPV4, table=[1, 2], unclassified=3))
    src, sport, dst, dport, _, port_hash = MS_IPV4[0]
    assert rss.select_queue(config, v4_frame(src, sport, dst, dport, 6)) == [1, 2][port_hash & 1]
    # No hash for these: the unclassified queue.
    assert rss.select_queue(config, v4_frame(src, sport, dst, dport, 17)) == 3
    assert rss.select_queue(config, eth(0x0806, bytes(28))) == 3
    assert rss.select_queue(config, v6_frame(*MS_IPV6[0][:4])) == 3


@pytest.mark.normative(N_RSS_DRV)
def test_rq_id_is_the_receive_queue_number() -> None:
    # vq_index_1_16 = 3 is virtqueue index 6, receiveq4: receive queue (pair) 3.
    config = decode(
        rss_payload(hash_types=wire.HASH_TYPE_IPV4, table=[3], unclassified=1, max_tx_vq=4)
    )
    src, sport, dst, dport, _, _ = MS_IPV4[2]
    assert rss.select_queue(config, v4_frame(src, sport, dst, dport)) == 3
    assert rss.select_queue(config, v6_frame(*MS_IPV6[0][:4])) == 1
