"""What split and packed virtqueues share: wire layouts, flags, chains, notification maths."""

from __future__ import annotations

import sys
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from virtio.errors import DeviceModelError
from virtio.layout import Bits, ByteOrder, Layout, le16, le32, le64

MAX_QUEUE_SIZE = 32768
# The legacy interface's Queue Align (PCI fixes it at 4096; MMIO version 1 lets the driver choose).
LEGACY_QUEUE_ALIGN = 4096

# Descriptor flags (split and packed).
DESC_F_NEXT = 1
DESC_F_WRITE = 2
DESC_F_INDIRECT = 4
# Packed ring only.
DESC_F_AVAIL = 1 << 7
DESC_F_USED = 1 << 15

# Split ring suppression flags.
AVAIL_F_NO_INTERRUPT = 1
USED_F_NO_NOTIFY = 1

# Packed ring event suppression flags.
RING_EVENT_FLAGS_ENABLE = 0
RING_EVENT_FLAGS_DISABLE = 1
RING_EVENT_FLAGS_DESC = 2

VIRTQ_DESC = Layout("virtq_desc", [("addr", le64), ("len", le32), ("flags", le16), ("next", le16)])
VIRTQ_USED_ELEM = Layout("virtq_used_elem", [("id", le32), ("len", le32)])
PVIRTQ_DESC = Layout("pvirtq_desc", [("addr", le64), ("len", le32), ("id", le16), ("flags", le16)])
PVIRTQ_EVENT_SUPPRESS = Layout(
    "pvirtq_event_suppress",
    [("desc", Bits(le16, [("off", 15), ("wrap", 1)])), ("flags", Bits(le16, [("event_flags", 2)]))],
)
LE16 = Layout("le16", [("value", le16)])

# Notification data (VIRTIO_F_NOTIFICATION_DATA), as the driver writes it.
NOTIFY_DATA_SPLIT = Layout(
    "virtio_notify_data (split)", [("data", Bits(le32, [("vqn", 16), ("next_idx", 16)]))]
)
NOTIFY_DATA_PACKED = Layout(
    "virtio_notify_data (packed)",
    [("data", Bits(le32, [("vqn", 16), ("next_off", 15), ("next_wrap", 1)]))],
)

# Normative ids cited by ring errors.
N_MSG_FRAMING = "drivernormative:Basic Facilities of a Virtio Device / Message Framing"
N_DESC_TABLE = "drivernormative:Basic Facilities of a Virtio Device / Virtqueues / The Virtqueue Descriptor Table"
N_INDIRECT = (
    "drivernormative:Basic Facilities of a Virtio Device / Virtqueues / "
    "The Virtqueue Descriptor Table / Indirect Descriptors"
)
N_AVAIL_RING = "drivernormative:Basic Facilities of a Virtio Device / Virtqueues / The Virtqueue Available Ring"
N_ALIGN = "drivernormative:Basic Facilities of a Virtio Device / Virtqueues"
N_USED_RING_DEV = (
    "devicenormative:Basic Facilities of a Virtio Device / Virtqueues / The Virtqueue Used Ring"
)
N_PACKED_ALIGN = "drivernormative:Basic Facilities of a Virtio Device / Packed Virtqueues"
N_PACKED_DESC_DRV = (
    "drivernormative:Basic Facilities of a Virtio Device / PAcked Virtqueues / "
    "The Virtqueue Descriptor Table"
)
N_PACKED_DESC_DEV = (
    "devicenormative:Basic Facilities of a Virtio Device / Packed Virtqueues / "
    "The Virtqueue Descriptor Table"
)
N_PACKED_SG = "drivernormative:Basic Facilities of a Virtio Device / Packed Virtqueues / Scatter-Gather Support"
N_PACKED_INDIRECT = (
    "drivernormative:Basic Facilities of a Virtio Device / Packed Virtqueues / "
    "The Virtqueue Descriptor Table / Indirect Descriptors"
)
N_PACKED_DEV = "devicenormative:Basic Facilities of a Virtio Device / Packed Virtqueues"
N_IN_ORDER_DEV = "devicenormative:Reserved Feature Bits"


class SwappedU16:
    """u16 array access in the byte order opposite to the host's.

    Each element is still read and written with one 16-bit access (the value
    is swapped in a register), so a peer in another process never sees half
    an index, whatever the ring's byte order.
    """

    __slots__ = ("words",)

    def __init__(self, view: memoryview) -> None:
        self.words = view.cast("H")

    def __getitem__(self, index: int) -> int:
        x = self.words[index]
        return (x >> 8) | (x & 0xFF) << 8

    def __setitem__(self, index: int, value: int) -> None:
        self.words[index] = (value >> 8) | (value & 0xFF) << 8


class SwappedU32:
    """u32 array access in the byte order opposite to the host's, one access each."""

    __slots__ = ("words",)

    def __init__(self, view: memoryview) -> None:
        self.words = view.cast("I")

    def __getitem__(self, index: int) -> int:
        return _swap32(self.words[index])

    def __setitem__(self, index: int, value: int) -> None:
        self.words[index] = _swap32(value)


def _swap32(x: int) -> int:
    return (x >> 24) | (x >> 8) & 0xFF00 | (x & 0xFF00) << 8 | (x & 0xFF) << 24


U16Array = memoryview | SwappedU16
U32Array = memoryview | SwappedU32


def u32_array(view: memoryview, order: ByteOrder = "little") -> U32Array:
    """Index a ring area as u32s of the ring's byte order (a native cast when it is the host's)."""
    if order == sys.byteorder:
        return view.cast("I")
    return SwappedU32(view)


def u16_array(view: memoryview, order: ByteOrder = "little") -> U16Array:
    """Index a ring area as u16s of the ring's byte order.

    Every element is read and written with one 16-bit access, so a peer in
    another process never sees half an index (struct's byte-at-a-time packing
    would let it).
    """
    if order == sys.byteorder:
        return view.cast("H")
    return SwappedU16(view)


class Chain:
    """A buffer the device popped: zero-copy views of its readable and writable parts.

    ``head`` names the buffer when it is pushed back: the head descriptor index
    on a split ring, the buffer id on a packed ring. ``slots`` is how many ring
    descriptors it took (a packed ring needs it to advance the used position).
    """

    __slots__ = ("head", "live", "read_len", "readable", "slots", "writable", "write_len")

    def __init__(
        self,
        head: int,
        readable: Sequence[memoryview],
        writable: Sequence[memoryview],
        read_len: int,
        write_len: int,
        slots: int = 1,
    ) -> None:
        self.head = head
        self.readable = readable
        self.writable = writable
        self.read_len = read_len
        self.write_len = write_len
        self.slots = slots
        #: Popped and not yet pushed back: a ring end takes each chain back once.
        self.live = True

    def __repr__(self) -> str:
        return (
            f"Chain(head={self.head}, read={self.read_len} in {len(self.readable)}, "
            f"write={self.write_len} in {len(self.writable)})"
        )

    def read(self, offset: int = 0, length: int | None = None) -> bytes:
        """Copy ``length`` readable bytes from ``offset`` (all of them by default)."""
        if offset == 0 and length is None:
            if len(self.readable) == 1:
                return bytes(self.readable[0])
            return b"".join(self.readable)
        end = self.read_len if length is None else min(self.read_len, offset + length)
        out = bytearray()
        pos = 0
        for piece in self.readable:
            n = piece.nbytes
            if pos + n > offset and pos < end:
                out += piece[max(0, offset - pos) : end - pos]
            pos += n
            if pos >= end:
                break
        return bytes(out)

    def write(self, data: bytes | bytearray | memoryview, offset: int = 0) -> int:
        """Scatter ``data`` into the writable part at ``offset``; returns bytes written."""
        src = memoryview(data).cast("B")
        if offset + src.nbytes > self.write_len:
            raise ValueError(
                f"write of {src.nbytes} at {offset} exceeds the {self.write_len}-byte buffer"
            )
        return scatter(self.writable, src, offset)

    def writable_slices(self, offset: int, length: int) -> list[memoryview]:
        """Views of ``length`` writable bytes from ``offset`` (for ``os.preadv``)."""
        return view_slices(self.writable, offset, length)

    def readable_slices(self, offset: int, length: int) -> list[memoryview]:
        """Views of ``length`` readable bytes from ``offset`` (for ``os.pwritev``)."""
        return view_slices(self.readable, offset, length)


def view_slices(views: Sequence[memoryview], offset: int, length: int) -> list[memoryview]:
    """Views of ``length`` bytes from ``offset`` of the bytes ``views`` hold in turn (no copy)."""
    out: list[memoryview] = []
    pos = 0
    end = offset + length
    for piece in views:
        n = piece.nbytes
        if pos + n > offset and pos < end:
            out.append(piece[max(0, offset - pos) : min(n, end - pos)])
        pos += n
        if pos >= end:
            break
    return out


def scatter(views: Sequence[memoryview], data: bytes | memoryview, offset: int = 0) -> int:
    """Copy ``data`` into the bytes ``views`` hold, from ``offset``; the bytes copied."""
    src = memoryview(data).cast("B")
    total = src.nbytes
    done = 0
    pos = 0
    for piece in views:
        n = piece.nbytes
        if pos + n > offset and done < total:
            start = max(0, offset - pos)
            take = min(n - start, total - done)
            piece[start : start + take] = src[done : done + take]
            done += take
        pos += n
        if done == total:
            break
    return done


def refusal(chain: Chain, written: int) -> str:
    """Why a device model may not push ``chain`` back with ``written`` bytes."""
    if not chain.live:
        return f"buffer {chain.head} pushed back but it is not in flight (pushed twice?)"
    return (
        f"buffer {chain.head}: {written} bytes written, but it has {chain.write_len} "
        f"device-writable bytes [{N_USED_RING_DEV}]"
    )


def take_in_order(expected: deque[Chain], items: Sequence[tuple[Chain, int]]) -> None:
    """Check a push against VIRTIO_F_IN_ORDER (and each item's length); consume it.

    ``expected`` holds the popped chains in the order they were made available.
    """
    for chain, written in items:
        if not chain.live or not 0 <= written <= chain.write_len:
            raise DeviceModelError(refusal(chain, written))
    if len(items) > len(expected) or any(
        chain is not expected[i] for i, (chain, _) in enumerate(items)
    ):
        raise DeviceModelError(
            f"buffer {items[0][0].head} pushed out of order with VIRTIO_F_IN_ORDER "
            f"(next in order: {expected[0].head if expected else 'none'}) [{N_IN_ORDER_DEV}]"
        )
    for _ in items:
        expected.popleft()


class InflightTracker(Protocol):
    """Keeps a record of in-flight buffers outside the process (vhost-user inflight fd)."""

    def popped(self, heads: list[int]) -> None:
        """These buffers were taken from the available ring, in this order."""

    def completing(self, heads: list[int]) -> None:
        """These buffers are about to be returned (before the used idx moves)."""

    def completed(self, used_idx: int) -> None:
        """The used idx now reads ``used_idx``."""


# A packed ring descriptor as read: (addr, len, id, flags).
PackedDesc = tuple[int, int, int, int]


class PackedInflightTracker(Protocol):
    """The packed-ring form of :class:`InflightTracker`: it keeps the descriptors."""

    def popped(self, descs: list[PackedDesc]) -> None:
        """One buffer was taken: its ring descriptors, in ring order."""

    def completing(self, ids: list[int], next_used: int, used_wrap: int) -> None:
        """These buffers are about to be returned; the used position will be this."""

    def completed(self) -> None:
        """The used descriptors are written."""


def need_event(event: int, new: int, old: int) -> bool:
    """True when moving an index from ``old`` to ``new`` crosses ``event``.

    All three are 16-bit ring indices; this is the event-index rule of
    "Used/Available Buffer Notification Suppression": notify when the index
    reaches ``event + 1``.
    """
    return ((new - event - 1) & 0xFFFF) < ((new - old) & 0xFFFF)


def check_queue_size(size: int, *, packed: bool) -> None:
    if not 1 <= size <= MAX_QUEUE_SIZE:
        raise ValueError(f"queue size {size} is outside 1..{MAX_QUEUE_SIZE}")
    if not packed and size & (size - 1):
        raise ValueError(f"split queue size {size} is not a power of 2")


@dataclass(frozen=True)
class RingLayout:
    """Where the three parts of a virtqueue live, and how big each is."""

    size: int
    desc: int
    driver: int
    device: int
    packed: bool = False

    @staticmethod
    def part_sizes(size: int, packed: bool) -> tuple[int, int, int]:
        if packed:
            return 16 * size, 4, 4
        return 16 * size, 6 + 2 * size, 6 + 8 * size

    @staticmethod
    def alignments(packed: bool) -> tuple[int, int, int]:
        return (16, 4, 4) if packed else (16, 2, 4)

    @classmethod
    def contiguous(cls, base: int, size: int, packed: bool = False) -> RingLayout:
        """All three parts back to back from ``base``, each properly aligned."""
        sizes = cls.part_sizes(size, packed)
        aligns = cls.alignments(packed)
        addrs = []
        addr = base
        for part, align in zip(sizes, aligns, strict=True):
            addr = (addr + align - 1) // align * align
            addrs.append(addr)
            addr += part
        return cls(size, addrs[0], addrs[1], addrs[2], packed)

    def total_bytes(self) -> int:
        return sum(self.part_sizes(self.size, self.packed)) + 16 * 3

    @classmethod
    def legacy(cls, base: int, size: int, align: int = LEGACY_QUEUE_ALIGN) -> RingLayout:
        """The legacy interface's split ring: one contiguous block from ``base``.

        The descriptor table, then the available ring, then the used ring at
        the next multiple of ``align`` (the transport's Queue Align), as
        "Legacy Interfaces: A Note on Virtqueue Layout" lays it out. The driver
        tells the device only ``base`` (as a page frame number) and the size.
        """
        if align <= 0 or align & (align - 1):
            raise ValueError(f"queue align {align} is not a power of 2")
        if base % align:
            raise ValueError(f"legacy ring at {base:#x} is not {align}-byte aligned")
        desc_len, avail_len, _used_len = cls.part_sizes(size, False)
        used = _align_up(base + desc_len + avail_len, align)
        return cls(size, base, base + desc_len, used, packed=False)

    @classmethod
    def legacy_bytes(cls, size: int, align: int = LEGACY_QUEUE_ALIGN) -> int:
        """How many bytes a legacy split ring of ``size`` entries occupies."""
        desc_len, avail_len, used_len = cls.part_sizes(size, False)
        return _align_up(desc_len + avail_len, align) + _align_up(used_len, align)


def _align_up(value: int, align: int) -> int:
    return (value + align - 1) & ~(align - 1)


def encode_notification(vqn: int, next_index: int, wrap: int | None = None) -> int:
    """The 32-bit notification value of VIRTIO_F_NOTIFICATION_DATA.

    Split rings send the next available index; packed rings the next offset and
    wrap counter. With VIRTIO_F_NOTIF_CONFIG_DATA, ``vqn`` is the value the
    transport gave instead of the queue index.
    """
    if wrap is None:
        return vqn & 0xFFFF | (next_index & 0xFFFF) << 16
    return vqn & 0xFFFF | (next_index & 0x7FFF) << 16 | (wrap & 1) << 31


def decode_notification(value: int, *, packed: bool) -> tuple[int, int, int | None]:
    """Inverse of :func:`encode_notification`: (vqn, next index/offset, wrap or None)."""
    vqn = value & 0xFFFF
    if packed:
        return vqn, (value >> 16) & 0x7FFF, (value >> 31) & 1
    return vqn, (value >> 16) & 0xFFFF, None


NO_VIEW = memoryview(b"")


def fast_region(memory: object) -> tuple[int, int, memoryview]:
    """(start, size, view) of the memory region hot loops should check inline first.

    Plain guest memory has one; translated (IOMMU) memory has none, so every
    access goes through the translation.
    """
    last_region = getattr(memory, "last_region", None)
    region = last_region() if last_region is not None else None
    if region is None:
        return 0, -1, NO_VIEW
    return region.gpa, region.size, region.view
