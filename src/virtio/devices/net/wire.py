"""virtio-net's wire format: the packet header, the configuration space, control commands.

Everything here is plain data and codecs, shared by the device model, the
driver, the host sides and the tests. The header's size depends on the
negotiated features (:func:`header_size`): 10 bytes on a legacy interface
without VIRTIO_NET_F_MRG_RXBUF, 12 with ``num_buffers`` (always present with
VIRTIO_F_VERSION_1), 20 with the hash report fields, 24 with the UDP tunnel
offsets and 32 with the outer network header / IPsec fields.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from virtio.layout import ByteOrder
from virtio.spec import features as F

# -- feature bits (spec 5.1.3), as plain ints -----------------------------------
CSUM = 0
GUEST_CSUM = 1
CTRL_GUEST_OFFLOADS = 2
MTU = 3
MAC = 5
GUEST_TSO4 = 7
GUEST_TSO6 = 8
GUEST_ECN = 9
GUEST_UFO = 10
HOST_TSO4 = 11
HOST_TSO6 = 12
HOST_ECN = 13
HOST_UFO = 14
MRG_RXBUF = 15
STATUS = 16
CTRL_VQ = 17
CTRL_RX = 18
CTRL_VLAN = 19
CTRL_RX_EXTRA = 20
GUEST_ANNOUNCE = 21
MQ = 22
CTRL_MAC_ADDR = 23
DEVICE_STATS = 50
HASH_TUNNEL = 51
VQ_NOTF_COAL = 52
NOTF_COAL = 53
GUEST_USO4 = 54
GUEST_USO6 = 55
HOST_USO = 56
HASH_REPORT = 57
GUEST_HDRLEN = 59
RSS = 60
RSC_EXT = 61
STANDBY = 62
SPEED_DUPLEX = 63
RSS_CONTEXT = 64
GUEST_UDP_TUNNEL_GSO = 65
GUEST_UDP_TUNNEL_GSO_CSUM = 66
HOST_UDP_TUNNEL_GSO = 67
HOST_UDP_TUNNEL_GSO_CSUM = 68
OUT_NET_HEADER = 69
IPSEC = 70
#: Legacy-only: the device handles GSO of any kind (never offered here).
GSO_LEGACY = 6

#: Offloads the driver receives (guest side), as a mask of feature bits.
GUEST_OFFLOAD_BITS = (
    1 << GUEST_CSUM
    | 1 << GUEST_TSO4
    | 1 << GUEST_TSO6
    | 1 << GUEST_ECN
    | 1 << GUEST_UFO
    | 1 << GUEST_USO4
    | 1 << GUEST_USO6
)
#: Offloads the device performs on transmit (host side).
HOST_OFFLOAD_BITS = (
    1 << CSUM | 1 << HOST_TSO4 | 1 << HOST_TSO6 | 1 << HOST_ECN | 1 << HOST_UFO | 1 << HOST_USO
)

# -- the packet header ------------------------------------------------------------
HDR_F_NEEDS_CSUM = 1
HDR_F_DATA_VALID = 2
HDR_F_RSC_INFO = 4
HDR_F_UDP_TUNNEL_CSUM = 8

GSO_NONE = 0
GSO_TCPV4 = 1
GSO_UDP = 3
GSO_TCPV6 = 4
GSO_UDP_L4 = 5
GSO_UDP_TUNNEL_IPV4 = 0x20
GSO_UDP_TUNNEL_IPV6 = 0x40
GSO_ECN = 0x80
GSO_TUNNEL_BITS = GSO_UDP_TUNNEL_IPV4 | GSO_UDP_TUNNEL_IPV6
#: The GSO kinds with their names (without the ECN and tunnel bits).
GSO_NAMES = {
    GSO_NONE: "none",
    GSO_TCPV4: "tcpv4",
    GSO_UDP: "udp",
    GSO_TCPV6: "tcpv6",
    GSO_UDP_L4: "udp_l4",
}

ETH_HLEN = 14
#: Largest frame a GSO offload may hand over (spec: 14 + 40 + 65535).
MAX_GSO_FRAME = 65589


@dataclass
class NetHdr:
    """``struct virtio_net_hdr``, every field; those a header size leaves out stay 0."""

    flags: int = 0
    gso_type: int = GSO_NONE
    hdr_len: int = 0
    gso_size: int = 0
    csum_start: int = 0
    csum_offset: int = 0
    num_buffers: int = 0
    hash_value: int = 0
    hash_report: int = 0
    outer_th_offset: int = 0
    inner_nh_offset: int = 0
    outer_nh_offset: int = 0

    @property
    def gso_kind(self) -> int:
        """``gso_type`` without the ECN and UDP tunnel bits."""
        return self.gso_type & ~(GSO_ECN | GSO_TUNNEL_BITS)

    @property
    def needs_csum(self) -> bool:
        return bool(self.flags & HDR_F_NEEDS_CSUM)

    @property
    def data_valid(self) -> bool:
        return bool(self.flags & HDR_F_DATA_VALID)


_HDR_LE = struct.Struct("<BBHHHHHIHHHHH6x")
_HDR_BE = struct.Struct(">BBHHHHHIHHHHH6x")
assert _HDR_LE.size == 32


def header_size(features: int, *, legacy: bool = False) -> int:
    """The header's size in bytes with these negotiated features."""

    def has(bit: int) -> bool:
        return bool(features >> bit & 1)

    if has(OUT_NET_HEADER) or has(IPSEC):
        return 32
    if has(HOST_UDP_TUNNEL_GSO) or has(GUEST_UDP_TUNNEL_GSO):
        return 24
    if has(HASH_REPORT):
        return 20
    if legacy and not has(MRG_RXBUF) and not has(F.VIRTIO_F_VERSION_1):
        return 10
    return 12


def decode_header(data: bytes | memoryview, size: int, order: ByteOrder = "little") -> NetHdr:
    """The header in the first ``size`` bytes of ``data`` (``len(data) >= size``)."""
    raw = bytes(data[:size]).ljust(32, b"\0")
    codec = _HDR_LE if order == "little" else _HDR_BE
    (flags, gso, hdr_len, gso_size, cs, co, nb, hv, hr, _pad, oth, inh, onh) = codec.unpack(raw)
    return NetHdr(flags, gso, hdr_len, gso_size, cs, co, nb, hv, hr, oth, inh, onh)


def encode_header(hdr: NetHdr, size: int, order: ByteOrder = "little") -> bytes:
    """The first ``size`` bytes of the header's encoding."""
    codec = _HDR_LE if order == "little" else _HDR_BE
    return codec.pack(
        hdr.flags,
        hdr.gso_type,
        hdr.hdr_len,
        hdr.gso_size,
        hdr.csum_start,
        hdr.csum_offset,
        hdr.num_buffers,
        hdr.hash_value,
        hdr.hash_report,
        0,
        hdr.outer_th_offset,
        hdr.inner_nh_offset,
        hdr.outer_nh_offset,
    )[:size]


# -- configuration space (spec 5.1.4) ---------------------------------------------
S_LINK_UP = 1
S_ANNOUNCE = 2

CONFIG_SIZE = 28
CFG_MAC = 0
CFG_STATUS = 6
CFG_MAX_PAIRS = 8
CFG_MTU = 10
CFG_SPEED = 12
CFG_DUPLEX = 16
CFG_RSS_MAX_KEY = 17
CFG_RSS_MAX_TABLE = 18
CFG_HASH_TYPES = 20
CFG_TUNNEL_TYPES = 24

SPEED_UNKNOWN = 0xFFFFFFFF
DUPLEX_FULL = 0x00
DUPLEX_HALF = 0x01
DUPLEX_UNKNOWN = 0xFF

# -- hash types (spec 5.1.6.4.3.1) and hash reports --------------------------------
HASH_TYPE_IPV4 = 1 << 0
HASH_TYPE_TCPV4 = 1 << 1
HASH_TYPE_UDPV4 = 1 << 2
HASH_TYPE_IPV6 = 1 << 3
HASH_TYPE_TCPV6 = 1 << 4
HASH_TYPE_UDPV6 = 1 << 5
HASH_TYPE_IP_EX = 1 << 6
HASH_TYPE_TCP_EX = 1 << 7
HASH_TYPE_UDP_EX = 1 << 8
HASH_TYPES_ALL = (1 << 9) - 1

HASH_REPORT_NONE = 0
HASH_REPORT_IPV4 = 1
HASH_REPORT_TCPV4 = 2
HASH_REPORT_UDPV4 = 3
HASH_REPORT_IPV6 = 4
HASH_REPORT_TCPV6 = 5
HASH_REPORT_UDPV6 = 6
HASH_REPORT_IPV6_EX = 7
HASH_REPORT_TCPV6_EX = 8
HASH_REPORT_UDPV6_EX = 9

# -- the control queue (spec 5.1.6.5) ------------------------------------------------
OK = 0
ERR = 1

CTRL_RX_CLASS = 0
RX_PROMISC = 0
RX_ALLMULTI = 1
RX_ALLUNI = 2
RX_NOMULTI = 3
RX_NOUNI = 4
RX_NOBCAST = 5

CTRL_MAC_CLASS = 1
MAC_TABLE_SET = 0
MAC_ADDR_SET = 1

CTRL_VLAN_CLASS = 2
VLAN_ADD = 0
VLAN_DEL = 1

CTRL_ANNOUNCE_CLASS = 3
ANNOUNCE_ACK = 0

CTRL_MQ_CLASS = 4
MQ_VQ_PAIRS_SET = 0
MQ_RSS_CONFIG = 1
MQ_HASH_CONFIG = 2
MQ_VQ_PAIRS_MIN = 1
MQ_VQ_PAIRS_MAX = 0x8000

CTRL_GUEST_OFFLOADS_CLASS = 5
GUEST_OFFLOADS_SET = 0

CTRL_NOTF_COAL_CLASS = 6
NOTF_COAL_TX_SET = 0
NOTF_COAL_RX_SET = 1
NOTF_COAL_VQ_SET = 2
NOTF_COAL_VQ_GET = 3

CTRL_HASH_TUNNEL_CLASS = 7
HASH_TUNNEL_SET = 0

CTRL_STATS_CLASS = 8
STATS_QUERY = 0
STATS_GET = 1

CTRL_RSS_CTX_CLASS = 9
RSS_CTX_CAP_GET = 0
RSS_CTX_ADD = 1
RSS_CTX_MOD = 2
RSS_CTX_DEL = 3

# -- encapsulation types for inner header hash (supported/enabled_tunnel_types) --------
HASH_TUNNEL_TYPE_GRE_2784 = 1 << 0
HASH_TUNNEL_TYPE_GRE_2890 = 1 << 1
HASH_TUNNEL_TYPE_GRE_7676 = 1 << 2
HASH_TUNNEL_TYPE_GRE_UDP = 1 << 3
HASH_TUNNEL_TYPE_VXLAN = 1 << 4
HASH_TUNNEL_TYPE_VXLAN_GPE = 1 << 5
HASH_TUNNEL_TYPE_GENEVE = 1 << 6
HASH_TUNNEL_TYPE_IPIP = 1 << 7
HASH_TUNNEL_TYPE_NVGRE = 1 << 8
#: Every encapsulation type the spec documents.
HASH_TUNNEL_TYPES_ALL = (1 << 9) - 1

# -- device statistics (VIRTIO_NET_CTRL_STATS) -----------------------------------------
STATS_TYPE_RX_BASIC = 1 << 0
STATS_TYPE_RX_CSUM = 1 << 1
STATS_TYPE_RX_GSO = 1 << 2
STATS_TYPE_RX_SPEED = 1 << 3
STATS_TYPE_TX_BASIC = 1 << 16
STATS_TYPE_TX_CSUM = 1 << 17
STATS_TYPE_TX_GSO = 1 << 18
STATS_TYPE_TX_SPEED = 1 << 19
STATS_TYPE_CVQ = 1 << 32
#: The bits of each queue kind (receiveq: 0..15, transmitq: 16..31, controlq: 32).
STATS_TYPES_RX = 0xFFFF
STATS_TYPES_TX = 0xFFFF << 16
STATS_TYPES_CVQ = STATS_TYPE_CVQ

# The reply header's ``type``: the bit number of the type.
STATS_REPLY_RX_BASIC = 0
STATS_REPLY_RX_CSUM = 1
STATS_REPLY_RX_GSO = 2
STATS_REPLY_RX_SPEED = 3
STATS_REPLY_TX_BASIC = 16
STATS_REPLY_TX_CSUM = 17
STATS_REPLY_TX_GSO = 18
STATS_REPLY_TX_SPEED = 19
STATS_REPLY_CVQ = 32

#: The largest control command payload the device accepts (a full MAC table of
#: unicast and multicast entries fits well below; anything larger is hostile).
MAX_CTRL_PAYLOAD = 1 << 16


def queue_role(index: int, pairs: int, ctrl: bool) -> str:
    """``receiveq1``, ``transmitq1``, ..., ``controlq``: the name of a queue index."""
    if index < 2 * pairs:
        kind = "receiveq" if index % 2 == 0 else "transmitq"
        return f"{kind}{index // 2 + 1}"
    if ctrl and index == 2 * pairs:
        return "controlq"
    return f"queue{index} (none)"


def mac_text(mac: bytes) -> str:
    return ":".join(f"{b:02x}" for b in mac)


def parse_mac(text: str) -> bytes:
    """``52:54:00:12:34:56`` as 6 bytes; ValueError for anything else."""
    parts = text.split(":")
    if len(parts) != 6 or not all(len(p) == 2 for p in parts):
        raise ValueError(f"not a MAC address: {text!r} (expected six hex pairs)")
    try:
        return bytes(int(p, 16) for p in parts)
    except ValueError:
        raise ValueError(f"not a MAC address: {text!r}") from None


BROADCAST = b"\xff" * 6


def is_multicast(mac: bytes | memoryview) -> bool:
    return bool(mac[0] & 1)
