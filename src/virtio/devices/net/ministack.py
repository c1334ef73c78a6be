"""A minimal IPv4 host over a frame link: enough to get a lease from a DHCP server and ping.

This is a tool for tests and examples ("get an address from QEMU's slirp and
ping the gateway"), not a network stack: no fragments, no routing beyond one
router, no TCP. The codecs are sans-IO (plain dataclasses with ``encode`` and
``parse``): Ethernet II, ARP, IPv4 (header checksum checked and set), ICMP
echo, UDP (pseudo-header checksum) and DHCP (RFC 2131 with the options 53,
50, 54, 1, 3, 6, 51 and 55). :class:`MiniHost` drives them over anything that
sends and receives whole frames (:class:`FrameLink`), such as a
:class:`~virtio.devices.net.driver.NetDriver` through :class:`NetDriverLink`::

    host = MiniHost(NetDriverLink(driver))
    lease = host.dhcp()                      # DISCOVER, OFFER, REQUEST, ACK
    gateway = lease.router or lease.server   # slirp with restrict=on sends no router
    host.resolve(gateway)                    # ARP
    host.ping(gateway)                       # ICMP echo, matched by id and sequence

A wait that runs out raises :class:`MiniStackError`; a frame that does not
parse (:class:`MalformedPacket`) is counted in ``MiniHost.malformed`` and
dropped. Checksums of received packets are always checked here, whatever
the device claims about them.
"""

from __future__ import annotations

import contextlib
import random
import struct
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Interface, IPv4Network
from typing import Protocol, TypeVar

from virtio.devices.net import wire as W
from virtio.devices.net.driver import NetDriver
from virtio.devices.net.offload import checksum

ETH_P_IP = 0x0800
ETH_P_ARP = 0x0806
ETH_MIN_FRAME = 60  # without the frame check sequence
PROTO_ICMP = 1
PROTO_UDP = 17
ARP_REQUEST = 1
ARP_REPLY = 2
ICMP_ECHO_REPLY = 0
ICMP_ECHO_REQUEST = 8
DHCP_SERVER_PORT = 67
DHCP_CLIENT_PORT = 68
ANY = IPv4Address(0)
LIMITED_BROADCAST = IPv4Address("255.255.255.255")

# DHCP (RFC 2131, RFC 2132)
BOOTREQUEST = 1
BOOTREPLY = 2
DHCP_MAGIC = b"\x63\x82\x53\x63"
DHCP_FLAG_BROADCAST = 0x8000
DHCPDISCOVER = 1
DHCPOFFER = 2
DHCPREQUEST = 3
DHCPACK = 5
DHCPNAK = 6
OPT_PAD = 0
OPT_SUBNET_MASK = 1
OPT_ROUTER = 3
OPT_DNS = 6
OPT_REQUESTED_ADDRESS = 50
OPT_LEASE_TIME = 51
OPT_MESSAGE_TYPE = 53
OPT_SERVER_ID = 54
OPT_PARAMETER_LIST = 55
OPT_END = 255
#: What the client asks the server for (option 55).
PARAMETERS = bytes([OPT_SUBNET_MASK, OPT_ROUTER, OPT_DNS, OPT_LEASE_TIME, OPT_SERVER_ID])

_ARP = struct.Struct(">HHBBH6s4s6s4s")
_IP4 = struct.Struct(">BBHHHBBH4s4s")
_ICMP_ECHO = struct.Struct(">BBHHH")
_UDP = struct.Struct(">HHHH")
_BOOTP = struct.Struct(">BBBBIHH4s4s4s4s16s64s128s")
_BOOTP_MIN = 300  # the smallest BOOTP message (RFC 951), which relays and old servers expect


class MiniStackError(RuntimeError):
    """A wait ran out (no answer), a server refused, or the host is not configured for it."""


class MalformedPacket(ValueError):
    """Bytes that do not parse as the packet asked for (short, bad checksum, wrong kind)."""


class FrameLink(Protocol):
    """Whole Ethernet frames in and out (no virtio-net header), and the link's address."""

    @property
    def mac(self) -> bytes: ...

    def send(self, frame: bytes) -> None: ...

    def receive(self, timeout: float) -> list[bytes]:
        """Frames that arrived, waiting up to ``timeout`` for the first; [] if none."""
        ...


# -- codecs ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Ethernet:
    dst: bytes
    src: bytes
    ethertype: int
    payload: bytes

    def encode(self) -> bytes:
        """The frame, zero-padded to the 60-byte minimum."""
        frame = self.dst + self.src + self.ethertype.to_bytes(2, "big") + self.payload
        return frame.ljust(ETH_MIN_FRAME, b"\0")

    @classmethod
    def parse(cls, frame: bytes) -> Ethernet:
        """An Ethernet II frame; the payload keeps any padding (the layer above trims it)."""
        if len(frame) < W.ETH_HLEN:
            raise MalformedPacket(f"a {len(frame)}-byte frame is shorter than an Ethernet header")
        return cls(frame[0:6], frame[6:12], int.from_bytes(frame[12:14], "big"), frame[14:])


@dataclass(frozen=True)
class Arp:
    """An ARP packet for IPv4 over Ethernet (RFC 826)."""

    op: int
    sha: bytes
    spa: IPv4Address
    tha: bytes
    tpa: IPv4Address

    def encode(self) -> bytes:
        return _ARP.pack(
            1, ETH_P_IP, 6, 4, self.op, self.sha, self.spa.packed, self.tha, self.tpa.packed
        )

    @classmethod
    def parse(cls, data: bytes) -> Arp:
        if len(data) < _ARP.size:
            raise MalformedPacket(f"a {len(data)}-byte ARP packet is shorter than {_ARP.size}")
        htype, ptype, hlen, plen, op, sha, spa, tha, tpa = _ARP.unpack_from(data)
        if (htype, ptype, hlen, plen) != (1, ETH_P_IP, 6, 4):
            raise MalformedPacket(f"not ARP for IPv4 over Ethernet ({htype}, {ptype:#06x})")
        return cls(op, sha, IPv4Address(spa), tha, IPv4Address(tpa))

    def answer(self, mac: bytes, address: IPv4Address | None) -> Arp | None:
        """The reply ``mac`` owes this packet if it asks for ``address``, else None."""
        if self.op != ARP_REQUEST or address is None or self.tpa != address:
            return None
        return Arp(ARP_REPLY, mac, address, self.sha, self.spa)


@dataclass(frozen=True)
class IPv4:
    """An IPv4 packet (RFC 791) without options or fragments when built here."""

    src: IPv4Address
    dst: IPv4Address
    proto: int
    payload: bytes
    ttl: int = 64
    ident: int = 0

    def encode(self) -> bytes:
        total = 20 + len(self.payload)
        if total > 0xFFFF:
            raise ValueError(f"a {total}-byte IPv4 packet is too long")
        fields = (0x45, 0, total, self.ident, 0x4000, self.ttl, self.proto, 0)
        header = bytearray(_IP4.pack(*fields, self.src.packed, self.dst.packed))
        header[10:12] = checksum(header).to_bytes(2, "big")
        return bytes(header) + self.payload

    @classmethod
    def parse(cls, data: bytes) -> IPv4:
        """A whole, unfragmented packet with a right header checksum; trailing padding dropped."""
        if len(data) < 20:
            raise MalformedPacket(f"a {len(data)}-byte IPv4 packet is shorter than its header")
        vihl, _tos, total, ident, frag, ttl, proto, _sum, src, dst = _IP4.unpack_from(data)
        ihl = (vihl & 0xF) * 4
        if vihl >> 4 != 4 or ihl < 20:
            raise MalformedPacket(f"not an IPv4 header (version/IHL byte {vihl:#04x})")
        if not ihl <= total <= len(data):
            raise MalformedPacket(f"IPv4 total length {total} with {len(data)} bytes at hand")
        if checksum(data[:ihl]) != 0:
            raise MalformedPacket("wrong IPv4 header checksum")
        if frag & 0x3FFF:
            raise MalformedPacket("a fragment (not reassembled here)")
        return cls(IPv4Address(src), IPv4Address(dst), proto, data[ihl:total], ttl, ident)


@dataclass(frozen=True)
class IcmpEcho:
    """An ICMP echo request (type 8) or reply (type 0)."""

    type: int
    ident: int
    seq: int
    payload: bytes = b""

    def encode(self) -> bytes:
        message = bytearray(_ICMP_ECHO.pack(self.type, 0, 0, self.ident, self.seq) + self.payload)
        message[2:4] = checksum(message).to_bytes(2, "big")
        return bytes(message)

    @classmethod
    def parse(cls, data: bytes) -> IcmpEcho:
        if len(data) < _ICMP_ECHO.size:
            raise MalformedPacket(f"a {len(data)}-byte ICMP message is too short")
        if checksum(data) != 0:
            raise MalformedPacket("wrong ICMP checksum")
        kind, code, _sum, ident, seq = _ICMP_ECHO.unpack_from(data)
        if kind not in (ICMP_ECHO_REQUEST, ICMP_ECHO_REPLY) or code != 0:
            raise MalformedPacket(f"ICMP type {kind} code {code} is not an echo")
        return cls(kind, ident, seq, data[_ICMP_ECHO.size :])

    def reply(self) -> IcmpEcho:
        return IcmpEcho(ICMP_ECHO_REPLY, self.ident, self.seq, self.payload)


def _pseudo_header(src: IPv4Address, dst: IPv4Address, proto: int, length: int) -> bytes:
    return src.packed + dst.packed + bytes([0, proto]) + length.to_bytes(2, "big")


@dataclass(frozen=True)
class Udp:
    sport: int
    dport: int
    payload: bytes

    def encode(self, src: IPv4Address, dst: IPv4Address) -> bytes:
        """The datagram with its checksum over the IPv4 pseudo-header of ``src`` → ``dst``."""
        length = _UDP.size + len(self.payload)
        datagram = bytearray(_UDP.pack(self.sport, self.dport, length, 0) + self.payload)
        value = checksum(_pseudo_header(src, dst, PROTO_UDP, length) + datagram)
        datagram[6:8] = (value or 0xFFFF).to_bytes(2, "big")  # 0 means "no checksum"
        return bytes(datagram)

    @classmethod
    def parse(cls, data: bytes, src: IPv4Address, dst: IPv4Address) -> Udp:
        if len(data) < _UDP.size:
            raise MalformedPacket(f"a {len(data)}-byte UDP datagram is too short")
        sport, dport, length, value = _UDP.unpack_from(data)
        if not _UDP.size <= length <= len(data):
            raise MalformedPacket(f"UDP length {length} with {len(data)} bytes at hand")
        datagram = data[:length]
        if value and checksum(_pseudo_header(src, dst, PROTO_UDP, length) + datagram) != 0:
            raise MalformedPacket("wrong UDP checksum")
        return cls(sport, dport, datagram[_UDP.size :])


def _addresses(raw: bytes) -> tuple[IPv4Address, ...]:
    if not raw or len(raw) % 4:
        raise MalformedPacket(f"a {len(raw)}-byte DHCP option is not a list of addresses")
    return tuple(IPv4Address(raw[i : i + 4]) for i in range(0, len(raw), 4))


@dataclass(frozen=True)
class Dhcp:
    """A DHCP message (BOOTP with the magic cookie and options; RFC 2131, RFC 2132)."""

    op: int
    xid: int
    chaddr: bytes
    options: Mapping[int, bytes] = field(default_factory=dict)
    flags: int = 0
    secs: int = 0
    ciaddr: IPv4Address = ANY
    yiaddr: IPv4Address = ANY
    siaddr: IPv4Address = ANY
    giaddr: IPv4Address = ANY

    def encode(self) -> bytes:
        head = (self.op, 1, 6, 0, self.xid, self.secs, self.flags)
        addresses = (a.packed for a in (self.ciaddr, self.yiaddr, self.siaddr, self.giaddr))
        fixed = _BOOTP.pack(*head, *addresses, self.chaddr, b"", b"")
        options = bytearray(DHCP_MAGIC)
        for code, value in self.options.items():
            if not 0 < code < OPT_END or len(value) > 255:
                raise ValueError(f"DHCP option {code} of {len(value)} bytes cannot be encoded")
            options += bytes([code, len(value)]) + value
        options.append(OPT_END)
        return (fixed + bytes(options)).ljust(_BOOTP_MIN, b"\0")

    @classmethod
    def parse(cls, data: bytes) -> Dhcp:
        if len(data) < _BOOTP.size + len(DHCP_MAGIC):
            raise MalformedPacket(f"a {len(data)}-byte BOOTP message is too short")
        fixed = _BOOTP.unpack_from(data)
        op, htype, hlen, _hops, xid, secs, flags = fixed[:7]
        ci, yi, si, gi = (IPv4Address(raw) for raw in fixed[7:11])
        chaddr = fixed[11]
        if (htype, hlen) != (1, 6):
            raise MalformedPacket(f"hardware type {htype}/length {hlen} is not Ethernet")
        at = _BOOTP.size
        if data[at : at + 4] != DHCP_MAGIC:
            raise MalformedPacket("no DHCP magic cookie")
        at += 4
        options: dict[int, bytes] = {}
        while at < len(data):
            code = data[at]
            if code == OPT_END:
                break
            if code == OPT_PAD:
                at += 1
                continue
            if at + 2 > len(data) or at + 2 + data[at + 1] > len(data):
                raise MalformedPacket(f"DHCP option {code} runs past the message")
            length = data[at + 1]
            # RFC 3396: a repeated option continues the first.
            options[code] = options.get(code, b"") + data[at + 2 : at + 2 + length]
            at += 2 + length
        else:
            raise MalformedPacket("DHCP options without an end option")
        return cls(op, xid, chaddr[:6], options, flags, secs, ci, yi, si, gi)

    @property
    def message_type(self) -> int | None:
        raw = self.options.get(OPT_MESSAGE_TYPE)
        return raw[0] if raw is not None and len(raw) == 1 else None

    @property
    def server_id(self) -> IPv4Address | None:
        raw = self.options.get(OPT_SERVER_ID)
        return None if raw is None else _addresses(raw)[0]


def dhcp_discover(mac: bytes, xid: int) -> Dhcp:
    """A DHCPDISCOVER asking for broadcast replies (the client has no address to be sent to)."""
    options = {OPT_MESSAGE_TYPE: bytes([DHCPDISCOVER]), OPT_PARAMETER_LIST: PARAMETERS}
    return Dhcp(BOOTREQUEST, xid, mac, options, flags=DHCP_FLAG_BROADCAST)


def dhcp_request(mac: bytes, xid: int, offer: Dhcp) -> Dhcp:
    """The DHCPREQUEST that takes ``offer`` (its address, option 50; its server, option 54)."""
    server = offer.server_id
    if server is None:
        raise MalformedPacket("a DHCPOFFER without a server identifier (option 54)")
    options = {
        OPT_MESSAGE_TYPE: bytes([DHCPREQUEST]),
        OPT_REQUESTED_ADDRESS: offer.yiaddr.packed,
        OPT_SERVER_ID: server.packed,
        OPT_PARAMETER_LIST: PARAMETERS,
    }
    return Dhcp(BOOTREQUEST, xid, mac, options, flags=DHCP_FLAG_BROADCAST)


@dataclass(frozen=True)
class DhcpLease:
    address: IPv4Address
    netmask: IPv4Address
    router: IPv4Address | None
    dns: tuple[IPv4Address, ...]
    server: IPv4Address
    lease_time: int | None

    @property
    def network(self) -> IPv4Network:
        return IPv4Interface(f"{self.address}/{self.netmask}").network

    @classmethod
    def from_ack(cls, ack: Dhcp) -> DhcpLease:
        server = ack.server_id
        mask = ack.options.get(OPT_SUBNET_MASK)
        if server is None or mask is None:
            raise MalformedPacket("a DHCPACK without a server identifier or a subnet mask")
        routers = ack.options.get(OPT_ROUTER)
        dns = ack.options.get(OPT_DNS)
        lease = ack.options.get(OPT_LEASE_TIME)
        if lease is not None and len(lease) != 4:
            raise MalformedPacket(f"a {len(lease)}-byte lease time (option 51)")
        return cls(
            address=ack.yiaddr,
            netmask=_addresses(mask)[0],
            router=None if routers is None else _addresses(routers)[0],
            dns=() if dns is None else _addresses(dns),
            server=server,
            lease_time=None if lease is None else int.from_bytes(lease, "big"),
        )


# -- whole frames ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Packet:
    """A received frame, decoded as far as this stack goes."""

    eth: Ethernet
    arp: Arp | None = None
    ip: IPv4 | None = None
    icmp: IcmpEcho | None = None
    udp: Udp | None = None


def decode(frame: bytes) -> Packet:
    """Ethernet, then ARP or IPv4, then ICMP echo or UDP; other payloads stay undecoded."""
    eth = Ethernet.parse(frame)
    if eth.ethertype == ETH_P_ARP:
        return Packet(eth, arp=Arp.parse(eth.payload))
    if eth.ethertype != ETH_P_IP:
        return Packet(eth)
    ip = IPv4.parse(eth.payload)
    if ip.proto == PROTO_UDP:
        return Packet(eth, ip=ip, udp=Udp.parse(ip.payload, ip.src, ip.dst))
    if ip.proto == PROTO_ICMP and ip.payload[:1] in (b"\x00", b"\x08"):
        return Packet(eth, ip=ip, icmp=IcmpEcho.parse(ip.payload))
    return Packet(eth, ip=ip)


def arp_frame(src_mac: bytes, dst_mac: bytes, arp: Arp) -> bytes:
    return Ethernet(dst_mac, src_mac, ETH_P_ARP, arp.encode()).encode()


def ip_frame(src_mac: bytes, dst_mac: bytes, ip: IPv4) -> bytes:
    return Ethernet(dst_mac, src_mac, ETH_P_IP, ip.encode()).encode()


def udp_frame(
    src_mac: bytes, dst_mac: bytes, src: IPv4Address, dst: IPv4Address, udp: Udp, *, ident: int = 0
) -> bytes:
    return ip_frame(src_mac, dst_mac, IPv4(src, dst, PROTO_UDP, udp.encode(src, dst), ident=ident))


# -- the host -------------------------------------------------------------------------------

T = TypeVar("T")


class MiniHost:
    """One IPv4 address on a :class:`FrameLink`: DHCP, ARP, ping and UDP, one wait at a time.

    While it waits for something, the host answers ARP requests for its address
    and echo requests to it; frames nobody waited for are kept (``backlog``, the
    last 256) for a later wait to find.
    """

    def __init__(
        self,
        link: FrameLink,
        *,
        interface: IPv4Interface | None = None,
        router: IPv4Address | None = None,
    ) -> None:
        self.link = link
        self.address: IPv4Address | None = None if interface is None else interface.ip
        self.network: IPv4Network | None = None if interface is None else interface.network
        self.router = router
        self.lease: DhcpLease | None = None
        self.neighbours: dict[IPv4Address, bytes] = {}
        self.backlog: deque[Packet] = deque(maxlen=256)
        #: Frames dropped because they did not parse (a wrong checksum, say).
        self.malformed = 0
        self._ident = random.getrandbits(16)

    @property
    def mac(self) -> bytes:
        return self.link.mac

    # -- the sans-IO core -----------------------------------------------------------------

    def accepts(self, packet: Packet) -> bool:
        dst = packet.eth.dst
        return dst == self.mac or dst == W.BROADCAST

    def react(self, packet: Packet) -> list[bytes]:
        """Learn from ``packet`` and return the frames it calls for (ARP and echo replies)."""
        if packet.arp is not None:
            arp = packet.arp
            if arp.spa != ANY and (arp.tpa == self.address or arp.spa in self.neighbours):
                self.neighbours[arp.spa] = arp.sha
            answer = arp.answer(self.mac, self.address)
            return [] if answer is None else [arp_frame(self.mac, arp.sha, answer)]
        ip, icmp = packet.ip, packet.icmp
        if (
            ip is not None
            and icmp is not None
            and icmp.type == ICMP_ECHO_REQUEST
            and self.address is not None
            and ip.dst == self.address
        ):
            reply = IPv4(
                self.address, ip.src, PROTO_ICMP, icmp.reply().encode(), ident=self._next()
            )
            return [ip_frame(self.mac, packet.eth.src, reply)]
        return []

    def _next(self) -> int:
        self._ident = (self._ident + 1) & 0xFFFF
        return self._ident

    # -- waiting ----------------------------------------------------------------------------

    def poll(self, timeout: float) -> list[Packet]:
        """Receive for up to ``timeout``: the packets for this host, answered where due."""
        out = []
        for frame in self.link.receive(timeout):
            try:
                packet = decode(frame)
            except MalformedPacket:
                self.malformed += 1
                continue
            if not self.accepts(packet):
                continue
            for reply in self.react(packet):
                self.link.send(reply)
            out.append(packet)
        return out

    def wait_for(self, match: Callable[[Packet], T | None], timeout: float, what: str) -> T:
        """The first non-None ``match(packet)`` (the backlog first); MiniStackError at ``timeout``."""
        for packet in list(self.backlog):
            found = match(packet)
            if found is not None:
                self.backlog.remove(packet)
                return found
        deadline = time.monotonic() + timeout
        while (remaining := deadline - time.monotonic()) > 0:
            packets = self.poll(remaining)
            for i, packet in enumerate(packets):
                found = match(packet)
                if found is not None:
                    self.backlog.extend(packets[i + 1 :])
                    return found
                self.backlog.append(packet)
        raise MiniStackError(f"no {what} within {timeout:g}s")

    def _exchange(
        self,
        send: Callable[[], None],
        match: Callable[[Packet], T | None],
        timeout: float,
        attempts: int,
        what: str,
    ) -> T:
        """``send()`` and wait, up to ``attempts`` times within ``timeout`` in all."""
        if attempts < 1:
            raise ValueError("attempts must be at least 1")
        for _ in range(attempts):
            send()
            with contextlib.suppress(MiniStackError):
                return self.wait_for(match, timeout / attempts, what)
        raise MiniStackError(f"no {what} within {timeout:g}s ({attempts} sent)")

    # -- DHCP -----------------------------------------------------------------------------

    def dhcp(self, *, timeout: float = 6.0, attempts: int = 3, xid: int | None = None) -> DhcpLease:
        """Get a lease (DISCOVER → OFFER → REQUEST → ACK) and take its address and router.

        Each of the two exchanges sends up to ``attempts`` times within ``timeout``.
        """
        xid = random.getrandbits(32) if xid is None else xid
        mac = self.mac

        def reply(kinds: tuple[int, ...]) -> Callable[[Packet], Dhcp | None]:
            def match(packet: Packet) -> Dhcp | None:
                udp = packet.udp
                if udp is None or (udp.sport, udp.dport) != (DHCP_SERVER_PORT, DHCP_CLIENT_PORT):
                    return None
                try:
                    message = Dhcp.parse(udp.payload)
                except MalformedPacket:
                    self.malformed += 1
                    return None
                if message.op != BOOTREPLY or message.xid != xid or message.chaddr != mac:
                    return None
                return message if message.message_type in kinds else None

            return match

        def broadcast(message: Dhcp) -> Callable[[], None]:
            udp = Udp(DHCP_CLIENT_PORT, DHCP_SERVER_PORT, message.encode())
            frame = udp_frame(mac, W.BROADCAST, ANY, LIMITED_BROADCAST, udp, ident=self._next())
            return lambda: self.link.send(frame)

        send = broadcast(dhcp_discover(mac, xid))
        offer = self._exchange(send, reply((DHCPOFFER,)), timeout, attempts, "DHCPOFFER")
        send = broadcast(dhcp_request(mac, xid, offer))
        what = "DHCPACK"
        ack = self._exchange(send, reply((DHCPACK, DHCPNAK)), timeout, attempts, what)
        if ack.message_type == DHCPNAK:
            raise MiniStackError(f"the DHCP server {ack.server_id} refused {offer.yiaddr} (NAK)")
        lease = DhcpLease.from_ack(ack)
        self.lease = lease
        self.address, self.network, self.router = lease.address, lease.network, lease.router
        return lease

    # -- ARP, ICMP, UDP -----------------------------------------------------------------------

    def _source(self) -> IPv4Address:
        if self.address is None:
            raise MiniStackError("the host has no address (call dhcp() or give an interface)")
        return self.address

    def resolve(self, address: IPv4Address, *, timeout: float = 3.0, attempts: int = 3) -> bytes:
        """The MAC of neighbour ``address``, asked by ARP (answers are cached)."""
        known = self.neighbours.get(address)
        if known is not None:
            return known
        request = Arp(ARP_REQUEST, self.mac, self._source(), bytes(6), address)
        frame = arp_frame(self.mac, W.BROADCAST, request)

        def match(packet: Packet) -> bytes | None:
            arp = packet.arp
            if arp is None or arp.op != ARP_REPLY or arp.spa != address:
                return None
            return arp.sha

        mac = self._exchange(
            lambda: self.link.send(frame), match, timeout, attempts, f"ARP reply from {address}"
        )
        self.neighbours[address] = mac
        return mac

    def next_hop(self, dst: IPv4Address) -> IPv4Address:
        if self.network is not None and dst in self.network:
            return dst
        if self.router is None:
            raise MiniStackError(f"{dst} is off-link and the host has no router")
        return self.router

    def ping(
        self,
        dst: IPv4Address,
        *,
        seq: int = 1,
        ident: int | None = None,
        payload: bytes = b"pyvirtio ministack",
        timeout: float = 3.0,
        attempts: int = 3,
    ) -> IcmpEcho:
        """Send echo requests to ``dst`` until the reply with this id and sequence comes."""
        src = self._source()
        ident = self._next() if ident is None else ident
        dst_mac = self.resolve(self.next_hop(dst), timeout=timeout)
        echo = IcmpEcho(ICMP_ECHO_REQUEST, ident, seq, payload).encode()

        def send() -> None:
            self.link.send(ip_frame(self.mac, dst_mac, IPv4(src, dst, PROTO_ICMP, echo)))

        def match(packet: Packet) -> IcmpEcho | None:
            icmp, ip = packet.icmp, packet.ip
            if icmp is None or ip is None or ip.src != dst or ip.dst != src:
                return None
            if (icmp.type, icmp.ident, icmp.seq) != (ICMP_ECHO_REPLY, ident, seq):
                return None
            return icmp

        return self._exchange(send, match, timeout, attempts, f"echo reply from {dst}")

    def send_udp(self, dst: IPv4Address, sport: int, dport: int, payload: bytes) -> None:
        src = self._source()
        dst_mac = W.BROADCAST if dst == LIMITED_BROADCAST else self.resolve(self.next_hop(dst))
        udp = Udp(sport, dport, payload)
        self.link.send(udp_frame(self.mac, dst_mac, src, dst, udp, ident=self._next()))

    def receive_udp(self, port: int, *, timeout: float = 3.0) -> tuple[IPv4Address, Udp]:
        """The next datagram to ``port``, with its sender's address."""

        def match(packet: Packet) -> tuple[IPv4Address, Udp] | None:
            if packet.udp is None or packet.ip is None or packet.udp.dport != port:
                return None
            return packet.ip.src, packet.udp

        return self.wait_for(match, timeout, f"UDP datagram to port {port}")


# -- a NetDriver as a frame link ------------------------------------------------------------


class NetDriverLink:
    """A started :class:`NetDriver` as a :class:`FrameLink`.

    The virtio-net header of each received frame is kept in ``rx_headers``
    (the last ``keep_headers``), for tests to look at.
    """

    def __init__(
        self, driver: NetDriver, *, keep_headers: int = 256, send_timeout: float = 1.0
    ) -> None:
        self.driver = driver
        self.send_timeout = send_timeout
        self.rx_headers: deque[W.NetHdr] = deque(maxlen=keep_headers)

    @property
    def mac(self) -> bytes:
        return self.driver.mac

    def send(self, frame: bytes) -> None:
        driver = self.driver
        # Every transmit slot in use: wait for the device to give some back.
        if not driver.transport.wait_until(lambda: driver.send(frame), self.send_timeout):
            raise MiniStackError(f"no transmit slot came free within {self.send_timeout:g}s")

    def receive(self, timeout: float) -> list[bytes]:
        frames = []
        for hdr, frame in self.driver.receive(timeout):
            self.rx_headers.append(hdr)
            frames.append(frame)
        return frames
