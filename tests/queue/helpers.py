"""Shared set-up for ring tests: one memory, both ends of one queue."""

from __future__ import annotations

from dataclasses import dataclass

from virtio.memory import Allocator, GuestMemory
from virtio.queue import DeviceQueue, DriverQueue, RingLayout, device_queue, driver_queue

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
