"""virtio-vsock's wire format: the packet header, op codes, types, flags, events."""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import IntEnum

from virtio.spec import features as F

STREAM_F = F.VIRTIO_VSOCK_F_STREAM
SEQPACKET_F = F.VIRTIO_VSOCK_F_SEQPACKET
NO_IMPLIED_STREAM_F = F.VIRTIO_VSOCK_F_NO_IMPLIED_STREAM

RX, TX, EVENT = 0, 1, 2

HOST_CID = 2
#: CIDs no guest may have: 0, 1, the host's, and the two all-ones values.
RESERVED_CIDS = frozenset({0, 1, HOST_CID, 0xFFFFFFFF, 0xFFFFFFFFFFFFFFFF})


class Op(IntEnum):
    INVALID = 0
    REQUEST = 1
    RESPONSE = 2
    RST = 3
    SHUTDOWN = 4
    RW = 5
    CREDIT_UPDATE = 6
    CREDIT_REQUEST = 7


class Type(IntEnum):
    STREAM = 1
    SEQPACKET = 2


#: SHUTDOWN flags (bit values): the sender will receive / send no more.
SHUTDOWN_RCV = 1 << 0
SHUTDOWN_SEND = 1 << 1
SHUTDOWN_BOTH = SHUTDOWN_RCV | SHUTDOWN_SEND

#: RW flags on seqpacket: end of message, end of record.
SEQ_EOM = 1 << 0
SEQ_EOR = 1 << 1

EVENT_TRANSPORT_RESET = 0
EVENT_MSG = struct.Struct("<I")

_HDR = struct.Struct("<QQIIIHHIII")
HDR_SIZE = _HDR.size  # 44


@dataclass(frozen=True)
class Hdr:
    """``struct virtio_vsock_hdr``: addressing, payload length, op, credit."""

    src_cid: int
    dst_cid: int
    src_port: int
    dst_port: int
    len: int = 0
    type: int = Type.STREAM
    op: int = Op.INVALID
    flags: int = 0
    buf_alloc: int = 0
    fwd_cnt: int = 0

    def pack(self) -> bytes:
        return _HDR.pack(
            self.src_cid,
            self.dst_cid,
            self.src_port,
            self.dst_port,
            self.len,
            self.type,
            self.op,
            self.flags,
            self.buf_alloc,
            self.fwd_cnt,
        )

    @classmethod
    def unpack(cls, data: bytes | memoryview) -> Hdr:
        return cls(*_HDR.unpack_from(data))

    def describe(self) -> str:
        op = Op(self.op).name if self.op in Op._value2member_map_ else str(self.op)
        return (
            f"{op} {self.src_cid}:{self.src_port} -> {self.dst_cid}:{self.dst_port} "
            f"type {self.type} len {self.len} flags {self.flags:#x}"
        )


def peer_free(buf_alloc: int, fwd_cnt: int, tx_cnt: int) -> int:
    """What a sender may still send: the peer's buffer less the bytes in flight (u32 maths)."""
    in_flight = (tx_cnt - fwd_cnt) & 0xFFFFFFFF
    return max(0, buf_alloc - in_flight)


def stream_offered(features: int) -> bool:
    """Stream sockets are usable: negotiated, or implied when nothing says otherwise."""
    # Without NO_IMPLIED_STREAM (no feature at all, or seqpacket alone) stream is implied.
    return bool(features >> STREAM_F & 1 or not features >> NO_IMPLIED_STREAM_F & 1)
