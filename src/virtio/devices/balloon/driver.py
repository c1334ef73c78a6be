"""The balloon driver: follows the device's target with pages from its allocator.

Pages given to the balloon are 4 KiB pieces of the driver's guest memory
(:class:`~virtio.memory.Allocator`); their PFNs travel on the inflateq and
deflateq, ``actual`` follows. The driver keeps one statistics buffer with
the device, refilled each time the device returns it. Free page hints and
free page reports hand the device pages that are free in the driver's
allocator for the time of the request.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

from virtio.core.driver import DriverTransport, Request, UsedBuffer, VirtioDriver
from virtio.devices.balloon import wire as W
from virtio.errors import NegotiationError
from virtio.spec.device_ids import DeviceId

#: PFNs per inflate or deflate buffer.
BATCH = 256


class BalloonDriver(VirtioDriver):
    device_id = DeviceId.BALLOON

    def __init__(
        self,
        transport: DriverTransport,
        *,
        poison_val: int | None = None,
        stats: Callable[[], dict[int, int]] | None = None,
        features: int | None = None,
        queue_size: int | None = None,
        avoid_features: int = 0,
    ) -> None:
        super().__init__(
            transport, features=features, queue_size=queue_size, avoid_features=avoid_features
        )
        #: The value written to pages leaving the balloon, and kept in free pages
        #: (None: PAGE_POISON declined, free pages' contents are not expected).
        self.poison_val = poison_val
        self.stats_source = stats or self._allocator_stats
        #: Guest addresses of the pages in the balloon, in the order given.
        self.ballooned: list[int] = []
        self.stats_sent = 0
        self._stats_request: Request | None = None

    def supported_features(self) -> int:
        bits = (
            1 << W.MUST_TELL_HOST
            | 1 << W.STATS_VQ
            | 1 << W.DEFLATE_ON_OOM
            | 1 << W.FREE_PAGE_HINT
            | 1 << W.PAGE_REPORTING
        )
        if self.poison_val is not None:
            # Only a driver that writes poison_val to freed pages may accept it.
            bits |= 1 << W.PAGE_POISON
        return bits

    def choose_features(self, offered: int) -> int:
        accept = super().choose_features(offered)
        if self.poison_val is not None and not accept >> W.PAGE_POISON & 1:
            # Free pages are expected to hold poison_val: reported without PAGE_POISON,
            # the device could change them, so no free page reporting then.
            accept &= ~(1 << W.PAGE_REPORTING)
        return accept

    def queues_wanted(self) -> int:
        return len(W.queue_roles(self.negotiated))

    def queue_of(self, role: str) -> int:
        roles = W.queue_roles(self.negotiated)
        if role not in roles:
            raise NegotiationError(f"{role} does not exist with the features negotiated")
        return roles.index(role)

    def setup(self) -> None:
        if self.has(W.PAGE_POISON):
            assert self.poison_val is not None
            # Before DRIVER_OK, and never while it is set.
            self.transport.write_config(W.POISON_VAL, self.poison_val.to_bytes(4, "little"))

    def initialize(self) -> None:
        super().initialize()
        self._stats_request = None
        self.ballooned = []
        if self.has(W.STATS_VQ):
            self._send_stats()

    # -- config ------------------------------------------------------------------------

    def _config_u32(self, offset: int) -> int:
        # Little-endian through the legacy interface too.
        return int.from_bytes(self.read_config(offset, 4), "little")

    @property
    def target(self) -> int:
        """num_pages: how many pages the device wants in the balloon."""
        return self._config_u32(W.NUM_PAGES)

    @property
    def cmd_id(self) -> int:
        return self._config_u32(W.FREE_PAGE_HINT_CMD_ID)

    def _write_actual(self) -> None:
        self.transport.write_config(W.ACTUAL, len(self.ballooned).to_bytes(4, "little"))

    # -- inflate and deflate ---------------------------------------------------------

    def follow(self, timeout: float = 30.0) -> int:
        """Inflate or deflate until the balloon holds the target; returns its size in pages.

        Inflation stops early when the allocator has no page left to give.
        """
        while True:
            want = self.target
            have = len(self.ballooned)
            if want > have:
                if not self.inflate(min(BATCH, want - have), timeout):
                    break
            elif want < have:
                self.deflate(min(BATCH, have - want), timeout)
            else:
                break
        return len(self.ballooned)

    def inflate(self, count: int, timeout: float = 30.0) -> int:
        """Give up to ``count`` pages to the balloon; the number given."""
        alloc = self.transport.allocator
        pages: list[int] = []
        try:
            for _ in range(count):
                pages.append(alloc.alloc(W.PAGE_SIZE, W.PAGE_SIZE))
        except MemoryError:
            pass
        if not pages:
            return 0
        try:
            self._send_pfns(W.INFLATEQ, pages, timeout)
        except BaseException:
            for addr in pages:
                alloc.free(addr)
            raise
        # The pages are the device's from now on: this side never touches them.
        self.ballooned.extend(pages)
        self._write_actual()
        return len(pages)

    def deflate(self, count: int, timeout: float = 30.0) -> int:
        """Take up to ``count`` pages back from the balloon; the number taken."""
        pages = self.ballooned[-count:] if count else []
        if not pages:
            return 0
        # Whatever MUST_TELL_HOST says, the pages are used only after the device's
        # acknowledgement: the simplest order that is always allowed.
        self._send_pfns(W.DEFLATEQ, pages, timeout)
        del self.ballooned[-len(pages) :]
        memory = self.transport.memory
        alloc = self.transport.allocator
        for addr in pages:
            if self.has(W.PAGE_POISON) and self.poison_val is not None:
                memory.write(addr, self.poison_val.to_bytes(4, "little") * (W.PAGE_SIZE // 4))
            alloc.free(addr)
        self._write_actual()
        return len(pages)

    def _send_pfns(self, role: str, pages: list[int], timeout: float) -> None:
        pfns = W.pack_pfns(addr >> W.PAGE_SHIFT for addr in pages)
        self.call(self.queue_of(role), [pfns], timeout=timeout)

    # -- statistics --------------------------------------------------------------------

    def _allocator_stats(self) -> dict[int, int]:
        alloc = self.transport.allocator
        return {
            W.S_MEMTOT: alloc.size,
            W.S_MEMFREE: alloc.bytes_free,
            W.S_AVAIL: alloc.bytes_free,
        }

    def _send_stats(self) -> None:
        # The same subset of statistics every time, as the spec asks.
        data = W.pack_stats(self.stats_source(), self.byteorder)
        q = self.queue_of(W.STATSQ)
        self._stats_request = self.submit(q, [data])
        self.kick(q)
        self.stats_sent += 1

    def service(self) -> int:
        """Handle what the device did: refill a returned statistics buffer, follow the target.

        Returns how many statistics buffers were sent.
        """
        sent = 0
        follow = False
        for event in self.poll():
            if isinstance(event, UsedBuffer) and event.request is self._stats_request:
                self.release(event.request)
                self._send_stats()
                sent += 1
            elif not isinstance(event, UsedBuffer):
                follow = True
        if follow and self.broken is None:
            self.follow()
        return sent

    def wait_stats_request(self, timeout: float = 10.0) -> bool:
        """Wait until the device asks for statistics, and answer it."""
        before = self.stats_sent
        return self.transport.wait_until(
            lambda: self.service() > 0 or self.stats_sent > before, timeout
        )

    # -- free page hinting and reporting ---------------------------------------------

    @contextmanager
    def _free_pages(self, count: int) -> Iterator[list[int]]:
        alloc = self.transport.allocator
        pages: list[int] = []
        try:
            try:
                for _ in range(count):
                    pages.append(alloc.alloc(W.PAGE_SIZE, W.PAGE_SIZE))
            except MemoryError:
                pass
            yield pages
        finally:
            for addr in pages:
                alloc.free(addr)

    def _page_request(self, queue: int, pages: list[int], timeout: float) -> None:
        request = Request(queue, [], [(addr, W.PAGE_SIZE) for addr in pages], None)
        self.queues[queue].add([], request.in_, request)
        self.kick(queue)
        self.wait(request, timeout)

    def hint_free_pages(self, count: int, timeout: float = 30.0) -> int:
        """One hinting round for the current command id; the pages hinted (0: no round)."""
        cmd_id = self.cmd_id
        if cmd_id < W.CMD_ID_FIRST:
            return 0
        q = self.queue_of(W.FREE_PAGE_VQ)
        self.call(q, [W.pack_cmd_id(cmd_id, self.byteorder)], timeout=timeout)
        with self._free_pages(count) as pages:
            if pages:
                self._page_request(q, pages, timeout)
            self.call(q, [W.pack_cmd_id(W.CMD_ID_STOP, self.byteorder)], timeout=timeout)
            # Released before DONE: their contents are initialized again.
            for addr in pages:
                self.transport.memory.write(addr, bytes(W.PAGE_SIZE))
        return len(pages)

    def report_free_pages(self, count: int, timeout: float = 30.0) -> int:
        """Report up to ``count`` free pages; the number reported."""
        q = self.queue_of(W.REPORTING_VQ)
        with self._free_pages(count) as pages:
            if not pages:
                return 0
            if self.has(W.PAGE_POISON) and self.poison_val is not None:
                fill = self.poison_val.to_bytes(4, "little") * (W.PAGE_SIZE // 4)
                for addr in pages:
                    self.transport.memory.write(addr, fill)
            self._page_request(q, pages, timeout)
        return len(pages)
