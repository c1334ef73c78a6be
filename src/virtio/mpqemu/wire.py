"""The messages of QEMU's multi-process link (``include/hw/remote/mpqemu-link.h``, QEMU 7.2).

A message is a 16-byte header (``int cmd``, 4 bytes of padding, ``size_t
size``) and ``size`` payload bytes, with file descriptors (SCM_RIGHTS) on the
header. The proxy sends the commands; every configuration, BAR and reset
message is answered with RET, SYNC_SYSMEM and SET_IRQFD are not. Sizes are
the x86_64 ABI's: this is a host-local protocol.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass, field
from typing import Any

from virtio.errors import VirtioError

HEADER = struct.Struct("<iIQ")  # cmd, padding, size
MAX_FDS = 8
#: The proxy's largest payload (the union in MPQemuMsg: SyncSysmemMsg).
MAX_PAYLOAD = 8 * 8 * 3
SYNC_SYSMEM = struct.Struct("<8Q8Q8q")  # guest addresses, sizes, fd offsets
PCI_CONF = struct.Struct("<IIi")  # addr, val, len
BAR_ACCESS = struct.Struct("<QQI?3x")  # addr, val, size, memory (else I/O)
RET = struct.Struct("<Q")


class Command(enum.IntEnum):
    SYNC_SYSMEM = 0
    RET = 1
    PCI_CFGWRITE = 2
    PCI_CFGREAD = 3
    BAR_WRITE = 4
    BAR_READ = 5
    SET_IRQFD = 6
    DEVICE_RESET = 7


class MpqemuError(VirtioError):
    """A message the proxy should never send (or a broken stream)."""


@dataclass
class Message:
    cmd: int
    payload: bytes = b""
    fds: list[int] = field(default_factory=list)

    def name(self) -> str:
        try:
            return Command(self.cmd).name
        except ValueError:
            return f"command {self.cmd}"


@dataclass(frozen=True)
class MemorySection:
    """One region of guest RAM: where the guest sees it, and where it is in its fd."""

    gpa: int
    size: int
    offset: int
    fd: int


@dataclass(frozen=True)
class ConfigAccess:
    addr: int
    value: int
    length: int


@dataclass(frozen=True)
class BarAccess:
    addr: int  # the absolute guest-physical address, or the I/O port
    value: int
    size: int
    memory: bool


def parse_header(data: bytes) -> tuple[int, int]:
    """(cmd, payload size) of a header; a size beyond the proxy's union is refused."""
    cmd, _pad, size = HEADER.unpack(data)
    if size > MAX_PAYLOAD:
        raise MpqemuError(f"{_name(cmd)}: payload of {size} bytes (at most {MAX_PAYLOAD})")
    return cmd, size


def encode(cmd: int, payload: bytes = b"") -> bytes:
    return HEADER.pack(cmd, 0, len(payload)) + payload


def encode_ret(value: int) -> bytes:
    return encode(Command.RET, RET.pack(value & 0xFFFF_FFFF_FFFF_FFFF))


def _name(cmd: int) -> str:
    return Message(cmd).name()


def _payload(msg: Message, layout: struct.Struct) -> tuple[Any, ...]:
    if len(msg.payload) < layout.size:
        raise MpqemuError(
            f"{msg.name()}: payload of {len(msg.payload)} bytes, {layout.size} expected"
        )
    return layout.unpack_from(msg.payload)


def decode_sysmem(msg: Message) -> list[MemorySection]:
    """The RAM sections of a SYNC_SYSMEM: one per fd, in order."""
    if len(msg.fds) > MAX_FDS:
        raise MpqemuError(f"SYNC_SYSMEM with {len(msg.fds)} fds (at most {MAX_FDS})")
    values = _payload(msg, SYNC_SYSMEM)
    gpas, sizes, offsets = values[0:8], values[8:16], values[16:24]
    sections = []
    for i, fd in enumerate(msg.fds):
        gpa, size, offset = int(gpas[i]), int(sizes[i]), int(offsets[i])
        if size <= 0 or offset < 0 or gpa + size > 1 << 64:
            raise MpqemuError(f"SYNC_SYSMEM section {i}: {size:#x} bytes at {gpa:#x}+{offset:#x}")
        sections.append(MemorySection(gpa, size, offset, fd))
    return sections


def decode_config(msg: Message) -> ConfigAccess:
    addr, value, length = _payload(msg, PCI_CONF)
    return ConfigAccess(int(addr), int(value), int(length))


def decode_bar(msg: Message) -> BarAccess:
    addr, value, size, memory = _payload(msg, BAR_ACCESS)
    return BarAccess(int(addr), int(value), int(size), bool(memory))
