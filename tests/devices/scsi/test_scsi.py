"""virtio-scsi: the device model, its SCSI target and the driver over loopback."""

from __future__ import annotations

import argparse
import struct
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from virtio.core.device import RingOptions
from virtio.devices.registry import DeviceSettings, device_type
from virtio.devices.scsi import ScsiDevice, ScsiDriver, ScsiError, ScsiProtocolError
from virtio.devices.scsi import wire as W
from virtio.devices.scsi.options import ControlFifo
from virtio.queue import Chain, ChainWriter
from virtio.spec import features as F
from virtio.spec.status import DeviceStatus as S
from virtio.transport.loopback import Loopback
from virtio.vhost_user.frontend import VhostUserFrontend
from virtio.vhost_user.server import VhostUserServer

N_CONFIG_DEV = W.N_CONFIG_DEV
N_CONFIG_DRV = W.N_CONFIG_DRV
N_INIT_DEV = W.N_INIT_DEV
N_REQ_DEV = W.N_REQ_DEV
N_REQ_DRV = W.N_REQ_DRV
N_EVENT_DEV = W.N_EVENT_DEV
N_EVENT_DRV = W.N_EVENT_DRV

MIB = 1 << 20
RINGS = {"split": RingOptions(packed=False), "packed": RingOptions()}

# Sense keys / additional sense codes the tests look for.
ILLEGAL_REQUEST, UNIT_ATTENTION, DATA_PROTECT = 0x5, 0x6, 0x7


def read16(lba: int, blocks: int) -> bytes:
    return struct.pack(">BBQIBB", 0x88, 0, lba, blocks, 0, 0)


def write16(lba: int, blocks: int) -> bytes:
    return struct.pack(">BBQIBB", 0x8A, 0, lba, blocks, 0, 0)


def images(tmp_path: Path, *sizes: int) -> list[Path]:
    out = []
    for i, size in enumerate(sizes):
        path = tmp_path / f"lun{i}.img"
        with open(path, "wb") as f:
            f.truncate(size)
        out.append(path)
    return out


class Host:
    """A device, its loopback and an initialized driver."""

    def __init__(
        self,
        paths: list[Path],
        *,
        features: int | None = None,
        ring: RingOptions | None = None,
        **kw: object,
    ) -> None:
        self.device = ScsiDevice(paths, ring=ring, **kw)  # type: ignore[arg-type]
        self.lb = Loopback(self.device)
        self.driver = ScsiDriver(self.lb, features=features)
        self.driver.initialize()

    def close(self) -> None:
        self.lb.close()
        self.device.close()


@pytest.fixture
def host(tmp_path: Path) -> Iterator[Host]:
    h = Host(images(tmp_path, 4 * MIB, 2 * MIB))
    yield h
    h.close()


def header(lun: bytes, cdb: bytes, cdb_size: int = 32, pi: bytes | None = None) -> bytes:
    """A request header; ``pi``: the T10 PI fields (they come before the CDB)."""
    fixed = W.REQ_CMD_HEADER.pack(lun=lun, id=1, task_attr=0, prio=0, crn=0)
    return fixed + (pi or b"") + cdb.ljust(cdb_size, b"\0")


def response(raw: bytes) -> dict[str, int | bytes]:
    return W.RESP_CMD.unpack(raw[: W.RESP_CMD.size])


# -- commands ---------------------------------------------------------------------------


@pytest.mark.normative(N_REQ_DEV, N_REQ_DRV)
@pytest.mark.parametrize("ring", list(RINGS))
def test_write_read_back_and_image_on_disk(tmp_path: Path, ring: str) -> None:
    paths = images(tmp_path, 4 * MIB, 2 * MIB)
    h = Host(paths, ring=RINGS[ring])
    try:
        d = h.driver
        payload = bytes(range(256)) * 2 * 64  # 32 KiB
        d.write(1, 100, payload)
        assert d.read(1, 100, len(payload) // 512) == payload
        # READ(6)/WRITE(6) and READ(10)/WRITE(10) address the same blocks.
        d.checked(0, bytes((0x0A, 0, 0, 7, 1, 0)), data_out=b"\xab" * 512)
        assert d.checked(0, bytes((0x08, 0, 0, 7, 1, 0)), data_in_len=512) == b"\xab" * 512
        ten = struct.pack(">BBIBHB", 0x28, 0, 7, 0, 1, 0)
        assert d.checked(0, ten, data_in_len=512) == b"\xab" * 512
        d.synchronize_cache(1)
        d.checked(1, struct.pack(">BBQIBB", 0x91, 0, 0, 0, 0, 0))  # SYNCHRONIZE CACHE (16)
    finally:
        h.close()
    assert paths[1].read_bytes()[100 * 512 : 100 * 512 + len(payload)] == payload
    assert paths[0].read_bytes()[7 * 512 : 8 * 512] == b"\xab" * 512


@pytest.mark.normative(N_REQ_DEV)
def test_inquiry_vpd_pages_report_luns_capacity(host: Host) -> None:
    d = host.driver
    std = d.inquiry(0, length=36)
    assert std[0] == 0 and std[2] == 6 and std[8:16] == b"PYVIRTIO"
    supported = d.inquiry(0, 0x00)
    assert list(supported[4:]) == [0x00, 0x80, 0x83, 0xB0, 0xB1, 0xB2]
    assert d.inquiry(1, 0x80)[4:] == b"pyvirtio-0001"
    ident = d.inquiry(0, 0x83)
    assert ident[1] == 0x83 and ident[4] == 0x02 and ident[5] == 0x01
    limits = d.inquiry(0, 0xB0)
    assert len(limits) == 0x40 and struct.unpack_from(">I", limits, 20)[0] > 0  # max unmap
    assert struct.unpack_from(">H", d.inquiry(0, 0xB1), 4)[0] == 1  # non-rotating
    assert d.inquiry(0, 0xB2)[5] & 0x80  # LBPU: UNMAP works
    assert d.report_luns() == [0, 1]
    assert d.read_capacity(0) == (4 * MIB // 512, 512)
    rc10 = d.checked(1, bytes((0x25,)) + bytes(9), data_in_len=8)
    assert struct.unpack(">II", rc10) == (2 * MIB // 512 - 1, 512)
    assert d.checked(0, bytes(6)) == b""  # TEST UNIT READY
    # A LUN with no logical unit: peripheral qualifier 3, and commands fail.
    assert d.inquiry(5, length=36)[0] == 0x7F
    r = d.command(5, bytes(6))
    assert r.status == 2 and (r.sense_key(), r.asc()) == (ILLEGAL_REQUEST, 0x25)
    # The REPORT LUNS well-known logical unit answers REPORT LUNS.
    cdb = struct.pack(">BBBBBBIBB", 0xA0, 0, 0, 0, 0, 0, 64, 0, 0)
    r = d.command(0, cdb, data_in_len=64, raw_lun=W.REPORT_LUNS_WLUN)
    assert r.good and struct.unpack_from(">I", r.data)[0] == 16


@pytest.mark.normative(N_REQ_DEV)
def test_sense_data_for_errors(host: Host) -> None:
    d = host.driver
    cases = [
        (bytes((0xFF,)) + bytes(9), 0, (ILLEGAL_REQUEST, 0x20)),  # invalid opcode
        (read16(4 * MIB // 512, 1), 512, (ILLEGAL_REQUEST, 0x21)),  # LBA out of range
        (read16(4 * MIB // 512 - 1, 2), 1024, (ILLEGAL_REQUEST, 0x21)),  # runs past the end
        (struct.pack(">BBBHB", 0x12, 1, 0x99, 255, 0), 255, (ILLEGAL_REQUEST, 0x24)),  # VPD
        (bytes((0x1A, 0, 0x1C, 0, 255, 0)), 255, (ILLEGAL_REQUEST, 0x24)),  # mode page 1Ch
        (bytes((0x1A, 0, 0xC8, 0, 255, 0)), 255, (ILLEGAL_REQUEST, 0x39)),  # saved values
    ]
    for cdb, length, (key, asc) in cases:
        r = d.command(0, cdb, data_in_len=length)
        assert r.response == W.S_OK and r.status == 2, cdb.hex()
        assert r.sense[0] == 0x70 and len(r.sense) == 18  # fixed format
        assert (r.sense_key(), r.asc()) == (key, asc), cdb.hex()
        assert r.residual == length
    # Writes beyond the image change nothing.
    r = d.command(1, write16(2 * MIB // 512, 1), data_out=b"\xff" * 512)
    assert (r.sense_key(), r.asc()) == (ILLEGAL_REQUEST, 0x21)
    with pytest.raises(ScsiError, match="status 0x2"):
        d.read(0, 1 << 40, 1)
    # REQUEST SENSE with nothing pending: NO SENSE.
    assert d.checked(0, bytes((0x03, 0, 0, 0, 18, 0)), data_in_len=18)[2] == 0


@pytest.mark.normative(N_REQ_DEV)
def test_mode_sense_caching_and_all_pages(host: Host) -> None:
    d = host.driver
    six = d.checked(0, bytes((0x1A, 0, 0x08, 0, 255, 0)), data_in_len=255)
    assert six[0] == len(six) - 1 and six[3] == 8  # one block descriptor
    assert six[2] & 0x10 and not six[2] & 0x80  # DPOFUA, not write-protected
    page = six[4 + 8 :]
    assert page[0] == 0x08 and page[2] & 0x04  # WCE
    ten = d.checked(
        0, struct.pack(">BBBBBBBHB", 0x5A, 0x08, 0x3F, 0, 0, 0, 0, 255, 0), data_in_len=255
    )
    assert struct.unpack_from(">H", ten)[0] == len(ten) - 2
    assert struct.unpack_from(">H", ten, 6)[0] == 0  # DBD: no block descriptor
    assert ten[8] == 0x08 and ten[8 + 20] == 0x0A  # caching, then control


@pytest.mark.normative(N_REQ_DEV)
def test_unmap_and_write_same(host: Host) -> None:
    d = host.driver
    d.write(0, 10, b"\x55" * 4096)
    params = struct.pack(">HH4s", 6 + 16, 16, b"") + struct.pack(">QI4s", 10, 4, b"")
    d.checked(0, struct.pack(">BBIBHB", 0x42, 0, 0, 0, len(params), 0), data_out=params)
    assert d.read(0, 10, 8) == bytes(2048) + b"\x55" * 2048
    ws16 = struct.pack(">BBQIBB", 0x93, 0, 20, 3, 0, 0)
    d.checked(0, ws16, data_out=b"\x77" * 512)
    assert d.read(0, 19, 5) == bytes(512) + b"\x77" * 1536 + bytes(512)
    ws10 = struct.pack(">BBIBHB", 0x41, 0x08, 20, 0, 2, 0)  # UNMAP bit, zero block
    d.checked(0, ws10, data_out=bytes(512))
    assert d.read(0, 20, 3) == bytes(1024) + b"\x77" * 512
    r = d.command(0, struct.pack(">BBIBHB", 0x41, 0, 20, 0, 0, 0), data_out=bytes(512))
    assert (r.sense_key(), r.asc()) == (ILLEGAL_REQUEST, 0x24)  # WSNZ: zero blocks refused
    bad = struct.pack(">HH4s", 6 + 16, 16, b"") + struct.pack(">QI4s", 1 << 30, 1, b"")
    r = d.command(0, struct.pack(">BBIBHB", 0x42, 0, 0, 0, len(bad), 0), data_out=bad)
    assert (r.sense_key(), r.asc()) == (ILLEGAL_REQUEST, 0x21)


@pytest.mark.normative(N_REQ_DEV)
def test_read_only_is_write_protected(tmp_path: Path) -> None:
    paths = images(tmp_path, MIB)
    paths[0].write_bytes(b"\x11" * MIB)
    h = Host(paths, read_only=True)
    try:
        d = h.driver
        for cdb, out in (
            (write16(0, 1), b"\0" * 512),
            (struct.pack(">BBQIBB", 0x93, 0, 0, 1, 0, 0), bytes(512)),
            (struct.pack(">BBIBHB", 0x42, 0, 0, 0, 24, 0), bytes(24)),
        ):
            r = d.command(0, cdb, data_out=out)
            assert r.status == 2 and (r.sense_key(), r.asc()) == (DATA_PROTECT, 0x27)
        assert d.checked(0, bytes((0x1A, 0, 0x3F, 0, 255, 0)), data_in_len=255)[2] & 0x80
        assert d.read(0, 0, 1) == b"\x11" * 512
    finally:
        h.close()
    assert paths[0].read_bytes() == b"\x11" * MIB


@pytest.mark.normative(N_REQ_DEV)
def test_overrun_and_residual(host: Host) -> None:
    d = host.driver
    r = d.command(0, read16(0, 4), data_in_len=1024)  # wants 2048 bytes
    assert r.response == W.S_OVERRUN
    r = d.command(0, write16(0, 4), data_out=bytes(1024))
    assert r.response == W.S_OVERRUN
    r = d.command(0, read16(0, 2), data_in_len=4096)  # an underrun is fine
    assert r.good and r.residual == 3072 and len(r.data) == 1024
    r = d.command(0, struct.pack(">BBBHB", 0x12, 0, 0, 36, 0), data_in_len=100)
    assert r.good and len(r.data) == 36 and r.residual == 64


@pytest.mark.normative(N_REQ_DEV)
def test_inout_bidirectional(tmp_path: Path) -> None:
    paths = images(tmp_path, MIB)
    h = Host(paths, features=0)  # VIRTIO_SCSI_F_INOUT not negotiated
    try:
        assert not h.driver.has(F.VIRTIO_SCSI_F_INOUT)
        raw_lun = W.encode_lun(0)
        out = [header(raw_lun, write16(0, 1)), bytes(512)]
        _, raw = h.driver.call(W.REQUESTQ, out, [W.RESP_CMD.size + 96, 512])
        assert response(raw)["response"] == W.S_FAILURE
    finally:
        h.close()
    h = Host(paths)
    try:
        assert h.driver.has(F.VIRTIO_SCSI_F_INOUT)
        r = h.driver.command(0, write16(0, 1), data_out=b"\x42" * 512, data_in_len=512)
        assert r.good and r.residual == 512  # data-out processed, nothing read
        assert h.driver.read(0, 0, 1) == b"\x42" * 512
    finally:
        h.close()


@pytest.mark.normative(N_REQ_DEV, N_REQ_DRV)
def test_t10_pi_fields(tmp_path: Path) -> None:
    h = Host(images(tmp_path, MIB))
    try:
        d = h.driver
        assert d.has(F.VIRTIO_SCSI_F_T10_PI)
        # The PI bytes sit between the header and the data, both ways.
        d.command(0, write16(3, 1), data_out=b"\x33" * 512, pi_out=b"\xee" * 8)
        r = d.command(0, read16(3, 1), data_in_len=512, pi_in_len=8)
        assert r.good and r.data == b"\x33" * 512
        # On the wire the PI fields sit between crn and the CDB (as Linux sends them).
        pi = W.REQ_CMD_PI.pack(pi_bytesout=0, pi_bytesin=0)
        raw_req = [header(W.encode_lun(0), read16(3, 1), pi=pi)]
        _, raw = d.call(W.REQUESTQ, raw_req, [W.RESP_CMD.size + 96, 512])
        assert response(raw)["status"] == 0 and raw[-512:] == b"\x33" * 512
        # pi_bytesout beyond the readable bytes: a failure response.
        pi = W.REQ_CMD_PI.pack(pi_bytesout=4096, pi_bytesin=0)
        out = [header(W.encode_lun(0), write16(0, 1), pi=pi), bytes(512)]
        _, raw = d.call(W.REQUESTQ, out, [W.RESP_CMD.size + 96])
        assert response(raw)["response"] == W.S_FAILURE
    finally:
        h.close()
    other = tmp_path / "other"
    other.mkdir()
    h = Host(images(other, MIB), features=0)
    try:
        with pytest.raises(ValueError, match="T10_PI"):
            h.driver.command(0, bytes(6), pi_out=b"x")
    finally:
        h.close()


# -- configuration ----------------------------------------------------------------------


@pytest.mark.normative(N_CONFIG_DEV, N_CONFIG_DRV)
def test_sizes_are_writable_and_restored_on_reset(host: Host) -> None:
    d = host.driver
    assert (d.sense_size, d.cdb_size) == (96, 32)
    assert d.event_info_size == 16 and d.max_target == 0
    d.set_sizes(cdb_size=16, sense_size=32)
    assert (d.sense_size, d.cdb_size) == (32, 16)
    assert d.read(0, 0, 1) == bytes(512)  # requests now use the new sizes
    r = d.command(0, bytes((0xFF,)) + bytes(9))
    assert len(r.sense) == 18
    d.set_sizes(sense_size=8)
    r = d.command(0, bytes((0xFF,)) + bytes(9))
    assert len(r.sense) == 8 and r.sense_key() == ILLEGAL_REQUEST  # truncated to sense_size
    d.initialize()  # reset: the defaults are back
    d.refresh()
    assert (d.sense_size, d.cdb_size) == (96, 32)
    # Any other field is read-only: writing it breaks the spec.
    host.lb.write_config(0, (4).to_bytes(4, "little"))
    assert host.device.status & S.DEVICE_NEEDS_RESET
    assert N_CONFIG_DRV in (host.device.needs_reset_reason or "")


# -- control queue ----------------------------------------------------------------------


@pytest.mark.normative(N_REQ_DEV)
def test_task_management_functions(host: Host) -> None:
    d = host.driver
    for subtype in (
        W.T_TMF_ABORT_TASK,
        W.T_TMF_ABORT_TASK_SET,
        W.T_TMF_CLEAR_TASK_SET,
        W.T_TMF_QUERY_TASK,
        W.T_TMF_QUERY_TASK_SET,
    ):
        assert d.tmf(subtype, 0, tag=99) == W.S_FUNCTION_COMPLETE
    assert d.tmf(W.T_TMF_CLEAR_ACA, 0) == W.S_FUNCTION_REJECTED
    assert d.tmf(77, 0) == W.S_FUNCTION_REJECTED
    assert d.tmf(W.T_TMF_ABORT_TASK, 9) == W.S_INCORRECT_LUN
    assert d.tmf(W.T_TMF_ABORT_TASK, raw_lun=bytes((1, 3, 0, 0, 0, 0, 0, 0))) == W.S_BAD_TARGET
    # A logical unit reset leaves a unit attention on that LUN only.
    assert d.tmf(W.T_TMF_LOGICAL_UNIT_RESET, 1) == W.S_FUNCTION_COMPLETE
    assert d.command(0, bytes(6)).good
    r = d.command(1, bytes(6))
    assert (r.sense_key(), r.asc()) == (UNIT_ATTENTION, 0x29)
    assert d.command(1, bytes(6)).good  # reported once
    # An I_T nexus reset ignores the LUN and reaches every unit.
    assert d.tmf(W.T_TMF_I_T_NEXUS_RESET, 200) == W.S_FUNCTION_COMPLETE
    sense = d.checked(0, bytes((0x03, 0, 0, 0, 18, 0)), data_in_len=18)
    assert (sense[2], sense[12], sense[13]) == (UNIT_ATTENTION, 0x29, 0x07)
    assert (d.command(1, bytes(6)).sense_key()) == UNIT_ATTENTION


@pytest.mark.normative(N_REQ_DEV)
def test_asynchronous_notification_query(host: Host) -> None:
    d = host.driver
    events = W.EVT_ASYNC_MEDIA_CHANGE | W.EVT_ASYNC_OPERATIONAL_CHANGE
    assert d.an_query(0, events) == (W.S_OK, 0)
    assert d.an_query(1, events, subscribe=True) == (W.S_OK, 0)
    assert d.an_query(8, events)[0] == W.S_INCORRECT_LUN


# -- event queue ------------------------------------------------------------------------


@pytest.mark.normative(N_EVENT_DEV, N_EVENT_DRV, N_INIT_DEV)
def test_hotplug_and_param_change_events(host: Host, tmp_path: Path) -> None:
    d, dev = host.driver, host.device
    d.start_events(4)
    extra = tmp_path / "extra.img"
    extra.write_bytes(bytes(MIB))
    assert dev.add_lun(extra) == 2
    (event,) = d.poll_events()
    assert (event.kind, event.lun_number, event.reason) == (
        W.T_TRANSPORT_RESET,
        2,
        W.EVT_RESET_RESCAN,
    )
    assert event.lun == W.encode_lun(2) and not event.missed
    assert d.report_luns(2) == [0, 1, 2]
    r = d.command(0, bytes(6))  # the other LUNs see REPORTED LUNS DATA HAS CHANGED
    assert (r.sense_key(), r.asc(), r.ascq()) == (UNIT_ATTENTION, 0x3F, 0x0E)
    d.write(2, 0, b"\x99" * 512)
    with open(extra, "ab") as f:
        f.truncate(2 * MIB)
    assert dev.refresh_lun(2)
    (event,) = d.poll_events()
    assert (event.kind, event.reason) == (W.T_PARAM_CHANGE, 0x2A | 0x09 << 8)
    r = d.command(2, bytes(6))
    assert (r.sense_key(), r.asc(), r.ascq()) == (UNIT_ATTENTION, 0x2A, 0x09)
    assert d.read_capacity(2) == (2 * MIB // 512, 512)
    dev.remove_lun(2)
    (event,) = d.poll_events()
    assert (event.kind, event.reason) == (W.T_TRANSPORT_RESET, W.EVT_RESET_REMOVED)
    assert d.report_luns() == [0, 1]
    assert extra.read_bytes()[:512] == b"\x99" * 512


@pytest.mark.normative(N_EVENT_DEV, N_EVENT_DRV)
def test_events_missed_without_buffers(host: Host, tmp_path: Path) -> None:
    d, dev = host.driver, host.device
    extra = tmp_path / "extra.img"
    extra.write_bytes(bytes(MIB))
    dev.add_lun(extra)  # no buffer in the eventq: dropped
    assert dev.stats["events_missed"] == 1
    d.start_events(1)
    (event,) = d.poll_events()
    assert event.missed and event.kind == W.T_NO_EVENT
    dev.remove_lun(2)
    (event,) = d.poll_events()  # the buffer was given back by poll_events
    assert not event.missed and event.reason == W.EVT_RESET_REMOVED


@pytest.mark.normative(N_EVENT_DEV)
def test_no_hotplug_events_without_the_feature(tmp_path: Path) -> None:
    h = Host(images(tmp_path, MIB), features=0)
    try:
        h.driver.start_events(2)
        extra = tmp_path / "extra.img"
        extra.write_bytes(bytes(MIB))
        h.device.add_lun(extra)
        h.device.refresh_lun(0)
        assert h.driver.poll_events() == []
        assert h.driver.report_luns() == [0, 1]  # found by scanning instead
    finally:
        h.close()


@pytest.mark.normative(N_EVENT_DEV)
def test_reset_returns_event_buffers_as_no_event(host: Host) -> None:
    host.driver.start_events(3)
    host.device.quiesce(W.EVENTQ)
    events = host.driver.poll_events()
    assert [e.event for e in events] == [W.T_NO_EVENT] * 3


# -- hostile drivers ----------------------------------------------------------------------


@pytest.mark.normative(N_REQ_DEV, N_REQ_DRV)
def test_hostile_requests_get_responses(host: Host) -> None:
    d = host.driver
    resp = W.RESP_CMD.size + 96
    lun0 = W.encode_lun(0)
    # A header shorter than lun..cdb[cdb_size]: failure, nothing executed.
    _, raw = d.call(W.REQUESTQ, [header(lun0, write16(0, 1))[:30]], [resp])
    assert response(raw)["response"] == W.S_FAILURE
    # cdb_size past the buffer: the driver says 200, sends 32.
    d.set_sizes(cdb_size=200)
    _, raw = d.call(W.REQUESTQ, [header(lun0, read16(0, 1))], [resp, 512])
    assert response(raw)["response"] == W.S_FAILURE
    d.set_sizes(cdb_size=32)
    # A CDB longer than cdb_size allows: CHECK CONDITION, not a misread.
    d.set_sizes(cdb_size=10)
    pi = bytes(W.REQ_CMD_PI.size)  # T10 PI is negotiated: its fields follow the CDB
    _, raw = d.call(W.REQUESTQ, [header(lun0, read16(0, 1)[:10], 10, pi)], [resp, 512])
    fields = response(raw)
    assert fields["status"] == 2 and raw[W.RESP_CMD.size + 12] == 0x24
    d.set_sizes(cdb_size=32)
    # Not target 0, or not the virtio LUN format at all: BAD_TARGET.
    for lun in (bytes((1, 4, 0, 0, 0, 0, 0, 0)), bytes((2, 0, 0, 0, 0, 0, 0, 0))):
        r = d.command(0, bytes(6), raw_lun=lun)
        assert r.response == W.S_BAD_TARGET
    # A multi-level or extended LUN on target 0: no such logical unit.
    for lun in (bytes((1, 0, 0x80, 1, 0, 0, 0, 0)), bytes((1, 0, 0, 1, 0, 1, 0, 0))):
        r = d.command(0, bytes(6), raw_lun=lun)
        assert r.response == W.S_OK and (r.sense_key(), r.asc()) == (ILLEGAL_REQUEST, 0x25)
    # A short control request type: unknown types fail, the device lives on.
    _, raw = d.call(W.CONTROLQ, [struct.pack("<I", 9) + bytes(20)], [1])
    assert raw[0] == W.S_FAILURE
    assert d.read(0, 0, 1) == bytes(512)
    assert not host.device.status & S.DEVICE_NEEDS_RESET


@pytest.mark.normative(N_REQ_DRV, N_EVENT_DRV)
@pytest.mark.parametrize(
    ("queue", "out", "in_sizes"),
    [
        (W.REQUESTQ, [bytes(51)], [8]),  # no room for the response
        (W.CONTROLQ, [bytes(2)], [1]),  # no type
        (W.CONTROLQ, [struct.pack("<I", W.T_TMF) + bytes(4)], [1]),  # short TMF
        (W.CONTROLQ, [struct.pack("<I", W.T_AN_QUERY) + bytes(12)], [1]),  # short AN reply
        (W.EVENTQ, [], [8]),  # event buffer too small
        (W.EVENTQ, [bytes(4)], [16]),  # event buffer with a readable part
    ],
    ids=["no-response", "no-type", "short-tmf", "short-an", "small-event", "readable-event"],
)
def test_unanswerable_requests_need_reset(
    host: Host, queue: int, out: list[bytes], in_sizes: list[int]
) -> None:
    d = host.driver
    d.submit(queue, out, in_sizes)
    d.kick(queue)
    assert host.device.status & S.DEVICE_NEEDS_RESET
    assert host.device.needs_reset_reason
    d.initialize()  # a reset brings it back
    assert d.read(0, 0, 1) == bytes(512)


# -- hostile devices ----------------------------------------------------------------------


class LyingDevice(ScsiDevice):
    """Answers every command with a response that breaks the format."""

    lie = "sense"

    def handle_chain(self, queue_index: int, chain: Chain) -> int | None:
        if queue_index != W.REQUESTQ:
            return super().handle_chain(queue_index, chain)
        w = ChainWriter(chain)
        if self.lie == "short":
            w.write(b"\0\0\0")
            return 3
        sense_len, residual = (500, 0) if self.lie == "sense" else (0, 1 << 20)
        w.write(
            W.RESP_CMD.pack(
                sense_len=sense_len, residual=residual, status_qualifier=0, status=0, response=0
            )
        )
        return W.RESP_CMD.size


@pytest.mark.parametrize("lie", ["sense", "residual", "short"])
def test_driver_rejects_malformed_responses(tmp_path: Path, lie: str) -> None:
    device = LyingDevice(images(tmp_path, MIB))
    device.lie = lie
    lb = Loopback(device)
    try:
        driver = ScsiDriver(lb)
        driver.initialize()
        with pytest.raises(ScsiProtocolError):
            driver.read(0, 0, 1)
    finally:
        lb.close()
        device.close()


# -- serve options and the control FIFO --------------------------------------------------


def test_serve_options_and_control_fifo(tmp_path: Path) -> None:
    kind = device_type("scsi")
    parser = argparse.ArgumentParser()
    kind.add_arguments(parser)
    paths = images(tmp_path, MIB, MIB)
    fifo = tmp_path / "ctl"
    args = parser.parse_args(
        [str(paths[0]), str(paths[1]), "--read-only", "--control", str(fifo), "--no-hotplug",
         "--workers", "3"]
    )  # fmt: skip
    assert kind.num_queues(args) == 3
    device = kind.from_arguments(args, DeviceSettings())
    assert isinstance(device, ScsiDevice) and device.read_only
    assert device.io is not None and device.io.count == 3
    assert not device.offered_features >> F.VIRTIO_SCSI_F_HOTPLUG & 1
    assert sorted(device.luns) == [0, 1]
    control = device.control
    assert isinstance(control, ControlFifo)
    extra = tmp_path / "x.img"
    extra.write_bytes(bytes(MIB))
    with open(fifo, "w") as f:
        f.write(f"add {extra}\nremove 0\n")
    control._readable(0.0)
    assert sorted(device.luns) == [1, 2]
    assert "failed" in control.run("remove 7")
    assert "unknown" in control.run("explode")
    device.close()
    with pytest.raises(ValueError, match="no such image"):
        kind.from_arguments(parser.parse_args([str(tmp_path / "none")]), DeviceSettings())


@pytest.mark.normative(N_REQ_DEV, N_CONFIG_DEV)
def test_served_over_vhost_user(tmp_path: Path) -> None:
    """The device behind a real vhost-user socket: config writes and commands get through."""
    device = ScsiDevice(images(tmp_path, MIB))
    server = VhostUserServer(tmp_path / "vu.sock", device)
    server.bind()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        with VhostUserFrontend(str(tmp_path / "vu.sock"), device_id=8) as frontend:
            driver = ScsiDriver(frontend)
            driver.initialize()
            driver.set_sizes(sense_size=64)
            assert driver.sense_size == 64 and device.sense_size == 64
            driver.write(0, 5, b"\x5a" * 1024)
            assert driver.read(0, 5, 2) == b"\x5a" * 1024
            assert driver.tmf(W.T_TMF_ABORT_TASK, 0) == W.S_FUNCTION_COMPLETE
            driver.reset()
    finally:
        server.stop()
        thread.join(timeout=10)
        device.close()
    assert not thread.is_alive()
    assert (tmp_path / "lun0.img").read_bytes()[5 * 512 : 7 * 512] == b"\x5a" * 1024
