"""virtio-mem wire format: requests, responses, configuration space, constants."""

from __future__ import annotations

import struct
from dataclasses import dataclass

# Request types.
REQ_PLUG = 0
REQ_UNPLUG = 1
REQ_UNPLUG_ALL = 2
REQ_STATE = 3

# Response types.
RESP_ACK = 0
RESP_NACK = 1
RESP_BUSY = 2
RESP_ERROR = 3

# STATE response: the state of the blocks asked about.
STATE_PLUGGED = 0
STATE_UNPLUGGED = 1
STATE_MIXED = 2

# Feature bits.
F_ACPI_PXM = 0
F_UNPLUGGED_INACCESSIBLE = 1
F_PERSISTENT_SUSPEND = 2

REQ_SIZE = 24  # every request
RESP_SIZE = 10  # every response
CONFIG_SIZE = 56
MAX_BLOCKS = 0xFFFF  # nb_blocks is a le16

_REQ = struct.Struct("<H6xQH6x")
_RESP = struct.Struct("<H6xH")
_CONFIG = struct.Struct("<QH6xQQQQQ")

REQUEST_NAMES = {
    REQ_PLUG: "PLUG",
    REQ_UNPLUG: "UNPLUG",
    REQ_UNPLUG_ALL: "UNPLUG_ALL",
    REQ_STATE: "STATE",
}
RESPONSE_NAMES = {RESP_ACK: "ACK", RESP_NACK: "NACK", RESP_BUSY: "BUSY", RESP_ERROR: "ERROR"}

# Field offsets in virtio_mem_config.
OFF_BLOCK_SIZE = 0
OFF_NODE_ID = 8
OFF_ADDR = 16
OFF_REGION_SIZE = 24
OFF_USABLE_REGION_SIZE = 32
OFF_PLUGGED_SIZE = 40
OFF_REQUESTED_SIZE = 48


@dataclass(frozen=True)
class Request:
    """One guest request: its type and (for PLUG, UNPLUG, STATE) the blocks it covers."""

    type: int
    addr: int = 0
    nb_blocks: int = 0


@dataclass(frozen=True)
class MemConfig:
    """virtio_mem_config, decoded."""

    block_size: int
    node_id: int
    addr: int
    region_size: int
    usable_region_size: int
    plugged_size: int
    requested_size: int


def pack_request(request: Request) -> bytes:
    """The 24 bytes of a request (padding zero)."""
    return _REQ.pack(request.type, request.addr, request.nb_blocks)


def unpack_request(data: bytes) -> Request:
    """Decode the first 24 bytes; padding is ignored, as the device must."""
    if len(data) < REQ_SIZE:
        raise ValueError(f"a virtio-mem request is {REQ_SIZE} bytes, got {len(data)}")
    type_, addr, nb_blocks = _REQ.unpack_from(data)
    return Request(type_, addr, nb_blocks)


def pack_response(type_: int, state: int = 0) -> bytes:
    return _RESP.pack(type_, state)


def unpack_response(data: bytes) -> tuple[int, int]:
    """(response type, state); the state means something only for an ACKed STATE."""
    if len(data) < 2:
        raise ValueError(f"a virtio-mem response needs its type, got {len(data)} bytes")
    data = bytes(data).ljust(RESP_SIZE, b"\0")
    type_, state = _RESP.unpack_from(data)
    return int(type_), int(state)


def pack_config(c: MemConfig) -> bytes:
    return _CONFIG.pack(
        c.block_size,
        c.node_id,
        c.addr,
        c.region_size,
        c.usable_region_size,
        c.plugged_size,
        c.requested_size,
    )


def unpack_config(data: bytes) -> MemConfig:
    """Decode virtio_mem_config; padding is ignored, as the driver must."""
    if len(data) < CONFIG_SIZE:
        raise ValueError(f"virtio_mem_config is {CONFIG_SIZE} bytes, got {len(data)}")
    return MemConfig(*_CONFIG.unpack_from(data))
