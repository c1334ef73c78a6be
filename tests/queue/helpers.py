"""Shared set-up for ring tests: one memory, both ends of one queue."""

from __future__ import annotations

from dataclasses import dataclass

from virtio.memory import Allocator, GuestMemory
from virtio.queue import DeviceQueue, DriverQueue, RingLayout, device_queue, driver_queue
from virtio.queue.common import LE16, PVIRTQ_DESC, VIRTQ_DESC, VIRTQ_USED_ELEM

RING_BASE = 0x1000
BUF_BASE = 0x40000
MEM_SIZE = 4 << 20


@dataclass
class Pair:
    memory: GuestMemory
    allocator: Allocator
    layout: RingLayout
    driver: DriverQueue
    device: DeviceQueue


def make_pair(
    size: int = 8,
    *,
    packed: bool = False,
    indirect: bool = False,
    event_idx: bool = False,
    in_order: bool = False,
    device_indirect: bool | None = None,
) -> Pair:
    memory = GuestMemory()
    memory.add(0, bytearray(MEM_SIZE))
    allocator = Allocator(BUF_BASE, MEM_SIZE - BUF_BASE)
    layout = RingLayout.contiguous(RING_BASE, size, packed)
    driver = driver_queue(
        memory,
        layout,
        indirect=indirect,
        event_idx=event_idx,
        in_order=in_order,
        allocator=allocator,
    )
    device = device_queue(
        memory,
        layout,
        indirect=indirect if device_indirect is None else device_indirect,
        event_idx=event_idx,
        in_order=in_order,
    )
    return Pair(memory, allocator, layout, driver, device)


# -- hand-made ring contents, the way a hostile driver or device writes them ----


def put_desc(pair: Pair, index: int, addr: int, length: int, flags: int, nxt: int = 0) -> None:
    """Write split descriptor ``index`` directly into the table."""
    pair.memory.write(pair.layout.desc + 16 * index, VIRTQ_DESC.pack_raw(addr, length, flags, nxt))


def put_table(pair: Pair, addr: int, entries: list[tuple[int, int, int, int]]) -> None:
    """Write an indirect table of split descriptors at ``addr``."""
    pair.memory.write(addr, b"".join(VIRTQ_DESC.pack_raw(*e) for e in entries))


def publish(pair: Pair, *heads: int, idx: int | None = None) -> None:
    """Put heads in the available ring and move its idx (split)."""
    avail = pair.layout.driver
    current = LE16.unpack(pair.memory.read(avail + 2, 2))["value"]
    assert isinstance(current, int)
    for i, head in enumerate(heads):
        slot = (current + i) % pair.layout.size
        pair.memory.write(avail + 4 + 2 * slot, LE16.pack(value=head))
    new = (current + len(heads)) & 0xFFFF if idx is None else idx
    pair.memory.write(avail + 2, LE16.pack(value=new))


def put_used(pair: Pair, slot: int, elem_id: int, length: int, idx: int) -> None:
    """Write a used element and the used idx (split), as a hostile device would."""
    used = pair.layout.device
    pair.memory.write(used + 4 + 8 * slot, VIRTQ_USED_ELEM.pack_raw(elem_id, length))
    pair.memory.write(used + 2, LE16.pack(value=idx))


def put_packed(pair: Pair, pos: int, addr: int, length: int, buf_id: int, flags: int) -> None:
    pair.memory.write(
        pair.layout.desc + 16 * pos, PVIRTQ_DESC.pack_raw(addr, length, buf_id, flags)
    )


def put_packed_table(pair: Pair, addr: int, entries: list[tuple[int, int, int, int]]) -> None:
    """Write an indirect table of packed descriptors (addr, len, id, flags) at ``addr``."""
    pair.memory.write(addr, b"".join(PVIRTQ_DESC.pack_raw(*e) for e in entries))
