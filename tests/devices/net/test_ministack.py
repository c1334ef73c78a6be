"""The minimal IPv4 host: its codecs on synthetic frames, and its exchanges over a scripted link."""

from __future__ import annotations

import time
from collections.abc import Callable
from ipaddress import IPv4Address, IPv4Interface

import pytest

from virtio.devices.net import ministack as M
from virtio.devices.net import wire as W

MAC = bytes.fromhex("525400abcdef")
SERVER_MAC = bytes.fromhex("52550a000202")
OTHER_MAC = bytes.fromhex("020000000099")
HOST = IPv4Address("10.0.2.15")
SERVER = IPv4Address("10.0.2.2")
DNS = IPv4Address("10.0.2.3")


def naive_checksum(data: bytes) -> int:
    """RFC 1071 the long way: 16-bit words, end-around carry, complement."""
    if len(data) % 2:
        data += b"\0"
    total = 0
    for i in range(0, len(data), 2):
        total += data[i] << 8 | data[i + 1]
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


class ScriptedLink:
    """A FrameLink whose peer is a function: each frame sent may queue frames to receive."""

    def __init__(self, peer: Callable[[bytes], list[bytes]] | None = None) -> None:
        self.mac = MAC
        self.peer = peer
        self.sent: list[bytes] = []
        self.inbox: list[bytes] = []

    def send(self, frame: bytes) -> None:
        self.sent.append(frame)
        if self.peer is not None:
            self.inbox.extend(self.peer(frame))

    def receive(self, timeout: float) -> list[bytes]:
        if not self.inbox:
            time.sleep(min(timeout, 0.005))
        frames, self.inbox = self.inbox, []
        return frames


def dhcp_of(frame: bytes) -> M.Dhcp:
    udp = M.decode(frame).udp
    assert udp is not None
    return M.Dhcp.parse(udp.payload)


def server_options(kind: int) -> dict[int, bytes]:
    return {
        M.OPT_MESSAGE_TYPE: bytes([kind]),
        M.OPT_SERVER_ID: SERVER.packed,
        M.OPT_LEASE_TIME: (86400).to_bytes(4, "big"),
        M.OPT_SUBNET_MASK: IPv4Address("255.255.255.0").packed,
        M.OPT_ROUTER: SERVER.packed,
        M.OPT_DNS: DNS.packed + IPv4Address("10.0.2.4").packed,
    }


def dhcp_reply_frame(request: M.Dhcp, kind: int, *, xid: int | None = None) -> bytes:
    reply = M.Dhcp(
        M.BOOTREPLY,
        request.xid if xid is None else xid,
        request.chaddr,
        server_options(kind),
        flags=request.flags,
        yiaddr=HOST if kind != M.DHCPNAK else M.ANY,
        siaddr=SERVER,
    )
    udp = M.Udp(M.DHCP_SERVER_PORT, M.DHCP_CLIENT_PORT, reply.encode())
    return M.udp_frame(SERVER_MAC, W.BROADCAST, SERVER, M.LIMITED_BROADCAST, udp)


def slirp_like(*, nak: bool = False, stray_first: bool = False) -> Callable[[bytes], list[bytes]]:
    """A peer that serves DHCP, answers ARP for SERVER and echoes pings to SERVER."""

    def peer(frame: bytes) -> list[bytes]:
        packet = M.decode(frame)
        if packet.udp is not None and packet.udp.dport == M.DHCP_SERVER_PORT:
            request = M.Dhcp.parse(packet.udp.payload)
            out = []
            if stray_first:  # another client's reply first: the host must not take it
                out.append(dhcp_reply_frame(request, M.DHCPOFFER, xid=request.xid ^ 1))
            if request.message_type == M.DHCPDISCOVER:
                out.append(dhcp_reply_frame(request, M.DHCPOFFER))
            elif request.message_type == M.DHCPREQUEST:
                out.append(dhcp_reply_frame(request, M.DHCPNAK if nak else M.DHCPACK))
            return out
        if packet.arp is not None:
            answer = packet.arp.answer(SERVER_MAC, SERVER)
            return [] if answer is None else [M.arp_frame(SERVER_MAC, packet.arp.sha, answer)]
        if packet.icmp is not None and packet.ip is not None and packet.ip.dst == SERVER:
            reply = M.IPv4(SERVER, packet.ip.src, M.PROTO_ICMP, packet.icmp.reply().encode())
            return [M.ip_frame(SERVER_MAC, packet.eth.src, reply)]
        return []

    return peer


# -- codecs -----------------------------------------------------------------------------------


def test_dhcp_discover_encodes_the_rfc2131_layout_and_parses_back() -> None:
    discover = M.dhcp_discover(MAC, 0x12345678)
    raw = discover.encode()
    assert len(raw) == 300  # the BOOTP minimum, padded
    assert raw[0:4] == bytes([M.BOOTREQUEST, 1, 6, 0])  # op, htype Ethernet, hlen 6, hops
    assert raw[4:8] == bytes.fromhex("12345678")
    assert raw[10:12] == b"\x80\x00"  # the broadcast flag
    assert raw[12:28] == bytes(16)  # ciaddr .. giaddr all 0.0.0.0
    assert raw[28:44] == MAC + bytes(10)
    assert raw[236:240] == M.DHCP_MAGIC
    assert raw[240:243] == bytes([M.OPT_MESSAGE_TYPE, 1, M.DHCPDISCOVER])
    parsed = M.Dhcp.parse(raw)
    assert parsed == discover
    assert parsed.message_type == M.DHCPDISCOVER
    assert parsed.options[M.OPT_PARAMETER_LIST] == bytes([1, 3, 6, 51, 54])


def test_dhcp_request_takes_the_offer_address_and_server() -> None:
    offer = M.Dhcp(M.BOOTREPLY, 7, MAC, server_options(M.DHCPOFFER), yiaddr=HOST)
    assert M.Dhcp.parse(offer.encode()) == offer
    request = M.Dhcp.parse(M.dhcp_request(MAC, 7, offer).encode())
    assert request.message_type == M.DHCPREQUEST
    assert request.xid == 7 and request.chaddr == MAC
    assert request.options[M.OPT_REQUESTED_ADDRESS] == HOST.packed
    assert request.options[M.OPT_SERVER_ID] == SERVER.packed
    assert request.ciaddr == M.ANY  # still unconfigured (SELECTING state)
    with pytest.raises(M.MalformedPacket, match="option 54"):
        M.dhcp_request(MAC, 7, M.Dhcp(M.BOOTREPLY, 7, MAC, {M.OPT_MESSAGE_TYPE: b"\x02"}))


def test_a_lease_holds_options_1_3_6_51_and_54() -> None:
    ack = M.Dhcp(M.BOOTREPLY, 1, MAC, server_options(M.DHCPACK), yiaddr=HOST)
    lease = M.DhcpLease.from_ack(M.Dhcp.parse(ack.encode()))
    assert lease.address == HOST
    assert lease.netmask == IPv4Address("255.255.255.0")
    assert str(lease.network) == "10.0.2.0/24"
    assert lease.router == SERVER and lease.server == SERVER
    assert lease.dns == (DNS, IPv4Address("10.0.2.4"))
    assert lease.lease_time == 86400
    bare = {M.OPT_MESSAGE_TYPE: b"\x05", M.OPT_SERVER_ID: SERVER.packed}
    with pytest.raises(M.MalformedPacket, match="subnet mask"):
        M.DhcpLease.from_ack(M.Dhcp(M.BOOTREPLY, 1, MAC, bare, yiaddr=HOST))


def test_dhcp_options_pad_split_and_truncation() -> None:
    raw = bytearray(M.Dhcp(M.BOOTREPLY, 1, MAC).encode())
    # Replace the options with: pad, a split option 6 (RFC 3396), end.
    options = b"\x00" + b"\x06\x04" + DNS.packed + b"\x06\x04" + SERVER.packed + b"\xff"
    raw[240:] = options
    assert M.Dhcp.parse(bytes(raw)).options == {M.OPT_DNS: DNS.packed + SERVER.packed}
    with pytest.raises(M.MalformedPacket, match="runs past"):
        M.Dhcp.parse(bytes(raw[:240]) + b"\x06\x08" + DNS.packed)
    with pytest.raises(M.MalformedPacket, match="end option"):
        M.Dhcp.parse(bytes(raw[:240]) + b"\x06\x04" + DNS.packed)
    with pytest.raises(M.MalformedPacket, match="magic"):
        M.Dhcp.parse(bytes(raw[:236]) + bytes(4) + options)


def test_a_dhcp_frame_survives_ethernet_ip_and_udp_with_checksums() -> None:
    discover = M.dhcp_discover(MAC, 99)
    udp = M.Udp(M.DHCP_CLIENT_PORT, M.DHCP_SERVER_PORT, discover.encode())
    frame = M.udp_frame(MAC, W.BROADCAST, M.ANY, M.LIMITED_BROADCAST, udp, ident=5)
    packet = M.decode(frame)
    assert packet.eth.dst == W.BROADCAST and packet.eth.src == MAC
    assert packet.ip is not None and packet.ip.src == M.ANY
    assert packet.ip.dst == M.LIMITED_BROADCAST and packet.ip.ident == 5
    assert packet.udp == udp
    assert M.Dhcp.parse(packet.udp.payload) == discover
    # The UDP checksum covers the pseudo-header: an independent sum agrees.
    segment = frame[34:]
    pseudo = bytes(4) + b"\xff" * 4 + bytes([0, 17]) + len(segment).to_bytes(2, "big")
    assert naive_checksum(pseudo + segment) == 0
    corrupt = bytearray(frame)
    corrupt[-1] ^= 0x01
    with pytest.raises(M.MalformedPacket, match="UDP checksum"):
        M.decode(bytes(corrupt))


def test_ipv4_header_checksum_matches_a_known_header() -> None:
    # The classic example header: 192.168.0.1 -> 192.168.0.199, UDP, 0x73 bytes, checksum 0xb861.
    ip = M.IPv4(IPv4Address("192.168.0.1"), IPv4Address("192.168.0.199"), 17, bytes(0x73 - 20))
    encoded = ip.encode()
    assert encoded[:20] == bytes.fromhex("45000073000040004011b861c0a80001c0a800c7")
    assert M.IPv4.parse(encoded + b"padding") == ip  # trailing bytes past total length dropped
    bad = bytearray(encoded)
    bad[8] = 63  # TTL changed, checksum not
    with pytest.raises(M.MalformedPacket, match="header checksum"):
        M.IPv4.parse(bytes(bad))
    fragment = bytearray(encoded)
    fragment[6:8] = b"\x20\x00"  # more fragments
    fragment[10:12] = b"\0\0"
    fragment[10:12] = naive_checksum(bytes(fragment[:20])).to_bytes(2, "big")
    with pytest.raises(M.MalformedPacket, match="fragment"):
        M.IPv4.parse(bytes(fragment))


def test_icmp_echo_checksum_is_the_internet_checksum() -> None:
    # A Windows ping (id 1, seq 1, its 32-byte payload) carries checksum 0x4d5a.
    echo = M.IcmpEcho(M.ICMP_ECHO_REQUEST, 1, 1, b"abcdefghijklmnopqrstuvwabcdefghi")
    raw = echo.encode()
    assert raw[:8] == bytes.fromhex("08004d5a00010001")
    odd = M.IcmpEcho(M.ICMP_ECHO_REPLY, 0xBEEF, 0x1234, b"odd").encode()
    assert naive_checksum(odd[:2] + b"\0\0" + odd[4:]) == int.from_bytes(odd[2:4], "big")
    assert M.IcmpEcho.parse(raw) == echo
    assert echo.reply() == M.IcmpEcho(M.ICMP_ECHO_REPLY, 1, 1, echo.payload)
    with pytest.raises(M.MalformedPacket, match="ICMP checksum"):
        M.IcmpEcho.parse(raw[:-1] + b"j")


def test_the_host_answers_an_arp_request_for_its_address_only() -> None:
    link = ScriptedLink()
    host = M.MiniHost(link, interface=IPv4Interface("10.0.2.15/24"))
    request = M.Arp(M.ARP_REQUEST, SERVER_MAC, SERVER, bytes(6), HOST)
    frame = M.arp_frame(SERVER_MAC, W.BROADCAST, request)
    assert len(frame) == 60  # padded to the Ethernet minimum
    (reply_frame,) = host.react(M.decode(frame))
    reply = M.decode(reply_frame)
    assert reply.eth.dst == SERVER_MAC and reply.eth.src == MAC
    assert reply.eth.ethertype == M.ETH_P_ARP
    assert reply.arp == M.Arp(M.ARP_REPLY, MAC, HOST, SERVER_MAC, SERVER)
    assert reply_frame[14:22] == bytes.fromhex("0001080006040002")  # Ethernet/IPv4, 6/4, reply
    assert host.neighbours == {SERVER: SERVER_MAC}  # the asker was learnt
    someone_else = M.Arp(M.ARP_REQUEST, SERVER_MAC, SERVER, bytes(6), IPv4Address("10.0.2.16"))
    assert host.react(M.decode(M.arp_frame(SERVER_MAC, W.BROADCAST, someone_else))) == []
    # Polled from the link, the answer goes out by itself.
    link.inbox.append(frame)
    (seen,) = host.poll(0.01)
    assert seen.arp == request and link.sent == [reply_frame]


def test_the_host_answers_an_echo_request_to_it() -> None:
    host = M.MiniHost(ScriptedLink(), interface=IPv4Interface("10.0.2.15/24"))
    echo = M.IcmpEcho(M.ICMP_ECHO_REQUEST, 3, 4, b"hello")
    ask = M.ip_frame(SERVER_MAC, MAC, M.IPv4(SERVER, HOST, M.PROTO_ICMP, echo.encode()))
    (answer,) = host.react(M.decode(ask))
    packet = M.decode(answer)
    assert packet.ip is not None and (packet.ip.src, packet.ip.dst) == (HOST, SERVER)
    assert packet.eth.dst == SERVER_MAC
    assert packet.icmp == M.IcmpEcho(M.ICMP_ECHO_REPLY, 3, 4, b"hello")


# -- exchanges ----------------------------------------------------------------------------------


def test_dhcp_arp_and_ping_against_a_scripted_server() -> None:
    link = ScriptedLink(slirp_like(stray_first=True))
    host = M.MiniHost(link)
    lease = host.dhcp(xid=0xCAFE)
    assert lease.address == HOST and lease.router == SERVER
    assert (host.address, str(host.network), host.router) == (HOST, "10.0.2.0/24", SERVER)
    discover, request = (dhcp_of(frame) for frame in link.sent)
    assert (discover.message_type, request.message_type) == (M.DHCPDISCOVER, M.DHCPREQUEST)
    assert discover.xid == request.xid == 0xCAFE
    assert discover.flags & M.DHCP_FLAG_BROADCAST
    assert host.resolve(SERVER) == SERVER_MAC
    reply = host.ping(SERVER, seq=9, ident=0x77, payload=b"ping")
    assert reply == M.IcmpEcho(M.ICMP_ECHO_REPLY, 0x77, 9, b"ping")
    # An off-link address goes to the router's MAC.
    assert host.next_hop(IPv4Address("192.0.2.1")) == SERVER
    assert len(link.sent) == 4  # DISCOVER, REQUEST, one ARP request (then cached), one echo


def test_a_dhcp_nak_and_a_silent_server_are_errors() -> None:
    with pytest.raises(M.MiniStackError, match="NAK"):
        M.MiniHost(ScriptedLink(slirp_like(nak=True))).dhcp()
    silent = ScriptedLink()
    with pytest.raises(M.MiniStackError, match=r"no DHCPOFFER within 0.06s \(3 sent\)"):
        M.MiniHost(silent).dhcp(timeout=0.06, attempts=3)
    assert len(silent.sent) == 3  # the DISCOVER went out on each attempt


def test_arp_and_ping_without_an_answer_or_an_address_are_errors() -> None:
    host = M.MiniHost(ScriptedLink())
    with pytest.raises(M.MiniStackError, match="no address"):
        host.ping(SERVER)
    host = M.MiniHost(ScriptedLink(), interface=IPv4Interface("10.0.2.15/24"))
    with pytest.raises(M.MiniStackError, match=r"no ARP reply from 10\.0\.2\.2 within"):
        host.resolve(SERVER, timeout=0.03)
    with pytest.raises(M.MiniStackError, match="no router"):
        host.next_hop(IPv4Address("192.0.2.1"))


def test_udp_goes_to_the_resolved_neighbour_and_comes_back() -> None:
    def echo(frame: bytes) -> list[bytes]:
        packet = M.decode(frame)
        if packet.arp is not None:
            answer = packet.arp.answer(SERVER_MAC, SERVER)
            return [] if answer is None else [M.arp_frame(SERVER_MAC, packet.arp.sha, answer)]
        assert packet.udp is not None and packet.ip is not None
        back = M.Udp(packet.udp.dport, packet.udp.sport, packet.udp.payload[::-1])
        return [M.udp_frame(SERVER_MAC, packet.eth.src, SERVER, packet.ip.src, back)]

    link = ScriptedLink(echo)
    host = M.MiniHost(link, interface=IPv4Interface("10.0.2.15/24"))
    host.send_udp(SERVER, 4000, 7, b"abc")
    sender, datagram = host.receive_udp(4000, timeout=0.5)
    assert sender == SERVER and datagram == M.Udp(7, 4000, b"cba")
    sent = M.decode(link.sent[-1])
    assert sent.eth.dst == SERVER_MAC and sent.ip is not None and sent.ip.src == HOST
    with pytest.raises(M.MiniStackError, match="UDP datagram to port 4000"):
        host.receive_udp(4000, timeout=0.02)


def test_frames_that_do_not_parse_are_counted_and_dropped() -> None:
    link = ScriptedLink()
    host = M.MiniHost(link, interface=IPv4Interface("10.0.2.15/24"))
    good = M.ip_frame(SERVER_MAC, MAC, M.IPv4(SERVER, HOST, 253, b"x"))
    bad = bytearray(good)
    bad[24] ^= 0xFF  # the header checksum
    not_ours = M.ip_frame(SERVER_MAC, OTHER_MAC, M.IPv4(SERVER, HOST, 253, b"x"))
    link.inbox += [b"short", bytes(bad), not_ours, good]
    packets = host.poll(0.01)
    assert host.malformed == 2
    assert [p.eth.dst for p in packets] == [MAC]  # another MAC's unicast frame was ignored
