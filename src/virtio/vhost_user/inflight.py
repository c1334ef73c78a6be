"""Inflight I/O tracking (vhost-user INFLIGHT_SHMFD) for split rings.

The back-end records, in shared memory the front-end keeps across back-end
restarts, which buffers it has taken and not yet returned. A restarted
back-end reads the record and serves those buffers again, in the order it
first took them, so no request the driver is waiting for is lost.

Region layout per queue (the back-end chooses it; the front-end only stores
it): a 16-byte header (features, version, desc_num, last_batch_head,
used_idx) then one 16-byte entry per descriptor (inflight, padding, next,
counter).
"""

from __future__ import annotations

from virtio.layout import Bytes, Layout, u8, u16, u32, u64
from virtio.queue import Chain, PackedDeviceQueue, SplitDeviceQueue

INFLIGHT_SPLIT_HEADER = Layout(
    "QueueRegionSplit",
    [
        ("features", u64),
        ("version", u16),
        ("desc_num", u16),
        ("last_batch_head", u16),
        ("used_idx", u16),
    ],
)
DESC_STATE_SPLIT = Layout(
    "DescStateSplit",
    [("inflight", u8), ("padding", Bytes(5)), ("next", u16), ("counter", u64)],
)
_HDR = INFLIGHT_SPLIT_HEADER.struct
_DESC = DESC_STATE_SPLIT.struct
_ALIGN = 64
_OFF_LAST_BATCH = INFLIGHT_SPLIT_HEADER.offset_of("last_batch_head")
_OFF_USED = INFLIGHT_SPLIT_HEADER.offset_of("used_idx")


def queue_region_size(queue_size: int) -> int:
    """Bytes one queue's record takes, rounded up so records stay aligned."""
    raw = INFLIGHT_SPLIT_HEADER.size + DESC_STATE_SPLIT.size * queue_size
    return (raw + _ALIGN - 1) // _ALIGN * _ALIGN


class InflightSplit:
    """The inflight record of one split queue, kept in a shared-memory view."""

    def __init__(self, view: memoryview, queue_size: int) -> None:
        if view.nbytes < queue_region_size(queue_size):
            raise ValueError("inflight region too small for the queue")
        self.view = view
        self.size = queue_size
        self.counter = 0
        self._batch: list[int] = []

    @property
    def initialized(self) -> bool:
        return bool(INFLIGHT_SPLIT_HEADER.unpack(self.view)["version"])

    def reset(self) -> None:
        self.view[: queue_region_size(self.size)] = bytes(queue_region_size(self.size))
        _HDR.pack_into(self.view, 0, 0, 1, self.size, 0, 0)
        self.counter = 0

    def _entry(self, head: int) -> int:
        return INFLIGHT_SPLIT_HEADER.size + DESC_STATE_SPLIT.size * head

    # -- InflightTracker -----------------------------------------------------------

    def popped(self, heads: list[int]) -> None:
        view = self.view
        for head in heads:
            off = self._entry(head)
            _DESC.pack_into(view, off, 0, b"", 0, self.counter)
            self.counter += 1
            view[off] = 1  # inflight, written after its counter

    def completing(self, heads: list[int]) -> None:
        view = self.view
        last = int.from_bytes(view[_OFF_LAST_BATCH : _OFF_LAST_BATCH + 2], "little")
        for head in heads:
            off = self._entry(head) + DESC_STATE_SPLIT.offset_of("next")
            view[off : off + 2] = last.to_bytes(2, "little")
            last = head
        view[_OFF_LAST_BATCH : _OFF_LAST_BATCH + 2] = last.to_bytes(2, "little")
        self._batch = heads

    def completed(self, used_idx: int) -> None:
        view = self.view
        for head in self._batch:
            view[self._entry(head)] = 0
        self._batch = []
        view[_OFF_USED : _OFF_USED + 2] = used_idx.to_bytes(2, "little")

    # -- after a restart -------------------------------------------------------------

    def pending(self, ring_used_idx: int) -> list[int]:
        """Heads still in flight, oldest first, after fixing up a half-recorded batch."""
        view = self.view
        header = INFLIGHT_SPLIT_HEADER.unpack(view)
        recorded = header["used_idx"]
        assert isinstance(recorded, int)
        if recorded != ring_used_idx:
            # The used idx moved but the inflight flags of that last batch were not
            # cleared: walk the batch list and clear them now.
            count = (ring_used_idx - recorded) & 0xFFFF
            head = header["last_batch_head"]
            assert isinstance(head, int)
            for _ in range(min(count, self.size)):
                if head >= self.size:
                    break
                off = self._entry(head)
                view[off] = 0
                head = int.from_bytes(view[off + 6 : off + 8], "little")
            view[_OFF_USED : _OFF_USED + 2] = ring_used_idx.to_bytes(2, "little")
        entries = []
        for head in range(self.size):
            inflight, _pad, _next, counter = _DESC.unpack_from(view, self._entry(head))
            if inflight:
                entries.append((counter, head))
        entries.sort()
        if entries:
            self.counter = entries[-1][0] + 1
        return [head for _, head in entries]

    def resume(self, queue: SplitDeviceQueue) -> list[Chain]:
        """Attach to ``queue`` and return the chains to serve again, oldest first."""
        if not self.initialized:
            self.reset()
            queue.tracker = self
            return []
        used_idx = int.from_bytes(queue.ring.used[2:4], "little")
        heads = self.pending(used_idx)
        # Everything taken so far is what was used plus what is still in flight.
        queue.set_base((used_idx + len(heads)) & 0xFFFF, used_idx)
        queue.tracker = self
        chains = []
        for head in heads:
            chains.append(queue.chain_at(head))
        return chains


# -- packed rings ---------------------------------------------------------------------
#
# The record keeps a copy of every descriptor taken (the ring itself is
# overwritten by used descriptors), threaded on a free list, and a
# committed ("old_") copy of the list head and used position so that a crash
# in the middle of returning a batch can be rolled back or forward.

INFLIGHT_PACKED_HEADER = Layout(
    "QueueRegionPacked",
    [
        ("features", u64),
        ("version", u16),
        ("desc_num", u16),
        ("free_head", u16),
        ("old_free_head", u16),
        ("used_idx", u16),
        ("old_used_idx", u16),
        ("used_wrap_counter", u8),
        ("old_used_wrap_counter", u8),
        ("padding", Bytes(10)),  # to 32 bytes: the entries hold u64s
    ],
)
DESC_STATE_PACKED = Layout(
    "DescStatePacked",
    [
        ("inflight", u8),
        ("padding", u8),
        ("next", u16),
        ("last", u16),
        ("num", u16),
        ("counter", u64),
        ("id", u16),
        ("flags", u16),
        ("len", u32),
        ("addr", u64),
    ],
)
_PH = INFLIGHT_PACKED_HEADER.struct
_PE = DESC_STATE_PACKED.struct


def packed_region_size(queue_size: int) -> int:
    raw = INFLIGHT_PACKED_HEADER.size + DESC_STATE_PACKED.size * queue_size
    return (raw + _ALIGN - 1) // _ALIGN * _ALIGN


class InflightPacked:
    """The inflight record of one packed queue (the vhost-user document's algorithm)."""

    def __init__(self, view: memoryview, queue_size: int) -> None:
        if view.nbytes < packed_region_size(queue_size):
            raise ValueError("inflight region too small for the queue")
        self.view = view
        self.size = queue_size
        self.counter = 0
        self.heads: dict[int, int] = {}  # buffer id -> entry holding its first descriptor
        self._batch: list[int] = []

    # header fields ------------------------------------------------------------------------

    def _h(self) -> list[int]:
        return [int(v) for v in _PH.unpack_from(self.view, 0)[:9]]

    def _set_h(self, **fields: int) -> None:
        values = dict(
            zip(
                (
                    "features",
                    "version",
                    "desc_num",
                    "free_head",
                    "old_free_head",
                    "used_idx",
                    "old_used_idx",
                    "used_wrap_counter",
                    "old_used_wrap_counter",
                ),
                self._h(),
                strict=True,
            )
        )
        values.update(fields)
        _PH.pack_into(self.view, 0, *values.values(), bytes(10))

    def _e(self, index: int) -> list[int]:
        return [int(v) for v in _PE.unpack_from(self.view, self._off(index))]

    def _set_e(self, index: int, **fields: int) -> None:
        names = (
            "inflight",
            "padding",
            "next",
            "last",
            "num",
            "counter",
            "id",
            "flags",
            "len",
            "addr",
        )
        values = dict(zip(names, self._e(index), strict=True))
        values.update(fields)
        _PE.pack_into(self.view, self._off(index), *values.values())

    def _off(self, index: int) -> int:
        return INFLIGHT_PACKED_HEADER.size + DESC_STATE_PACKED.size * index

    @property
    def initialized(self) -> bool:
        return self._h()[1] != 0

    def reset(self) -> None:
        self.view[: packed_region_size(self.size)] = bytes(packed_region_size(self.size))
        for i in range(self.size):
            self._set_e(i, next=(i + 1) % self.size)
        self._set_h(version=1, desc_num=self.size, used_wrap_counter=1, old_used_wrap_counter=1)
        self.counter = 0
        self.heads = {}

    # PackedInflightTracker ------------------------------------------------------------------

    def popped(self, descs: list[tuple[int, int, int, int]]) -> None:
        h = self._h()
        free_head, head = h[3], h[4]
        for k, (addr, length, buf_id, flags) in enumerate(descs):
            if k == 0:
                self._set_e(head, num=0, counter=self.counter)
                self.counter += 1
            if k == len(descs) - 1:
                self._set_e(head, last=free_head)
            self._set_e(head, num=self._e(head)[4] + 1)
            self._set_e(free_head, addr=addr, len=length, flags=flags, id=buf_id)
            free_head = self._e(free_head)[2]
        self._set_e(head, inflight=1)
        self.heads[descs[-1][2]] = head
        self._set_h(free_head=free_head, old_free_head=free_head)

    def completing(self, ids: list[int], next_used: int, used_wrap: int) -> None:
        free_head = self._h()[3]
        batch = []
        for buf_id in ids:
            entry = self.heads.pop(buf_id)
            self._set_e(self._e(entry)[3], next=free_head)
            free_head = entry
            batch.append(entry)
        self._batch = batch
        self._set_h(free_head=free_head, used_idx=next_used, used_wrap_counter=used_wrap)

    def completed(self) -> None:
        for entry in self._batch:
            self._set_e(entry, inflight=0)
        self._batch = []
        h = self._h()
        self._set_h(old_free_head=h[3], old_used_idx=h[5], old_used_wrap_counter=h[7])

    # after a restart ---------------------------------------------------------------------------

    def resume(self, queue: PackedDeviceQueue) -> list[Chain]:
        """Attach to ``queue`` and return the buffers to serve again, oldest first."""
        if not self.initialized:
            self.reset()
            queue.tracker = self
            return []
        h = self._h()
        if h[5] != h[6]:
            # A batch was being returned: did its used descriptor reach the ring?
            flags = int(queue.ring.desc16[(h[6] << 3) + 7])
            avail_pattern = 1 << 7 if h[8] else 1 << 15
            if flags & (1 << 7 | 1 << 15) != avail_pattern:
                # It did: finish the batch. Its head entries were linked in front of
                # the old free head; they are done.
                entry, steps = h[3], 0
                while entry != h[4] and steps < self.size:
                    self._set_e(entry, inflight=0)
                    entry = self._e(self._e(entry)[3])[2]
                    steps += 1
                self._set_h(old_free_head=h[3], old_used_idx=h[5], old_used_wrap_counter=h[7])
        # Roll back anything not committed: the batch is served again.
        h = self._h()
        self._set_h(free_head=h[4], used_idx=h[6], used_wrap_counter=h[8])
        h = self._h()
        live = []
        for i in range(self.size):
            e = self._e(i)
            if e[0]:
                live.append((e[5], i))
        live.sort()
        self.counter = live[-1][0] + 1 if live else 0
        chains: list[Chain] = []
        slots = 0
        for _counter, head in live:
            descs = []
            entry = head
            for _ in range(self._e(head)[4]):
                e = self._e(entry)
                descs.append((e[9], e[8], e[6], e[7]))
                entry = e[2]
            chain = queue.chain_from(descs)
            self.heads[chain.head] = head
            chains.append(chain)
            slots += len(descs)
        used_pos, used_wrap = h[6], h[8]
        laps, avail_pos = divmod(used_pos + slots, self.size)
        queue.set_base(avail_pos, used_wrap ^ (laps & 1), used_pos, used_wrap)
        queue._inflight = slots
        queue.tracker = self
        return chains
