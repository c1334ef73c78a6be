"""The virtio-blk driver: block reads and writes over any transport."""

from __future__ import annotations

import struct
from dataclasses import dataclass

from virtio.core.driver import Request, VirtioDriver
from virtio.devices.blk.wire import (
    BLK_CONFIG,
    BLK_DISCARD_WRITE_ZEROES,
    BLK_REQ_HEADER,
    ID_BYTES,
    N_BLK_DRV_OP,
    S_IOERR,
    S_OK,
    S_UNSUPP,
    SECTOR_SIZE,
    T_DISCARD,
    T_FLUSH,
    T_GET_ID,
    T_IN,
    T_OUT,
    T_SECURE_ERASE,
    T_WRITE_ZEROES,
)
from virtio.errors import VirtioError
from virtio.spec import features as F
from virtio.spec.device_ids import DeviceId


class BlkError(VirtioError):
    """The device answered a request with an error status."""

    def __init__(self, status: int, what: str) -> None:
        name = {S_IOERR: "IOERR", S_UNSUPP: "UNSUPP"}.get(status, f"status {status}")
        super().__init__(f"{what}: {name}")
        self.status = status


@dataclass(frozen=True)
class BlkGeometry:
    """What the driver learned from the config space."""

    capacity: int  # in 512-byte sectors
    blk_size: int
    physical_block_exp: int
    min_io_size: int
    opt_io_size: int
    num_queues: int
    seg_max: int
    size_max: int  # 0: no limit
    read_only: bool
    writeback: bool | None
    max_discard_sectors: int
    max_discard_seg: int
    max_write_zeroes_sectors: int
    max_write_zeroes_seg: int


class BlkDriver(VirtioDriver):
    device_id = DeviceId.BLOCK

    def supported_features(self) -> int:
        out = 0
        for bit in (
            F.VIRTIO_BLK_F_SIZE_MAX,
            F.VIRTIO_BLK_F_SEG_MAX,
            F.VIRTIO_BLK_F_GEOMETRY,
            F.VIRTIO_BLK_F_RO,
            F.VIRTIO_BLK_F_BLK_SIZE,
            F.VIRTIO_BLK_F_FLUSH,
            F.VIRTIO_BLK_F_TOPOLOGY,
            F.VIRTIO_BLK_F_CONFIG_WCE,
            F.VIRTIO_BLK_F_MQ,
            F.VIRTIO_BLK_F_DISCARD,
            F.VIRTIO_BLK_F_WRITE_ZEROES,
            F.VIRTIO_BLK_F_SECURE_ERASE,
        ):
            out |= 1 << bit
        return out

    @property
    def header(self) -> struct.Struct:
        """The request header in the interface's byte order (the guest's, if legacy)."""
        return BLK_REQ_HEADER.with_order(self.byteorder).struct

    def _config_field(self, name: str, size: int) -> int:
        # Fields are read one by one only where the layout guarantees them.
        data = self.read_config(BLK_CONFIG.offset_of(name), size)
        return int.from_bytes(data, self.byteorder)

    def queues_wanted(self) -> int:
        if self.has(F.VIRTIO_BLK_F_MQ):
            return max(1, min(self._config_field("num_queues", 2), self.transport.num_queues()))
        return 1

    def setup(self) -> None:
        self.refresh()

    def on_config_change(self) -> None:
        self.refresh()

    def refresh(self) -> None:
        """Re-read the config space (e.g. capacity after a resize)."""
        # Read only as far as the negotiated features reach: devices may have a
        # shorter config space than the newest layout.
        raw = self.read_config(0, self.config_bytes_needed())
        cfg = BLK_CONFIG.with_order(self.byteorder).unpack(raw.ljust(BLK_CONFIG.size, b"\0"))

        def field(name: str, bit: int | None = None) -> int:
            if bit is not None and not self.has(bit):
                return 0
            value = cfg[name]
            assert isinstance(value, int)
            return value

        wce = self.has(F.VIRTIO_BLK_F_CONFIG_WCE)
        self.geometry = BlkGeometry(
            capacity=field("capacity"),
            blk_size=field("blk_size", F.VIRTIO_BLK_F_BLK_SIZE) or SECTOR_SIZE,
            physical_block_exp=field("physical_block_exp", F.VIRTIO_BLK_F_TOPOLOGY),
            min_io_size=field("min_io_size", F.VIRTIO_BLK_F_TOPOLOGY),
            opt_io_size=field("opt_io_size", F.VIRTIO_BLK_F_TOPOLOGY),
            num_queues=field("num_queues", F.VIRTIO_BLK_F_MQ) or 1,
            seg_max=field("seg_max", F.VIRTIO_BLK_F_SEG_MAX),
            size_max=field("size_max", F.VIRTIO_BLK_F_SIZE_MAX),
            read_only=self.has(F.VIRTIO_BLK_F_RO),
            writeback=bool(field("writeback")) if wce else None,
            max_discard_sectors=field("max_discard_sectors", F.VIRTIO_BLK_F_DISCARD),
            max_discard_seg=field("max_discard_seg", F.VIRTIO_BLK_F_DISCARD),
            max_write_zeroes_sectors=field("max_write_zeroes_sectors", F.VIRTIO_BLK_F_WRITE_ZEROES),
            max_write_zeroes_seg=field("max_write_zeroes_seg", F.VIRTIO_BLK_F_WRITE_ZEROES),
        )

    def config_bytes_needed(self) -> int:
        """How much of virtio_blk_config the negotiated features make meaningful."""
        if self.has(F.VIRTIO_BLK_F_ZONED):
            return BLK_CONFIG.size
        if self.has(F.VIRTIO_BLK_F_SECURE_ERASE):
            return BLK_CONFIG.offset_of("zone_sectors")
        if self.has(F.VIRTIO_BLK_F_DISCARD) or self.has(F.VIRTIO_BLK_F_WRITE_ZEROES):
            return BLK_CONFIG.offset_of("max_secure_erase_sectors")
        return BLK_CONFIG.offset_of("max_discard_sectors")

    @property
    def capacity(self) -> int:
        return self.geometry.capacity

    # -- requests --------------------------------------------------------------------

    def _check(self, sector: int, nbytes: int) -> None:
        if nbytes % SECTOR_SIZE:
            raise ValueError(f"length {nbytes} is not a multiple of 512 [{N_BLK_DRV_OP}]")
        if sector < 0 or sector * SECTOR_SIZE + nbytes > self.capacity * SECTOR_SIZE:
            raise ValueError(
                f"sectors {sector}+{nbytes // SECTOR_SIZE} beyond capacity {self.capacity} "
                f"[{N_BLK_DRV_OP}]"
            )

    def segment_sizes(self, nbytes: int) -> list[int]:
        """Split a data buffer into segments no larger than the device's size_max."""
        limit = self.geometry.size_max or nbytes or 1
        sizes = [limit] * (nbytes // limit)
        if nbytes % limit:
            sizes.append(nbytes % limit)
        return sizes

    def submit_read(self, sector: int, nbytes: int, queue: int = 0) -> Request:
        self._check(sector, nbytes)
        return self.submit(
            queue, [self.header.pack(T_IN, 0, sector)], [*self.segment_sizes(nbytes), 1]
        )

    def submit_write(self, sector: int, data: bytes | memoryview, queue: int = 0) -> Request:
        self._check(sector, len(data))
        view = memoryview(data).cast("B")
        pieces, pos = [], 0
        for n in self.segment_sizes(len(view)):
            pieces.append(view[pos : pos + n])
            pos += n
        return self.submit(queue, [self.header.pack(T_OUT, 0, sector), *pieces], [1])

    def status_of(self, request: Request) -> int:
        addr, _ = request.in_[-1]
        return self.transport.memory.read(addr, 1)[0]

    def finish(self, request: Request, what: str) -> bytes:
        """Check a completed request's status; returns its data (reads) and frees it."""
        try:
            status = self.status_of(request)
            if status != S_OK:
                raise BlkError(status, what)
            memory = self.transport.memory
            return b"".join(memory.read(addr, n) for addr, n in request.in_[:-1])
        finally:
            self.release(request)

    def _run(self, request: Request, what: str, timeout: float) -> bytes:
        try:
            self.kick(request.queue)
            self.wait(request, timeout)
        except BaseException:
            if request.done:
                self.release(request)
            raise
        return self.finish(request, what)

    def read(self, sector: int, nbytes: int, *, queue: int = 0, timeout: float = 30.0) -> bytes:
        return self._run(self.submit_read(sector, nbytes, queue), f"read {sector}", timeout)

    def write(
        self, sector: int, data: bytes | memoryview, *, queue: int = 0, timeout: float = 30.0
    ) -> None:
        if self.geometry.read_only:
            raise BlkError(S_IOERR, "device is read-only")
        self._run(self.submit_write(sector, data, queue), f"write {sector}", timeout)

    def write_unchecked(self, sector: int, data: bytes, *, queue: int = 0) -> None:
        """Send a write even to a read-only device (to see it refused)."""
        self._check(sector, len(data))
        request = self.submit(queue, [self.header.pack(T_OUT, 0, sector), data], [1])
        self._run(request, f"write {sector}", 30.0)

    def flush(self, *, queue: int = 0, timeout: float = 30.0) -> None:
        if not self.has(F.VIRTIO_BLK_F_FLUSH):
            return
        # Sector MUST be 0 for a flush, and it carries no data.
        self._run(self.submit(queue, [self.header.pack(T_FLUSH, 0, 0)], [1]), "flush", timeout)

    def get_id(self, *, queue: int = 0) -> str:
        request = self.submit(queue, [self.header.pack(T_GET_ID, 0, 0)], [ID_BYTES, 1])
        data = self._run(request, "get-id", 30.0)
        return data.split(b"\0", 1)[0].decode(errors="replace")

    def _ranges(self, req_type: int, ranges: list[tuple[int, int]], unmap: bool, what: str) -> None:
        segment = BLK_DISCARD_WRITE_ZEROES.with_order(self.byteorder)
        payload = b"".join(
            segment.pack(sector=s, num_sectors=n, unmap=1 if unmap else 0) for s, n in ranges
        )
        for s, n in ranges:
            self._check(s, n * SECTOR_SIZE)
        request = self.submit(0, [self.header.pack(req_type, 0, 0), payload], [1])
        self._run(request, what, 30.0)

    def discard(self, ranges: list[tuple[int, int]]) -> None:
        """Discard (sector, count) ranges."""
        if not self.has(F.VIRTIO_BLK_F_DISCARD):
            raise BlkError(S_UNSUPP, "discard not negotiated")
        self._ranges(T_DISCARD, ranges, False, "discard")

    def write_zeroes(self, ranges: list[tuple[int, int]], *, unmap: bool = False) -> None:
        if not self.has(F.VIRTIO_BLK_F_WRITE_ZEROES):
            raise BlkError(S_UNSUPP, "write-zeroes not negotiated")
        self._ranges(T_WRITE_ZEROES, ranges, unmap, "write-zeroes")

    def secure_erase(self, ranges: list[tuple[int, int]]) -> None:
        if not self.has(F.VIRTIO_BLK_F_SECURE_ERASE):
            raise BlkError(S_UNSUPP, "secure-erase not negotiated")
        self._ranges(T_SECURE_ERASE, ranges, False, "secure-erase")

    def set_writeback(self, enabled: bool) -> None:
        if not self.has(F.VIRTIO_BLK_F_CONFIG_WCE):
            raise BlkError(S_UNSUPP, "CONFIG_WCE not negotiated")
        self.transport.write_config(BLK_CONFIG.offset_of("writeback"), bytes((int(enabled),)))
        self.refresh()
