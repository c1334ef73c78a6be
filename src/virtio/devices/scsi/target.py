"""The SCSI command set of a direct-access logical unit (a disk) backed by an image file.

:class:`LogicalUnit` executes one CDB against its image: SPC commands
(INQUIRY with the VPD pages Linux asks for, REPORT LUNS, TEST UNIT READY,
REQUEST SENSE, MODE SENSE) and SBC ones (READ CAPACITY, READ/WRITE,
SYNCHRONIZE CACHE, UNMAP, WRITE SAME). Errors are CHECK CONDITION with
fixed-format sense data. Unit attention conditions (a reset, a capacity
change, a new LUN on the target) are kept per logical unit and reported on
the next command that is not INQUIRY, REPORT LUNS or REQUEST SENSE.
"""

from __future__ import annotations

import logging
import os
import struct
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

from virtio.devices.fileio import preadv_all, pwritev_full, zero_views
from virtio.devices.imagefile import CAN_PUNCH_HOLES, punch_hole, write_zeroes
from virtio.devices.scsi.wire import report_luns_entry
from virtio.queue import view_slices

log = logging.getLogger("virtio.scsi")

BLOCK_SIZE = 512

# SAM status codes.
GOOD = 0x00
CHECK_CONDITION = 0x02

# Sense keys.
NO_SENSE = 0x0
NOT_READY = 0x2
MEDIUM_ERROR = 0x3
ILLEGAL_REQUEST = 0x5
UNIT_ATTENTION = 0x6
DATA_PROTECT = 0x7

# (sense key, asc, ascq) triples.
Sense = tuple[int, int, int]
INVALID_OPCODE: Sense = (ILLEGAL_REQUEST, 0x20, 0x00)
LBA_OUT_OF_RANGE: Sense = (ILLEGAL_REQUEST, 0x21, 0x00)
INVALID_FIELD_IN_CDB: Sense = (ILLEGAL_REQUEST, 0x24, 0x00)
LUN_NOT_SUPPORTED: Sense = (ILLEGAL_REQUEST, 0x25, 0x00)
INVALID_FIELD_IN_PARAMETER_LIST: Sense = (ILLEGAL_REQUEST, 0x26, 0x00)
PARAMETER_LIST_LENGTH_ERROR: Sense = (ILLEGAL_REQUEST, 0x1A, 0x00)
SAVING_NOT_SUPPORTED: Sense = (ILLEGAL_REQUEST, 0x39, 0x00)
WRITE_PROTECTED: Sense = (DATA_PROTECT, 0x27, 0x00)
UNRECOVERED_READ_ERROR: Sense = (MEDIUM_ERROR, 0x11, 0x00)
WRITE_ERROR: Sense = (MEDIUM_ERROR, 0x0C, 0x00)
UA_RESET: Sense = (UNIT_ATTENTION, 0x29, 0x00)
UA_I_T_NEXUS_LOSS: Sense = (UNIT_ATTENTION, 0x29, 0x07)
UA_CAPACITY_CHANGED: Sense = (UNIT_ATTENTION, 0x2A, 0x09)
UA_REPORTED_LUNS_CHANGED: Sense = (UNIT_ATTENTION, 0x3F, 0x0E)
NO_SENSE_DATA: Sense = (NO_SENSE, 0x00, 0x00)

# Opcodes.
TEST_UNIT_READY = 0x00
REQUEST_SENSE = 0x03
READ_6 = 0x08
WRITE_6 = 0x0A
INQUIRY = 0x12
MODE_SELECT_6 = 0x15
MODE_SENSE_6 = 0x1A
START_STOP_UNIT = 0x1B
PREVENT_ALLOW = 0x1E
READ_CAPACITY_10 = 0x25
READ_10 = 0x28
WRITE_10 = 0x2A
VERIFY_10 = 0x2F
SYNCHRONIZE_CACHE_10 = 0x35
WRITE_SAME_10 = 0x41
UNMAP = 0x42
MODE_SENSE_10 = 0x5A
READ_16 = 0x88
WRITE_16 = 0x8A
SYNCHRONIZE_CACHE_16 = 0x91
WRITE_SAME_16 = 0x93
SERVICE_ACTION_IN_16 = 0x9E
SAI_READ_CAPACITY_16 = 0x10
REPORT_LUNS = 0xA0
READ_12 = 0xA8
WRITE_12 = 0xAA

# Limits advertised in the Block Limits VPD page (in blocks).
MAX_TRANSFER = 1 << 16
MAX_UNMAP_BLOCKS = 1 << 22
MAX_UNMAP_DESCRIPTORS = 64
MAX_WRITE_SAME = 1 << 22

VPD_PAGES = (0x00, 0x80, 0x83, 0xB0, 0xB1, 0xB2)

#: READ/WRITE (10) and (16) CDBs as far as the transfer length: opcode, flags (FUA is
#: bit 3), LBA, [group number,] blocks. The device's fast path decodes them.
RW10 = struct.Struct(">BBIBH")
RW16 = struct.Struct(">BBQI")
FUA = 0x08


def cdb_length(opcode: int) -> int | None:
    """The CDB length its group code gives (None: variable length or vendor specific)."""
    return {0: 6, 1: 10, 2: 10, 4: 16, 5: 12}.get(opcode >> 5)


def fixed_sense(sense: Sense, information: int | None = None) -> bytes:
    """Fixed-format sense data (response code 70h), 18 bytes."""
    key, asc, ascq = sense
    valid = 0x80 if information is not None else 0
    info = (information or 0) & 0xFFFFFFFF
    return struct.pack(">BBBIB4sBBB3s", 0x70 | valid, 0, key, info, 10, b"", asc, ascq, 0, b"")


@dataclass
class Result:
    """What one command produced: status, sense (if CHECK CONDITION), data-in bytes.

    ``overrun``: the CDB asks for more data than the buffers hold (the
    transport answers VIRTIO_SCSI_S_OVERRUN). ``data_out_used``: bytes of
    data-out the command consumed (for the residual).
    """

    status: int = GOOD
    sense: bytes = b""
    data: bytes = b""
    data_out_used: int = 0
    overrun: bool = False

    @classmethod
    def check(cls, sense: Sense, information: int | None = None) -> Result:
        return cls(CHECK_CONDITION, fixed_sense(sense, information))


class _Error(Exception):
    def __init__(self, sense: Sense) -> None:
        super().__init__(sense)
        self.sense = sense


class _Overrun(Exception):
    pass


class LogicalUnit:
    """One LUN: a disk image, 512-byte logical blocks."""

    def __init__(self, path: str | os.PathLike[str], number: int, *, read_only: bool = False):
        self.path = os.fspath(path)
        self.number = number
        self.read_only = read_only
        flags = os.O_RDONLY if read_only else os.O_RDWR
        self.fd = os.open(self.path, flags | os.O_CLOEXEC)
        self.blocks = 0
        self.refresh_capacity()
        self.writeback = True
        self.unit_attention: deque[Sense] = deque()
        self.stats = {"read": 0, "write": 0, "errors": 0}
        serial = f"pyvirtio-{number:04d}"
        self.serial = serial.encode()

    def refresh_capacity(self) -> bool:
        """Re-read the image size; True if it changed."""
        size = os.fstat(self.fd).st_size
        if size == 0:
            size = os.lseek(self.fd, 0, os.SEEK_END)  # block devices report 0 in stat
        blocks = size // BLOCK_SIZE
        changed = blocks != self.blocks
        self.blocks = blocks
        return changed

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def flush(self) -> None:
        if self.fd >= 0 and not self.read_only:
            os.fdatasync(self.fd)

    def add_unit_attention(self, sense: Sense) -> None:
        if sense not in self.unit_attention:
            self.unit_attention.append(sense)

    # -- transfers straight between the image and guest buffers ---------------------------
    # The device checked the CDB (range, write protection, lengths). These touch only
    # the image and the views, so they may run on a worker thread.

    def read_into(self, views: list[memoryview], lba: int, nbytes: int) -> None:
        """Read ``nbytes`` from block ``lba`` into ``views`` (which hold exactly that much)."""
        got = preadv_all(self.fd, views, lba * BLOCK_SIZE)
        if got < nbytes:
            zero_views(views, got)  # the image shrank under the LUN: zeroes, as _read

    def write_from(self, views: list[memoryview], lba: int, fua: bool) -> None:
        """Write ``views`` at block ``lba``; with FUA, make it durable."""
        pwritev_full(self.fd, views, lba * BLOCK_SIZE)
        if fua and self.writeback:
            os.fdatasync(self.fd)

    def transfer_failed(self, err: BaseException, write: bool) -> bytes:
        """Count a failed read_into / write_from; the sense data to answer with."""
        log.warning("LUN %d: I/O error: %s", self.number, err)
        self.stats["errors"] += 1
        return fixed_sense(WRITE_ERROR if write else UNRECOVERED_READ_ERROR)

    # -- execution ---------------------------------------------------------------------

    def execute(
        self,
        cdb: bytes,
        data_out: Sequence[memoryview],
        data_out_len: int,
        data_in_len: int,
        luns: Sequence[int],
    ) -> Result:
        """Run one CDB; ``luns``: every LUN of the target (for REPORT LUNS)."""
        opcode = cdb[0]
        if opcode not in (INQUIRY, REPORT_LUNS, REQUEST_SENSE) and self.unit_attention:
            return Result.check(self.unit_attention.popleft())
        try:
            result = self._dispatch(cdb, data_out, data_out_len, data_in_len, luns)
        except _Error as err:
            self.stats["errors"] += 1
            return Result.check(err.sense)
        except _Overrun:
            return Result(overrun=True)
        except OSError as err:
            log.warning("LUN %d: I/O error: %s", self.number, err)
            self.stats["errors"] += 1
            write = opcode in (WRITE_6, WRITE_10, WRITE_12, WRITE_16, WRITE_SAME_10, WRITE_SAME_16)
            return Result.check(WRITE_ERROR if write else UNRECOVERED_READ_ERROR)
        if len(result.data) > data_in_len:
            result.data = result.data[:data_in_len]
        return result

    def _dispatch(
        self,
        cdb: bytes,
        data_out: Sequence[memoryview],
        out_len: int,
        in_len: int,
        luns: Sequence[int],
    ) -> Result:
        op = cdb[0]
        if op == TEST_UNIT_READY:
            return Result()
        if op == INQUIRY:
            return Result(data=inquiry(cdb, self))
        if op == REPORT_LUNS:
            return Result(data=report_luns(cdb, luns))
        if op == REQUEST_SENSE:
            return self._request_sense(cdb)
        if op in (READ_6, READ_10, READ_12, READ_16):
            return self._read(cdb, in_len)
        if op in (WRITE_6, WRITE_10, WRITE_12, WRITE_16):
            return self._write(cdb, data_out, out_len)
        if op == READ_CAPACITY_10:
            last = min(self.blocks - 1, 0xFFFFFFFF) if self.blocks else 0
            return Result(data=struct.pack(">II", last, BLOCK_SIZE))
        if op == SERVICE_ACTION_IN_16 and cdb[1] & 0x1F == SAI_READ_CAPACITY_16:
            return Result(data=self._read_capacity_16(cdb))
        if op in (SYNCHRONIZE_CACHE_10, SYNCHRONIZE_CACHE_16):
            lba, count = _lba_count(cdb)
            self._check_range(lba, count)
            self.flush()
            return Result()
        if op in (MODE_SENSE_6, MODE_SENSE_10):
            return Result(data=self._mode_sense(cdb))
        if op == UNMAP:
            return self._unmap(cdb, data_out, out_len)
        if op in (WRITE_SAME_10, WRITE_SAME_16):
            return self._write_same(cdb, data_out, out_len)
        if op in (START_STOP_UNIT, PREVENT_ALLOW):
            return Result()  # a fixed disk: nothing to spin or lock
        if op == VERIFY_10:
            lba, count = _lba_count(cdb)
            self._check_range(lba, count)
            return Result()
        raise _Error(INVALID_OPCODE)

    def _request_sense(self, cdb: bytes) -> Result:
        if cdb[1] & 0x01:
            raise _Error(INVALID_FIELD_IN_CDB)  # descriptor format is not supported
        sense = self.unit_attention.popleft() if self.unit_attention else NO_SENSE_DATA
        return Result(data=fixed_sense(sense)[: cdb[4]])

    def _check_range(self, lba: int, count: int) -> None:
        if lba + count > self.blocks or (count == 0 and lba > self.blocks):
            raise _Error(LBA_OUT_OF_RANGE)

    def _read(self, cdb: bytes, in_len: int) -> Result:
        lba, count = _lba_count(cdb)
        self._check_range(lba, count)
        nbytes = count * BLOCK_SIZE
        if nbytes > in_len:
            raise _Overrun
        data = os.pread(self.fd, nbytes, lba * BLOCK_SIZE) if nbytes else b""
        if len(data) < nbytes:
            data += bytes(nbytes - len(data))
        self.stats["read"] += 1
        return Result(data=data)

    def _write(self, cdb: bytes, data_out: Sequence[memoryview], out_len: int) -> Result:
        lba, count = _lba_count(cdb)
        if self.read_only:
            raise _Error(WRITE_PROTECTED)
        self._check_range(lba, count)
        nbytes = count * BLOCK_SIZE
        if nbytes > out_len:
            raise _Overrun
        pwritev_full(self.fd, view_slices(data_out, 0, nbytes), lba * BLOCK_SIZE)
        if cdb[0] != WRITE_6 and cdb[1] & 0x08 and self.writeback:
            os.fdatasync(self.fd)  # FUA: the data must be on the medium
        self.stats["write"] += 1
        return Result(data_out_used=nbytes)

    def _read_capacity_16(self, cdb: bytes) -> bytes:
        last = self.blocks - 1 if self.blocks else 0
        thin = 0 if self.read_only or not CAN_PUNCH_HOLES else 0xC0  # LBPME | LBPRZ
        data = struct.pack(">QIBBH16s", last, BLOCK_SIZE, 0, 3, thin << 8, b"")
        return data[: struct.unpack_from(">I", cdb, 10)[0]]

    # -- MODE SENSE --------------------------------------------------------------------

    def _mode_pages(self, page: int, changeable: bool) -> bytes:
        caching = bytearray(20)
        caching[0:2] = b"\x08\x12"
        if not changeable and self.writeback:
            caching[2] = 0x04  # WCE
        control = bytearray(12)
        control[0:2] = b"\x0a\x0a"
        pages = {0x08: bytes(caching), 0x0A: bytes(control)}
        if page == 0x3F:
            return b"".join(pages[p] for p in sorted(pages))
        if page not in pages:
            raise _Error(INVALID_FIELD_IN_CDB)
        return pages[page]

    def _mode_sense(self, cdb: bytes) -> bytes:
        six = cdb[0] == MODE_SENSE_6
        dbd = bool(cdb[1] & 0x08)
        pc, page, subpage = cdb[2] >> 6, cdb[2] & 0x3F, cdb[3]
        if pc == 3:
            raise _Error(SAVING_NOT_SUPPORTED)
        if subpage not in (0, 0xFF) or (subpage == 0xFF and page != 0x3F):
            raise _Error(INVALID_FIELD_IN_CDB)
        body = self._mode_pages(page, changeable=pc == 1)
        specific = (0x80 if self.read_only else 0) | 0x10  # WP, DPOFUA
        blockdesc = b""
        if not dbd:
            blocks = min(self.blocks, 0xFFFFFFFF)
            blockdesc = struct.pack(">IB", blocks, 0) + BLOCK_SIZE.to_bytes(3, "big")
        if six:
            head = struct.pack(">BBBB", 3 + len(blockdesc) + len(body), 0, specific, len(blockdesc))
            alloc = cdb[4]
        else:
            length = 6 + len(blockdesc) + len(body)
            head = struct.pack(">HBBBBH", length, 0, specific, 0, 0, len(blockdesc))
            alloc = struct.unpack_from(">H", cdb, 7)[0]
        return (head + blockdesc + body)[:alloc]

    # -- provisioning ------------------------------------------------------------------

    def _unmap(self, cdb: bytes, data_out: Sequence[memoryview], out_len: int) -> Result:
        if self.read_only:
            raise _Error(WRITE_PROTECTED)
        plen = struct.unpack_from(">H", cdb, 7)[0]
        if plen == 0:
            return Result()
        if plen > out_len:
            raise _Overrun
        params = b"".join(bytes(v) for v in data_out)[:plen]
        if plen < 8:
            raise _Error(PARAMETER_LIST_LENGTH_ERROR)
        desc_len = struct.unpack_from(">H", params, 2)[0]
        if desc_len % 16 or 8 + desc_len > plen:
            raise _Error(PARAMETER_LIST_LENGTH_ERROR)
        if desc_len // 16 > MAX_UNMAP_DESCRIPTORS:
            raise _Error(INVALID_FIELD_IN_PARAMETER_LIST)
        ranges = [struct.unpack_from(">QI", params, 8 + 16 * i) for i in range(desc_len // 16)]
        for lba, count in ranges:
            if count > MAX_UNMAP_BLOCKS:
                raise _Error(INVALID_FIELD_IN_PARAMETER_LIST)
            self._check_range(lba, count)
        for lba, count in ranges:
            self._zero(lba, count)
        return Result(data_out_used=plen)

    def _write_same(self, cdb: bytes, data_out: Sequence[memoryview], out_len: int) -> Result:
        lba, count = _lba_count(cdb)
        if self.read_only:
            raise _Error(WRITE_PROTECTED)
        ndob = cdb[0] == WRITE_SAME_16 and bool(cdb[1] & 0x01)
        if count == 0 or count > MAX_WRITE_SAME:
            raise _Error(INVALID_FIELD_IN_CDB)  # WSNZ: zero blocks is not allowed
        self._check_range(lba, count)
        if ndob:
            block, used = bytes(BLOCK_SIZE), 0
        else:
            if out_len < BLOCK_SIZE:
                raise _Overrun
            block = b"".join(bytes(v) for v in data_out)[:BLOCK_SIZE]
            used = BLOCK_SIZE
        if block == bytes(BLOCK_SIZE):
            self._zero(lba, count)
        else:
            chunk = block * 256
            pos, end = lba * BLOCK_SIZE, (lba + count) * BLOCK_SIZE
            while pos < end:
                pos += os.pwrite(self.fd, chunk[: end - pos], pos)
        return Result(data_out_used=used)

    def _zero(self, lba: int, count: int) -> None:
        """Unmapped blocks read back as zeroes (LBPRZ): punch a hole, or write zeroes."""
        offset, length = lba * BLOCK_SIZE, count * BLOCK_SIZE
        if not length:
            return
        if not punch_hole(self.fd, offset, length):
            write_zeroes(self.fd, offset, length)


def _lba_count(cdb: bytes) -> tuple[int, int]:
    """The LBA and transfer length of a READ/WRITE/SYNC/WRITE SAME/VERIFY CDB."""
    n = len(cdb)
    op = cdb[0]
    group = op >> 5
    if group == 0:
        if n < 6:
            raise _Error(INVALID_FIELD_IN_CDB)
        lba = (cdb[1] & 0x1F) << 16 | cdb[2] << 8 | cdb[3]
        count = cdb[4] or 256  # READ(6)/WRITE(6): 0 means 256 blocks
        return lba, count
    if group in (1, 2):
        if n < 10:
            raise _Error(INVALID_FIELD_IN_CDB)
        return struct.unpack_from(">I", cdb, 2)[0], struct.unpack_from(">H", cdb, 7)[0]
    if group == 5:
        if n < 12:
            raise _Error(INVALID_FIELD_IN_CDB)
        lba, count = struct.unpack_from(">II", cdb, 2)
        return int(lba), int(count)
    if n < 16:
        raise _Error(INVALID_FIELD_IN_CDB)
    lba, count = struct.unpack_from(">QI", cdb, 2)
    return int(lba), int(count)


# -- SPC data that does not need an image ------------------------------------------------


def _alloc16(cdb: bytes, at: int) -> int:
    return int(struct.unpack_from(">H", cdb, at)[0])


def inquiry(cdb: bytes, unit: LogicalUnit | None) -> bytes:
    """Standard INQUIRY data or a VPD page; ``unit`` None: no logical unit at this LUN."""
    alloc = _alloc16(cdb, 3)
    evpd = cdb[1] & 0x01
    page = cdb[2]
    if cdb[1] & 0x02 or (not evpd and page):
        raise _Error(INVALID_FIELD_IN_CDB)  # CMDDT is obsolete
    # Peripheral qualifier 3 / type 1Fh: no logical unit here (SPC).
    peripheral = 0x00 if unit is not None else 0x7F
    if not evpd:
        data = bytearray(36)
        data[0] = peripheral
        data[2] = 0x06  # SPC-4
        data[3] = 0x12  # HISUP, response data format 2
        data[4] = len(data) - 5
        data[7] = 0x02  # CMDQUE
        data[8:16] = b"PYVIRTIO"
        data[16:32] = b"VIRTIO-SCSI DISK"
        data[32:36] = b"1.0 "
        return bytes(data[:alloc])
    if unit is None:
        raise _Error(LUN_NOT_SUPPORTED)
    return vpd_page(page, unit)[:alloc]


def vpd_page(page: int, unit: LogicalUnit) -> bytes:
    if page == 0x00:
        body = bytes(VPD_PAGES)
    elif page == 0x80:
        body = unit.serial
    elif page == 0x83:
        # A T10 vendor ID designator (ASCII, associated with the logical unit).
        ident = b"PYVIRTIO" + unit.serial
        body = bytes((0x02, 0x01, 0x00, len(ident))) + ident
    elif page == 0xB0:
        provisioning = not unit.read_only
        body = struct.pack(
            ">BBHIIIIIIIQ",
            0x01,  # WSNZ
            0,
            0,
            MAX_TRANSFER,
            0,
            0,
            MAX_UNMAP_BLOCKS if provisioning else 0,
            MAX_UNMAP_DESCRIPTORS if provisioning else 0,
            1,
            0,
            MAX_WRITE_SAME if provisioning else 0,
        ).ljust(0x3C, b"\0")
    elif page == 0xB1:
        body = struct.pack(">H", 1).ljust(0x3C, b"\0")  # non-rotating medium
    elif page == 0xB2:
        flags = 0 if unit.read_only else 0xE0  # LBPU, LBPWS, LBPWS10
        if flags and CAN_PUNCH_HOLES:
            flags |= 0x04  # LBPRZ: unmapped blocks read zeroes
        body = bytes((0, flags, 0x02 if flags else 0, 0))
    else:
        raise _Error(INVALID_FIELD_IN_CDB)
    return bytes((0x00, page)) + struct.pack(">H", len(body)) + body


def report_luns(cdb: bytes, luns: Sequence[int]) -> bytes:
    select = cdb[2]
    alloc = struct.unpack_from(">I", cdb, 6)[0]
    if select not in (0x00, 0x01, 0x02) or alloc < 16:
        raise _Error(INVALID_FIELD_IN_CDB)
    shown = [] if select == 0x01 else sorted(luns)  # 01h: well-known LUNs only (none listed)
    body = b"".join(report_luns_entry(n) for n in shown)
    return (struct.pack(">II", len(body), 0) + body)[:alloc]


def execute_without_unit(cdb: bytes, data_in_len: int, luns: Sequence[int]) -> Result:
    """A command for a LUN with no logical unit (or the REPORT LUNS well-known LU)."""
    try:
        if cdb[0] == INQUIRY:
            data = inquiry(cdb, None)
        elif cdb[0] == REPORT_LUNS:
            data = report_luns(cdb, luns)
        elif cdb[0] == REQUEST_SENSE:
            data = fixed_sense(LUN_NOT_SUPPORTED)[: cdb[4]]
        else:
            return Result.check(LUN_NOT_SUPPORTED)
    except _Error as err:
        return Result.check(err.sense)
    return Result(data=data[:data_in_len])
