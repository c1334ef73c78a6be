"""The persistent memory driver: finds the region, reads and writes it, flushes it.

Where the region is depends on VIRTIO_PMEM_F_SHMEM_REGION: with it, shared
memory region 0 of the transport (the config's start and size are not
used); without it, ``start`` and ``size`` from the config space, a range of
guest-physical memory the driver reaches through its transport's memory
(or a :class:`~virtio.memory.Memory` it is given). A flush answers the
device's ``ret``: 0 for success, -1 for failure; anything else is a device
error.
"""

from __future__ import annotations

from virtio.core.driver import VirtioDriver
from virtio.core.shm import MemoryWindow, ShmWindow, find_window
from virtio.devices.pmem import wire as W
from virtio.errors import NegotiationError, VirtioError
from virtio.memory import Memory
from virtio.spec.device_ids import DeviceId

N_INIT_DRV = "drivernormative:Device Types / PMEM Device / Device Initialization"


class PmemError(VirtioError):
    """A flush failed, or the device answered what the spec does not allow."""


class PmemDriver(VirtioDriver):
    device_id = DeviceId.PMEM

    def supported_features(self) -> int:
        return 1 << W.F_SHMEM_REGION

    def config(self) -> tuple[int, int]:
        """(start, size) as the config space says (meaningless with SHMEM_REGION)."""
        return W.unpack_config(self.read_config(0, W.CONFIG_SIZE))

    def window(self, memory: Memory | None = None) -> ShmWindow:
        """Access to the region: shared memory region 0, or ``start`` in ``memory``.

        ``memory`` is where guest-physical addresses resolve (default: the
        transport's memory, which may not map the region).
        """
        if self.has(W.F_SHMEM_REGION):
            # MUST query shared memory id 0, and MUST NOT use start or size.
            return self._shared_window()
        start, size = self.config()
        if size == 0:
            raise PmemError("the device reports an empty region")
        return MemoryWindow(memory or self.transport.memory, start, size)

    def _shared_window(self) -> ShmWindow:
        window = find_window(self.transport, W.SHMEM_ID)
        if window is None:
            raise NegotiationError(
                f"{type(self.transport).__name__} offers no shared memory region 0", N_INIT_DRV
            )
        return window

    def flush(self, timeout: float = 30.0) -> int:
        """One FLUSH request; its ret (0 or -1). PmemError if the device broke the format."""
        return self.request(W.REQ_TYPE_FLUSH, timeout)

    def request(self, type_: int, timeout: float = 30.0) -> int:
        written, data = self.call(0, [W.pack_request(type_)], [W.RESP_SIZE], timeout)
        if written < W.RESP_SIZE:
            raise PmemError(f"device wrote {written} bytes of a {W.RESP_SIZE}-byte response")
        ret = W.unpack_response(data)
        if ret not in (W.RET_OK, W.RET_FAILURE):
            raise PmemError(f"device answered ret {ret} (the spec allows 0 and -1)")
        return ret
