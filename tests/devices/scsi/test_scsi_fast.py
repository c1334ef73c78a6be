"""virtio-scsi's fast path (READ/WRITE (10)/(16) straight into guest buffers) and its workers.

Every case checks the answer a driver sees (response, status, sense,
residual, data) and, where it matters, which path served it
(``device.stats["fast"]`` / ``["deferred"]``), so a change that quietly sends
everything down the general path shows up here.
"""

from __future__ import annotations

import os
import random
import struct
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from virtio.core.device import RingOptions
from virtio.core.driver import Request
from virtio.devices.scsi import ScsiDevice, ScsiDriver, ScsiResult
from virtio.devices.scsi import wire as W
from virtio.spec.status import DeviceStatus as S
from virtio.transport.loopback import Loopback

N_REQ_DEV = W.N_REQ_DEV

KIB = 1 << 10
MIB = 1 << 20
RESP = W.RESP_CMD.size
MEDIUM_ERROR, ILLEGAL_REQUEST, UNIT_ATTENTION = 0x3, 0x5, 0x6


def read10(lba: int, blocks: int, flags: int = 0) -> bytes:
    return struct.pack(">BBIBHB", 0x28, flags, lba, 0, blocks, 0)


def write10(lba: int, blocks: int, flags: int = 0) -> bytes:
    return struct.pack(">BBIBHB", 0x2A, flags, lba, 0, blocks, 0)


def read12(lba: int, blocks: int) -> bytes:
    return struct.pack(">BBIIBB", 0xA8, 0, lba, blocks, 0, 0)


def read16(lba: int, blocks: int) -> bytes:
    return struct.pack(">BBQIBB", 0x88, 0, lba, blocks, 0, 0)


def write16(lba: int, blocks: int, flags: int = 0) -> bytes:
    return struct.pack(">BBQIBB", 0x8A, flags, lba, blocks, 0, 0)


def pattern(n: int, seed: int = 0) -> bytes:
    """Bytes no two blocks of which are alike (a misplaced block shows)."""
    return random.Random(seed).randbytes(n)


class Host:
    """A device on a patterned image, its loopback and a driver."""

    def __init__(self, tmp_path: Path, size: int = 4 * MIB, **kw: object) -> None:
        self.path = tmp_path / "lun0.img"
        self.image = pattern(size, 3)
        self.path.write_bytes(self.image)
        self.device = ScsiDevice([self.path], **kw)  # type: ignore[arg-type]
        self.lb = Loopback(self.device)
        self.driver = ScsiDriver(self.lb)
        self.driver.initialize()

    def header(self, cdb: bytes, *, task_attr: int = W.S_SIMPLE, pi: bytes = bytes(8)) -> bytes:
        fixed = W.REQ_CMD_HEADER.pack(lun=W.encode_lun(0), id=7, task_attr=task_attr, prio=0, crn=0)
        return fixed + pi + cdb.ljust(self.driver.cdb_size, b"\0")

    def submit(self, out: list[bytes], in_sizes: list[int]) -> Request:
        return self.driver.submit(W.REQUESTQ, out, in_sizes)

    def finish(self, request: Request, data_out: int = 0, data_in: int = 0) -> ScsiResult:
        """Wait for a request and decode its response."""
        d = self.driver
        d.wait(request)
        raw = d.read_in_full(request)
        d.release(request)
        return d.parse_response(raw, request.written, data_out, data_in)

    def call(self, out: list[bytes], in_sizes: list[int], data_out: int = 0) -> ScsiResult:
        request = self.submit(out, in_sizes)
        self.driver.kick(W.REQUESTQ)
        return self.finish(request, data_out, sum(in_sizes[1:]))

    def close(self) -> None:
        self.lb.close()
        self.device.close()


@pytest.fixture
def host(tmp_path: Path) -> Iterator[Host]:
    h = Host(tmp_path)
    yield h
    h.close()


# -- the fast path itself -----------------------------------------------------------------


@pytest.mark.normative(N_REQ_DEV)
@pytest.mark.parametrize("ring", ["split", "packed"])
def test_read_write_10_16_take_the_fast_path(tmp_path: Path, ring: str) -> None:
    h = Host(tmp_path, ring=RingOptions(packed=ring == "packed"))
    try:
        d, dev = h.driver, h.device
        assert d.checked(0, read10(8, 8), data_in_len=4 * KIB) == h.image[8 * 512 : 16 * 512]
        assert d.checked(0, read16(100, 1), data_in_len=512) == h.image[100 * 512 : 101 * 512]
        d.checked(0, write10(30, 2), data_out=b"\xa1" * 1024)
        d.checked(0, write16(40, 1, flags=0x08), data_out=b"\xb2" * 512)  # FUA
        assert d.checked(0, read12(30, 2), data_in_len=1024) == b"\xa1" * 1024
        assert d.read(0, 40, 1) == b"\xb2" * 512
        assert dev.stats["fast"] == 5 and dev.stats["deferred"] == 0
        assert dev.luns[0].stats["read"] == 4 and dev.luns[0].stats["write"] == 2
    finally:
        h.close()
    on_disk = h.path.read_bytes()
    assert on_disk[30 * 512 : 32 * 512] == b"\xa1" * 1024
    assert on_disk[40 * 512 : 41 * 512] == b"\xb2" * 512


@pytest.mark.normative(N_REQ_DEV)
def test_flat_space_luns_take_the_fast_path(host: Host, tmp_path: Path) -> None:
    """Linux addresses every LUN in the flat space (40h in byte 2), LUN 0 included."""
    d, dev = host.driver, host.device
    full = [RESP + d.sense_size, 512]

    def request(lun: bytes, cdb: bytes) -> bytes:
        fixed = W.REQ_CMD_HEADER.pack(lun=lun, id=0, task_attr=0, prio=0, crn=0)
        return fixed + bytes(8) + cdb.ljust(32, b"\0")

    r = host.call([request(bytes((1, 0, 0x40, 0, 0, 0, 0, 0)), read10(3, 1))], full)
    assert r.good and r.data == host.image[3 * 512 : 4 * 512]
    extra = tmp_path / "extra.img"
    extra.write_bytes(pattern(MIB, 8))
    dev.add_lun(extra, 300)
    d.command(0, bytes(6))  # LUN 0's REPORTED LUNS DATA HAS CHANGED, once
    r = host.call([request(W.encode_lun(300), read10(2, 1))], full)
    assert r.good and r.data == pattern(MIB, 8)[2 * 512 : 3 * 512]
    assert dev.stats["fast"] == 2
    # Method 10b (logical unit addressing) is no LUN of this target: general path.
    r = host.call([request(bytes((1, 0, 0x80, 0, 0, 0, 0, 0)), read10(3, 1))], full)
    assert r.status == 2 and (r.sense_key(), r.asc()) == (ILLEGAL_REQUEST, 0x25)
    assert dev.stats["fast"] == 2


@pytest.mark.normative(N_REQ_DEV)
def test_fast_answers_match_the_general_path(host: Host) -> None:
    """READ(10) (fast) and READ(12) (general) give byte-identical responses."""
    d = host.driver
    sizes = [RESP + d.sense_size, 3 * KIB]  # an underrun: 2 KiB read into 3 KiB
    answers = []
    for cdb in (read10(5, 4), read12(5, 4)):
        request = host.submit([host.header(cdb)], sizes)
        d.kick(W.REQUESTQ)
        d.wait(request)
        answers.append((request.written, d.read_in_full(request)))
        d.release(request)
    (written, raw), (written_general, raw_general) = answers
    assert written == written_general and raw[:written] == raw_general[:written]
    assert written == RESP + d.sense_size + 2 * KIB
    r = d.parse_response(raw, written, 0, 3 * KIB)
    assert r.good and r.residual == KIB and r.data[: 2 * KIB] == host.image[5 * 512 : 9 * 512]
    assert host.device.stats["fast"] == 1


@pytest.mark.normative(N_REQ_DEV)
def test_buffers_split_over_many_descriptors(host: Host) -> None:
    d, dev = host.driver, host.device
    data_in = [1, 511, 1000, 7, 2577]  # 4 KiB in odd pieces
    resp = [5, 7, d.sense_size]  # the response split too
    request = host.submit([host.header(read10(64, 8))], resp + data_in)
    d.kick(W.REQUESTQ)
    d.wait(request)
    raw = d.read_in_full(request)
    d.release(request)
    r = d.parse_response(raw, request.written, 0, 4 * KIB)
    assert r.good and r.residual == 0
    assert r.data == host.image[64 * 512 : 72 * 512]
    # A write whose data sits in many small descriptors after the header.
    payload = pattern(4 * KIB, 99)
    pieces = [payload[i : i + 100] for i in range(0, len(payload), 100)]
    r = host.call([host.header(write16(200, 8)), *pieces], [RESP + d.sense_size], 4 * KIB)
    assert r.good and r.residual == 0
    assert d.read(0, 200, 8) == payload
    assert dev.stats["fast"] == 3
    # A header split over descriptors goes the general way, with the same answer.
    head = host.header(read10(64, 8))
    r = host.call([head[:9], head[9:]], [RESP + d.sense_size, 4 * KIB])
    assert r.good and r.data == host.image[64 * 512 : 72 * 512]
    assert dev.stats["fast"] == 3


@pytest.mark.normative(N_REQ_DEV)
def test_short_response_buffer_and_short_data(host: Host) -> None:
    d = host.driver
    # A write with room for the response but not for sense data: GOOD, nothing more.
    r = host.call([host.header(write10(9, 1)), b"\x5c" * 512], [RESP], 512)
    assert r.good and r.sense == b""
    assert host.device.stats["fast"] == 1
    # Data-in smaller than the transfer: OVERRUN, nothing read.
    r = host.call([host.header(read10(0, 8))], [RESP + d.sense_size, 4 * KIB - 1])
    assert r.response == W.S_OVERRUN
    # Data-out smaller than the transfer: OVERRUN, nothing written.
    r = host.call([host.header(write10(10, 2)), b"\xee" * 1000], [RESP + d.sense_size], 1000)
    assert r.response == W.S_OVERRUN
    assert d.read(0, 9, 3) == b"\x5c" * 512 + host.image[10 * 512 : 12 * 512]
    # Zero blocks: GOOD, the whole buffer is residual.
    r = host.call([host.header(read10(0, 0))], [RESP + d.sense_size, 512])
    assert r.good and r.residual == 512


@pytest.mark.normative(N_REQ_DEV)
def test_reads_past_the_end(host: Host) -> None:
    d = host.driver
    blocks = 4 * MIB // 512
    for cdb, length in (
        (read10(blocks, 1), 512),
        (read10(blocks - 1, 2), 1024),
        (read16((1 << 64) - 1, 1), 512),
        (write16(blocks - 1, 2), 0),
    ):
        out = [host.header(cdb)] + ([bytes(1024)] if cdb[0] == 0x8A else [])
        in_sizes = [RESP + d.sense_size] + ([length] if length else [])
        r = host.call(out, in_sizes, 1024 if cdb[0] == 0x8A else 0)
        assert r.status == 2 and (r.sense_key(), r.asc()) == (ILLEGAL_REQUEST, 0x21), cdb.hex()
        assert r.residual == (length or 1024)
    assert d.read(0, blocks - 1, 1) == host.image[-512:]
    assert host.device.stats["fast"] == 1


@pytest.mark.normative(N_REQ_DEV)
def test_image_shrunk_under_the_lun_reads_zeroes(host: Host) -> None:
    os.truncate(host.path, 2 * MIB)  # the LUN still reports 4 MiB
    d = host.driver
    r = d.command(0, read10(2 * MIB // 512 - 1, 4), data_in_len=2 * KIB)
    assert r.good and r.data == host.image[2 * MIB - 512 : 2 * MIB] + bytes(1536)
    assert host.device.stats["fast"] == 1


@pytest.mark.normative(N_REQ_DEV)
def test_hostile_fields_take_the_general_path(host: Host) -> None:
    d, dev = host.driver, host.device
    full = [RESP + d.sense_size, 512]
    # PI bytes announced: served by the general path (and still read correctly).
    pi = W.REQ_CMD_PI.pack(pi_bytesout=0, pi_bytesin=8)
    r = host.call([host.header(read10(1, 1), pi=pi)], [RESP + d.sense_size, 8, 512])
    assert r.good and r.data[8:] == host.image[512:1024]
    # An ORDERED task waits for what is in flight, on the general path.
    r = host.call([host.header(read10(1, 1), task_attr=W.S_ORDERED)], full)
    assert r.good and r.data == host.image[512:1024]
    # A READ carrying data-out (bidirectional): the data-out is residual (the
    # driver counts it off the data-in it shows).
    r = host.call([host.header(read10(1, 1)), bytes(100)], full, 100)
    assert r.good and r.residual == 100 and r.data == host.image[512 : 1024 - 100]
    # No logical unit at the LUN, and an address that is no LUN of target 0.
    lun5 = W.REQ_CMD_HEADER.pack(lun=W.encode_lun(5), id=0, task_attr=0, prio=0, crn=0)
    r = host.call([lun5 + bytes(8) + read10(0, 1).ljust(32, b"\0")], full)
    assert r.status == 2 and (r.sense_key(), r.asc()) == (ILLEGAL_REQUEST, 0x25)
    bad = W.REQ_CMD_HEADER.pack(
        lun=bytes((1, 2, 0, 0, 0, 0, 0, 0)), id=0, task_attr=0, prio=0, crn=0
    )
    r = host.call([bad + bytes(8) + read10(0, 1).ljust(32, b"\0")], full)
    assert r.response == W.S_BAD_TARGET
    # A READ (10) that does not fit in cdb_size: CHECK CONDITION, not a misread.
    d.set_sizes(cdb_size=8)
    r = host.call([host.header(read10(1, 1)[:8])], full)
    assert r.status == 2 and (r.sense_key(), r.asc()) == (ILLEGAL_REQUEST, 0x24)
    d.set_sizes(cdb_size=32)
    assert dev.stats["fast"] == 0
    assert not dev.status & S.DEVICE_NEEDS_RESET


@pytest.mark.normative(N_REQ_DEV)
def test_unit_attention_and_write_protect_are_kept(tmp_path: Path) -> None:
    h = Host(tmp_path, read_only=True)
    try:
        d, dev = h.driver, h.device
        assert d.tmf(W.T_TMF_LOGICAL_UNIT_RESET, 0) == W.S_FUNCTION_COMPLETE
        r = d.command(0, read10(0, 1), data_in_len=512)
        assert (r.sense_key(), r.asc()) == (UNIT_ATTENTION, 0x29) and r.residual == 512
        r = d.command(0, write10(0, 1), data_out=bytes(512))
        assert r.status == 2 and (r.sense_key(), r.asc()) == (0x7, 0x27)
        assert d.read(0, 0, 1) == h.image[:512]
        assert dev.stats["fast"] == 1  # only the last read
    finally:
        h.close()
    assert h.path.read_bytes()[:512] == h.image[:512]


@pytest.mark.normative(N_REQ_DEV)
@pytest.mark.parametrize("size", [4 * KIB, 256 * KIB], ids=["inline", "worker"])
def test_io_errors_are_medium_errors(host: Host, tmp_path: Path, size: int) -> None:
    d, unit = host.driver, host.device.luns[0]
    good_fd = unit.fd
    broken = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)  # preadv/pwritev: EISDIR/EBADF
    unit.fd = broken
    try:
        r = d.command(0, read10(0, size // 512), data_in_len=size)
        assert r.status == 2 and (r.sense_key(), r.asc()) == (MEDIUM_ERROR, 0x11)
        assert r.residual == size
        r = d.command(0, write10(0, size // 512), data_out=bytes(size))
        assert r.status == 2 and (r.sense_key(), r.asc()) == (MEDIUM_ERROR, 0x0C)
        assert r.residual == size
    finally:
        unit.fd = good_fd
        os.close(broken)
    assert unit.stats["errors"] == 2
    assert host.device.stats["deferred"] == (2 if size > 64 * KIB else 0)
    assert d.read(0, 0, 1) == host.image[:512]


# -- worker threads -----------------------------------------------------------------------


def _submit_read(h: Host, lba: int, nbytes: int) -> Request:
    return h.submit([h.header(read10(lba, nbytes // 512))], [RESP + h.driver.sense_size, nbytes])


@pytest.mark.normative(N_REQ_DEV)
def test_workers_complete_every_request_with_its_own_data(host: Host) -> None:
    d, dev = host.driver, host.device
    plan = [(0, 256 * KIB), (1000, 4 * KIB), (2000, 1 * MIB), (3000, 128 * KIB), (5, 512)]
    plan += [(4000 + 300 * i, 128 * KIB) for i in range(4)]
    payload = pattern(512 * KIB, 42)
    write = host.submit([host.header(write10(6000, 1024)), payload], [RESP + d.sense_size])
    requests = [_submit_read(host, lba, n) for lba, n in plan]
    d.kick(W.REQUESTQ)
    assert dev.stats["deferred"] >= 2  # the first large ones went to the two workers
    for (lba, n), request in zip(plan, requests, strict=True):
        r = host.finish(request, 0, n)
        assert r.good and r.residual == 0 and r.data == host.image[lba * 512 : lba * 512 + n]
    assert host.finish(write, len(payload)).good
    assert d.read(0, 6000, 1024) == payload
    assert dev.stats["fast"] == len(plan) + 2
    assert dev.io is not None and dev.io.outstanding == 0


@pytest.mark.normative(N_REQ_DEV)
def test_general_commands_wait_for_transfers_in_flight(host: Host) -> None:
    """A command on the general path sees every earlier transfer done (here: its data)."""
    d, dev = host.driver, host.device
    payload = pattern(256 * KIB, 5)
    write = host.submit([host.header(write10(100, 512)), payload], [RESP + d.sense_size])
    check = host.submit([host.header(read12(100, 512))], [RESP + d.sense_size, 256 * KIB])
    d.kick(W.REQUESTQ)
    assert dev.stats["deferred"] == 1
    assert host.finish(write, len(payload)).good
    r = host.finish(check, 0, 256 * KIB)
    assert r.good and r.data == payload


@pytest.mark.normative(N_REQ_DEV)
def test_tmf_while_requests_are_in_flight(host: Host) -> None:
    d, dev = host.driver, host.device
    unit = dev.luns[0]
    gate = threading.Event()
    started = threading.Semaphore(0)
    real = unit.read_into

    def slow_read(views: list[memoryview], lba: int, nbytes: int) -> None:
        started.release()
        gate.wait(30)  # held in the "system call" until the test lets it go
        real(views, lba, nbytes)

    unit.read_into = slow_read  # type: ignore[method-assign]
    reads = [_submit_read(host, 0, 128 * KIB), _submit_read(host, 512, 128 * KIB)]
    d.kick(W.REQUESTQ)
    assert started.acquire(timeout=30) and started.acquire(timeout=30)
    assert dev.io is not None and dev.io.outstanding == 2
    assert d.harvest(W.REQUESTQ) == []  # nothing completed yet
    opener = threading.Thread(target=gate.set)
    opener.start()
    # The TMF is served inside this call: the reads complete before its response.
    assert d.tmf(W.T_TMF_ABORT_TASK, 0, tag=7) == W.S_FUNCTION_COMPLETE
    opener.join(10)
    done = d.harvest(W.REQUESTQ)
    assert {id(r) for r in done} == {id(r) for r in reads}
    unit.read_into = real  # type: ignore[method-assign]
    for request, lba in zip(reads, (0, 512), strict=True):
        raw = d.read_in_full(request)
        d.release(request)
        r = d.parse_response(raw, request.written, 0, 128 * KIB)
        assert r.good and r.data == host.image[lba * 512 : lba * 512 + 128 * KIB]
    # A LUN reset with transfers in flight: they finish GOOD, the next command sees it.
    reads = [_submit_read(host, 0, 128 * KIB)]
    d.kick(W.REQUESTQ)
    assert d.tmf(W.T_TMF_LOGICAL_UNIT_RESET, 0) == W.S_FUNCTION_COMPLETE
    assert host.finish(reads[0], 0, 128 * KIB).good
    r = d.command(0, read10(0, 1), data_in_len=512)
    assert (r.sense_key(), r.asc()) == (UNIT_ATTENTION, 0x29)


@pytest.mark.normative(N_REQ_DEV)
def test_reset_and_hot_remove_wait_for_transfers(host: Host, tmp_path: Path) -> None:
    d, dev = host.driver, host.device
    extra = tmp_path / "extra.img"
    extra.write_bytes(pattern(MIB, 11))
    assert dev.add_lun(extra) == 1
    d.command(1, bytes(6))  # the REPORTED LUNS DATA HAS CHANGED attention, once
    d.command(0, bytes(6))
    request = d.submit(
        W.REQUESTQ,
        [
            W.REQ_CMD_HEADER.pack(lun=W.encode_lun(1), id=0, task_attr=0, prio=0, crn=0)
            + bytes(8)
            + read10(0, 512).ljust(32, b"\0")
        ],
        [RESP + d.sense_size, 256 * KIB],
    )
    d.kick(W.REQUESTQ)
    assert dev.stats["deferred"] == 1
    dev.remove_lun(1)  # waits for the read, then closes the image
    assert dev.io is not None and dev.io.outstanding == 0
    r = host.finish(request, 0, 256 * KIB)
    assert r.good and r.data == pattern(MIB, 11)[: 256 * KIB]
    # A device reset with a transfer in flight: it completes first, then the rings go.
    _submit_read(host, 0, 256 * KIB)
    d.kick(W.REQUESTQ)
    d.initialize()
    assert dev.io.outstanding == 0
    assert d.read(0, 0, 1) == host.image[:512]


def test_without_workers_everything_is_inline(tmp_path: Path) -> None:
    h = Host(tmp_path, workers=0)
    try:
        assert h.device.io is None
        assert h.driver.read(0, 0, 2048) == h.image[: 1 * MIB]
        assert h.device.stats["fast"] == 1 and h.device.stats["deferred"] == 0
    finally:
        h.close()
    with pytest.raises(ValueError, match="workers"):
        ScsiDevice([h.path], workers=-1)


def test_hot_remove_refused_while_a_transfer_hangs(host: Host) -> None:
    d, dev = host.driver, host.device
    assert dev.io is not None
    unit = dev.luns[0]
    gate = threading.Event()
    real_read, real_drain = unit.read_into, dev.io.drain

    def stuck_read(views: list[memoryview], lba: int, nbytes: int) -> None:
        gate.wait(30)
        real_read(views, lba, nbytes)

    def impatient_drain(timeout: float = 60.0) -> None:
        raise TimeoutError("virtio-scsi-io: I/O did not finish")

    unit.read_into = stuck_read  # type: ignore[method-assign]
    dev.io.drain = impatient_drain  # type: ignore[method-assign]
    request = _submit_read(host, 0, 128 * KIB)
    d.kick(W.REQUESTQ)
    with pytest.raises(ValueError, match="do not finish"):
        dev.remove_lun(0)
    assert 0 in dev.luns and unit.fd >= 0  # the image stays open for the worker
    gate.set()
    dev.io.drain = real_drain  # type: ignore[method-assign]
    r = host.finish(request, 0, 128 * KIB)
    assert r.good and r.data == host.image[: 128 * KIB]
    unit.read_into = real_read  # type: ignore[method-assign]
