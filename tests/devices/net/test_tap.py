"""TapBackend against the real kernel, inside a network namespace made for each test.

The TAP is created in the root namespace (down, without an address) and moved at
once into a fresh namespace, where its kernel end gets 192.0.2.1/24 (TEST-NET-1)
and a fixed neighbour entry for the test's side, 192.0.2.2: every frame stays
between this process and that namespace, which is deleted afterwards.
"""

from __future__ import annotations

import json
import secrets
import select
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import pytest

from virtio.core.events import EventSources
from virtio.devices.net import wire
from virtio.devices.net.tap import (
    TUN_F_CSUM,
    TUN_F_TSO4,
    TUN_F_TSO6,
    TUN_F_TSO_ECN,
    TUN_F_UFO,
    TUN_F_USO4,
    TUN_F_USO6,
    TapBackend,
    tun_offload_flags,
)
from virtio.devices.net.wire import NetHdr

NS_IP = bytes([192, 0, 2, 1])
OUR_IP = bytes([192, 0, 2, 2])
NS_MAC = bytes.fromhex("020000000001")
OUR_MAC = bytes.fromhex("020000000002")


def ip(*args: str) -> str:
    done = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if done.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {done.stderr.strip()}")
    return done.stdout


def in_ns(ns: str, *argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["ip", "netns", "exec", ns, *argv], capture_output=True, text=True, timeout=30
    )


# -- frames -------------------------------------------------------------------------------


def checksum(data: bytes) -> int:
    """The Internet checksum (RFC 1071) of ``data``."""
    if len(data) % 2:
        data += b"\0"
    total: int = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def eth(dst: bytes, src: bytes, ethertype: int, payload: bytes) -> bytes:
    return dst + src + struct.pack("!H", ethertype) + payload


def ipv4(proto: int, src: bytes, dst: bytes, payload: bytes) -> bytes:
    head = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(payload), 1, 0, 64, proto, 0, src, dst)
    head = head[:10] + struct.pack("!H", checksum(head)) + head[12:]
    return head + payload


def arp_request(target_ip: bytes) -> bytes:
    body = struct.pack("!HHBBH6s4s6s4s", 1, 0x0800, 6, 4, 1, OUR_MAC, OUR_IP, b"\0" * 6, target_ip)
    return eth(wire.BROADCAST, OUR_MAC, 0x0806, body)


def icmp_echo(ident: int, seq: int, payload: bytes) -> bytes:
    msg = struct.pack("!BBHHH", 8, 0, 0, ident, seq) + payload
    msg = msg[:2] + struct.pack("!H", checksum(msg)) + msg[4:]
    return eth(NS_MAC, OUR_MAC, 0x0800, ipv4(1, OUR_IP, NS_IP, msg))


def pseudo_header(src: bytes, dst: bytes, proto: int, length: int) -> bytes:
    return src + dst + struct.pack("!BBH", 0, proto, length)


@dataclass
class Ipv4Frame:
    """The parts of an Ethernet/IPv4 frame these tests look at."""

    src_mac: bytes
    proto: int
    src: bytes
    dst: bytes
    l4: bytes  # the transport header and payload

    @classmethod
    def parse(cls, frame: bytes) -> Ipv4Frame | None:
        if len(frame) < 34 or frame[12:14] != b"\x08\x00":
            return None
        ihl = (frame[14] & 0x0F) * 4
        total = struct.unpack_from("!H", frame, 16)[0]
        return cls(frame[6:12], frame[23], frame[26:30], frame[30:34], frame[14 + ihl : 14 + total])


# -- the host loop ------------------------------------------------------------------------


@dataclass
class Received:
    frames: list[tuple[NetHdr, bytes]] = field(default_factory=list)
    room: bool = True

    def deliver(self, hdr: NetHdr, frame: bytes) -> bool:
        if self.room:
            self.frames.append((hdr, frame))
        return self.room


def pump(events: EventSources, until: Callable[[], bool], timeout: float = 5.0) -> bool:
    """Serve the watched fds as a host loop would, until ``until()`` or the timeout."""
    deadline = time.monotonic() + timeout
    while not until():
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        ready, _, _ = select.select(list(events.fds), [], [], min(left, 0.1))
        for fd in ready:
            events.fd_ready(fd, time.monotonic())
    return True


def first(received: Received, match: Callable[[NetHdr, bytes], bool]) -> Callable[[], bool]:
    return lambda: any(match(h, f) for h, f in received.frames)


# -- fixtures -----------------------------------------------------------------------------


@pytest.fixture
def netns() -> Iterator[str]:
    name = f"pyv-test-{secrets.token_hex(4)}"
    ip("netns", "add", name)
    try:
        # Keep IPv6 chatter (router solicitations, DAD) off the TAP.
        in_ns(name, "sysctl", "-qw", "net.ipv6.conf.default.disable_ipv6=1")
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=30)


@dataclass
class Setup:
    tap: TapBackend
    ns: str
    events: EventSources
    received: Received

    def kernel_stats(self) -> dict[str, int]:
        """The namespace end's RX counters (frames the kernel took from the TAP)."""
        info = json.loads(ip("-n", self.ns, "-s", "-j", "link", "show", self.tap.ifname))
        rx: dict[str, int] = info[0]["stats64"]["rx"]
        return rx


def make_setup(netns: str, vnet_hdr: bool) -> Iterator[Setup]:
    tap = TapBackend(f"pyvt{secrets.token_hex(4)}", vnet_hdr=vnet_hdr)
    try:
        ip("link", "set", tap.ifname, "netns", netns)
        ip("-n", netns, "link", "set", tap.ifname, "address", wire.mac_text(NS_MAC))
        ip("-n", netns, "addr", "add", "192.0.2.1/24", "dev", tap.ifname)
        ip("-n", netns, "link", "set", tap.ifname, "up")
        neighbour = ["192.0.2.2", "lladdr", wire.mac_text(OUR_MAC), "nud", "permanent"]
        ip("-n", netns, "neigh", "replace", *neighbour, "dev", tap.ifname)
        events = EventSources()
        received = Received()
        tap.start(events, received.deliver)
        yield Setup(tap, netns, events, received)
    finally:
        tap.close()


@pytest.fixture
def setup(netns: str) -> Iterator[Setup]:
    yield from make_setup(netns, vnet_hdr=True)


@pytest.fixture(params=[True, False], ids=["vnet_hdr", "plain"])
def any_setup(netns: str, request: pytest.FixtureRequest) -> Iterator[Setup]:
    yield from make_setup(netns, vnet_hdr=request.param)


# -- tests --------------------------------------------------------------------------------


def test_offload_flags_follow_the_guest_bits() -> None:
    csum, tso4, tso6 = 1 << wire.GUEST_CSUM, 1 << wire.GUEST_TSO4, 1 << wire.GUEST_TSO6
    ecn, uso4, uso6 = 1 << wire.GUEST_ECN, 1 << wire.GUEST_USO4, 1 << wire.GUEST_USO6
    uso = uso4 | uso6
    assert tun_offload_flags(0) == 0
    assert tun_offload_flags(csum) == TUN_F_CSUM
    assert tun_offload_flags(wire.GUEST_OFFLOAD_BITS) == (
        TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6 | TUN_F_TSO_ECN | TUN_F_UFO | TUN_F_USO4 | TUN_F_USO6
    )
    # The kernel refuses these combinations: they are left out, never sent.
    assert tun_offload_flags(tso4 | tso6) == 0
    assert tun_offload_flags(csum | ecn) == TUN_F_CSUM
    assert tun_offload_flags(csum | uso4) == TUN_F_CSUM
    assert tun_offload_flags(csum | tso4 | ecn) == TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO_ECN
    assert tun_offload_flags(csum | uso) == TUN_F_CSUM | TUN_F_USO4 | TUN_F_USO6


def test_bad_names_and_non_taps_are_refused_clearly() -> None:
    with pytest.raises(ValueError, match="interface name"):
        TapBackend("x" * 16)
    with pytest.raises(ValueError, match="interface name"):
        TapBackend("a b")
    # The loopback interface exists and is no TAP: the kernel refuses to attach.
    with pytest.raises(OSError, match="TAP lo: cannot attach"):
        TapBackend("lo")


def test_offloads_advertised(setup: Setup) -> None:
    assert setup.tap.tx_offloads == wire.HOST_OFFLOAD_BITS
    assert setup.tap.name == f"tap {setup.tap.ifname}"
    plain = TapBackend(f"pyvt{secrets.token_hex(4)}", vnet_hdr=False)
    try:
        assert plain.tx_offloads == 0
        assert plain.vnet_hdr is False
        plain.set_rx_offloads(wire.GUEST_OFFLOAD_BITS)  # no header to carry them: ignored
        assert plain.offload_flags == 0
    finally:
        plain.close()
    plain.close()  # closing twice is harmless
    assert plain.fileno() == -1


def test_arp_request_gets_a_reply(any_setup: Setup) -> None:
    s = any_setup
    s.tap.transmit(NetHdr(), arp_request(NS_IP))
    assert s.tap.tx_frames == 1

    def is_reply(hdr: NetHdr, frame: bytes) -> bool:
        return frame[12:14] == b"\x08\x06" and frame[20:22] == b"\x00\x02"

    assert pump(s.events, first(s.received, is_reply))
    hdr, frame = next((h, f) for h, f in s.received.frames if is_reply(h, f))
    assert frame[:6] == OUR_MAC and frame[6:12] == NS_MAC
    # Sender: the namespace's MAC and 192.0.2.1; target: us.
    assert frame[22:28] == NS_MAC and frame[28:32] == NS_IP
    assert frame[32:38] == OUR_MAC and frame[38:42] == OUR_IP
    assert hdr.gso_type == wire.GSO_NONE and hdr.flags == 0
    assert s.tap.rx_frames == len(s.received.frames)


def test_icmp_echo_gets_a_reply(any_setup: Setup) -> None:
    s = any_setup
    payload = bytes(range(256)) * 4
    s.tap.transmit(NetHdr(), icmp_echo(0x4242, 7, payload))

    def is_reply(hdr: NetHdr, frame: bytes) -> bool:
        p = Ipv4Frame.parse(frame)
        return p is not None and p.proto == 1 and p.l4[:1] == b"\x00"

    assert pump(s.events, first(s.received, is_reply))
    _, frame = next((h, f) for h, f in s.received.frames if is_reply(h, f))
    p = Ipv4Frame.parse(frame)
    assert p is not None
    assert (p.src, p.dst, frame[:6]) == (NS_IP, OUR_IP, OUR_MAC)
    assert struct.unpack_from("!HH", p.l4, 4) == (0x4242, 7)
    assert p.l4[8:] == payload
    assert checksum(p.l4) == 0


def test_gso_tcp_frame_with_partial_checksum_is_taken(setup: Setup) -> None:
    s = setup
    seq, mss, size = 1000, 1000, 3000
    payload = bytes(i & 0xFF for i in range(size))
    tcp_len = 20 + size
    # PSH without ACK, to a closed port: the kernel answers with an RST that acks
    # seq + the whole payload, which it only does if it took all of it.
    tcp = struct.pack("!HHIIBBHHH", 40000, 9, seq, 0, 5 << 4, 0x08, 65535, 0, 0)
    partial = ~checksum(pseudo_header(OUR_IP, NS_IP, 6, tcp_len)) & 0xFFFF
    tcp = tcp[:16] + struct.pack("!H", partial) + tcp[18:]
    frame = eth(NS_MAC, OUR_MAC, 0x0800, ipv4(6, OUR_IP, NS_IP, tcp + payload))
    hdr = NetHdr(
        flags=wire.HDR_F_NEEDS_CSUM,
        gso_type=wire.GSO_TCPV4,
        hdr_len=54,
        gso_size=mss,
        csum_start=34,
        csum_offset=16,
    )
    before = s.kernel_stats()
    s.tap.transmit(hdr, frame)
    assert s.tap.tx_frames == 1 and s.tap.dropped == 0, s.tap.last_error

    def is_rst(h: NetHdr, f: bytes) -> bool:
        p = Ipv4Frame.parse(f)
        return p is not None and p.proto == 6 and bool(p.l4[13] & 0x04)

    assert pump(s.events, first(s.received, is_rst))
    after = s.kernel_stats()
    assert after["packets"] == before["packets"] + 1
    assert after["bytes"] == before["bytes"] + len(frame)
    _, rst = next((h, f) for h, f in s.received.frames if is_rst(h, f))
    p = Ipv4Frame.parse(rst)
    assert p is not None
    ack = struct.unpack_from("!I", p.l4, 8)[0]
    assert ack == seq + size
    # No rx offloads asked for: the kernel hands over a fully checksummed frame.
    assert checksum(pseudo_header(p.src, p.dst, 6, len(p.l4)) + p.l4) == 0


SEND_UDP = """
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
if int(sys.argv[1]):
    s.setsockopt(socket.SOL_UDP, 103, int(sys.argv[1]))  # UDP_SEGMENT
s.sendto(bytes(i & 0xFF for i in range(int(sys.argv[2]))), ("192.0.2.2", 9999))
"""


def send_udp_from_ns(s: Setup, segment: int, size: int) -> None:
    done = in_ns(s.ns, sys.executable, "-c", SEND_UDP, str(segment), str(size))
    assert done.returncode == 0, done.stderr


def udp_frames(s: Setup) -> list[tuple[NetHdr, Ipv4Frame]]:
    out = []
    for h, f in s.received.frames:
        p = Ipv4Frame.parse(f)
        if p is not None and p.proto == 17 and p.l4[2:4] == struct.pack("!H", 9999):
            out.append((h, p))
    return out


def test_without_rx_offloads_the_kernel_segments_and_checksums(setup: Setup) -> None:
    s = setup
    s.tap.set_rx_offloads(0)
    assert s.tap.offload_flags == 0
    send_udp_from_ns(s, segment=1000, size=3000)
    assert pump(s.events, lambda: len(udp_frames(s)) >= 3)
    frames = udp_frames(s)
    assert [len(p.l4) for _, p in frames] == [1008, 1008, 1008]
    for h, p in frames:
        assert h.gso_type == wire.GSO_NONE and h.flags == 0
        assert checksum(pseudo_header(p.src, p.dst, 17, len(p.l4)) + p.l4) == 0


def test_rx_offloads_let_gso_and_partial_checksums_through(setup: Setup) -> None:
    s = setup
    bits = wire.GUEST_OFFLOAD_BITS
    s.tap.set_rx_offloads(bits)
    assert s.tap.offload_flags & TUN_F_CSUM
    # This kernel knows USO (6.2 and later): one datagram train, one frame.
    assert s.tap.offload_flags & TUN_F_USO4
    send_udp_from_ns(s, segment=1000, size=3000)
    assert pump(s.events, lambda: len(udp_frames(s)) >= 1)
    time.sleep(0.1)
    pump(s.events, lambda: False, timeout=0.2)
    [(h, p)] = udp_frames(s)
    assert h.gso_type == wire.GSO_UDP_L4 and h.gso_size == 1000
    assert h.flags & wire.HDR_F_NEEDS_CSUM
    assert (h.csum_start, h.csum_offset) == (34, 6)
    assert len(p.l4) == 8 + 3000
    assert p.l4[8:] == bytes(i & 0xFF for i in range(3000))

    # Checksum offload alone: a plain datagram comes with its checksum left to do.
    s.tap.set_rx_offloads(1 << wire.GUEST_CSUM)
    assert s.tap.offload_flags == TUN_F_CSUM
    s.received.frames.clear()
    send_udp_from_ns(s, segment=0, size=200)
    assert pump(s.events, lambda: len(udp_frames(s)) >= 1)
    [(h, p)] = udp_frames(s)
    assert h.gso_type == wire.GSO_NONE and h.flags == wire.HDR_F_NEEDS_CSUM
    assert (h.csum_start, h.csum_offset) == (34, 6)
    # What the kernel left in the field is the pseudo-header sum, not the checksum.
    stored = struct.unpack_from("!H", p.l4, 6)[0]
    assert stored == ~checksum(pseudo_header(p.src, p.dst, 17, len(p.l4))) & 0xFFFF


def test_deliver_refusing_counts_drops_and_stop_stops(setup: Setup) -> None:
    s = setup
    s.received.room = False
    s.tap.transmit(NetHdr(), arp_request(NS_IP))
    assert pump(s.events, lambda: s.tap.dropped >= 1)
    assert s.tap.rx_frames == 0 and s.received.frames == []
    s.tap.stop()
    assert s.tap.fileno() not in s.events.fds
    # Restarting is allowed (a device reset then going live again).
    s.received.room = True
    s.tap.start(s.events, s.received.deliver)
    s.tap.transmit(NetHdr(), arp_request(NS_IP))
    assert pump(s.events, lambda: s.tap.rx_frames >= 1)


def test_a_header_the_kernel_rejects_is_dropped_not_raised(setup: Setup) -> None:
    s = setup
    # csum_start beyond the frame: the kernel refuses the write with EINVAL.
    bad = NetHdr(flags=wire.HDR_F_NEEDS_CSUM, csum_start=5000, csum_offset=16)
    s.tap.transmit(bad, arp_request(NS_IP))
    assert s.tap.tx_frames == 0
    assert s.tap.dropped == 1 and s.tap.tx_errors == 1
    assert s.tap.last_error is not None
