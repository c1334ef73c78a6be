"""Split virtqueues: the descriptor table, available ring and used ring.

:class:`SplitRing` is the shared memory model; :class:`SplitDeviceQueue` and
:class:`SplitDriverQueue` are its two ends. Neither trusts the other: every
index, descriptor and length read from shared memory is checked, and a
violation raises :class:`~virtio.errors.RingError` naming the normative id.
"""

from __future__ import annotations

import bisect
import functools
import itertools
import operator
import struct
import sys
from collections import deque
from collections.abc import Sequence
from typing import NoReturn

from virtio.errors import DeviceModelError, GuestMemoryError, RingError
from virtio.layout import ByteOrder
from virtio.memory import Allocator, Memory
from virtio.queue.common import (
    AVAIL_F_NO_INTERRUPT,
    DESC_F_INDIRECT,
    DESC_F_NEXT,
    DESC_F_WRITE,
    MAX_QUEUE_SIZE,
    N_ALIGN,
    N_AVAIL_RING,
    N_DESC_TABLE,
    N_INDIRECT,
    N_MSG_FRAMING,
    N_USED_RING_DEV,
    USED_F_NO_NOTIFY,
    VIRTQ_DESC,
    VIRTQ_USED_ELEM,
    Chain,
    InflightTracker,
    RingLayout,
    U32Array,
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
#: Indirect tables this long or longer are first tried in whole-table steps.
_WHOLE_TABLE_MIN = 8
_LINKED = frozenset({DESC_F_NEXT, DESC_F_NEXT | DESC_F_WRITE})


@functools.lru_cache(maxsize=64)
def _table_struct(order: str, n: int) -> struct.Struct:
    """A whole table of ``n`` descriptors (addr, len, flags, next each)."""
    return struct.Struct(order + "QIHH" * n)


@functools.lru_cache(maxsize=64)
def _in_order(n: int) -> tuple[int, ...]:
    """The next fields of a table chained in order: 1, 2, ..., n - 1."""
    return tuple(range(1, n))


class SplitRing:
    """The three parts of a split virtqueue mapped from memory.

    ``order`` is the ring's byte order: little-endian for a modern device
    (VIRTIO_F_VERSION_1), the guest's native order through a legacy interface.
    """

    def __init__(self, memory: Memory, layout: RingLayout, order: ByteOrder = "little") -> None:
        if layout.packed:
            raise ValueError("a packed layout given to a split ring")
        check_queue_size(layout.size, packed=False)
        for addr, align, part in zip(
            (layout.desc, layout.driver, layout.device),
            RingLayout.alignments(False),
            ("descriptor table", "available ring", "used ring"),
            strict=True,
        ):
            if addr % align:
                raise RingError(f"{part} at {addr:#x} is not {align}-byte aligned", N_ALIGN)
        self.memory = memory
        self.layout = layout
        self.order = order
        self.size = layout.size
        self.mask = layout.size - 1
        # Descriptors and used elements, precompiled for the ring's byte order.
        self.desc_struct = VIRTQ_DESC.with_order(order).struct
        self.elem_struct = VIRTQ_USED_ELEM.with_order(order).struct
        desc_len, avail_len, used_len = RingLayout.part_sizes(layout.size, False)
        try:
            self.desc = memory.view(layout.desc, desc_len)
            self.avail = memory.view(layout.driver, avail_len)
            self.used = memory.view(layout.device, used_len)
        except GuestMemoryError as err:
            raise RingError(f"virtqueue outside guest memory: {err.message}", N_ALIGN) from err
        # Indices, flags and event words are accessed as whole u16s (see u16_array).
        self.avail16 = u16_array(self.avail, order)
        self.used16 = u16_array(self.used, order)
        # The used ring's (id, len) pairs as single u32 stores, two per element.
        self.used_elems: U32Array = u32_array(self.used[4 : 4 + 8 * self.size], order)
        self._avail_entries = (
            self.avail[4 : 4 + 2 * self.size].cast("H") if sys.byteorder == order else None
        )
        self._entries_format = "<" if order == "little" else ">"
        # Offsets of the event-index words that trail each ring.
        self.used_event_off = 4 + 2 * self.size
        self.avail_event_off = 4 + 8 * self.size

    def avail_entries(self, start: int, count: int) -> list[int]:
        """``count`` available-ring entries from slot ``start`` (no wrap)."""
        if self._avail_entries is not None:
            return self._avail_entries[start : start + count].tolist()
        return list(
            struct.unpack_from(f"{self._entries_format}{count}H", self.avail, 4 + 2 * start)
        )


class SplitDeviceQueue:
    """The device's end of a split virtqueue."""

    packed = False

    def __init__(
        self,
        ring: SplitRing,
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
        self.last_avail = 0  # next available-ring slot to read (free-running u16)
        self.used_idx = 0  # our copy of used->idx
        self._signalled = 0
        self._signalled_valid = False
        self._inflight = 0
        # With VIRTIO_F_IN_ORDER, the chains in the order they were popped.
        self._in_order_chains: deque[Chain] = deque()
        #: Records what is in flight in memory that outlives this process (vhost-user).
        self.tracker: InflightTracker | None = None

    # -- state for save/restore (vhost-user GET/SET_VRING_BASE) --------------

    def set_base(self, last_avail: int, used_idx: int | None = None) -> None:
        self.last_avail = last_avail & 0xFFFF
        self.used_idx = self.ring.used16[1] if used_idx is None else used_idx & 0xFFFF
        self._signalled_valid = False
        self._inflight = (self.last_avail - self.used_idx) & 0xFFFF
        self._in_order_chains.clear()

    def reset(self) -> None:
        """Forget all ring state (queue reset): nothing popped, nothing used."""
        self.last_avail = 0
        self.used_idx = 0
        self._signalled = 0
        self._signalled_valid = False
        self._inflight = 0
        self._in_order_chains.clear()

    # -- available side --------------------------------------------------------

    def avail_idx(self) -> int:
        return int(self.ring.avail16[1])

    def pending(self) -> int:
        """How many buffers the driver has made available and we have not popped."""
        n = (self.avail_idx() - self.last_avail) & 0xFFFF
        if n > self.size:
            raise RingError(
                f"available idx is {n} entries ahead of the device (queue size {self.size})",
                N_AVAIL_RING,
            )
        return n

    def pop(self) -> Chain | None:
        chains = self.pop_many(1)
        return chains[0] if chains else None

    def pop_many(self, limit: int = 1 << 16) -> list[Chain]:
        """Pop up to ``limit`` available chains, reading the available idx once."""
        ring = self.ring
        avail_idx = ring.avail16[1]
        last = self.last_avail
        n = (avail_idx - last) & 0xFFFF
        if n == 0:
            return []
        if n + self._inflight > self.size:
            raise RingError(
                f"available idx {avail_idx} is {n} entries ahead of the device with "
                f"{self._inflight} in flight (queue size {self.size})",
                N_AVAIL_RING,
            )
        if n > limit:
            n = limit
        size = self.size
        start = last & ring.mask
        # All heads of the batch in one or two slices of the ring.
        if start + n <= size:
            heads = ring.avail_entries(start, n)
        else:
            heads = ring.avail_entries(start, size - start) + ring.avail_entries(
                0, n - (size - start)
            )
        desc = ring.desc
        memory = ring.memory
        iovecs = memory.iovecs
        # The region holding most buffers, checked inline before the general lookup.
        r_gpa, r_size, r_view = fast_region(memory)
        unpack_desc = ring.desc_struct.unpack_from
        out: list[Chain] = []
        append = out.append
        bad_head = None
        if max(heads) >= size:
            # Take the good heads before the bad one, then report it.
            bad = next(i for i, h in enumerate(heads) if h >= size)
            bad_head = heads[bad]
            heads = heads[:bad]
        chained = DESC_F_NEXT | DESC_F_INDIRECT  # locals: no global lookups per chain
        write = DESC_F_WRITE
        failed = True
        try:
            for head in heads:
                addr, length, flags, _next = unpack_desc(desc, head << 4)
                if flags & chained:
                    append(self._walk(head))
                    continue
                # The common case: one direct descriptor.
                off = addr - r_gpa
                if off >= 0 and off + length <= r_size:
                    views: tuple[memoryview, ...] = (r_view[off : off + length],)
                else:
                    try:
                        views = tuple(iovecs(addr, length))
                    except GuestMemoryError as err:
                        raise RingError(f"descriptor {head}: {err.message}", N_DESC_TABLE) from err
                if flags & write:
                    append(Chain(head, (), views, 0, length, 1))
                else:
                    append(Chain(head, views, (), length, 0, 1))
            failed = False
        finally:
            # A head that failed its checks counts as taken: it is never served.
            self.last_avail = (last + len(out) + failed) & 0xFFFF
            self._inflight += len(out)
            if self.in_order:
                self._in_order_chains.extend(out)
            if self.tracker is not None and out:
                self.tracker.popped([chain.head for chain in out])
        if bad_head is not None:
            raise RingError(f"available head {bad_head} >= queue size {size}", N_AVAIL_RING)
        return out

    def chain_at(self, head: int) -> Chain:
        """Walk the chain at ``head`` again (to resubmit a request after a restart)."""
        if head >= self.size:
            raise RingError(f"head {head} >= queue size {self.size}", N_AVAIL_RING)
        # Counted in flight already: set_base() took it as popped and not used.
        chain = self._walk(head)
        if self.in_order:
            self._in_order_chains.append(chain)
        return chain

    def _walk(self, head: int) -> Chain:
        """Follow a chain with NEXT and/or INDIRECT descriptors, checking everything."""
        ring = self.ring
        unpack_desc = ring.desc_struct.unpack_from
        memory = ring.memory
        table = ring.desc
        table_size = self.size
        readable: list[memoryview] = []
        writable: list[memoryview] = []
        read_len = write_len = 0
        index = head
        seen = 0
        in_indirect = False
        r_gpa, r_size, r_view = fast_region(memory)
        while True:
            addr, length, flags, nxt = unpack_desc(table, index << 4)
            seen += 1
            if seen > table_size:
                raise RingError(
                    f"chain at head {head} is longer than its table ({table_size}): a loop",
                    N_DESC_TABLE,
                )
            if flags & DESC_F_INDIRECT:
                if not self.indirect:
                    raise RingError(
                        "INDIRECT descriptor without VIRTIO_F_INDIRECT_DESC", N_INDIRECT
                    )
                if in_indirect:
                    raise RingError("INDIRECT descriptor inside an indirect table", N_INDIRECT)
                if flags & DESC_F_NEXT:
                    raise RingError("descriptor has both INDIRECT and NEXT", N_INDIRECT)
                if length == 0 or length % 16:
                    raise RingError(
                        f"indirect table length {length} is not a non-zero multiple of 16",
                        N_INDIRECT,
                    )
                try:
                    table = memory.view(addr, length)
                except GuestMemoryError as err:
                    raise RingError(f"indirect table: {err.message}", N_INDIRECT) from err
                table_size = length // 16
                if table_size > MAX_QUEUE_SIZE:
                    # A device may limit chain length; nothing longer than a ring can be.
                    raise RingError(
                        f"indirect table of {table_size} descriptors is too long", N_MSG_FRAMING
                    )
                if table_size >= _WHOLE_TABLE_MIN:
                    chain = self._whole_table(head, table, readable, writable, read_len, write_len)
                    if chain is not None:
                        return chain
                index = 0
                seen = 0
                in_indirect = True
                continue
            off = addr - r_gpa
            if off >= 0 and off + length <= r_size:
                # The region of the last hit, checked inline: one view, appended.
                if flags & DESC_F_WRITE:
                    writable.append(r_view[off : off + length])
                    write_len += length
                elif writable:
                    raise RingError(
                        f"chain at head {head}: device-readable descriptor after a writable one",
                        N_MSG_FRAMING,
                    )
                else:
                    readable.append(r_view[off : off + length])
                    read_len += length
            else:
                try:
                    views = memory.iovecs(addr, length)
                except GuestMemoryError as err:
                    raise RingError(
                        f"descriptor at head {head}: {err.message}", N_DESC_TABLE
                    ) from err
                if flags & DESC_F_WRITE:
                    writable.extend(views)
                    write_len += length
                else:
                    if writable:
                        raise RingError(
                            f"chain at head {head}: device-readable descriptor after a "
                            "writable one",
                            N_MSG_FRAMING,
                        )
                    readable.extend(views)
                    read_len += length
            if read_len + write_len >= _MAX_CHAIN_BYTES:
                raise RingError(f"chain at head {head} is 2^32 bytes or longer", N_DESC_TABLE)
            if not flags & DESC_F_NEXT:
                return Chain(head, readable, writable, read_len, write_len)
            index = nxt
            if index >= table_size:
                raise RingError(
                    f"chain at head {head}: next {index} >= table size {table_size}",
                    N_INDIRECT if in_indirect else N_DESC_TABLE,
                )

    def _whole_table(
        self,
        head: int,
        table: memoryview,
        readable: list[memoryview],
        writable: list[memoryview],
        read_len: int,
        write_len: int,
    ) -> Chain | None:
        """An indirect table of the usual shape, checked and sliced in whole-table steps.

        The usual shape: descriptors chained in table order, readable ones before
        writable ones, none INDIRECT, all in the fast region, nothing writable
        before the table. Runs of descriptors that continue each other become one
        view. None for any other table: the caller walks it a descriptor at a time,
        with every check and error of its own.
        """
        n = len(table) // 16
        r_gpa, r_size, r_view = fast_region(self.ring.memory)
        flat = _table_struct(self.ring.desc_struct.format[0], n).unpack(table)
        flags = flat[2::4]
        if flat[3:-4:4] != _in_order(n) or not set(flags[:-1]) <= _LINKED:
            return None
        if flags[-1] & ~DESC_F_WRITE:
            return None
        # k: where the writable part starts; nothing readable may follow it.
        chained = DESC_F_NEXT | DESC_F_WRITE
        try:
            k = flags.index(chained, 0, n - 1)
        except ValueError:
            k = n - 1 if flags[-1] else n
        if k < n and (flags[k : n - 1].count(chained) != n - 1 - k or not flags[-1]):
            return None
        if k and writable:
            return None
        addrs, lens = flat[0::4], flat[1::4]
        total = sum(lens)
        if read_len + write_len + total >= _MAX_CHAIN_BYTES:
            return None
        ends = tuple(map(operator.add, addrs, lens))
        if min(addrs) < r_gpa or max(ends) > r_gpa + r_size:
            return None
        # A run ends where the next descriptor does not continue it, and at k.
        g = r_gpa
        inner = (
            [] if ends[:-1] == addrs[1:] else [i for i in range(1, n) if addrs[i] != ends[i - 1]]
        )
        if len(inner) == n - 1:  # nothing to merge: a view a descriptor
            views = [r_view[a - g : e - g] for a, e in zip(addrs, ends, strict=True)]
            first_writable = k
        else:
            at = bisect.bisect_left(inner, k)
            if 0 < k < n and (at == len(inner) or inner[at] != k):
                inner.insert(at, k)
            cuts = [0, *inner, n]
            views = [r_view[addrs[a] - g : ends[b - 1] - g] for a, b in itertools.pairwise(cuts)]
            first_writable = bisect.bisect_left(cuts, k)
        readable.extend(views[:first_writable])
        writable.extend(views[first_writable:])
        in_len = sum(lens[:k])
        return Chain(head, readable, writable, read_len + in_len, write_len + total - in_len)

    # -- used side -------------------------------------------------------------

    def push(self, chain: Chain, written: int) -> None:
        """Return one buffer to the driver with ``written`` bytes written."""
        self.push_many(((chain, written),))

    def push_many(self, items: Sequence[tuple[Chain, int]]) -> None:
        """Return several buffers, publishing the used idx once.

        With VIRTIO_F_IN_ORDER only the last buffer's entry is written, and the
        idx moves by the batch size: the driver counts the skipped ones as used.
        A request the device must not make (a buffer not in flight, a length
        beyond its writable bytes, out of order with IN_ORDER) raises
        :class:`~virtio.errors.DeviceModelError` and the used idx does not move:
        the driver sees nothing of the batch.
        """
        if not items:
            return
        ring = self.ring
        mask = ring.mask
        idx = self.used_idx
        elems = ring.used_elems
        if self.in_order:
            self._check_in_order(items)
            chain, written = items[-1]
            slot = (idx & mask) << 1
            elems[slot] = chain.head
            elems[slot + 1] = written
            idx = (idx + len(items)) & 0xFFFF
            for chain, _ in items:
                chain.live = False
        else:
            for chain, written in items:
                # Checked as it goes: a refused element only ever lands beyond the
                # published idx, where the driver never reads.
                if not (chain.live and 0 <= written <= chain.write_len):
                    self._refuse(items, chain, written)
                slot = (idx & mask) << 1
                elems[slot] = chain.head
                elems[slot + 1] = written
                chain.live = False
                idx += 1
            idx &= 0xFFFF
        tracker = self.tracker
        if tracker is not None:
            tracker.completing([chain.head for chain, _ in items])
        self.used_idx = idx
        self._inflight -= len(items)
        # The elements are in place before idx moves: the driver reads them in that order.
        ring.used16[1] = idx
        if tracker is not None:
            tracker.completed(idx)

    @staticmethod
    def _refuse(items: Sequence[tuple[Chain, int]], bad: Chain, written: int) -> NoReturn:
        reason = refusal(bad, written)
        for chain, _ in items:  # those taken before the bad one are in flight again
            if chain is bad:
                break
            chain.live = True
        raise DeviceModelError(reason)

    def _check_in_order(self, items: Sequence[tuple[Chain, int]]) -> None:
        take_in_order(self._in_order_chains, items)

    def needs_notify(self) -> bool:
        """Whether the driver wants a used-buffer notification for what was pushed."""
        # The used idx store must be visible before the driver's event word is read,
        # or a driver re-arming at that moment is never woken (store-load order).
        full_fence()
        new = self.used_idx
        old = self._signalled
        valid = self._signalled_valid
        self._signalled = new
        self._signalled_valid = True
        if self.event_idx:
            if not valid:
                return True
            event = self.ring.avail16[self.ring.used_event_off >> 1]
            return need_event(event, new, old)
        # Without event idx the device must notify unless the driver set NO_INTERRUPT
        # (it ignores used_event, as the device requirement says).
        return not (self.ring.avail16[0] & AVAIL_F_NO_INTERRUPT)

    def disable_notifications(self) -> None:
        """Ask the driver not to kick (a hint; the device still copes with kicks)."""
        if not self.event_idx:
            self.ring.used16[0] = USED_F_NO_NOTIFY

    def enable_notifications(self) -> bool:
        """Ask for kicks again; True if buffers arrived meanwhile (process them)."""
        if self.event_idx:
            self.ring.used16[self.ring.avail_event_off >> 1] = self.last_avail
        else:
            self.ring.used16[0] = 0
        # Re-check only after the re-arming store is visible (store-load order).
        full_fence()
        return self.avail_idx() != self.last_avail


class SplitDriverQueue:
    """The driver's end of a split virtqueue.

    Buffers are given as guest (or IOVA) address ranges; ``add`` returns the
    head descriptor index, and ``get_used`` returns the caller's token.
    """

    packed = False

    def __init__(
        self,
        ring: SplitRing,
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
        """Clear the rings and all bookkeeping (device reset or queue reset)."""
        ring = self.ring
        ring.desc[:] = bytes(len(ring.desc))
        ring.avail[:] = bytes(len(ring.avail))
        # The driver MUST initialize the used ring's flags to 0.
        ring.used[:] = bytes(len(ring.used))
        size = self.size
        self.avail_idx = 0
        self.last_used = 0
        self._kicked = 0
        self.num_free = size
        self._free: list[int] = list(range(size - 1, -1, -1))
        self._next_desc = 0
        self._tokens: list[object | None] = [None] * size
        self._ndesc: list[int] = [0] * size
        self._in_len: list[int] = [0] * size
        self._descs: list[list[int] | None] = [None] * size
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
        """Make a buffer available: ``out`` device-readable, then ``in_`` writable."""
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
        in_len = sum(n for _, n in in_)
        if sum(n for _, n, _ in segments) >= 1 << 32:
            raise ValueError("a descriptor chain must be shorter than 2^32 bytes")
        ring = self.ring
        desc = ring.desc
        pack_desc = ring.desc_struct.pack_into
        if use_indirect:
            assert self.allocator is not None
            if self.num_free < 1:
                raise BufferError("virtqueue full")
            if total > self.size:
                raise ValueError(f"chain of {total} exceeds the queue size {self.size}")
            table_addr = self.allocator.alloc(16 * total, 16)
            table = bytearray(16 * total)
            for i, (addr, length, flags) in enumerate(segments):
                last = i == total - 1
                pack_desc(
                    table,
                    16 * i,
                    addr,
                    length,
                    flags | (0 if last else DESC_F_NEXT),
                    0 if last else i + 1,
                )
            ring.memory.write(table_addr, table)
            head = self._take_descs(1)[0]
            pack_desc(desc, head << 4, table_addr, 16 * total, DESC_F_INDIRECT, 0)
            self._indirect_tables[head] = table_addr
            chain = [head]
        else:
            if total > self.num_free:
                raise BufferError("virtqueue full")
            chain = self._take_descs(total)
            for i, (addr, length, flags) in enumerate(segments):
                last = i == total - 1
                nxt = 0 if last else chain[i + 1]
                pack_desc(
                    desc, chain[i] << 4, addr, length, flags | (0 if last else DESC_F_NEXT), nxt
                )
        head = chain[0]
        self._tokens[head] = token
        self._ndesc[head] = len(chain)
        self._in_len[head] = in_len
        self._descs[head] = chain
        self._outstanding.append(head)
        idx = self.avail_idx
        ring.avail16[2 + (idx & ring.mask)] = head
        idx = (idx + 1) & 0xFFFF
        self.avail_idx = idx
        # The ring entry and descriptors are written before idx publishes them.
        ring.avail16[1] = idx
        return head

    def _add_one(self, addr: int, length: int, write: bool, token: object) -> int:
        if length >= 1 << 32:
            raise ValueError("a descriptor chain must be shorter than 2^32 bytes")
        if self.num_free < 1:
            raise BufferError("virtqueue full")
        ring = self.ring
        (head,) = self._take_descs(1)
        ring.desc_struct.pack_into(
            ring.desc, head << 4, addr, length, DESC_F_WRITE if write else 0, 0
        )
        self._tokens[head] = token
        self._ndesc[head] = 1
        self._in_len[head] = length if write else 0
        self._descs[head] = [head]
        self._outstanding.append(head)
        idx = self.avail_idx
        ring.avail16[2 + (idx & ring.mask)] = head
        idx = (idx + 1) & 0xFFFF
        self.avail_idx = idx
        # The ring entry and descriptor are written before idx publishes them.
        ring.avail16[1] = idx
        return head

    def _take_descs(self, n: int) -> list[int]:
        self.num_free -= n
        if self.in_order:
            # In order, descriptors are used in ring order from offset 0, wrapping.
            start = self._next_desc
            self._next_desc = (start + n) % self.size
            return [(start + i) % self.size for i in range(n)]
        free = self._free
        return [free.pop() for _ in range(n)]

    def kick_needed(self) -> bool:
        """Whether to notify the device about what was added since the last call."""
        new = self.avail_idx
        old = self._kicked
        self._kicked = new
        if new == old:
            return False
        ring = self.ring
        # The avail idx store must be visible before the device's event word is read.
        full_fence()
        if self.event_idx:
            event = ring.used16[ring.avail_event_off >> 1]
            return need_event(event, new, old)
        return not (ring.used16[0] & USED_F_NO_NOTIFY)

    def notification_value(self, vqn: int | None = None) -> int:
        """The VIRTIO_F_NOTIFICATION_DATA value for the next kick."""
        return encode_notification(self.vq_index if vqn is None else vqn, self.avail_idx)

    def used_idx(self) -> int:
        return int(self.ring.used16[1])

    def has_used(self) -> bool:
        return self.used_idx() != self.last_used

    def get_used(self) -> list[tuple[object, int]]:
        """Harvest every used buffer: (token, bytes written) in completion order."""
        ring = self.ring
        used = ring.used
        used_idx = ring.used16[1]
        last = self.last_used
        n = (used_idx - last) & 0xFFFF
        if n == 0:
            return []
        outstanding = len(self._outstanding)
        if n > outstanding:
            raise RingError(
                f"used idx moved by {n} with only {outstanding} buffers outstanding",
                N_USED_RING_DEV,
            )
        out: list[tuple[object, int]] = []
        mask = ring.mask
        unpack_elem = ring.elem_struct.unpack_from
        while n:
            head, written = unpack_elem(used, 4 + ((last & mask) << 3))
            if head >= self.size or self._descs[head] is None:
                raise RingError(f"used id {head} was never made available", N_USED_RING_DEV)
            if written > self._in_len[head] and self.clamp_used_len:
                self.overlong_used += 1
                written = self._in_len[head]
            if written > self._in_len[head]:
                raise RingError(
                    f"used len {written} exceeds the {self._in_len[head]} writable bytes of "
                    f"buffer {head}",
                    N_USED_RING_DEV,
                )
            if self.in_order:
                # A batch: every buffer made available up to ``head`` is done;
                # the skipped ones count as fully used.
                batch = 0
                while True:
                    first = self._outstanding.popleft()
                    batch += 1
                    done_len = written if first == head else self._in_len[first]
                    out.append((self._release(first), done_len))
                    if first == head:
                        break
                if batch > n:
                    raise RingError(
                        f"in-order batch of {batch} buffers but used idx moved by {n}",
                        N_USED_RING_DEV,
                    )
                n -= batch
                last = (last + batch) & 0xFFFF
            else:
                self._outstanding.remove(head)
                out.append((self._release(head), written))
                n -= 1
                last = (last + 1) & 0xFFFF
        self.last_used = last
        return out

    def _release(self, head: int) -> object:
        token = self._tokens[head]
        chain = self._descs[head]
        assert chain is not None
        self._tokens[head] = None
        self._descs[head] = None
        self.num_free += len(chain)
        if not self.in_order:
            self._free.extend(reversed(chain))
        table = self._indirect_tables.pop(head, None)
        if table is not None and self.allocator is not None:
            self.allocator.free(table)
        return token

    def disable_interrupts(self) -> None:
        if not self.event_idx:
            self.ring.avail16[0] = AVAIL_F_NO_INTERRUPT

    def enable_interrupts(self) -> bool:
        """Ask for used-buffer notifications; True if used buffers are already waiting."""
        if self.event_idx:
            self.ring.avail16[self.ring.used_event_off >> 1] = self.last_used
        else:
            self.ring.avail16[0] = 0
        full_fence()
        return self.has_used()

    def detach_unused(self) -> list[object]:
        """Take back every outstanding buffer (after a device or queue reset)."""
        tokens = [self._release(head) for head in list(self._outstanding)]
        self._outstanding.clear()
        return tokens

    @property
    def outstanding(self) -> int:
        return len(self._outstanding)
