"""The virtio-scsi driver: SCSI commands, task management and events over virtqueues.

The driver checks what the device answers: a response shorter than its
header, a ``sense_len`` beyond ``sense_size`` or a residual larger than the
buffers is a :class:`ScsiProtocolError`, never a silent misread.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from virtio.core.driver import VirtioDriver
from virtio.devices.scsi import wire as W
from virtio.errors import VirtioError
from virtio.queue import DriverQueue
from virtio.spec import features as F
from virtio.spec.device_ids import DeviceId

EVENT_BUFFERS = 8


class ScsiProtocolError(VirtioError):
    """The device's answer does not follow the virtio-scsi format."""


class ScsiError(VirtioError):
    """A command did not complete with GOOD status (response, status, sense)."""

    def __init__(self, result: ScsiResult, what: str) -> None:
        super().__init__(
            f"{what}: response {result.response}, status {result.status:#x}, "
            f"sense {result.sense_key():#x}/{result.asc():#04x}/{result.ascq():#04x}"
        )
        self.result = result


@dataclass(frozen=True)
class ScsiResult:
    """One command's outcome."""

    response: int
    status: int
    sense: bytes
    data: bytes
    residual: int
    status_qualifier: int = 0

    @property
    def good(self) -> bool:
        return self.response == W.S_OK and self.status == 0

    def sense_key(self) -> int:
        return self.sense[2] & 0x0F if len(self.sense) > 2 else 0

    def asc(self) -> int:
        return self.sense[12] if len(self.sense) > 12 else 0

    def ascq(self) -> int:
        return self.sense[13] if len(self.sense) > 13 else 0


@dataclass(frozen=True)
class ScsiEvent:
    event: int
    lun: bytes
    reason: int

    @property
    def missed(self) -> bool:
        return bool(self.event & W.T_EVENTS_MISSED)

    @property
    def kind(self) -> int:
        return self.event & ~W.T_EVENTS_MISSED

    @property
    def lun_number(self) -> int:
        return (self.lun[2] & 0x3F) << 8 | self.lun[3]


class ScsiDriver(VirtioDriver):
    device_id = DeviceId.SCSI

    def supported_features(self) -> int:
        out = 0
        for bit in (
            F.VIRTIO_SCSI_F_INOUT,
            F.VIRTIO_SCSI_F_HOTPLUG,
            F.VIRTIO_SCSI_F_CHANGE,
            F.VIRTIO_SCSI_F_T10_PI,
        ):
            out |= 1 << bit
        return out

    def _config(self, name: str) -> int:
        size = 2 if name in ("max_channel", "max_target") else 4
        data = self.read_config(W.SCSI_CONFIG.offset_of(name), size)
        return int.from_bytes(data, self.byteorder)

    def queues_wanted(self) -> int:
        wanted = 2 + max(1, self._config("num_queues"))
        return min(wanted, self.transport.num_queues())

    def _make_queue(self, index: int, packed: bool) -> DriverQueue:
        q = super()._make_queue(index, packed)
        # QEMU's virtio-scsi (7.2) counts a WRITE's data-out bytes in the used len;
        # nothing past the writable bytes is read, so the excess is ignored.
        q.clamp_used_len = index >= W.REQUESTQ
        return q

    def setup(self) -> None:
        self.refresh()

    def refresh(self) -> None:
        self.num_request_queues = max(1, self._config("num_queues"))
        self.sense_size = self._config("sense_size")
        self.cdb_size = self._config("cdb_size")
        self.event_info_size = self._config("event_info_size")
        self.max_lun = self._config("max_lun")
        self.max_target = self._config("max_target")

    def start_events(self, count: int = EVENT_BUFFERS) -> None:
        """Populate the eventq (once DRIVER_OK is set)."""
        size = max(self.event_info_size, W.EVENT.size)
        for _ in range(count):
            self.submit(W.EVENTQ, [], [size])
        self.kick(W.EVENTQ)

    def set_sizes(self, *, cdb_size: int | None = None, sense_size: int | None = None) -> None:
        """Write cdb_size / sense_size (the only writable config fields)."""
        for name, value in (("cdb_size", cdb_size), ("sense_size", sense_size)):
            if value is not None:
                offset = W.SCSI_CONFIG.offset_of(name)
                self.transport.write_config(offset, value.to_bytes(4, self.byteorder))
        self.refresh()

    # -- requests ------------------------------------------------------------------------

    def command(
        self,
        lun: int,
        cdb: bytes,
        data_out: bytes = b"",
        data_in_len: int = 0,
        *,
        target: int = 0,
        raw_lun: bytes | None = None,
        task_attr: int = W.S_SIMPLE,
        tag: int = 0,
        pi_out: bytes = b"",
        pi_in_len: int = 0,
        queue: int = W.REQUESTQ,
        timeout: float = 30.0,
    ) -> ScsiResult:
        """Send one CDB; returns the response, status, sense and the data read."""
        if len(cdb) > self.cdb_size:
            raise ValueError(f"CDB of {len(cdb)} bytes, cdb_size is {self.cdb_size}")
        if data_out and data_in_len and not self.has(F.VIRTIO_SCSI_F_INOUT):
            raise ValueError("bidirectional command without VIRTIO_SCSI_F_INOUT")
        pi = self.has(F.VIRTIO_SCSI_F_T10_PI)
        if (pi_out or pi_in_len) and not pi:
            raise ValueError("protection information without VIRTIO_SCSI_F_T10_PI")
        header = W.REQ_CMD_HEADER.with_order(self.byteorder).pack(
            lun=raw_lun if raw_lun is not None else W.encode_lun(lun, target),
            id=tag,
            task_attr=task_attr,
            prio=0,
            crn=0,
        )
        if pi:
            # Before the CDB, as Linux and QEMU lay out virtio_scsi_cmd_req_pi.
            header += W.REQ_CMD_PI.with_order(self.byteorder).pack(
                pi_bytesout=len(pi_out), pi_bytesin=pi_in_len
            )
        header += cdb.ljust(self.cdb_size, b"\0")
        out = [header] + ([pi_out] if pi_out else []) + ([data_out] if data_out else [])
        resp_len = W.RESP_CMD.size + self.sense_size
        in_sizes = [resp_len] + ([pi_in_len] if pi_in_len else [])
        if data_in_len:
            in_sizes.append(data_in_len)
        written, raw = self.call(queue, out, in_sizes, timeout)
        return self.parse_response(raw, written, len(data_out), data_in_len, pi_in_len)

    def parse_response(
        self, raw: bytes, written: int, data_out_len: int, data_in_len: int, pi_in_len: int = 0
    ) -> ScsiResult:
        """Check and decode a response (``raw``: every writable byte of the request)."""
        resp = W.RESP_CMD.with_order(self.byteorder)
        if written < resp.size:
            raise ScsiProtocolError(f"device wrote {written} bytes, a response has {resp.size}")
        fields = resp.unpack(raw[: resp.size])
        sense_len = int(fields["sense_len"])
        residual = int(fields["residual"])
        if sense_len > self.sense_size:
            raise ScsiProtocolError(f"sense_len {sense_len} beyond sense_size {self.sense_size}")
        if residual > data_in_len + data_out_len:
            raise ScsiProtocolError(
                f"residual {residual} beyond the {data_in_len + data_out_len} bytes of data"
            )
        start = resp.size + self.sense_size + pi_in_len
        got = min(data_in_len, max(0, data_in_len - residual), max(0, written - start))
        return ScsiResult(
            response=int(fields["response"]),
            status=int(fields["status"]),
            sense=raw[resp.size : resp.size + sense_len],
            data=raw[start : start + got],
            residual=residual,
            status_qualifier=int(fields["status_qualifier"]),
        )

    def tmf(
        self,
        subtype: int,
        lun: int = 0,
        *,
        tag: int = 0,
        raw_lun: bytes | None = None,
        timeout: float = 30.0,
    ) -> int:
        """A task management function; returns the response byte."""
        request = W.CTRL_TMF.with_order(self.byteorder).pack(
            type=W.T_TMF,
            subtype=subtype,
            lun=raw_lun if raw_lun is not None else W.encode_lun(lun),
            id=tag,
        )
        written, raw = self.call(W.CONTROLQ, [request], [1], timeout)
        if written < 1:
            raise ScsiProtocolError("device wrote no TMF response")
        return raw[0]

    def an_query(self, lun: int, events: int, *, subscribe: bool = False) -> tuple[int, int]:
        """Asynchronous notification query (or subscription): (response, event_actual)."""
        request = W.CTRL_AN.with_order(self.byteorder).pack(
            type=W.T_AN_SUBSCRIBE if subscribe else W.T_AN_QUERY,
            lun=W.encode_lun(lun),
            event_requested=events,
        )
        resp = W.CTRL_AN_RESP.with_order(self.byteorder)
        written, raw = self.call(W.CONTROLQ, [request], [resp.size])
        if written < resp.size:
            raise ScsiProtocolError(f"device wrote {written} bytes of an AN response")
        fields = resp.unpack(raw[: resp.size])
        return int(fields["response"]), int(fields["event_actual"])

    def poll_events(self) -> list[ScsiEvent]:
        """Events the device returned since the last look; their buffers go back."""
        events: list[ScsiEvent] = []
        layout = W.EVENT.with_order(self.byteorder)
        for request in self.harvest(W.EVENTQ):
            raw = self.read_in_full(request)
            written = request.written
            size = request.in_[0][1]
            self.release(request)
            if written < layout.size:
                raise ScsiProtocolError(f"event of {written} bytes (struct has {layout.size})")
            fields = layout.unpack(raw[: layout.size])
            lun = fields["lun"]
            assert isinstance(lun, bytes)
            events.append(ScsiEvent(int(fields["event"]), lun, int(fields["reason"])))
            self.submit(W.EVENTQ, [], [size])
        if events:
            self.kick(W.EVENTQ)
        return events

    # -- conveniences -----------------------------------------------------------------

    def checked(self, lun: int, cdb: bytes, data_out: bytes = b"", data_in_len: int = 0) -> bytes:
        result = self.command(lun, cdb, data_out, data_in_len)
        if not result.good:
            raise ScsiError(result, f"opcode {cdb[0]:#04x} on LUN {lun}")
        return result.data

    def inquiry(self, lun: int, page: int | None = None, length: int = 255) -> bytes:
        evpd = 0 if page is None else 1
        cdb = struct.pack(">BBBHB", 0x12, evpd, page or 0, length, 0)
        return self.checked(lun, cdb, data_in_len=length)

    def report_luns(self, lun: int = 0) -> list[int]:
        data = self.checked(
            lun, struct.pack(">BBBBBBIBB", 0xA0, 0, 0, 0, 0, 0, 4096, 0, 0), data_in_len=4096
        )
        length = struct.unpack_from(">I", data)[0]
        entries = [data[8 + i : 16 + i] for i in range(0, min(length, len(data) - 8), 8)]
        return [(e[0] & 0x3F) << 8 | e[1] for e in entries]

    def read_capacity(self, lun: int) -> tuple[int, int]:
        """(number of blocks, block size), from READ CAPACITY (16)."""
        cdb = struct.pack(">BBQIBB", 0x9E, 0x10, 0, 32, 0, 0)
        data = self.checked(lun, cdb, data_in_len=32)
        last, size = struct.unpack_from(">QI", data)
        return last + 1, size

    def read(self, lun: int, lba: int, blocks: int, block_size: int = 512) -> bytes:
        cdb = struct.pack(">BBQIBB", 0x88, 0, lba, blocks, 0, 0)
        return self.checked(lun, cdb, data_in_len=blocks * block_size)

    def write(self, lun: int, lba: int, data: bytes, block_size: int = 512) -> None:
        cdb = struct.pack(">BBQIBB", 0x8A, 0, lba, len(data) // block_size, 0, 0)
        self.checked(lun, cdb, data_out=data)

    def synchronize_cache(self, lun: int) -> None:
        self.checked(lun, bytes((0x35,)) + bytes(9))
