"""The file system device: virtqueues carrying FUSE requests to a :class:`FuseServer`.

Queue 0 is hiprio (FORGET, BATCH_FORGET, INTERRUPT only); with
VIRTIO_FS_F_NOTIFICATION queue 1 is the notification queue, and the request
queues follow it (without it they start at 1). Each request chain is one
FUSE message: fuse_in_header and its data device-readable, then room for
fuse_out_header and the reply device-writable. The server answers inline;
the device only frames messages and enforces the queues' roles.
"""

from __future__ import annotations

import logging
import struct
from collections import deque

from virtio.core.device import DEFERRED, RingOptions, VirtioDevice
from virtio.devices.fs import wire as W
from virtio.devices.fs.server import BadMessage, FuseServer
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
DEFAULT_NOTIFY_BUF_SIZE = 4096


def encode_tag(tag: str) -> bytes:
    """The tag as the config field holds it: UTF-8, NUL-padded, at most 36 bytes."""
    raw = tag.encode()
    if not raw or len(raw) > TAG_SIZE or b"\0" in raw:
        raise ValueError(f"tag {tag!r} must be 1..{TAG_SIZE} UTF-8 bytes without NUL")
    return raw


class FsDevice(VirtioDevice):
    """virtio-fs over one FUSE server; ``num_request_queues`` identical request queues."""

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
    ) -> None:
        if num_request_queues < 1:
            # The device MUST set num_request_queues to 1 or greater.
            raise ValueError(f"num_request_queues must be at least 1 [{N_CFG_DEV}]")
        if notification and notify_buf_size < W.OUT_HEADER_SIZE:
            raise ValueError("notify_buf_size must hold at least a fuse_out_header")
        self.server = server
        self.tag = encode_tag(tag)
        self.num_request_queues = num_request_queues
        self.notification = notification
        self.notify_buf_size = notify_buf_size if notification else 0
        self._notify_bufs: deque[Chain] = deque()
        self._notes: deque[bytes] = deque()
        super().__init__(
            num_queues=1 + int(notification) + num_request_queues,
            queue_max_size=queue_max_size,
            ring=ring,
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

    def describe(self) -> str:
        return (
            f"virtio-fs tag {self.tag.decode()!r} over {self.server.root}, "
            f"{self.num_request_queues} request queue(s), cache {self.server.cache}"
        )

    @property
    def notify_queue(self) -> int | None:
        return 1 if self.has(VIRTIO_FS_F_NOTIFICATION) else None

    def on_reset(self) -> None:
        self._notify_bufs.clear()
        self._notes.clear()
        # The FUSE session lives as long as the driver: a reset ends it.
        self.server.reset_session()

    def quiesce(self, queue_index: int) -> None:
        if queue_index == self.notify_queue and self._notify_bufs:
            # Give empty notification buffers back so the ring state covers them.
            spare = [(c, 0) for c in self._notify_bufs]
            self._notify_bufs.clear()
            self.complete_many(queue_index, spare)

    def close(self) -> None:
        self.server.close()

    # -- requests ------------------------------------------------------------------

    def handle_chain(self, queue_index: int, chain: Chain) -> int | None:
        if queue_index == self.notify_queue:
            return self._notify_buffer(chain)
        if chain.read_len < W.IN_HEADER_SIZE:
            self.fail(f"FUSE request of {chain.read_len} bytes has no fuse_in_header")
            return 0
        message = ChainReader(chain).read_all()
        opcode = self.server.opcode(message)
        hiprio = opcode in W.HIPRIO_OPS
        if hiprio != (queue_index == HIPRIO):
            where = "hiprio queue" if queue_index == HIPRIO else f"request queue {queue_index}"
            self.fail(f"FUSE opcode {opcode} on the {where}", N_HIPRIO_DRV)
            return 0
        try:
            reply = self.server.handle(message, chain.write_len)
        except BadMessage as err:
            self.fail(f"unanswerable FUSE request: {err}")
            return 0
        if reply is None:
            return 0
        return ChainWriter(chain).write(reply)

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
