"""Virtqueues: split and packed rings, one model for the device and the driver side."""

from __future__ import annotations

from virtio.layout import ByteOrder
from virtio.memory import Allocator, Memory
from virtio.queue.common import (
    Chain,
    RingLayout,
    decode_notification,
    encode_notification,
    scatter,
    view_slices,
)
from virtio.queue.cursor import ChainReader, ChainWriter, ShortChain
from virtio.queue.packed import PackedDeviceQueue, PackedDriverQueue, PackedRing
from virtio.queue.split import SplitDeviceQueue, SplitDriverQueue, SplitRing

DeviceQueue = SplitDeviceQueue | PackedDeviceQueue
DriverQueue = SplitDriverQueue | PackedDriverQueue


def device_queue(
    memory: Memory,
    layout: RingLayout,
    *,
    indirect: bool = False,
    event_idx: bool = False,
    in_order: bool = False,
    order: ByteOrder = "little",
) -> DeviceQueue:
    """The device's end of the ring described by ``layout``, in byte order ``order``."""
    if layout.packed:
        return PackedDeviceQueue(
            PackedRing(memory, layout, order),
            indirect=indirect,
            event_idx=event_idx,
            in_order=in_order,
        )
    return SplitDeviceQueue(
        SplitRing(memory, layout, order), indirect=indirect, event_idx=event_idx, in_order=in_order
    )


def driver_queue(
    memory: Memory,
    layout: RingLayout,
    *,
    indirect: bool = False,
    event_idx: bool = False,
    in_order: bool = False,
    allocator: Allocator | None = None,
    vq_index: int = 0,
    order: ByteOrder = "little",
) -> DriverQueue:
    """The driver's end of the ring described by ``layout`` (clears the ring)."""
    if layout.packed:
        return PackedDriverQueue(
            PackedRing(memory, layout, order),
            indirect=indirect,
            event_idx=event_idx,
            in_order=in_order,
            allocator=allocator,
            vq_index=vq_index,
        )
    return SplitDriverQueue(
        SplitRing(memory, layout, order),
        indirect=indirect,
        event_idx=event_idx,
        in_order=in_order,
        allocator=allocator,
        vq_index=vq_index,
    )


__all__ = [
    "Chain",
    "ChainReader",
    "ChainWriter",
    "DeviceQueue",
    "DriverQueue",
    "PackedDeviceQueue",
    "PackedDriverQueue",
    "PackedRing",
    "RingLayout",
    "ShortChain",
    "SplitDeviceQueue",
    "SplitDriverQueue",
    "SplitRing",
    "decode_notification",
    "device_queue",
    "driver_queue",
    "encode_notification",
    "scatter",
    "view_slices",
]
