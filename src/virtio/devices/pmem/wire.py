"""virtio-pmem wire format: the flush request, its response, the configuration space."""

from __future__ import annotations

import struct

REQ_TYPE_FLUSH = 0

RET_OK = 0
RET_FAILURE = -1  # the spec's "-1", as a le32: 0xFFFFFFFF

F_SHMEM_REGION = 0
SHMEM_ID = 0  # the shared memory region id the spec assigns

REQ_SIZE = 4
RESP_SIZE = 4
CONFIG_SIZE = 16

_LE32 = struct.Struct("<I")
_CONFIG = struct.Struct("<QQ")


def pack_request(type_: int) -> bytes:
    return _LE32.pack(type_ & 0xFFFFFFFF)


def unpack_request(data: bytes) -> int:
    if len(data) < REQ_SIZE:
        raise ValueError(f"a virtio-pmem request is {REQ_SIZE} bytes, got {len(data)}")
    return int(_LE32.unpack_from(data)[0])


def pack_response(ret: int) -> bytes:
    return _LE32.pack(ret & 0xFFFFFFFF)


def unpack_response(data: bytes) -> int:
    """``ret`` as a signed number (-1: failure)."""
    if len(data) < RESP_SIZE:
        raise ValueError(f"a virtio-pmem response is {RESP_SIZE} bytes, got {len(data)}")
    value = int(_LE32.unpack_from(data)[0])
    return value - (1 << 32) if value >= 1 << 31 else value


def pack_config(start: int, size: int) -> bytes:
    return _CONFIG.pack(start, size)


def unpack_config(data: bytes) -> tuple[int, int]:
    """(start, size)."""
    if len(data) < CONFIG_SIZE:
        raise ValueError(f"virtio_pmem_config is {CONFIG_SIZE} bytes, got {len(data)}")
    start, size = _CONFIG.unpack_from(data)
    return int(start), int(size)
