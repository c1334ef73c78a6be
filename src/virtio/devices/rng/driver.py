"""The entropy driver: asks the device for random bytes."""

from __future__ import annotations

from virtio.core.driver import VirtioDriver
from virtio.spec.device_ids import DeviceId


class RngDriver(VirtioDriver):
    device_id = DeviceId.ENTROPY

    def read(self, nbytes: int, *, timeout: float = 30.0) -> bytes:
        """Up to ``nbytes`` random bytes: only what the device says it wrote counts."""
        request = self.submit(0, [], [nbytes])
        try:
            self.kick(0)
            self.wait(request, timeout)
            return self.read_in(request)
        finally:
            if request.done:
                self.release(request)
