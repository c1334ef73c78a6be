"""The traditional memory balloon: the host asks for guest pages, the guest hands them over.

The host sets a target (``num_pages``, in 4 KiB pages) with
:meth:`BalloonDevice.set_target`; the driver inflates (PFNs on the
inflateq) or deflates (PFNs on the deflateq) to follow it and reports
``actual``. Inflated and reported pages are released from the back-end's
mapping of guest memory (see :mod:`virtio.devices.guestpages`).

The statistics buffer is kept by the device and returned (used) to ask for
new statistics, on a timer asked of the host (``self.events``). Free page
hinting follows the command id protocol in the config space: the host starts
a round (:meth:`BalloonDevice.start_hinting`), the driver sends the id and
then pages, the host ends it with STOP or DONE.

With ``release="remove"`` the device refuses FEATURES_OK to a driver that
declines VIRTIO_BALLOON_F_MUST_TELL_HOST (``require_must_tell_host``): the
removed pages' contents are gone for the guest too.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

from virtio.core.device import DEFERRED, RingOptions, VirtioDevice
from virtio.core.events import Timer
from virtio.devices.balloon import wire as W
from virtio.devices.guestpages import RELEASE_MODES, Release, release_view
from virtio.errors import GuestMemoryError
from virtio.queue import Chain
from virtio.sizes import format_size
from virtio.spec import features as F
from virtio.spec.device_ids import DeviceId
from virtio.spec.status import DeviceStatus as S

log = logging.getLogger("virtio.balloon")

BALLOON = "Device Types / Memory Balloon Device"
N_OP_DRV = f"drivernormative:{BALLOON} / Device Operation"
N_STATS_DRV = f"drivernormative:{BALLOON} / Device Operation / Memory Statistics"
N_HINT_DRV = f"drivernormative:{BALLOON} / Device Operation / Free Page Hinting"
N_POISON_DRV = f"drivernormative:{BALLOON} / Device Operation / Page Poison"
N_REPORT_DRV = f"drivernormative:{BALLOON} / Device Operation / Free Page Reporting"
N_FEATURES_DEV = f"devicenormative:{BALLOON} / Feature bits"

#: The largest num_pages: a le32.
MAX_PAGES = 0xFFFFFFFF


@dataclass
class BalloonCounters:
    """What the device has seen since it was created."""

    inflated: int = 0
    deflated: int = 0
    #: PFNs the device ignored: outside guest memory, inflated twice, or deflated unknown.
    ignored: int = 0
    reported_bytes: int = 0
    released_bytes: int = 0
    hinted_pages: int = 0
    stats_updates: int = 0


class BalloonDevice(VirtioDevice):
    """inflateq, deflateq and, as negotiated, statsq, free_page_vq and reporting_vq."""

    device_id = DeviceId.BALLOON

    def __init__(
        self,
        *,
        target_pages: int = 0,
        must_tell_host: bool = True,
        stats_interval: float | None = 5.0,
        deflate_on_oom: bool = True,
        free_page_hint: bool = True,
        page_poison: bool = True,
        page_reporting: bool = True,
        release: Release = "dontneed",
        require_must_tell_host: bool | None = None,
        on_stats: Callable[[dict[int, int]], None] | None = None,
        queue_max_size: int = 128,
        ring: RingOptions | None = None,
    ) -> None:
        if not 0 <= target_pages <= MAX_PAGES:
            raise ValueError(f"target of {target_pages} pages is outside 0..{MAX_PAGES}")
        if stats_interval is not None and stats_interval <= 0:
            raise ValueError("the statistics interval must be positive (or None: no statsq)")
        if release not in RELEASE_MODES:
            raise ValueError(f"release must be one of {', '.join(RELEASE_MODES)}")
        self.target_pages = target_pages
        self.stats_interval = stats_interval
        self.release_mode: Release = release
        # MADV_REMOVE punches the pages out of the shared memory: the guest loses
        # their contents too. Then only a driver that tells the host before it
        # uses balloon pages is accepted (None: decided by the release mode).
        if require_must_tell_host is None:
            require_must_tell_host = release == "remove"
        self.require_must_tell_host = require_must_tell_host and must_tell_host
        self.on_stats = on_stats
        self._offer = 0
        for enabled, bit in (
            (must_tell_host, W.MUST_TELL_HOST),
            (stats_interval is not None, W.STATS_VQ),
            (deflate_on_oom, W.DEFLATE_ON_OOM),
            (free_page_hint, W.FREE_PAGE_HINT),
            (page_poison, W.PAGE_POISON),
            (page_reporting, W.PAGE_REPORTING),
        ):
            if enabled:
                self._offer |= 1 << bit
        self.counters = BalloonCounters()
        #: PFNs in the balloon (inflated and not deflated).
        self.pages: set[int] = set()
        #: The latest statistics, by tag (empty until the driver sent some).
        self.stats: dict[int, int] = {}
        self.actual = 0
        self.poison_val = 0
        self.roles: list[str] = W.queue_roles(self._offer)
        self._stats_chain: Chain | None = None
        self._stats_first = True
        self._stats_timer: Timer | None = None
        self._cmd_id = W.CMD_ID_DONE
        self._next_cmd_id = W.CMD_ID_FIRST
        #: The latest command id the driver sent (not STOP), and whether its round goes on.
        self._sent_id: int | None = None
        self._hinting = False
        self.closers: list[Callable[[], None]] = []
        super().__init__(num_queues=5, queue_max_size=queue_max_size, ring=ring)

    # -- what the device declares ------------------------------------------------

    def device_features(self) -> int:
        return self._offer

    def config_size(self) -> int:
        return W.CONFIG_SIZE

    def build_config(self) -> None:
        # Little-endian through every interface, legacy included.
        self.config[W.NUM_PAGES : W.NUM_PAGES + 4] = self.target_pages.to_bytes(4, "little")
        self.config[W.FREE_PAGE_HINT_CMD_ID : W.FREE_PAGE_HINT_CMD_ID + 4] = self._cmd_id.to_bytes(
            4, "little"
        )

    def queues_for_features(self, features: int) -> int:
        return len(W.queue_roles(features))

    def validate_features(self, features: int) -> str | None:
        # Only reached through FEATURES_OK: a legacy driver is served without the bit.
        if self.require_must_tell_host and not features >> W.MUST_TELL_HOST & 1:
            return (
                "driver did not accept VIRTIO_BALLOON_F_MUST_TELL_HOST, and inflated pages "
                f"lose their contents (release {self.release_mode}) [{N_FEATURES_DEV}]"
            )
        return None

    def on_features_ok(self) -> None:
        self.roles = W.queue_roles(self.negotiated)

    def describe(self) -> str:
        names = ", ".join(f.removeprefix("VIRTIO_BALLOON_F_") for f in self.offered_names())
        return (
            f"balloon, target {format_size(self.target_pages * W.PAGE_SIZE)}, "
            f"release {self.release_mode}, offers {names or 'no features'}"
        )

    def offered_names(self) -> list[str]:
        return [F.feature_name(self.device_id, b) for b in range(6) if self._offer >> b & 1]

    def on_reset(self) -> None:
        self._cancel_stats_timer()
        self._stats_chain = None
        self._stats_first = True
        if self.pages:
            log.info("balloon reset: %d pages return to the guest", len(self.pages))
        self.pages.clear()
        self.actual = 0
        self.poison_val = 0
        self._sent_id = None
        self._hinting = False
        self.roles = W.queue_roles(self._offer)

    def close(self) -> None:
        self._cancel_stats_timer()
        for closer in self.closers:
            closer()
        self.closers.clear()

    # -- the host's side -----------------------------------------------------------

    def set_target(self, pages: int) -> None:
        """Ask the driver for ``pages`` pages in the balloon (num_pages)."""
        if not 0 <= pages <= MAX_PAGES:
            raise ValueError(f"target of {pages} pages is outside 0..{MAX_PAGES}")
        self.target_pages = pages
        data = pages.to_bytes(4, "little")
        if self.config[W.NUM_PAGES : W.NUM_PAGES + 4] != data:
            log.info("balloon target: %s (%d pages)", format_size(pages * W.PAGE_SIZE), pages)
            self.update_config(W.NUM_PAGES, data)

    @property
    def cmd_id(self) -> int:
        return self._cmd_id

    def start_hinting(self) -> int:
        """Begin a free page hinting round with a new command id; returns it."""
        if not self._offer >> W.FREE_PAGE_HINT & 1:
            raise ValueError("free page hinting is not offered")
        # Every round has a fresh id: none is reused (the counter wraps after 2^32).
        cmd_id = self._next_cmd_id
        self._next_cmd_id = cmd_id + 1 if cmd_id < 0xFFFFFFFF else W.CMD_ID_FIRST
        self._set_cmd_id(cmd_id)
        return cmd_id

    def stop_hinting(self, *, done: bool = False) -> None:
        """End the round: STOP (hinted pages stay with the device) or DONE (all released)."""
        self._set_cmd_id(W.CMD_ID_DONE if done else W.CMD_ID_STOP)

    def _set_cmd_id(self, cmd_id: int) -> None:
        self._cmd_id = cmd_id
        self.update_config(W.FREE_PAGE_HINT_CMD_ID, cmd_id.to_bytes(4, "little"))

    def request_stats(self) -> bool:
        """Return the kept statistics buffer now (asking for fresh statistics)."""
        chain = self._stats_chain
        if chain is None or not self.live:
            return False
        self._stats_chain = None
        self._cancel_stats_timer()
        self.complete(self.roles.index(W.STATSQ), chain, 0)
        return True

    def _cancel_stats_timer(self) -> None:
        if self._stats_timer is not None:
            self.events.cancel(self._stats_timer)
            self._stats_timer = None

    def _stats_due(self, _now: float) -> None:
        self._stats_timer = None
        self.request_stats()

    # -- the driver's side -----------------------------------------------------------

    def config_write(self, offset: int, data: bytes) -> bool:
        end = offset + len(data)
        if offset >= W.ACTUAL and end <= W.ACTUAL + 4:
            self.config[offset:end] = data
            # Through a legacy interface the value may come a byte at a time: it
            # counts once its most significant byte is written.
            if end == W.ACTUAL + 4:
                value = int.from_bytes(self.config[W.ACTUAL : W.ACTUAL + 4], "little")
                if value != self.actual:
                    # Drivers step by a few hundred pages: one line once the target is met.
                    level = logging.INFO if value == self.target_pages else logging.DEBUG
                    size = format_size(value * W.PAGE_SIZE)
                    log.log(level, "balloon actual: %s (%d pages)", size, value)
                self.actual = value
            return True
        if offset >= W.POISON_VAL and end <= W.POISON_VAL + 4 and self.has(W.PAGE_POISON):
            if self.status & S.DRIVER_OK:
                self.fail("driver changed poison_val while DRIVER_OK is set", N_POISON_DRV)
                return True
            self.config[offset:end] = data
            self.poison_val = int.from_bytes(self.config[W.POISON_VAL : W.POISON_VAL + 4], "little")
            return True
        return False

    def handle_chain(self, queue_index: int, chain: Chain) -> int | None:
        role = self.roles[queue_index]
        if role == W.INFLATEQ or role == W.DEFLATEQ:
            self._pfns(role, chain)
            return 0
        if role == W.STATSQ:
            return self._stats(chain)
        if role == W.FREE_PAGE_VQ:
            self._hint(chain)
            return 0
        self._report(chain)
        return 0

    def _pfns(self, role: str, chain: Chain) -> None:
        if chain.write_len:
            self.fail(f"{role} buffer has device-writable parts", N_OP_DRV)
            return
        try:
            pfns = W.unpack_pfns(chain.read())
        except ValueError as err:
            self.fail(f"{role}: {err}", N_OP_DRV)
            return
        if role == W.INFLATEQ:
            self._inflate(pfns)
        else:
            self._deflate(pfns)

    def _inflate(self, pfns: tuple[int, ...]) -> None:
        new: list[int] = []
        for pfn in pfns:
            if pfn in self.pages:
                self.counters.ignored += 1
            else:
                new.append(pfn)
        mapped = [pfn for pfn in new if self._mapped(pfn)]
        self.counters.ignored += len(new) - len(mapped)
        self.pages.update(mapped)
        self.counters.inflated += len(mapped)
        for first, count in W.runs(mapped):
            self._release(first << W.PAGE_SHIFT, count << W.PAGE_SHIFT)

    def _deflate(self, pfns: tuple[int, ...]) -> None:
        for pfn in pfns:
            if pfn in self.pages:
                self.pages.discard(pfn)
                self.counters.deflated += 1
            else:
                # Not in the balloon: nothing to give back (and not an error the
                # spec asks the device to catch).
                self.counters.ignored += 1

    def _mapped(self, pfn: int) -> bool:
        if self.memory is None:
            return False
        try:
            self.memory.view(pfn << W.PAGE_SHIFT, W.PAGE_SIZE)
        except GuestMemoryError:
            return False
        return True

    def _release(self, addr: int, length: int) -> None:
        if self.memory is None or self.release_mode == "none":
            return
        try:
            views = self.memory.iovecs(addr, length)
        except GuestMemoryError:
            return  # only ranges wholly inside guest memory
        for view in views:
            self.counters.released_bytes += release_view(view, self.release_mode)

    def _stats(self, chain: Chain) -> int | None:
        if chain.write_len:
            self.fail("statsq buffer has device-writable parts", N_STATS_DRV)
            return 0
        if self._stats_chain is not None:
            self.fail("driver made a second statsq buffer available", N_STATS_DRV)
            return 0
        first, self._stats_first = self._stats_first, False
        if first and self.legacy:
            pass  # legacy drivers sent an uninitialized first buffer: ignore it
        else:
            stats, extra = W.unpack_stats(chain.read(), self.byteorder)
            if extra:
                log.info("statsq: ignoring %d bytes after the last whole entry", extra)
            self.stats.update(stats)
            self.counters.stats_updates += 1
            log.info("balloon stats: %s", W.format_stats(self.stats))
            if self.on_stats is not None:
                self.on_stats(dict(self.stats))
        self._stats_chain = chain
        if self.stats_interval is not None:
            self._cancel_stats_timer()
            self._stats_timer = self.events.call_later(self.stats_interval, self._stats_due)
        return DEFERRED

    def _hint(self, chain: Chain) -> None:
        if chain.read_len:
            if chain.read_len != 4:
                self.fail(
                    f"free_page_vq output buffer of {chain.read_len} bytes, not 4", N_HINT_DRV
                )
                return
            cmd_id = W.unpack_cmd_id(chain.read(), self.byteorder)
            if cmd_id == W.CMD_ID_STOP:
                self._hinting = False
            elif cmd_id == self._sent_id == self._cmd_id:
                self.fail(f"driver sent command id {cmd_id} twice", N_HINT_DRV)
                return
            else:
                self._sent_id = cmd_id
                # A stale id starts nothing: its pages are ignored.
                self._hinting = cmd_id == self._cmd_id and cmd_id >= W.CMD_ID_FIRST
        if chain.write_len and self._hinting and self._sent_id == self._cmd_id:
            self.counters.hinted_pages += chain.write_len // W.PAGE_SIZE

    def _report(self, chain: Chain) -> None:
        if self.release_mode == "remove" and self.has(W.PAGE_POISON) and self.poison_val:
            # Removed pages read as zeroes: not poison_val, which must be kept.
            release: Release = "dontneed"
        else:
            release = self.release_mode
        for view in (*chain.readable, *chain.writable):
            self.counters.reported_bytes += view.nbytes
            self.counters.released_bytes += release_view(view, release)

    def quiesce(self, queue_index: int) -> None:
        # The kept statistics buffer holds nothing the device still writes.
        if self._stats_chain is not None and self.roles[queue_index : queue_index + 1] == [
            W.STATSQ
        ]:
            self.request_stats()
