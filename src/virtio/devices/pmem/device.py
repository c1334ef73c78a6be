"""The persistent memory device: a host file the guest maps, and a flush queue.

The file is mapped shared; the guest reaches its bytes either at the
guest-physical ``start`` given in the config space (the VMM must have mapped
the file there: the device only reports where), or, with
VIRTIO_PMEM_F_SHMEM_REGION, as shared memory region 0, which a transport
with shared memory (PCI's BAR, MMIO's SHM registers, the loopback) exposes.

A FLUSH request is an ``fsync`` of the file, run on a worker thread so the
queue keeps moving; its ``ret`` is 0 once the data is durable, -1 if the
host could not make it so. Writes through any shared mapping of the file
(this process's, the VMM's) are in the page cache ``fsync`` writes back.

Over vhost-user the device cannot place the file in guest-physical memory
itself: a VMM that maps the region is needed (QEMU 7.2 has no vhost-user
pmem front-end), and the PCI transport through QEMU's proxy cannot add
guest-physical address space, so there only the shared memory region (BAR)
reaches the bytes.
"""

from __future__ import annotations

import logging
import mmap
import os
from collections.abc import Sequence

from virtio.core.device import DEFERRED, RingOptions, SharedMemoryRegion, VirtioDevice
from virtio.devices.iothreads import IoThreads
from virtio.devices.pmem import wire as W
from virtio.queue import Chain, ChainReader, ChainWriter
from virtio.spec.device_ids import DeviceId

log = logging.getLogger("virtio.pmem")

PMEM = "Device Types / PMEM Device"
N_INIT_DEV = f"devicenormative:{PMEM} / Device Initialization"
N_INIT_DRV = f"drivernormative:{PMEM} / Device Initialization"
N_FLUSH_DEV = f"devicenormative:{PMEM} / Device Operation / Virtqueue flush"
N_RETURN_DEV = f"devicenormative:{PMEM} / Device Operation / Virtqueue return"


class PmemDevice(VirtioDevice):
    """One queue (req_vq); the region is the whole of ``path``.

    ``start`` None: the device knows no guest-physical address, offers only
    the shared memory region, and refuses a driver that does not take it.
    """

    device_id = DeviceId.PMEM

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        start: int | None = None,
        shmem_region: bool = True,
        queue_max_size: int = 64,
        ring: RingOptions | None = None,
    ) -> None:
        if start is None and not shmem_region:
            raise ValueError("pmem needs a guest-physical start or the shared memory region")
        if start is not None and not 0 <= start < 1 << 64:
            raise ValueError(f"start {start:#x} is outside the 64-bit address space")
        self.path = os.fspath(path)
        self.start = start
        self.shmem_region = shmem_region
        self.flushes = 0
        self.fd = os.open(self.path, os.O_RDWR | os.O_CLOEXEC)
        try:
            self.size = os.fstat(self.fd).st_size
            if self.size == 0:
                raise ValueError(f"{self.path}: an empty file cannot be persistent memory")
            if start is not None and start + self.size > 1 << 64:
                raise ValueError("the region ends beyond the 64-bit address space")
            self.mapping = mmap.mmap(self.fd, self.size, mmap.MAP_SHARED)
        except Exception:
            os.close(self.fd)
            raise
        self.io: IoThreads[Chain] | None = None
        super().__init__(num_queues=1, queue_max_size=queue_max_size, ring=ring)
        self.io = IoThreads(self.events, 1, self._flushed, name="virtio-pmem-flush")

    def device_features(self) -> int:
        return 1 << W.F_SHMEM_REGION if self.shmem_region else 0

    def config_size(self) -> int:
        return W.CONFIG_SIZE

    def build_config(self) -> None:
        if self.start is None:
            self.config[:] = W.pack_config(0, 0)
        else:
            self.config[:] = W.pack_config(self.start, self.size)

    def validate_features(self, features: int) -> str | None:
        if self.start is None and not features >> W.F_SHMEM_REGION & 1:
            return (
                "the device has no guest-physical address: the driver must accept "
                f"VIRTIO_PMEM_F_SHMEM_REGION [{N_INIT_DEV}]"
            )
        return None

    def on_features_ok(self) -> None:
        if self.has(W.F_SHMEM_REGION):
            # The region is shared memory 0 now; start and size SHOULD read zero.
            self.config[:] = W.pack_config(0, 0)

    def shared_memory_regions(self) -> Sequence[SharedMemoryRegion]:
        if not self.shmem_region:
            return ()
        return (SharedMemoryRegion(W.SHMEM_ID, self.size, self.mapping),)

    def describe(self) -> str:
        where = "shared memory region 0" if self.start is None else f"start {self.start:#x}"
        return f"PmemDevice, {self.path} ({self.size} bytes), {where}"

    # -- requests -------------------------------------------------------------------------

    def handle_chain(self, queue_index: int, chain: Chain) -> int | None:
        if chain.write_len < W.RESP_SIZE:
            self.fail(
                f"flush request with {chain.write_len} writable bytes: no room for ret",
                N_RETURN_DEV,
            )
            return 0
        if chain.read_len < W.REQ_SIZE:
            log.info("pmem request of %d bytes has no type", chain.read_len)
            return ChainWriter(chain).write(W.pack_response(W.RET_FAILURE))
        kind = W.unpack_request(ChainReader(chain).read(W.REQ_SIZE))
        if kind != W.REQ_TYPE_FLUSH:
            log.info("unknown pmem request type %d", kind)
            return ChainWriter(chain).write(W.pack_response(W.RET_FAILURE))
        assert self.io is not None
        self.io.submit(chain, self._fsync)
        return DEFERRED

    def _fsync(self) -> int:
        # Runs on the worker: the data written before the request is durable when it returns.
        self.mapping.flush()
        os.fsync(self.fd)
        return W.RET_OK

    def _flushed(self, results: list[tuple[Chain, object]]) -> None:
        done: list[tuple[Chain, int]] = []
        for chain, result in results:
            if isinstance(result, BaseException):
                log.warning("pmem flush of %s failed: %s", self.path, result)
                ret = W.RET_FAILURE
            else:
                self.flushes += 1
                ret = W.RET_OK
            done.append((chain, ChainWriter(chain).write(W.pack_response(ret))))
        self.complete_many(0, done)

    def quiesce(self, queue_index: int) -> None:
        # A flush on the worker writes its answer into guest memory: finish it first.
        if self.io is not None:
            self.io.drain()

    def flush_backend(self) -> None:
        if not self.mapping.closed:
            self.mapping.flush()
            os.fsync(self.fd)

    def close(self) -> None:
        if self.io is not None:
            self.io.close()
            self.io = None
        if not self.mapping.closed:
            try:
                self.mapping.close()
            except BufferError:
                log.info("pmem mapping still exported; left to the garbage collector")
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
