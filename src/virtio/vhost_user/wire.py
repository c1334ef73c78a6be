"""The vhost-user wire format: message numbers, flags, payload layouts, a framing codec.

Sans-IO: :class:`Message` is bytes plus file descriptors; :class:`Decoder`
turns a byte stream with its ancillary fds into messages, and
:func:`encode` does the reverse. All numbers are host byte order, which the
protocol defines as native; pyvirtio runs on little-endian hosts.
"""

from __future__ import annotations

import enum
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

from virtio.errors import VirtioError
from virtio.layout import Bytes, Layout, u8, u16, u32, u64


class VhostUserError(VirtioError):
    """A vhost-user peer sent something the protocol does not allow."""


class Request(enum.IntEnum):
    """Front-end to back-end requests."""

    GET_FEATURES = 1
    SET_FEATURES = 2
    SET_OWNER = 3
    RESET_OWNER = 4
    SET_MEM_TABLE = 5
    SET_LOG_BASE = 6
    SET_LOG_FD = 7
    SET_VRING_NUM = 8
    SET_VRING_ADDR = 9
    SET_VRING_BASE = 10
    GET_VRING_BASE = 11
    SET_VRING_KICK = 12
    SET_VRING_CALL = 13
    SET_VRING_ERR = 14
    GET_PROTOCOL_FEATURES = 15
    SET_PROTOCOL_FEATURES = 16
    GET_QUEUE_NUM = 17
    SET_VRING_ENABLE = 18
    SEND_RARP = 19
    NET_SET_MTU = 20
    SET_BACKEND_REQ_FD = 21
    IOTLB_MSG = 22
    SET_VRING_ENDIAN = 23
    GET_CONFIG = 24
    SET_CONFIG = 25
    CREATE_CRYPTO_SESSION = 26
    CLOSE_CRYPTO_SESSION = 27
    POSTCOPY_ADVISE = 28
    POSTCOPY_LISTEN = 29
    POSTCOPY_END = 30
    GET_INFLIGHT_FD = 31
    SET_INFLIGHT_FD = 32
    GPU_SET_SOCKET = 33
    RESET_DEVICE = 34
    VRING_KICK = 35
    GET_MAX_MEM_SLOTS = 36
    ADD_MEM_REG = 37
    REM_MEM_REG = 38
    SET_STATUS = 39
    GET_STATUS = 40


class BackendRequest(enum.IntEnum):
    """Back-end to front-end requests (on the back-end request channel)."""

    IOTLB_MSG = 1
    CONFIG_CHANGE_MSG = 2
    VRING_HOST_NOTIFIER_MSG = 3
    VRING_CALL = 4
    VRING_ERR = 5


class ProtocolFeature(enum.IntEnum):
    MQ = 0
    LOG_SHMFD = 1
    RARP = 2
    REPLY_ACK = 3
    MTU = 4
    BACKEND_REQ = 5
    CROSS_ENDIAN = 6
    CRYPTO_SESSION = 7
    PAGEFAULT = 8
    CONFIG = 9
    BACKEND_SEND_FD = 10
    HOST_NOTIFIER = 11
    INFLIGHT_SHMFD = 12
    RESET_DEVICE = 13
    INBAND_NOTIFICATIONS = 14
    CONFIGURE_MEM_SLOTS = 15
    STATUS = 16


# The virtio feature bit that says the back-end speaks protocol features.
F_PROTOCOL_FEATURES = 30
# vhost's own feature bit: dirty-page logging of all writes.
F_LOG_ALL = 26

VERSION = 0x1
FLAG_REPLY = 1 << 2
FLAG_NEED_REPLY = 1 << 3
VRING_INDEX_MASK = 0xFF
VRING_NOFD = 1 << 8
VRING_F_LOG = 1  # vring address flag: log used-ring writes
LOG_PAGE = 0x1000
MAX_MEM_REGIONS = 8  # SET_MEM_TABLE's fixed array
MAX_CONFIG_SIZE = 256
MAX_FDS = 8
MAX_PAYLOAD = 4096  # larger than any payload the protocol defines

HEADER = Layout("VhostUserMsg header", [("request", u32), ("flags", u32), ("size", u32)])
U64 = Layout("u64", [("value", u64)])
VRING_STATE = Layout("vhost_vring_state", [("index", u32), ("num", u32)])
VRING_ADDR = Layout(
    "vhost_vring_addr",
    [
        ("index", u32),
        ("flags", u32),
        ("desc", u64),
        ("used", u64),
        ("avail", u64),
        ("log", u64),
    ],
)
MEM_REGION = Layout(
    "VhostUserMemoryRegion",
    [("guest_addr", u64), ("size", u64), ("user_addr", u64), ("mmap_offset", u64)],
)
MEM_TABLE_HEADER = Layout("VhostUserMemory", [("nregions", u32), ("padding", u32)])
SINGLE_MEM_REGION = Layout(
    "VhostUserMemRegMsg",
    [
        ("padding", u64),
        ("guest_addr", u64),
        ("size", u64),
        ("user_addr", u64),
        ("mmap_offset", u64),
    ],
)
LOG = Layout("VhostUserLog", [("mmap_size", u64), ("mmap_offset", u64)])
CONFIG_HEADER = Layout("VhostUserConfig", [("offset", u32), ("size", u32), ("flags", u32)])
INFLIGHT = Layout(
    "VhostUserInflight",
    [
        ("mmap_size", u64),
        ("mmap_offset", u64),
        ("num_queues", u16),
        ("queue_size", u16),
        # QEMU's struct is not packed: its size rounds up to 24 bytes.
        ("padding", Bytes(4)),
    ],
)
IOTLB = Layout(
    "vhost_iotlb_msg",
    [
        ("iova", u64),
        ("size", u64),
        ("uaddr", u64),
        ("perm", u8),
        ("type", u8),
        ("padding", Bytes(6)),
    ],
)


@dataclass
class Message:
    """One vhost-user message: header fields, payload bytes, ancillary fds."""

    request: int
    payload: bytes = b""
    flags: int = VERSION
    fds: list[int] = field(default_factory=list)

    @property
    def need_reply(self) -> bool:
        return bool(self.flags & FLAG_NEED_REPLY)

    @property
    def is_reply(self) -> bool:
        return bool(self.flags & FLAG_REPLY)

    def name(self, backend_channel: bool = False) -> str:
        kinds: type[enum.IntEnum] = BackendRequest if backend_channel else Request
        try:
            return kinds(self.request).name
        except ValueError:
            return f"request {self.request}"

    def u64(self) -> int:
        expect_size(self, U64.size)
        return int(U64.struct.unpack(self.payload)[0])

    def state(self) -> tuple[int, int]:
        expect_size(self, VRING_STATE.size)
        index, num = VRING_STATE.struct.unpack(self.payload)
        return int(index), int(num)


def expect_size(msg: Message, size: int) -> None:
    if len(msg.payload) != size:
        raise VhostUserError(f"{msg.name()}: payload is {len(msg.payload)} bytes, expected {size}")


def encode(msg: Message) -> bytes:
    return HEADER.struct.pack(msg.request, msg.flags, len(msg.payload)) + msg.payload


def u64_message(request: int, value: int, flags: int = VERSION) -> Message:
    return Message(request, U64.struct.pack(value), flags)


def state_message(request: int, index: int, num: int, flags: int = VERSION) -> Message:
    return Message(request, VRING_STATE.struct.pack(index, num), flags)


def reply_to(msg: Message, payload: bytes, fds: Sequence[int] = ()) -> Message:
    return Message(msg.request, payload, VERSION | FLAG_REPLY, list(fds))


class Decoder:
    """Frames a byte stream into messages; fds attach to the message they came with.

    All the framing checks (protocol version, payload size) live here. A
    reader that wants every fd kept with its own message reads
    :attr:`needed` bytes at a time: the rest of the current header, then
    the rest of its payload. The kernel hands a message's fds over with the
    first read that touches its bytes, and such reads never reach into the
    next message.

    After :meth:`feed` raises, the stream is unusable: :meth:`take_fds`
    returns the fds not handed out (the caller closes them).
    """

    def __init__(self) -> None:
        self._buf = bytearray()
        self._fds: list[int] = []

    def feed(self, data: bytes, fds: Sequence[int] = ()) -> Iterator[Message]:
        """Buffer ``data`` and its ancillary ``fds``; iterate for the messages completed.

        Fds belong to the message that starts in (or continues into) this
        chunk. The data and fds are taken at once; bad headers raise
        :class:`VhostUserError` while iterating.
        """
        self._buf += data
        self._fds.extend(fds)
        return self._messages()

    def _messages(self) -> Iterator[Message]:
        while len(self._buf) >= HEADER.size:
            request, flags, size = self._header()
            end = HEADER.size + size
            if len(self._buf) < end:
                return
            payload = bytes(self._buf[HEADER.size : end])
            del self._buf[:end]
            fds_now, self._fds = self._fds, []
            yield Message(request, payload, flags, fds_now)

    def _header(self) -> tuple[int, int, int]:
        request, flags, size = HEADER.struct.unpack_from(self._buf, 0)
        if flags & 0x3 != VERSION:
            raise VhostUserError(f"bad protocol version {flags & 0x3} in message {request}")
        if size > MAX_PAYLOAD:
            raise VhostUserError(
                f"payload of {size} bytes in message {request} is too big (at most {MAX_PAYLOAD})"
            )
        return int(request), int(flags), int(size)

    @property
    def needed(self) -> int:
        """Bytes still missing from the current header, or else from its payload.

        12 on a fresh stream; 0 only when a whole message is buffered but not
        yet taken (iterate :meth:`feed` to get it). Reading exactly this many
        bytes never crosses into the next message.
        """
        buffered = len(self._buf)
        if buffered < HEADER.size:
            return HEADER.size - buffered
        _request, _flags, size = self._header()
        return max(0, HEADER.size + size - buffered)

    @property
    def pending_bytes(self) -> int:
        return len(self._buf)

    def take_fds(self) -> list[int]:
        """Fds not yet handed out (the caller closes them on error)."""
        fds, self._fds = self._fds, []
        return fds

    def reset(self) -> list[int]:
        """Forget any partial message; returns its fds for the caller to close."""
        self._buf.clear()
        return self.take_fds()
