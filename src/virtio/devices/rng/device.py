"""The entropy device: fills every buffer it is given with random bytes."""

from __future__ import annotations

import os
from collections.abc import Callable

from virtio.core.device import RingOptions, VirtioDevice
from virtio.queue import Chain
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
        queue_max_size: int = 64,
        ring: RingOptions | None = None,
    ) -> None:
        self.source = source
        self.max_per_request = max_per_request
        super().__init__(num_queues=1, queue_max_size=queue_max_size, ring=ring)

    def handle_chain(self, queue_index: int, chain: Chain) -> int:
        if chain.read_len:
            self.fail("entropy request has device-readable buffers", N_RNG_DRV)
            return 0
        n = min(chain.write_len, self.max_per_request)
        if n == 0:
            return 0
        # At least one byte, possibly less than the whole buffer.
        return chain.write(self.source(n), 0)
