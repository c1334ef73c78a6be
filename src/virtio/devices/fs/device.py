"""The file system device: virtqueues carrying FUSE requests to a :class:`FuseServer`.

Queue 0 is hiprio (FORGET, BATCH_FORGET, INTERRUPT only); with
VIRTIO_FS_F_NOTIFICATION queue 1 is the notification queue, and the request
queues follow it (without it they start at 1). Each request chain is one
FUSE message: fuse_in_header and its data device-readable, then room for
fuse_out_header and the reply device-writable. The server answers inline;
the device only frames messages and enforces the queues' roles. READ and
WRITE move data straight between the file and the chain's buffers; a READ
larger than ``inline_max`` runs on a worker thread (its chain deferred) while
the ring goes on being served. Any other request first waits for the reads
under way, so nothing (RELEASE, a new session) changes a file under them.
"""

from __future__ import annotations

import logging
import struct
from collections import deque
from collections.abc import Callable, Sequence

from virtio.core.device import DEFERRED, RingOptions, SharedMemoryRegion, VirtioDevice
from virtio.devices.fs import wire as W
from virtio.devices.fs.dax import DaxWindow
from virtio.devices.fs.server import IO_HEAD_SIZE, BadMessage, FuseServer
from virtio.devices.iothreads import IoThreads
from virtio.queue import Chain, ChainReader, ChainWriter
from virtio.spec.device_ids import DeviceId
from virtio.spec.features import VIRTIO_FS_F_NOTIFICATION

log = logging.getLogger("virtio.fs")

FS = "Device Types / File System Device"
N_CFG_DEV = f"devicenormative:{FS} / Device configuration layout"
N_CFG_DRV = f"drivernormative:{FS} / Device configuration layout"
N_HIPRIO_DEV = f"devicenormative:{FS} / Device Operation / Device Operation: High Priority Queue"
N_HIPRIO_DRV = f"drivernormative:{FS} / Device Operation / Device Operation: High Priority Queue"
N_NOTIFY_DRV = f"drivernormative:{FS} / Device Operation / Device Operation: Notification Queue"

TAG_SIZE = 36
CONFIG = struct.Struct("<36sII")
HIPRIO = 0
_READ, _WRITE = int(W.Op.READ), int(W.Op.WRITE)
DEFAULT_NOTIFY_BUF_SIZE = 4096


def encode_tag(tag: str) -> bytes:
    """The tag as the config field holds it: UTF-8, NUL-padded, at most 36 bytes."""
    raw = tag.encode()
    if not raw or len(raw) > TAG_SIZE or b"\0" in raw:
        raise ValueError(f"tag {tag!r} must be 1..{TAG_SIZE} UTF-8 bytes without NUL")
    return raw


class FsDevice(VirtioDevice):
    """virtio-fs over one FUSE server; ``num_request_queues`` identical request queues.

    ``dax``: the DAX window, exposed as shared memory region 0 (none without it).
    """

    device_id = DeviceId.FS

    def __init__(
        self,
        server: FuseServer,
        *,
        tag: str = "pyvirtio",
        num_request_queues: int = 1,
        notification: bool = False,
        notify_buf_size: int = DEFAULT_NOTIFY_BUF_SIZE,
        queue_max_size: int = 256,
        ring: RingOptions | None = None,
        dax: DaxWindow | None = None,
        workers: int = 2,
        inline_max: int = 64 << 10,
    ) -> None:
        if num_request_queues < 1:
            # The device MUST set num_request_queues to 1 or greater.
            raise ValueError(f"num_request_queues must be at least 1 [{N_CFG_DEV}]")
        if notification and notify_buf_size < W.OUT_HEADER_SIZE:
            raise ValueError("notify_buf_size must hold at least a fuse_out_header")
        if workers < 0:
            raise ValueError("workers must be 0 or more")
        self.server = server
        self.dax = dax
        server.dax = dax
        self.tag = encode_tag(tag)
        self.num_request_queues = num_request_queues
        self.notification = notification
        self.notify_buf_size = notify_buf_size if notification else 0
        self._notify_bufs: deque[Chain] = deque()
        self._notes: deque[bytes] = deque()
        self.inline_max = inline_max
        self._batch_left = 0
        super().__init__(
            num_queues=1 + int(notification) + num_request_queues,
            queue_max_size=queue_max_size,
            ring=ring,
        )
        #: Threads for READs larger than ``inline_max`` (None: every request inline).
        self.io: IoThreads[tuple[int, Chain]] | None = (
            IoThreads(self.events, workers, self._io_done, name="virtio-fs-io") if workers else None
        )

    def device_features(self) -> int:
        return 1 << VIRTIO_FS_F_NOTIFICATION if self.notification else 0

    def config_size(self) -> int:
        return CONFIG.size

    def build_config(self) -> None:
        CONFIG.pack_into(self.config, 0, self.tag, self.num_request_queues, self.notify_buf_size)

    def config_write(self, offset: int, data: bytes) -> bool:
        self.fail("driver wrote the file system device's configuration", N_CFG_DRV)
        return True

    def queues_for_features(self, features: int) -> int:
        return 1 + (features >> VIRTIO_FS_F_NOTIFICATION & 1) + self.num_request_queues

    def shared_memory_regions(self) -> Sequence[SharedMemoryRegion]:
        # The DAX window, if present, MUST be shared memory region 0.
        return () if self.dax is None else (self.dax.region,)

    def describe(self) -> str:
        window = f", DAX window {self.dax.size:#x} bytes" if self.dax is not None else ""
        return (
            f"virtio-fs tag {self.tag.decode()!r} over {self.server.root}, "
            f"{self.num_request_queues} request queue(s), cache {self.server.cache}{window}"
        )

    @property
    def notify_queue(self) -> int | None:
        return 1 if self.has(VIRTIO_FS_F_NOTIFICATION) else None

    def on_reset(self) -> None:
        self._wait_for_reads()
        self._notify_bufs.clear()
        self._notes.clear()
        # The FUSE session lives as long as the driver: a reset ends it.
        self.server.reset_session()

    def quiesce(self, queue_index: int) -> None:
        # Reads on worker threads write into guest memory: finish them first.
        self._wait_for_reads()
        if queue_index == self.notify_queue and self._notify_bufs:
            # Give empty notification buffers back so the ring state covers them.
            spare = [(c, 0) for c in self._notify_bufs]
            self._notify_bufs.clear()
            self.complete_many(queue_index, spare)

    def close(self) -> None:
        if self.io is not None:
            self.io.close()
        self.server.close()
        if self.dax is not None:
            self.dax.close()

    # -- requests ------------------------------------------------------------------

    def serve_chains(self, index: int, chains: Sequence[Chain]) -> bool:
        # How many chains of this batch follow the one being handled (see _read).
        self._batch_left = len(chains)
        try:
            return super().serve_chains(index, chains)
        finally:
            self._batch_left = 0

    def handle_chain(self, queue_index: int, chain: Chain) -> int | None:
        self._batch_left -= 1
        if queue_index == self.notify_queue:
            return self._notify_buffer(chain)
        if chain.read_len < W.IN_HEADER_SIZE:
            self.fail(f"FUSE request of {chain.read_len} bytes has no fuse_in_header")
            return 0
        rest: ChainReader | None = None
        if chain.read_len <= IO_HEAD_SIZE:
            head = chain.read()  # the whole message (a READ's): one join
        else:
            rest = ChainReader(chain)
            head = rest.read(IO_HEAD_SIZE)  # a WRITE's data stays in guest memory
        opcode = self.server.opcode(head)
        hiprio = opcode in W.HIPRIO_OPS
        if hiprio != (queue_index == HIPRIO):
            where = "hiprio queue" if queue_index == HIPRIO else f"request queue {queue_index}"
            self.fail(f"FUSE opcode {opcode} on the {where}", N_HIPRIO_DRV)
            return 0
        if opcode == _READ:
            message = head if chain.read_len == len(head) else chain.read()
            job = self.server.read_job(message, chain.writable, chain.write_len)
            if job is not None:
                return self._read(queue_index, chain, job)
        elif not hiprio:
            # FORGET touches no open file; everything else waits for the reads.
            self._wait_for_reads()
            if opcode == _WRITE and rest is not None:
                data = rest.views(rest.remaining)
                job = self.server.write_job(
                    head, data, chain.read_len, chain.writable, chain.write_len
                )
                if job is not None:
                    return job()
        message = head if chain.read_len == len(head) else chain.read()
        try:
            reply = self.server.handle(message, chain.write_len)
        except BadMessage as err:
            self.fail(f"unanswerable FUSE request: {err}")
            return 0
        if reply is None:
            return 0
        return ChainWriter(chain).write(reply)

    # -- reads on worker threads ------------------------------------------------------

    def _read(self, queue_index: int, chain: Chain, job: Callable[[], int]) -> int | None:
        io = self.io
        # A worker only when other requests of the batch can be served meanwhile: a
        # lone read (a guest reading one request at a time) is quicker inline, as is
        # a small one. When every worker is busy the ring's thread reads too.
        if (
            io is not None
            and self._batch_left > 0
            and chain.write_len > self.inline_max
            and io.outstanding < io.count
        ):
            io.submit((queue_index, chain), job)
            return DEFERRED
        return job()

    def _io_done(self, results: list[tuple[tuple[int, Chain], object]]) -> None:
        by_queue: dict[int, list[tuple[Chain, int]]] = {}
        for (queue_index, chain), result in results:
            if not isinstance(result, int):
                log.error("READ job failed: %r", result)  # jobs catch errors: a bug
                result = 0
            by_queue.setdefault(queue_index, []).append((chain, result))
        for queue_index, items in by_queue.items():
            self.complete_many(queue_index, items)

    def _wait_for_reads(self) -> None:
        if self.io is not None and self.io.outstanding:
            self.io.drain()

    # -- notifications ---------------------------------------------------------------

    def _notify_buffer(self, chain: Chain) -> int | None:
        if chain.read_len or chain.write_len < self.notify_buf_size:
            self.fail(
                f"notification buffer of {chain.write_len} writable, {chain.read_len} "
                f"readable bytes (notify_buf_size {self.notify_buf_size})",
                N_NOTIFY_DRV,
            )
            return 0
        if self._notes:
            return ChainWriter(chain).write(self._notes.popleft())
        self._notify_bufs.append(chain)
        return DEFERRED

    def send_notification(self, code: int, payload: bytes) -> None:
        """Emit a FUSE notify message (unique 0, error = the notify code).

        Delivered when a notification buffer is available, kept until then.
        """
        queue = self.notify_queue
        if queue is None:
            raise RuntimeError("VIRTIO_FS_F_NOTIFICATION was not negotiated")
        message = (
            W.fmt(self.server.order, W.OUT_HEADER).pack(W.OUT_HEADER_SIZE + len(payload), code, 0)
            + payload
        )
        if len(message) > self.notify_buf_size:
            # notify_buf_size MUST hold any notify message the device emits.
            raise ValueError(f"notify message of {len(message)} bytes [{N_CFG_DEV}]")
        if not self._notify_bufs:
            self._notes.append(message)
            return
        chain = self._notify_bufs.popleft()
        self.complete(queue, chain, ChainWriter(chain).write(message))
