"""An in-process test harness for ring peers (like rust-vmm's ``mock.rs``).

:func:`ring_pair` builds one guest memory holding one virtqueue and returns
both ends of it, so a device model can be tested against a driver end (or a
driver against a device end) without a transport. The ``put_*`` and
``publish`` helpers write ring contents directly, the way a buggy or hostile
peer would, in the ring's byte order:

    pair = ring_pair(8, event_idx=True)
    pair.driver.add([(pair.buffer(b"ping"), 4)], [(pair.alloc(16), 16)], token="req")
    (chain,) = pair.device.pop_many()
    pair.device.push_many([(chain, chain.write(b"pong"))])
    assert pair.driver.get_used() == [("req", 4)]
"""

from __future__ import annotations

from dataclasses import dataclass

from virtio.layout import ByteOrder
from virtio.memory import Allocator, GuestMemory
from virtio.queue import DeviceQueue, DriverQueue, RingLayout, device_queue, driver_queue
from virtio.queue.common import LE16, PVIRTQ_DESC, VIRTQ_DESC, VIRTQ_USED_ELEM

RING_BASE = 0x1000
BUF_BASE = 0x40000
MEM_SIZE = 4 << 20


@dataclass
class RingPair:
    """One virtqueue in one guest memory, with its driver end and its device end."""

    memory: GuestMemory
    allocator: Allocator
    layout: RingLayout
    driver: DriverQueue
    device: DeviceQueue
    order: ByteOrder = "little"

    def alloc(self, size: int, align: int = 16) -> int:
        return self.allocator.alloc(size, align)

    def buffer(self, data: bytes) -> int:
        """A guest buffer holding ``data``; returns its address."""
        addr = self.allocator.alloc(max(len(data), 1))
        self.memory.write(addr, data)
        return addr

    # -- hand-made ring contents, the way a hostile driver or device writes them ------

    def put_desc(self, index: int, addr: int, length: int, flags: int, nxt: int = 0) -> None:
        """Write split descriptor ``index`` directly into the table."""
        fmt = VIRTQ_DESC.with_order(self.order)
        self.memory.write(self.layout.desc + 16 * index, fmt.pack_raw(addr, length, flags, nxt))

    def put_table(self, addr: int, entries: list[tuple[int, int, int, int]]) -> None:
        """Write an indirect table of split descriptors (addr, len, flags, next) at ``addr``."""
        fmt = VIRTQ_DESC.with_order(self.order)
        self.memory.write(addr, b"".join(fmt.pack_raw(*e) for e in entries))

    def _u16(self, addr: int) -> int:
        value = LE16.with_order(self.order).unpack(self.memory.read(addr, 2))["value"]
        assert isinstance(value, int)
        return value

    def _put_u16(self, addr: int, value: int) -> None:
        self.memory.write(addr, LE16.with_order(self.order).pack(value=value & 0xFFFF))

    def publish(self, *heads: int, idx: int | None = None) -> None:
        """Put heads in the available ring and move its idx (split)."""
        avail = self.layout.driver
        current = self._u16(avail + 2)
        for i, head in enumerate(heads):
            self._put_u16(avail + 4 + 2 * ((current + i) % self.layout.size), head)
        self._put_u16(avail + 2, (current + len(heads)) if idx is None else idx)

    def put_used(self, slot: int, elem_id: int, length: int, idx: int) -> None:
        """Write a used element and the used idx (split), as a hostile device would."""
        used = self.layout.device
        fmt = VIRTQ_USED_ELEM.with_order(self.order)
        self.memory.write(used + 4 + 8 * slot, fmt.pack_raw(elem_id, length))
        self._put_u16(used + 2, idx)

    def put_packed(self, pos: int, addr: int, length: int, buf_id: int, flags: int) -> None:
        fmt = PVIRTQ_DESC.with_order(self.order)
        self.memory.write(self.layout.desc + 16 * pos, fmt.pack_raw(addr, length, buf_id, flags))

    def put_packed_table(self, addr: int, entries: list[tuple[int, int, int, int]]) -> None:
        """Write an indirect table of packed descriptors (addr, len, id, flags) at ``addr``."""
        fmt = PVIRTQ_DESC.with_order(self.order)
        self.memory.write(addr, b"".join(fmt.pack_raw(*e) for e in entries))


def ring_pair(
    size: int = 8,
    *,
    packed: bool = False,
    indirect: bool = False,
    event_idx: bool = False,
    in_order: bool = False,
    device_indirect: bool | None = None,
    order: ByteOrder = "little",
    legacy: bool = False,
) -> RingPair:
    """Both ends of one virtqueue of ``size`` entries.

    ``legacy`` lays the split ring out as a legacy interface does (one block,
    the used ring on the next 4096-byte boundary); ``order`` is the ring's
    byte order (big-endian is what a legacy Channel I/O guest uses).
    """
    memory = GuestMemory()
    memory.add(0, bytearray(MEM_SIZE))
    allocator = Allocator(BUF_BASE, MEM_SIZE - BUF_BASE)
    if legacy:
        if packed:
            raise ValueError("a legacy interface has no packed rings")
        layout = RingLayout.legacy(RING_BASE, size)
        if layout.device + RingLayout.part_sizes(size, False)[2] > BUF_BASE:
            raise ValueError(f"a legacy ring of {size} entries does not fit before the buffers")
    else:
        layout = RingLayout.contiguous(RING_BASE, size, packed)
    driver = driver_queue(
        memory,
        layout,
        indirect=indirect,
        event_idx=event_idx,
        in_order=in_order,
        allocator=allocator,
        order=order,
    )
    device = device_queue(
        memory,
        layout,
        indirect=indirect if device_indirect is None else device_indirect,
        event_idx=event_idx,
        in_order=in_order,
        order=order,
    )
    return RingPair(memory, allocator, layout, driver, device, order)
