"""The entropy device: fills every buffer it is given with random bytes.

With a rate limit (QEMU's ``max-bytes`` per ``period``), the device hands out
at most ``max_bytes`` in each period: a request that finds the budget spent
is kept (deferred) and answered when the device's timer refills the budget.
The timer is asked of the device's host (``self.events``); the device never
reads a clock.
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Callable

from virtio.core.device import DEFERRED, RingOptions, VirtioDevice
from virtio.core.events import Timer
from virtio.queue import Chain, ChainWriter
from virtio.spec.device_ids import DeviceId

N_RNG_DRV = "drivernormative:Device Types / Entropy Device / Device Operation"


class RngDevice(VirtioDevice):
    """One queue (requestq), no features, no configuration space."""

    device_id = DeviceId.ENTROPY

    def __init__(
        self,
        *,
        source: Callable[[int], bytes] = os.urandom,
        max_per_request: int = 1 << 16,
        max_bytes: int | None = None,
        period: float = 1.0,
        queue_max_size: int = 64,
        ring: RingOptions | None = None,
    ) -> None:
        if max_bytes is not None and (max_bytes < 1 or period <= 0):
            raise ValueError("a rate limit needs max_bytes >= 1 and a positive period")
        self.source = source
        self.max_per_request = max_per_request
        self.max_bytes = max_bytes
        self.period = period
        self._budget = max_bytes or 0
        self._waiting: deque[Chain] = deque()
        self._timer: Timer | None = None
        super().__init__(num_queues=1, queue_max_size=queue_max_size, ring=ring)

    def on_reset(self) -> None:
        self._waiting.clear()
        if self._timer is not None:
            self.events.cancel(self._timer)
            self._timer = None
        self._budget = self.max_bytes or 0

    def handle_chain(self, queue_index: int, chain: Chain) -> int | None:
        if chain.read_len:
            self.fail("entropy request has device-readable buffers", N_RNG_DRV)
            return 0
        if self.max_bytes is None:
            return self._fill(chain, self.max_per_request)
        if self._waiting or self._budget == 0:
            self._waiting.append(chain)
            self._arm()
            return DEFERRED
        return self._spend(chain)

    def _fill(self, chain: Chain, limit: int) -> int:
        n = min(chain.write_len, limit)
        if n == 0:
            return 0
        # At least one byte, possibly less than the whole buffer.
        return ChainWriter(chain).write(self.source(n))

    def _spend(self, chain: Chain) -> int:
        written = self._fill(chain, min(self.max_per_request, self._budget))
        self._budget -= written
        self._arm()  # the period runs from the first byte handed out
        return written

    def _arm(self) -> None:
        if self._timer is None:
            self._timer = self.events.call_later(self.period, self._refill)

    def _refill(self, now: float) -> None:
        self._timer = None
        assert self.max_bytes is not None
        self._budget = self.max_bytes
        done: list[tuple[Chain, int]] = []
        while self._waiting and self._budget:
            chain = self._waiting.popleft()
            done.append((chain, self._spend(chain)))
        if done:
            self.complete_many(0, done)
        if self._waiting:
            self._arm()
