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

from virtio.layout import Bytes, Layout, u8, u16, u64
from virtio.queue import Chain, SplitDeviceQueue

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
