"""Packed virtqueues: one descriptor ring plus two event suppression structures.

Availability and use are signalled by the AVAIL/USED flag bits compared with
each side's wrap counter. :class:`PackedDeviceQueue` and
:class:`PackedDriverQueue` are the two ends of one :class:`PackedRing`.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence

from virtio.errors import DeviceModelError, GuestMemoryError, RingError
from virtio.layout import ByteOrder
from virtio.memory import Allocator, Memory
from virtio.queue.common import (
    DESC_F_AVAIL,
    DESC_F_INDIRECT,
    DESC_F_NEXT,
    DESC_F_USED,
    DESC_F_WRITE,
    MAX_QUEUE_SIZE,
    N_MSG_FRAMING,
    N_PACKED_ALIGN,
    N_PACKED_DESC_DEV,
    N_PACKED_INDIRECT,
    N_PACKED_SG,
    PVIRTQ_DESC,
    RING_EVENT_FLAGS_DESC,
    RING_EVENT_FLAGS_DISABLE,
    RING_EVENT_FLAGS_ENABLE,
    Chain,
    PackedDesc,
    PackedInflightTracker,
    RingLayout,
    check_queue_size,
    encode_notification,
    fast_region,
    need_event,
    refusal,
    take_in_order,
    u16_array,
    u32_array,
)
from virtio.queue.fence import full_fence

_MAX_CHAIN_BYTES = 1 << 32
_BOTH = DESC_F_AVAIL | DESC_F_USED


class PackedRing:
    """The descriptor ring and the driver/device event suppression areas.

    Packed rings need VIRTIO_F_VERSION_1, so on the wire they are always
    little-endian; ``order`` exists so one ring model serves every layout the
    property tests exercise.
    """

    def __init__(self, memory: Memory, layout: RingLayout, order: ByteOrder = "little") -> None:
        if not layout.packed:
            raise ValueError("a split layout given to a packed ring")
        check_queue_size(layout.size, packed=True)
        for addr, align, part in zip(
            (layout.desc, layout.driver, layout.device),
            RingLayout.alignments(True),
            ("descriptor ring", "driver event suppression", "device event suppression"),
            strict=True,
        ):
            if addr % align:
                raise RingError(f"{part} at {addr:#x} is not {align}-byte aligned", N_PACKED_ALIGN)
        self.memory = memory
        self.layout = layout
        self.order = order
        self.size = layout.size
        self.desc_struct = PVIRTQ_DESC.with_order(order).struct
        try:
            self.desc = memory.view(layout.desc, 16 * layout.size)
            self.driver_event = memory.view(layout.driver, 4)
            self.device_event = memory.view(layout.device, 4)
        except GuestMemoryError as err:
            raise RingError(
                f"virtqueue outside guest memory: {err.message}", N_PACKED_ALIGN
            ) from err
        # Flags and event words move as whole u16s (see u16_array): element 8*i+7
        # is descriptor i's flags; events are (off_wrap, flags).
        self.desc16 = u16_array(self.desc, order)
        self.desc32 = u32_array(self.desc, order)
        self.driver_event16 = u16_array(self.driver_event, order)
        self.device_event16 = u16_array(self.device_event, order)


def _event_count(count: int, pos: int, wrap: int, off: int, event_wrap: int, size: int) -> int:
    """Turn an event (offset, wrap) into the free-running count scale of ``count``.

    ``count`` is how many descriptors have passed, sitting at ring position
    ``pos`` with wrap counter ``wrap``; an event with the other wrap counter
    belongs to the previous lap.
    """
    event = count - pos + off
    if event_wrap != wrap:
        event -= size
    return event


class PackedDeviceQueue:
    """The device's end of a packed virtqueue."""

    packed = True

    def __init__(
        self,
        ring: PackedRing,
        *,
        indirect: bool = False,
        event_idx: bool = False,
        in_order: bool = False,
    ) -> None:
        self.ring = ring
        self.size = ring.size
        self.indirect = indirect
        self.event_idx = event_idx
        self.in_order = in_order
        self.reset()

    def reset(self) -> None:
        #: Records in-flight buffers outside the process (vhost-user inflight fd).
        self.tracker: PackedInflightTracker | None = None
        self.next_avail = 0
        self.avail_wrap = 1
        self.next_used = 0
        self.used_wrap = 1
        # Free-running counts of descriptors passed, for event suppression maths.
        self._used_count = 0
        self._signalled = 0
        self._signalled_valid = False
        self._inflight = 0
        # With VIRTIO_F_IN_ORDER, the chains in the order they were popped.
        self._in_order_chains: deque[Chain] = deque()

    def set_base(self, next_avail: int, avail_wrap: int, next_used: int, used_wrap: int) -> None:
        """Resume at a saved position (vhost-user SET_VRING_BASE)."""
        if not (0 <= next_avail < self.size and 0 <= next_used < self.size):
            raise ValueError("packed ring position outside the ring")
        self.next_avail, self.avail_wrap = next_avail, avail_wrap & 1
        self.next_used, self.used_wrap = next_used, used_wrap & 1
        self._signalled_valid = False
        self._in_order_chains.clear()

    def _is_avail(self, flags: int, wrap: int) -> bool:
        avail = 1 if flags & DESC_F_AVAIL else 0
        used = 1 if flags & DESC_F_USED else 0
        return avail == wrap and used != wrap

    def has_available(self) -> bool:
        flags = self.ring.desc16[(self.next_avail << 3) + 7]
        return self._is_avail(flags, self.avail_wrap)

    def pop(self) -> Chain | None:
        chains = self.pop_many(1)
        return chains[0] if chains else None

    def pop_many(self, limit: int = 1 << 16) -> list[Chain]:
        ring = self.ring
        desc = ring.desc
        size = self.size
        iovecs = ring.memory.iovecs
        r_gpa, r_size, r_view = fast_region(ring.memory)
        unpack = ring.desc_struct.unpack_from
        out: list[Chain] = []
        append = out.append
        pos = self.next_avail
        wrap = self.avail_wrap
        # Available means AVAIL == wrap counter and USED != wrap counter.
        ready = DESC_F_AVAIL if wrap else DESC_F_USED
        desc16 = ring.desc16
        tracker = self.tracker
        chained = DESC_F_NEXT | DESC_F_INDIRECT  # locals: no global lookups per chain
        write = DESC_F_WRITE
        inflight = self._inflight
        try:
            while len(out) < limit:
                # The flags first, in one access: they say whether the rest is valid.
                flags = desc16[(pos << 3) + 7]
                if flags & _BOTH != ready:
                    break
                addr, length, buf_id, _flags = unpack(desc, pos << 4)
                if inflight >= size:
                    raise RingError(
                        f"more than {size} descriptors made available at once", N_PACKED_SG
                    )
                if flags & chained:
                    chain, next_pos, next_wrap = self._walk(pos, wrap)
                    inflight += chain.slots
                else:
                    off = addr - r_gpa
                    if off >= 0 and off + length <= r_size:
                        views: tuple[memoryview, ...] = (r_view[off : off + length],)
                    else:
                        try:
                            views = tuple(iovecs(addr, length))
                        except GuestMemoryError as err:
                            raise RingError(
                                f"descriptor at {pos}: {err.message}", N_PACKED_DESC_DEV
                            ) from err
                    if flags & write:
                        chain = Chain(buf_id, (), views, 0, length, 1)
                    else:
                        chain = Chain(buf_id, views, (), length, 0, 1)
                    if tracker is not None:
                        tracker.popped([(addr, length, buf_id, flags)])
                    next_pos, next_wrap = pos + 1, wrap
                    if next_pos == size:
                        next_pos = 0
                        next_wrap ^= 1
                    inflight += 1
                append(chain)
                # Progress only past a chain that passed every check.
                pos = next_pos
                if next_wrap != wrap:
                    wrap = next_wrap
                    ready = DESC_F_AVAIL if wrap else DESC_F_USED
        finally:
            # An error leaves the chains before it popped.
            self.next_avail = pos
            self.avail_wrap = wrap
            self._inflight = inflight
            if self.in_order:
                self._in_order_chains.extend(out)
        return out

    def _walk(self, pos: int, wrap: int) -> tuple[Chain, int, int]:
        ring = self.ring
        desc = ring.desc
        desc16 = ring.desc16
        unpack = ring.desc_struct.unpack_from
        size = self.size
        memory = ring.memory
        r_gpa, r_size, r_view = fast_region(memory)
        readable: list[memoryview] = []
        writable: list[memoryview] = []
        read_len = write_len = 0
        slots = 0
        start = pos
        tracker = self.tracker
        record: list[PackedDesc] | None = [] if tracker is not None else None
        ready = DESC_F_AVAIL if wrap else DESC_F_USED
        while True:
            flags = desc16[(pos << 3) + 7]
            if slots and flags & _BOTH != ready:
                raise RingError(
                    f"chain at {start}: descriptor {pos} is not available yet", N_PACKED_SG
                )
            addr, length, buf_id, _flags = unpack(desc, pos << 4)
            if record is not None:
                record.append((addr, length, buf_id, flags))
            slots += 1
            pos += 1
            if pos == size:
                pos = 0
                wrap ^= 1
                ready = DESC_F_AVAIL if wrap else DESC_F_USED
            if flags & DESC_F_INDIRECT:
                chain = self._indirect(addr, length, flags, buf_id, slots, readable, writable)
                if tracker is not None and record is not None:
                    tracker.popped(record)
                return chain, pos, wrap
            # A direct descriptor: the region of the last hit is checked inline.
            off = addr - r_gpa
            if off >= 0 and off + length <= r_size:
                piece = r_view[off : off + length]
                if flags & DESC_F_WRITE:
                    writable.append(piece)
                    write_len += length
                else:
                    if writable:
                        raise RingError(
                            "device-readable descriptor after a writable one", N_MSG_FRAMING
                        )
                    readable.append(piece)
                    read_len += length
                if read_len + write_len >= _MAX_CHAIN_BYTES:
                    raise RingError("chain is 2^32 bytes or longer", N_PACKED_SG)
            else:
                read_len, write_len = self._add_segment(
                    memory, addr, length, flags, readable, writable, read_len, write_len
                )
            if not flags & DESC_F_NEXT:
                if tracker is not None and record is not None:
                    tracker.popped(record)
                return Chain(buf_id, readable, writable, read_len, write_len, slots), pos, wrap
            if slots == size:
                # The list would run into its own first descriptor.
                raise RingError(
                    f"chain at {start} is longer than the queue ({size} descriptors)", N_PACKED_SG
                )

    def _indirect(
        self,
        addr: int,
        length: int,
        flags: int,
        buf_id: int,
        slots: int,
        readable: list[memoryview],
        writable: list[memoryview],
    ) -> Chain:
        """The buffer an indirect descriptor points to (one table, WRITE the only flag)."""
        if not self.indirect:
            raise RingError("INDIRECT descriptor without VIRTIO_F_INDIRECT_DESC", N_PACKED_INDIRECT)
        if flags & DESC_F_NEXT or slots > 1:
            raise RingError("INDIRECT descriptor inside a NEXT-linked list", N_PACKED_INDIRECT)
        if length == 0 or length % 16:
            raise RingError(
                f"indirect table length {length} is not a non-zero multiple of 16",
                N_PACKED_INDIRECT,
            )
        if length // 16 > MAX_QUEUE_SIZE:
            raise RingError(
                f"indirect table of {length // 16} descriptors is too long", N_PACKED_INDIRECT
            )
        memory = self.ring.memory
        try:
            table = memory.view(addr, length)
        except GuestMemoryError as err:
            raise RingError(f"indirect table: {err.message}", N_PACKED_INDIRECT) from err
        unpack = self.ring.desc_struct.unpack_from
        r_gpa, r_size, r_view = fast_region(memory)
        read_len = write_len = 0
        for i in range(length // 16):
            t_addr, t_len, _t_id, t_flags = unpack(table, i << 4)
            off = t_addr - r_gpa
            if t_flags == DESC_F_WRITE and off >= 0 and off + t_len <= r_size:
                writable.append(r_view[off : off + t_len])  # the common case, inline
                write_len += t_len
                continue
            if t_flags & ~DESC_F_WRITE:
                raise RingError(
                    f"indirect entry {i} sets flags {t_flags:#x} (only WRITE allowed)",
                    N_PACKED_INDIRECT,
                )
            read_len, write_len = self._add_segment(
                memory, t_addr, t_len, t_flags, readable, writable, read_len, write_len
            )
        if read_len + write_len >= _MAX_CHAIN_BYTES:
            raise RingError("chain is 2^32 bytes or longer", N_PACKED_SG)
        return Chain(buf_id, readable, writable, read_len, write_len, 1)

    def chain_from(self, descs: list[PackedDesc]) -> Chain:
        """Rebuild a buffer from its recorded ring descriptors (resubmission)."""
        memory = self.ring.memory
        readable: list[memoryview] = []
        writable: list[memoryview] = []
        read_len = write_len = 0
        addr, length, buf_id, flags = descs[0]
        if flags & DESC_F_INDIRECT:
            try:
                table = memory.view(addr, length)
            except GuestMemoryError as err:
                raise RingError(f"indirect table: {err.message}", N_PACKED_INDIRECT) from err
            unpack = self.ring.desc_struct.unpack_from
            entries = [unpack(table, i << 4) for i in range(length // 16)]
            segments = [(a, n, f) for a, n, _i, f in entries]
        else:
            segments = [(a, n, f) for a, n, _i, f in descs]
            buf_id = descs[-1][2]
        for a, n, f in segments:
            read_len, write_len = self._add_segment(
                memory, a, n, f, readable, writable, read_len, write_len
            )
        chain = Chain(buf_id, readable, writable, read_len, write_len, len(descs))
        if self.in_order:
            self._in_order_chains.append(chain)
        return chain

    @staticmethod
    def _add_segment(
        memory: Memory,
        addr: int,
        length: int,
        flags: int,
        readable: list[memoryview],
        writable: list[memoryview],
        read_len: int,
        write_len: int,
    ) -> tuple[int, int]:
        try:
            views = memory.iovecs(addr, length)
        except GuestMemoryError as err:
            raise RingError(f"descriptor: {err.message}", N_PACKED_DESC_DEV) from err
        if flags & DESC_F_WRITE:
            writable.extend(views)
            write_len += length
        else:
            if writable:
                raise RingError("device-readable descriptor after a writable one", N_MSG_FRAMING)
            readable.extend(views)
            read_len += length
        if read_len + write_len >= _MAX_CHAIN_BYTES:
            raise RingError("chain is 2^32 bytes or longer", N_PACKED_SG)
        return read_len, write_len

    # -- used side -------------------------------------------------------------

    def push(self, chain: Chain, written: int) -> None:
        self.push_many(((chain, written),))

    def push_many(self, items: Sequence[tuple[Chain, int]]) -> None:
        """Write used descriptors; in order, one descriptor covers the whole batch.

        A request the device must not make raises
        :class:`~virtio.errors.DeviceModelError` before anything is written
        (each used descriptor is visible to the driver the moment it is written).
        """
        if not items:
            return
        if self.in_order:
            self._check_in_order(items)
            last, written = items[-1]
            batches: Sequence[tuple[Chain, int]] = ((last, written),)
            total = sum(chain.slots for chain, _ in items)
        else:
            total = 0
            for chain, written in items:
                if not (chain.live and 0 <= written <= chain.write_len):
                    raise DeviceModelError(refusal(chain, written))
                total += chain.slots
            batches = items
        desc16 = self.ring.desc16
        desc32 = self.ring.desc32
        size = self.size
        pos = self.next_used
        wrap = self.used_wrap
        tracker = self.tracker
        if tracker is not None:
            laps, after = divmod(pos + total, size)
            tracker.completing([c.head for c, _ in items], after, wrap ^ (laps & 1))
        used_bits = _BOTH if wrap else 0
        in_order = self.in_order
        for chain, written in batches:
            # id and len land before the flags that hand the descriptor back; each is
            # one native store, and the address (reserved in used descriptors) is left.
            desc32[(pos << 2) + 2] = written
            desc16[(pos << 3) + 6] = chain.head
            desc16[(pos << 3) + 7] = used_bits | (DESC_F_WRITE if written else 0)
            pos += total if in_order else chain.slots
            if pos >= size:
                pos -= size
                wrap ^= 1
                used_bits = _BOTH if wrap else 0
            chain.live = False
        if in_order:
            for chain, _ in items:
                chain.live = False
        self._used_count += total
        self._inflight -= total
        self.next_used = pos
        self.used_wrap = wrap
        if tracker is not None:
            tracker.completed()

    def _check_in_order(self, items: Sequence[tuple[Chain, int]]) -> None:
        take_in_order(self._in_order_chains, items)

    def needs_notify(self) -> bool:
        # The used flags must be visible before the driver's event structure is read.
        full_fence()
        new = self._used_count
        old = self._signalled
        valid = self._signalled_valid
        self._signalled = new
        self._signalled_valid = True
        event16 = self.ring.driver_event16
        flags = event16[1]
        off_wrap = event16[0]
        flags &= 3
        if flags == RING_EVENT_FLAGS_DISABLE:
            return False
        if flags == RING_EVENT_FLAGS_DESC and self.event_idx:
            if not valid:
                return True
            event = _event_count(
                new, self.next_used, self.used_wrap, off_wrap & 0x7FFF, off_wrap >> 15, self.size
            )
            return need_event(event & 0xFFFF, new & 0xFFFF, old & 0xFFFF)
        return True

    def disable_notifications(self) -> None:
        self.ring.device_event16[1] = RING_EVENT_FLAGS_DISABLE

    def enable_notifications(self) -> bool:
        if self.event_idx:
            off_wrap = self.next_avail | self.avail_wrap << 15
            self.ring.device_event16[0] = off_wrap
            self.ring.device_event16[1] = RING_EVENT_FLAGS_DESC
        else:
            self.ring.device_event16[1] = RING_EVENT_FLAGS_ENABLE
        # Re-check only after the re-arming store is visible (store-load order).
        full_fence()
        return self.has_available()


class PackedDriverQueue:
    """The driver's end of a packed virtqueue."""

    packed = True

    def __init__(
        self,
        ring: PackedRing,
        *,
        indirect: bool = False,
        event_idx: bool = False,
        in_order: bool = False,
        allocator: Allocator | None = None,
        vq_index: int = 0,
    ) -> None:
        self.ring = ring
        self.size = ring.size
        self.indirect = indirect and allocator is not None
        self.event_idx = event_idx
        self.in_order = in_order
        self.allocator = allocator
        self.vq_index = vq_index
        #: Take a used len past the writable bytes as all of them (counted in
        #: ``overlong_used``) instead of a violation: for devices known to overcount.
        self.clamp_used_len = False
        self.overlong_used = 0
        self.reset()

    def reset(self) -> None:
        ring = self.ring
        ring.desc[:] = bytes(len(ring.desc))
        ring.driver_event[:] = bytes(4)
        ring.device_event[:] = bytes(4)
        size = self.size
        self.next_avail = 0
        self.avail_wrap = 1
        self.next_used = 0
        self.used_wrap = 1
        self.num_free = size
        self._avail_count = 0
        self._kicked = 0
        self._free_ids: list[int] = list(range(size - 1, -1, -1))
        self._tokens: list[object | None] = [None] * size
        self._slots: list[int] = [0] * size
        self._in_len: list[int] = [0] * size
        self._live: list[bool] = [False] * size
        self._indirect_tables: dict[int, int] = {}
        self._outstanding: deque[int] = deque()

    def add(
        self,
        out: Sequence[tuple[int, int]],
        in_: Sequence[tuple[int, int]] = (),
        token: object = None,
        *,
        use_indirect: bool | None = None,
    ) -> int:
        total = len(out) + len(in_)
        if total == 1 and not use_indirect:
            # The common case (a network frame, a receive buffer): one descriptor.
            return self._add_one(*(out[0] if out else in_[0]), bool(in_), token)
        if total == 0:
            raise ValueError("a buffer needs at least one segment")
        if use_indirect is None:
            use_indirect = self.indirect and total > 1
        elif use_indirect and self.allocator is None:
            raise ValueError("indirect descriptors need an allocator")
        segments = [(a, n, 0) for a, n in out] + [(a, n, DESC_F_WRITE) for a, n in in_]
        if sum(n for _, n, _ in segments) >= 1 << 32:
            raise ValueError("a descriptor chain must be shorter than 2^32 bytes")
        slots = 1 if use_indirect else total
        if slots > self.num_free or not self._free_ids:
            raise BufferError("virtqueue full")
        if total > self.size:
            raise ValueError(f"chain of {total} exceeds the queue size {self.size}")
        buf_id = self._free_ids.pop()
        ring = self.ring
        desc = ring.desc
        pack_desc = ring.desc_struct.pack_into
        if use_indirect:
            assert self.allocator is not None
            table_addr = self.allocator.alloc(16 * total, 16)
            table = bytearray(16 * total)
            for i, (addr, length, flags) in enumerate(segments):
                pack_desc(table, 16 * i, addr, length, 0, flags)
            ring.memory.write(table_addr, table)
            self._indirect_tables[buf_id] = table_addr
            entries = [(table_addr, 16 * total, DESC_F_INDIRECT)]
        else:
            entries = [
                (addr, length, flags | (DESC_F_NEXT if i < total - 1 else 0))
                for i, (addr, length, flags) in enumerate(segments)
            ]
        first = self.next_avail
        first_flags = 0
        pos = first
        wrap = self.avail_wrap
        for i, (addr, length, flags) in enumerate(entries):
            bits = DESC_F_AVAIL if wrap else DESC_F_USED
            if i == 0:
                # Flags 0 never read as available, whatever the wrap counter.
                first_flags = flags | bits
                pack_desc(desc, pos << 4, addr, length, buf_id, 0)
            else:
                pack_desc(desc, pos << 4, addr, length, buf_id, flags | bits)
            pos += 1
            if pos == self.size:
                pos = 0
                wrap ^= 1
        # The first descriptor's flags go last: that makes the whole list available.
        ring.desc16[(first << 3) + 7] = first_flags
        self.next_avail = pos
        self.avail_wrap = wrap
        self.num_free -= slots
        self._avail_count += slots
        self._tokens[buf_id] = token
        self._slots[buf_id] = slots
        self._in_len[buf_id] = sum(n for _, n in in_)
        self._live[buf_id] = True
        self._outstanding.append(buf_id)
        return buf_id

    def _add_one(self, addr: int, length: int, write: bool, token: object) -> int:
        if length >= 1 << 32:
            raise ValueError("a descriptor chain must be shorter than 2^32 bytes")
        if self.num_free < 1 or not self._free_ids:
            raise BufferError("virtqueue full")
        buf_id = self._free_ids.pop()
        ring = self.ring
        pos = self.next_avail
        wrap = self.avail_wrap
        ring.desc_struct.pack_into(ring.desc, pos << 4, addr, length, buf_id, 0)
        # The flags go last: they make the descriptor available.
        flags = (DESC_F_WRITE if write else 0) | (DESC_F_AVAIL if wrap else DESC_F_USED)
        ring.desc16[(pos << 3) + 7] = flags
        pos += 1
        if pos == self.size:
            pos = 0
            wrap ^= 1
        self.next_avail = pos
        self.avail_wrap = wrap
        self.num_free -= 1
        self._avail_count += 1
        self._tokens[buf_id] = token
        self._slots[buf_id] = 1
        self._in_len[buf_id] = length if write else 0
        self._live[buf_id] = True
        self._outstanding.append(buf_id)
        return buf_id

    def kick_needed(self) -> bool:
        new = self._avail_count
        old = self._kicked
        self._kicked = new
        if new == old:
            return False
        # The descriptor flags must be visible before the device's event structure is read.
        full_fence()
        event16 = self.ring.device_event16
        flags = event16[1]
        off_wrap = event16[0]
        flags &= 3
        if flags == RING_EVENT_FLAGS_DISABLE:
            return False
        if flags == RING_EVENT_FLAGS_DESC and self.event_idx:
            event = _event_count(
                new, self.next_avail, self.avail_wrap, off_wrap & 0x7FFF, off_wrap >> 15, self.size
            )
            return need_event(event & 0xFFFF, new & 0xFFFF, old & 0xFFFF)
        return True

    def notification_value(self, vqn: int | None = None) -> int:
        return encode_notification(
            self.vq_index if vqn is None else vqn, self.next_avail, self.avail_wrap
        )

    def has_used(self) -> bool:
        flags = self.ring.desc16[(self.next_used << 3) + 7]
        return self._is_used(flags)

    def _is_used(self, flags: int) -> bool:
        avail = 1 if flags & DESC_F_AVAIL else 0
        used = 1 if flags & DESC_F_USED else 0
        return avail == used == self.used_wrap

    def get_used(self) -> list[tuple[object, int]]:
        desc = self.ring.desc
        unpack = self.ring.desc_struct.unpack_from
        out: list[tuple[object, int]] = []
        while self._outstanding:
            pos = self.next_used
            flags = self.ring.desc16[(pos << 3) + 7]
            if not self._is_used(flags):
                break
            _addr, written, buf_id, _flags = unpack(desc, pos << 4)
            if buf_id >= self.size or not self._live[buf_id]:
                raise RingError(
                    f"used buffer id {buf_id} was never made available", N_PACKED_DESC_DEV
                )
            if not flags & DESC_F_WRITE:
                written = 0
            if written > self._in_len[buf_id] and self.clamp_used_len:
                self.overlong_used += 1
                written = self._in_len[buf_id]
            if written > self._in_len[buf_id]:
                raise RingError(
                    f"used len {written} exceeds the {self._in_len[buf_id]} writable bytes of "
                    f"buffer {buf_id}",
                    N_PACKED_DESC_DEV,
                )
            if self.in_order:
                slots = 0
                while True:
                    first = self._outstanding.popleft()
                    slots += self._slots[first]
                    done = written if first == buf_id else self._in_len[first]
                    out.append((self._release(first), done))
                    if first == buf_id:
                        break
            else:
                self._outstanding.remove(buf_id)
                slots = self._slots[buf_id]
                out.append((self._release(buf_id), written))
            pos += slots
            if pos >= self.size:
                pos -= self.size
                self.used_wrap ^= 1
            self.next_used = pos
        return out

    def _release(self, buf_id: int) -> object:
        token = self._tokens[buf_id]
        self._tokens[buf_id] = None
        self._live[buf_id] = False
        self.num_free += self._slots[buf_id]
        self._free_ids.append(buf_id)
        table = self._indirect_tables.pop(buf_id, None)
        if table is not None and self.allocator is not None:
            self.allocator.free(table)
        return token

    def disable_interrupts(self) -> None:
        self.ring.driver_event16[1] = RING_EVENT_FLAGS_DISABLE

    def enable_interrupts(self) -> bool:
        if self.event_idx:
            off_wrap = self.next_used | self.used_wrap << 15
            self.ring.driver_event16[0] = off_wrap
            self.ring.driver_event16[1] = RING_EVENT_FLAGS_DESC
        else:
            self.ring.driver_event16[1] = RING_EVENT_FLAGS_ENABLE
        full_fence()
        return self.has_used()

    def detach_unused(self) -> list[object]:
        tokens = [self._release(buf_id) for buf_id in list(self._outstanding)]
        self._outstanding.clear()
        return tokens

    @property
    def outstanding(self) -> int:
        return len(self._outstanding)
