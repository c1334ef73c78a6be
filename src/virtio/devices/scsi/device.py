"""The virtio-scsi host device: one target (0) whose LUNs are image files.

Requests on the request queues are parsed (header, T10 PI fields when
negotiated, CDB of the driver's ``cdb_size``) and executed by the
:class:`~virtio.devices.scsi.target.LogicalUnit` they address.

READ and WRITE (10) and (16) of a simple task, with no unit attention, PI
bytes or bidirectional data, take a fast path: the CDB is decoded in
place and data moves with ``os.preadv``/``os.pwritev`` straight between
the image and the guest's buffers. Like virtio-blk, small transfers run
inline on the ring's thread; larger ones go to worker threads
(:class:`~virtio.devices.iothreads.IoThreads`), their chains deferred. Every
other command, and anything odd about a READ or WRITE, takes the general
path, which first waits for the transfers in flight: it sees every earlier
command completed, as do task management functions (ABORT TASK and friends
complete once the tasks in flight have; a reset leaves a unit attention
behind). The event queue keeps the driver's buffers until the host reports
a LUN added, removed or changed; an event with no buffer to go in is
dropped and the next buffer reports VIRTIO_SCSI_T_EVENTS_MISSED.

With VIRTIO_SCSI_F_T10_PI the spec's listing of virtio_scsi_req_cmd puts
``pi_bytesout`` and ``pi_bytesin`` after ``cdb``; the drivers and devices
in use (Linux, QEMU) put them before it, between ``crn`` and ``cdb``. This
device follows them, so a real guest's commands are read where they are.
"""

from __future__ import annotations

import logging
import os
import struct
from collections import deque
from collections.abc import Sequence
from typing import Protocol

from virtio.core.device import DEFERRED, RingOptions, VirtioDevice
from virtio.devices.fileio import IOV_MAX
from virtio.devices.iothreads import IoThreads
from virtio.devices.scsi import wire as W
from virtio.devices.scsi.target import (
    BLOCK_SIZE,
    CHECK_CONDITION,
    FUA,
    GOOD,
    READ_10,
    READ_16,
    RW10,
    RW16,
    UA_CAPACITY_CHANGED,
    UA_I_T_NEXUS_LOSS,
    UA_REPORTED_LUNS_CHANGED,
    UA_RESET,
    WRITE_10,
    WRITE_16,
    LogicalUnit,
    Result,
    cdb_length,
    execute_without_unit,
)
from virtio.queue import Chain, ChainReader, ChainWriter
from virtio.spec import features as F
from virtio.spec.device_ids import DeviceId

log = logging.getLogger("virtio.scsi")

MAX_LUNS = 16384
_SENSE_SIZE_AT = W.SCSI_CONFIG.offset_of("sense_size")
_CDB_SIZE_AT = W.SCSI_CONFIG.offset_of("cdb_size")
_MIN_CDB = 6
#: Larger CDB or sense sizes than this are refused (the driver's write is ignored).
MAX_CDB_SIZE = 260
MAX_SENSE_SIZE = 4096

#: lun, id, task_attr: as much of the request header as the fast path needs.
_FAST_HEADER = struct.Struct("<8sQB")
_PI_AT = W.REQ_CMD_HEADER.size
_NO_LEVELS = bytes(4)
#: The fast path's answer for "not mine: take the general path".
_GENERAL = -1

#: A transfer on a worker thread: queue, chain, unit, write?, length, residual, bytes used.
_Transfer = tuple[int, Chain, LogicalUnit, bool, int, int, int]


class _Closer(Protocol):
    def close(self) -> None: ...


class LunAddress:
    """What an 8-byte ``lun`` field addresses."""

    __slots__ = ("error", "lun", "wlun")

    def __init__(self, lun: int | None = None, *, wlun: bool = False, error: int = 0) -> None:
        self.lun = lun
        self.wlun = wlun
        self.error = error  # a virtio-scsi response code; 0 if the address is usable


def decode_lun(raw: bytes) -> LunAddress:
    """Decode the virtio-scsi LUN format: 1, target, single-level LUN, four zero bytes."""
    if raw == W.REPORT_LUNS_WLUN:
        return LunAddress(wlun=True)
    if raw[0] != 1 or raw[1] != 0:
        return LunAddress(error=W.S_BAD_TARGET)  # not target 0: no such target
    method = raw[2] >> 6
    if any(raw[4:8]) or method not in (0, 1) or (method == 0 and raw[2]):
        # The target exists, but this is no single-level LUN of it.
        return LunAddress(None)
    return LunAddress((raw[2] & 0x3F) << 8 | raw[3])


class ScsiDevice(VirtioDevice):
    """A SCSI host with one target; LUN n serves ``images[n]``."""

    device_id = DeviceId.SCSI

    def __init__(
        self,
        images: Sequence[str | os.PathLike[str]],
        *,
        read_only: bool = False,
        num_queues: int = 1,
        hotplug: bool = True,
        change: bool = True,
        inout: bool = True,
        t10_pi: bool = True,
        queue_max_size: int = 256,
        ring: RingOptions | None = None,
        workers: int = 2,
        inline_max: int = 64 << 10,
    ) -> None:
        if not 1 <= num_queues <= 64:
            raise ValueError("num_queues must be 1..64")
        if workers < 0:
            raise ValueError("workers must be 0 or more")
        #: READs and WRITEs larger than this go to the ``workers`` threads (if any).
        self.inline_max = inline_max
        self.read_only = read_only
        self.num_request_queues = num_queues
        self.offer = {
            F.VIRTIO_SCSI_F_HOTPLUG: hotplug,
            F.VIRTIO_SCSI_F_CHANGE: change,
            F.VIRTIO_SCSI_F_INOUT: inout,
            F.VIRTIO_SCSI_F_T10_PI: t10_pi,
        }
        self.seg_max = max(1, min(254, queue_max_size - 2))
        self.luns: dict[int, LogicalUnit] = {}
        try:
            for n, path in enumerate(images):
                self.luns[n] = LogicalUnit(path, n, read_only=read_only)
        except OSError:
            for unit in self.luns.values():
                unit.close()
            raise
        self.cdb_size = W.DEFAULT_CDB_SIZE
        self.sense_size = W.DEFAULT_SENSE_SIZE
        self._event_buffers: deque[Chain] = deque()
        self._events_missed = False
        #: The host side that changes LUNs at run time (the ``--control`` FIFO), if any.
        self.control: _Closer | None = None
        self.stats = {
            "commands": 0,
            "fast": 0,
            "deferred": 0,
            "tmf": 0,
            "events": 0,
            "events_missed": 0,
        }
        super().__init__(num_queues=2 + num_queues, queue_max_size=queue_max_size, ring=ring)
        self._layouts()
        self.io: IoThreads[_Transfer] | None = (
            IoThreads(self.events, workers, self._transfers_done, name="virtio-scsi-io")
            if workers
            else None
        )

    def _layouts(self) -> None:
        order = self.byteorder
        self._req = W.REQ_CMD_HEADER.with_order(order)
        self._pi = W.REQ_CMD_PI.with_order(order)
        self._resp = W.RESP_CMD.with_order(order)
        self._tmf = W.CTRL_TMF.with_order(order)
        self._an = W.CTRL_AN.with_order(order)
        self._an_resp = W.CTRL_AN_RESP.with_order(order)
        self._event = W.EVENT.with_order(order)

    # -- declaration -----------------------------------------------------------------

    def device_features(self) -> int:
        bits = 0
        for bit, offered in self.offer.items():
            if offered:
                bits |= 1 << bit
        return bits

    def config_size(self) -> int:
        return W.SCSI_CONFIG.size

    def build_config(self) -> None:
        # sense_size and cdb_size go back to their defaults on every reset.
        self.cdb_size = W.DEFAULT_CDB_SIZE
        self.sense_size = W.DEFAULT_SENSE_SIZE
        W.SCSI_CONFIG.with_order(self.byteorder).pack_into(
            self.config,
            0,
            num_queues=self.num_request_queues,
            seg_max=self.seg_max,
            max_sectors=0xFFFF,
            cmd_per_lun=128,
            event_info_size=W.EVENT.size,
            sense_size=self.sense_size,
            cdb_size=self.cdb_size,
            max_channel=0,
            max_target=0,
            max_lun=MAX_LUNS - 1,
        )

    def config_write(self, offset: int, data: bytes) -> bool:
        if offset in (_SENSE_SIZE_AT, _CDB_SIZE_AT) and len(data) == 4:
            value = int.from_bytes(data, self.byteorder)
            limit = MAX_SENSE_SIZE if offset == _SENSE_SIZE_AT else MAX_CDB_SIZE
            if value > limit:
                log.info("ignoring %s %d (more than %d)", _name(offset), value, limit)
                return True
            self.config[offset : offset + 4] = data
            if offset == _SENSE_SIZE_AT:
                self.sense_size = value
            else:
                self.cdb_size = value
            return True
        self.fail(
            f"driver wrote config bytes {offset}+{len(data)} (only sense_size and cdb_size "
            "are writable)",
            W.N_CONFIG_DRV,
        )
        return True

    def queues_for_features(self, features: int) -> int:
        return 2 + self.num_request_queues

    def on_reset(self) -> None:
        self._event_buffers.clear()
        self._events_missed = False
        self._layouts()

    def describe(self) -> str:
        ro = ", read-only" if self.read_only else ""
        luns = ", ".join(f"LUN {n}: {u.path} ({u.blocks} blocks)" for n, u in self.luns.items())
        return f"SCSI target 0, {luns}{ro}"

    def flush_backend(self) -> None:
        for unit in self.luns.values():
            unit.flush()

    def close(self) -> None:
        if self.io is not None:
            self.io.close()
        if self.control is not None:
            self.control.close()
            self.control = None
        for unit in self.luns.values():
            unit.close()

    # -- dispatch ---------------------------------------------------------------------

    def handle_chain(self, queue_index: int, chain: Chain) -> int | None:
        if queue_index == W.CONTROLQ:
            return self._control(chain)
        if queue_index == W.EVENTQ:
            return self._event_buffer(chain)
        return self._command(queue_index, chain)

    # -- request queues ---------------------------------------------------------------

    def _command(self, queue_index: int, chain: Chain) -> int | None:
        self.stats["commands"] += 1
        resp_size = self._resp.size
        if chain.write_len < resp_size:
            self.fail(
                f"SCSI request with {chain.write_len} writable bytes (the response needs "
                f"{resp_size})",
                W.N_REQ_DRV,
            )
            return 0
        done = self._fast_transfer(queue_index, chain)
        if done != _GENERAL:
            return done
        self._settle()
        pi = self.has(F.VIRTIO_SCSI_F_T10_PI)
        header = self._req.size + self.cdb_size + (self._pi.size if pi else 0)
        sense_room = min(self.sense_size, chain.write_len - resp_size)
        if chain.read_len < header or self.cdb_size < _MIN_CDB:
            log.info(
                "SCSI request with %d readable bytes, header needs %d (cdb_size %d)",
                chain.read_len,
                header,
                self.cdb_size,
            )
            return self._respond(chain, W.S_FAILURE, 0, 0, b"", 0)
        reader = ChainReader(chain)
        fields = self._req.unpack(reader.read(self._req.size))
        lun_raw = fields["lun"]
        assert isinstance(lun_raw, bytes)
        pi_out = pi_in = 0
        if pi:
            # Where Linux and QEMU put them (struct virtio_scsi_cmd_req_pi): before the
            # CDB, not after it as the spec's listing shows.
            pi_fields = self._pi.unpack(reader.read(self._pi.size))
            pi_out, pi_in = int(pi_fields["pi_bytesout"]), int(pi_fields["pi_bytesin"])
        cdb = reader.read(self.cdb_size)
        data_start = resp_size + self.sense_size + pi_in
        if pi_out > reader.remaining or (pi_in and data_start > chain.write_len):
            log.info("SCSI request: protection information larger than its buffers")
            return self._respond(chain, W.S_FAILURE, 0, 0, b"", 0)
        reader.skip(pi_out)  # no logical unit is formatted with protection information
        data_out_len = reader.remaining
        data_in_len = max(0, chain.write_len - data_start)
        if data_out_len and data_in_len and not self.has(F.VIRTIO_SCSI_F_INOUT):
            return self._respond(chain, W.S_FAILURE, 0, 0, b"", 0)
        address = decode_lun(lun_raw)
        if address.error:
            return self._respond(chain, address.error, 0, data_in_len + data_out_len, b"", 0)
        needed = cdb_length(cdb[0])
        if needed is not None and needed > len(cdb):
            # The CDB cannot fit in cdb_size bytes: treat the missing bytes as absent.
            result = Result.check((0x5, 0x24, 0x00))
        elif address.wlun or address.lun not in self.luns:
            result = execute_without_unit(cdb, data_in_len, sorted(self.luns))
        else:
            unit = self.luns[address.lun]
            data_out = reader.views(data_out_len)
            result = unit.execute(cdb, data_out, data_out_len, data_in_len, sorted(self.luns))
        if result.status or result.overrun:
            log.debug(
                "LUN %s: CDB %s: status %#x, sense %s%s",
                address.lun,
                cdb[: needed or 16].hex(),
                result.status,
                result.sense[:14].hex(),
                " (overrun)" if result.overrun else "",
            )
        if result.overrun:
            return self._respond(chain, W.S_OVERRUN, 0, data_in_len + data_out_len, b"", 0)
        sense = result.sense[:sense_room]
        data = result.data[:data_in_len]
        if data:
            writer = ChainWriter(chain)
            writer.seek(data_start)
            writer.write(data)
        residual = data_in_len - len(data) + data_out_len - result.data_out_used
        written = data_start + len(data) if data else resp_size + len(sense)
        return self._respond(chain, W.S_OK, result.status, residual, sense, written)

    # -- the fast path: READ/WRITE (10)/(16) --------------------------------------------

    def _fast_transfer(self, queue_index: int, chain: Chain) -> int | None:
        """Serve a plain READ/WRITE (10)/(16); _GENERAL for anything else.

        Nothing is changed before the request is known to be one: the general
        path reads it again from the start and answers whatever is odd about it
        (a header split over descriptors, a unit attention, a range or length
        error, PI bytes, another task attribute) as before.
        """
        readable = chain.readable
        if not readable:
            return _GENERAL
        first = readable[0]
        pi = self.negotiated >> F.VIRTIO_SCSI_F_T10_PI & 1
        at = _PI_AT + (self._pi.size if pi else 0)
        cdb_size = self.cdb_size
        header = at + cdb_size
        if first.nbytes < header:
            return _GENERAL
        op = first[at]
        if op in (READ_10, WRITE_10):
            if cdb_size < 10:
                return _GENERAL
            _op, flags, lba, _group, count = RW10.unpack_from(first, at)
        elif op in (READ_16, WRITE_16):
            if cdb_size < 16:
                return _GENERAL
            _op, flags, lba, count = RW16.unpack_from(first, at)
        else:
            return _GENERAL
        lun, _tag, task_attr = _FAST_HEADER.unpack_from(first)
        # Only a simple task: ORDERED and HEAD OF QUEUE wait for what is in flight.
        if task_attr != W.S_SIMPLE or lun[0] != 1 or lun[1] or lun[4:] != _NO_LEVELS:
            return _GENERAL
        # Single-level LUN: peripheral (00b, below 256) or flat space (01b), which
        # Linux uses for every LUN.
        if lun[2] >> 6 == 1:
            unit = self.luns.get((lun[2] & 0x3F) << 8 | lun[3])
        elif not lun[2]:
            unit = self.luns.get(lun[3])
        else:
            return _GENERAL
        if unit is None or unit.unit_attention or not count or lba + count > unit.blocks:
            return _GENERAL
        if pi and any(self._pi.struct.unpack_from(first, _PI_AT)):
            return _GENERAL
        nbytes = count * BLOCK_SIZE
        resp_size = self._resp.size
        data_start = resp_size + self.sense_size
        write = op in (WRITE_10, WRITE_16)
        if write:
            data_out_len = chain.read_len - header
            if unit.read_only or chain.write_len > data_start or data_out_len < nbytes:
                return _GENERAL
            views = chain.readable_slices(header, nbytes)
            residual, written = data_out_len - nbytes, resp_size
        else:
            data_in_len = chain.write_len - data_start
            if chain.read_len != header or data_in_len < nbytes:
                return _GENERAL
            views = chain.writable_slices(data_start, nbytes)
            residual, written = data_in_len - nbytes, data_start + nbytes
        if len(views) > IOV_MAX:
            return _GENERAL
        self.stats["fast"] += 1
        unit.stats["write" if write else "read"] += 1
        fua = bool(flags & FUA)
        io = self.io
        if nbytes > self.inline_max and io is not None and io.outstanding < io.count:
            self.stats["deferred"] += 1
            token = (queue_index, chain, unit, write, nbytes, residual, written)
            if write:
                io.submit(token, lambda: unit.write_from(views, lba, fua))
            else:
                io.submit(token, lambda: unit.read_into(views, lba, nbytes))
            return DEFERRED
        error: OSError | None = None
        try:
            if write:
                unit.write_from(views, lba, fua)
            else:
                unit.read_into(views, lba, nbytes)
        except OSError as err:
            error = err
        return self._transferred(chain, unit, write, nbytes, residual, written, error)

    def _transferred(
        self,
        chain: Chain,
        unit: LogicalUnit,
        write: bool,
        nbytes: int,
        residual: int,
        written: int,
        error: BaseException | None,
    ) -> int:
        """Answer a fast-path transfer: GOOD, or CHECK CONDITION with a medium error."""
        resp_size = self._resp.size
        if error is not None:
            # As on the general path: nothing transferred, the whole length is residual.
            sense = unit.transfer_failed(error, write)[
                : min(self.sense_size, chain.write_len - resp_size)
            ]
            return self._respond(chain, W.S_OK, CHECK_CONDITION, residual + nbytes, sense, 0)
        first = chain.writable[0]
        if first.nbytes >= resp_size:
            self._resp.struct.pack_into(first, 0, 0, residual, 0, GOOD, W.S_OK)
            return written
        return self._respond(chain, W.S_OK, GOOD, residual, b"", written)

    def _transfers_done(self, results: list[tuple[_Transfer, object]]) -> None:
        by_queue: dict[int, list[tuple[Chain, int]]] = {}
        for (queue_index, chain, unit, write, nbytes, residual, written), result in results:
            error = result if isinstance(result, BaseException) else None
            answer = self._transferred(chain, unit, write, nbytes, residual, written, error)
            by_queue.setdefault(queue_index, []).append((chain, answer))
        for queue_index, items in by_queue.items():
            self.complete_many(queue_index, items)

    def _settle(self) -> bool:
        """Wait for the transfers in flight and complete them; False if some hang."""
        if self.io is not None and self.io.outstanding:
            try:
                self.io.drain()
            except TimeoutError as err:
                # A stuck image (a hung NFS server, say): go on rather than stop serving.
                log.warning("%s; going on without them", err)
                return False
        return True

    def _respond(
        self, chain: Chain, response: int, status: int, residual: int, sense: bytes, written: int
    ) -> int:
        writer = ChainWriter(chain)
        writer.write(
            self._resp.pack(
                sense_len=len(sense),
                residual=residual & 0xFFFFFFFF,
                status_qualifier=0,
                status=status,
                response=response,
            )
        )
        if sense:
            writer.write(sense)
        return max(written, writer.position)

    # -- control queue ----------------------------------------------------------------

    def _control(self, chain: Chain) -> int:
        if chain.read_len < 4 or chain.write_len < 1:
            self.fail(
                f"control request with {chain.read_len} readable / {chain.write_len} writable "
                "bytes (needs a type and a response)",
                W.N_REQ_DRV,
            )
            return 0
        reader = ChainReader(chain)
        kind = int.from_bytes(reader.read(4), self.byteorder)
        reader.seek(0)
        writer = ChainWriter(chain)
        if kind == W.T_TMF:
            if chain.read_len < self._tmf.size:
                self.fail("TMF request shorter than virtio_scsi_ctrl_tmf", W.N_REQ_DRV)
                return 0
            fields = self._tmf.unpack(reader.read(self._tmf.size))
            lun_raw = fields["lun"]
            assert isinstance(lun_raw, bytes)
            writer.write(bytes((self._task_management(int(fields["subtype"]), lun_raw),)))
            return 1
        if kind in (W.T_AN_QUERY, W.T_AN_SUBSCRIBE):
            if chain.read_len < self._an.size or chain.write_len < self._an_resp.size:
                self.fail("asynchronous notification request too short", W.N_REQ_DRV)
                return 0
            fields = self._an.unpack(reader.read(self._an.size))
            lun_raw = fields["lun"]
            assert isinstance(lun_raw, bytes)
            response = self._lun_response(decode_lun(lun_raw))
            # No logical unit reports asynchronous events: none is supported.
            writer.write(self._an_resp.pack(event_actual=0, response=response))
            return self._an_resp.size
        log.info("unknown control request type %d", kind)
        writer.write(bytes((W.S_FAILURE,)))
        return 1

    def _lun_response(self, address: LunAddress) -> int:
        if address.error:
            return address.error
        if address.wlun or address.lun not in self.luns:
            return W.S_INCORRECT_LUN
        return W.S_OK

    def _task_management(self, subtype: int, lun_raw: bytes) -> int:
        self.stats["tmf"] += 1
        # Tasks in flight complete first (they cannot be stopped inside a system call):
        # the function then finds them done, and its response comes after theirs.
        self._settle()
        address = decode_lun(lun_raw)
        if address.error:
            return address.error
        if subtype == W.T_TMF_I_T_NEXUS_RESET:
            # The nexus is the whole target: the single-level LUN is ignored.
            for unit in self.luns.values():
                unit.add_unit_attention(UA_I_T_NEXUS_LOSS)
            return W.S_FUNCTION_COMPLETE
        if subtype not in range(W.T_TMF_QUERY_TASK_SET + 1):
            return W.S_FUNCTION_REJECTED
        response = self._lun_response(address)
        if response != W.S_OK:
            return response
        assert address.lun is not None
        if subtype == W.T_TMF_LOGICAL_UNIT_RESET:
            self.luns[address.lun].add_unit_attention(UA_RESET)
            return W.S_FUNCTION_COMPLETE
        if subtype == W.T_TMF_CLEAR_ACA:
            return W.S_FUNCTION_REJECTED  # NACA is not supported: there is never an ACA
        # ABORT TASK (SET), CLEAR TASK SET, QUERY TASK (SET): every command read
        # before this one has completed, so no task is in the task set.
        return W.S_FUNCTION_COMPLETE

    # -- event queue ------------------------------------------------------------------

    def _event_buffer(self, chain: Chain) -> int | None:
        if chain.read_len or chain.write_len < W.EVENT.size:
            self.fail(
                f"event buffer with {chain.read_len} readable / {chain.write_len} writable bytes "
                f"(must be device-writable, at least {W.EVENT.size})",
                W.N_EVENT_DRV,
            )
            return 0
        if self._events_missed:
            self._events_missed = False
            return self._write_event(chain, W.T_NO_EVENT | W.T_EVENTS_MISSED, bytes(8), 0)
        self._event_buffers.append(chain)
        return DEFERRED

    def _write_event(self, chain: Chain, event: int, lun: bytes, reason: int) -> int:
        ChainWriter(chain).write(self._event.pack(event=event, lun=lun, reason=reason))
        self.stats["events"] += 1
        return W.EVENT.size

    def send_event(self, event: int, lun: int, reason: int) -> bool:
        """Report an event; False if no buffer was there (it is reported as missed)."""
        if not self.live:
            return False
        if not self._event_buffers:
            self._events_missed = True
            self.stats["events_missed"] += 1
            return False
        chain = self._event_buffers.popleft()
        if self._events_missed:
            event |= W.T_EVENTS_MISSED
            self._events_missed = False
        written = self._write_event(chain, event, W.encode_lun(lun), reason)
        self.complete(W.EVENTQ, chain, written)
        return True

    def quiesce(self, queue_index: int) -> None:
        if queue_index >= W.REQUESTQ:
            self._settle()  # transfers on worker threads write into guest memory
            return
        # Event buffers the device keeps go back holding "no event" (before a reset,
        # a queue reset or a saved ring state), so a driver never reads stale ones.
        if queue_index == W.EVENTQ and self._event_buffers:
            chains = list(self._event_buffers)
            self._event_buffers.clear()
            items = [(c, self._write_event(c, W.T_NO_EVENT, bytes(8), 0)) for c in chains]
            self.complete_many(W.EVENTQ, items)

    # -- the host side: hotplug and parameter changes -------------------------------------

    def add_lun(self, path: str | os.PathLike[str], lun: int | None = None) -> int:
        """Attach an image as a new LUN (the lowest free one by default); returns it."""
        if lun is None:
            lun = next(n for n in range(MAX_LUNS) if n not in self.luns)
        if not 0 <= lun < MAX_LUNS or lun in self.luns:
            raise ValueError(f"LUN {lun} is in use or outside 0..{MAX_LUNS - 1}")
        self.luns[lun] = LogicalUnit(path, lun, read_only=self.read_only)
        for n, unit in self.luns.items():
            if n != lun:
                unit.add_unit_attention(UA_REPORTED_LUNS_CHANGED)
        if self.has(F.VIRTIO_SCSI_F_HOTPLUG):
            self.send_event(W.T_TRANSPORT_RESET, lun, W.EVT_RESET_RESCAN)
        return lun

    def remove_lun(self, lun: int) -> None:
        """Detach a LUN; its image is closed."""
        if lun not in self.luns:
            raise ValueError(f"no LUN {lun}")
        if not self._settle():
            # Closing the image now could hand its descriptor to another file.
            raise ValueError(f"LUN {lun} has transfers that do not finish")
        unit = self.luns.pop(lun)
        unit.flush()
        unit.close()
        for other in self.luns.values():
            other.add_unit_attention(UA_REPORTED_LUNS_CHANGED)
        if self.has(F.VIRTIO_SCSI_F_HOTPLUG):
            self.send_event(W.T_TRANSPORT_RESET, lun, W.EVT_RESET_REMOVED)

    def refresh_lun(self, lun: int) -> bool:
        """Re-read a LUN's image size (it was resized); True if it changed."""
        unit = self.luns.get(lun)
        if unit is None:
            raise ValueError(f"no LUN {lun}")
        if not unit.refresh_capacity():
            return False
        unit.add_unit_attention(UA_CAPACITY_CHANGED)
        if self.has(F.VIRTIO_SCSI_F_CHANGE):
            _key, asc, ascq = UA_CAPACITY_CHANGED
            self.send_event(W.T_PARAM_CHANGE, lun, asc | ascq << 8)
        return True


def _name(offset: int) -> str:
    return "sense_size" if offset == _SENSE_SIZE_AT else "cdb_size"
