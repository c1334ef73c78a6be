"""virtio-ccw, both sides: channel programs over the seam, and the driver over a channel."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from virtio.core.device import RingOptions, VirtioDevice
from virtio.devices.blk import BlkDevice, BlkDriver, BlkOptions
from virtio.devices.registry import DeviceSettings, device_type, device_types
from virtio.devices.rng import RngDevice, RngDriver
from virtio.errors import GuestMemoryError, NegotiationError
from virtio.memory import Allocator, GuestMemory
from virtio.spec import features as F
from virtio.spec.status import DeviceStatus as S
from virtio.transport.ccw import (
    CCW_CMD_BASIC_SENSE,
    CCW_CMD_NOOP,
    CCW_CMD_READ_FEAT,
    CCW_CMD_READ_STATUS,
    CCW_CMD_READ_VQ_CONF,
    CCW_CMD_SENSE_ID,
    CCW_CMD_SET_CONF_IND,
    CCW_CMD_SET_IND,
    CCW_CMD_SET_IND_ADAPTER,
    CCW_CMD_SET_VIRTIO_REV,
    CCW_CMD_SET_VQ,
    CCW_CMD_TIC,
    CCW_CMD_VDEV_RESET,
    CCW_CMD_WRITE_FEAT,
    CCW_CMD_WRITE_STATUS,
    COMMAND_NAMES,
    CU_TYPE,
    DEFAULT_SCHID,
    FEATURE_DESC,
    INDICATOR_ADDRESS,
    N_ADAPTER_DEV,
    N_ADAPTER_DRV,
    N_BASIC_DEV,
    N_BASIC_DRV,
    N_INIT_DRV,
    N_NOTIFY_DEV,
    N_NOTIFY_DRV,
    N_RESET_DEV,
    N_RESET_DRV,
    N_REV_DEV,
    N_REV_DRV,
    N_STATUS_DEV,
    N_STATUS_DRV,
    N_TWO_STAGE_DEV,
    N_VQ_DEV,
    REV_INFO,
    SENSE_COMMAND_REJECT,
    SENSE_ID_SIZE,
    THININT_AREA,
    VQ_CONFIG_BLOCK,
    VQ_INFO_BLOCK,
    VQ_INFO_BLOCK_LEGACY,
    Ccw,
    CcwDevice,
    CcwFlag,
    CcwTransport,
    ChannelStatus,
    LocalChannel,
    NoDevice,
    UnitStatus,
    ccw_loopback,
    subchannel_id,
)

REVISIONS = [0, 1, 2]
INDICATOR_KINDS = ["classic", "adapter"]
PROGRAM, DATA, RING = 0x100, 0x1000, 0x8000
MEMORY = 1 << 20
DONE = UnitStatus.CHANNEL_END | UnitStatus.DEVICE_END
ALL_STATUS = S.ACKNOWLEDGE | S.DRIVER | S.FEATURES_OK | S.DRIVER_OK


class Recorder:
    """A CcwInterrupts sink that counts what the device raised."""

    def __init__(self) -> None:
        self.io: list[int] = []
        self.adapter: list[int] = []

    def io_interrupt(self, schid: int) -> None:
        self.io.append(schid)

    def adapter_interrupt(self, isc: int) -> None:
        self.adapter.append(isc)


class Rig:
    """A subchannel in 1 MiB of guest memory, driven one raw channel program at a time."""

    def __init__(self, device: VirtioDevice | None = None, **options: object) -> None:
        self.memory = GuestMemory()
        self.memory.add(0, bytearray(MEMORY))
        self.device = device if device is not None else RngDevice()
        self.sink = Recorder()
        self.ccw = CcwDevice(self.device, self.memory, sink=self.sink, **options)  # type: ignore[arg-type]
        self.ccw.enable()

    def run(self, *ccws: Ccw, at: int = PROGRAM) -> ChannelStatus:
        for i, ccw in enumerate(ccws):
            self.memory.write(at + 8 * i, ccw.pack())
        return self.ccw.start(at)

    def cmd(
        self,
        cmd: int,
        data: bytes = b"",
        *,
        count: int | None = None,
        flags: int = 0,
        read: int = 0,
    ) -> tuple[ChannelStatus, bytes]:
        n = max(len(data), read) if count is None else count
        self.memory.write(DATA, data.ljust(max(n, read, len(data)), b"\0"))
        status = self.run(Ccw(cmd, flags, n, DATA))
        return status, self.memory.read(DATA, read)

    def ok(self, cmd: int, data: bytes = b"", *, read: int = 0) -> bytes:
        status, out = self.cmd(cmd, data, read=read)
        assert status.ok, f"{COMMAND_NAMES[cmd]}: {status}"
        return out

    def revision(self, revision: int) -> ChannelStatus:
        return self.cmd(CCW_CMD_SET_VIRTIO_REV, REV_INFO.pack(revision=revision, length=0))[0]

    def status(self, value: int) -> ChannelStatus:
        return self.cmd(CCW_CMD_WRITE_STATUS, bytes([value]))[0]

    def read_status(self) -> int:
        return self.ok(CCW_CMD_READ_STATUS, read=1)[0]

    def features(self, value: int) -> None:
        for index in range(2):
            word = value >> (32 * index) & 0xFFFFFFFF
            self.ok(CCW_CMD_WRITE_FEAT, FEATURE_DESC.pack(features=word, index=index))

    def to_features_ok(self, features: int = 1 << F.VIRTIO_F_VERSION_1) -> None:
        assert self.revision(2).ok
        for value in (S.ACKNOWLEDGE, S.ACKNOWLEDGE | S.DRIVER):
            assert self.status(value).ok
        self.features(features)
        assert self.status(S.ACKNOWLEDGE | S.DRIVER | S.FEATURES_OK).ok

    def set_vq(self, index: int, size: int = 8, **fields: int) -> ChannelStatus:
        block = VQ_INFO_BLOCK.pack(
            desc=fields.pop("desc", RING),
            index=index,
            size=size,
            driver=fields.pop("driver", RING + 0x100),
            device=fields.pop("device", RING + 0x200),
            **fields,
        )
        return self.cmd(CCW_CMD_SET_VQ, block)[0]

    @property
    def reason(self) -> str:
        return self.device.needs_reset_reason or ""


def needs_reset(rig: Rig, normative: str) -> None:
    assert rig.device.status & S.DEVICE_NEEDS_RESET
    assert normative in rig.reason, rig.reason


def recovers(rig: Rig) -> None:
    """A VDEV_RESET brings a failed device back: status 0, no reason left."""
    status = rig.cmd(CCW_CMD_VDEV_RESET)[0]
    assert status.ok, status
    assert rig.device.status == 0 and rig.device.needs_reset_reason is None


# -- every device type, end to end --------------------------------------------------------


@pytest.mark.normative(N_REV_DRV, N_RESET_DEV, N_RESET_DRV)
@pytest.mark.parametrize("indicators", INDICATOR_KINDS)
@pytest.mark.parametrize("revision", REVISIONS)
@pytest.mark.parametrize("name", list(device_types()))
def test_every_device_type_with_its_driver_over_ccw(
    tmp_path: Path, name: str, revision: int, indicators: str
) -> None:
    kind = device_type(name)
    device = kind.example(tmp_path, DeviceSettings())
    try:
        transport = ccw_loopback(device, revision=revision, adapter=indicators == "adapter")
        assert transport.device_id == kind.device_id and transport.revision == revision
        assert transport.legacy == (revision == 0)
        driver = kind.driver(transport)
        driver.initialize()
        assert transport.adapter_active == (indicators == "adapter")
        assert driver.has(F.VIRTIO_F_VERSION_1) == (revision > 0)
        if kind.smoke is not None:
            kind.smoke(driver)
        assert not device.needs_reset_reason, device.needs_reset_reason
        channel = transport.channel
        assert isinstance(channel, LocalChannel)
        if indicators == "adapter" and kind.smoke is not None:
            assert channel.adapter_interrupts and set(channel.adapter_interrupts) == {3}
        # The reset is complete once VDEV_RESET ends: the status reads 0 at once.
        driver.reset()
        assert device.status == 0 and transport.read_status() == 0
        assert channel.subchannel.indicators is None and channel.subchannel.adapter is None
    finally:
        device.close()


def test_loopback_builds_a_registered_type_by_name(tmp_path: Path) -> None:
    transport = ccw_loopback("rng", directory=tmp_path)
    driver = RngDriver(transport)
    driver.initialize()
    assert len(driver.read(16)) == 16
    with pytest.raises(ValueError, match="directory"):
        ccw_loopback("blk")


# -- revisions -------------------------------------------------------------------------------


@pytest.mark.normative(N_REV_DEV, N_REV_DRV)
@pytest.mark.parametrize("device_revision", REVISIONS)
@pytest.mark.parametrize("driver_revision", REVISIONS)
def test_the_driver_gets_the_highest_revision_both_take(
    driver_revision: int, device_revision: int
) -> None:
    device = RngDevice()
    transport = ccw_loopback(device, revision=driver_revision, device_revision=device_revision)
    assert transport.revision == min(driver_revision, device_revision)
    # Trying a revision the device rejects is no fault of the driver's.
    assert device.needs_reset_reason is None
    driver = RngDriver(transport)
    driver.initialize()
    assert len(driver.read(8)) == 8


@pytest.mark.normative(N_REV_DEV, N_REV_DRV)
def test_revision_rules_of_the_device() -> None:
    rig = Rig(max_revision=1)
    status = rig.revision(2)  # not supported: command reject, and nothing else
    assert status.command_reject and not status.incorrect_length
    assert rig.device.needs_reset_reason is None
    status, _ = rig.cmd(CCW_CMD_SET_VIRTIO_REV, REV_INFO.pack(revision=1, length=4) + b"abcd")
    assert status.command_reject  # revision 1 carries no data: an invalid combination
    assert rig.device.needs_reset_reason is None
    assert rig.revision(1).ok and rig.ccw.revision == 1
    assert rig.revision(1).ok  # the same revision again changes nothing
    assert rig.revision(0).command_reject  # a different one: refused
    needs_reset(rig, N_REV_DRV)
    recovers(rig)
    assert rig.ccw.revision == 1  # a virtio reset keeps the revision
    # Re-enabling the subchannel unsets it.
    rig.ccw.enable()
    assert rig.ccw.revision is None
    assert rig.revision(1).ok


@pytest.mark.normative(N_REV_DEV)
def test_a_non_transitional_device_rejects_revision_0_and_legacy_drivers() -> None:
    rig = Rig(transitional=False)
    assert rig.revision(0).command_reject
    assert rig.device.needs_reset_reason is None
    # A virtio command before any revision: rejected (and a rule broken).
    assert rig.status(S.ACKNOWLEDGE).command_reject
    needs_reset(rig, N_REV_DRV)
    assert rig.revision(1).ok and rig.device.needs_reset_reason is None


@pytest.mark.normative(N_REV_DEV)
def test_a_transitional_device_takes_a_legacy_driver_for_revision_0() -> None:
    rig = Rig()
    assert rig.status(S.ACKNOWLEDGE).ok  # no SET_VIRTIO_REV first: a legacy driver
    assert rig.ccw.revision == 0 and rig.device.legacy
    assert rig.revision(0).command_reject  # not even revision 0 may be set now
    assert rig.cmd(CCW_CMD_READ_STATUS, read=1)[0].command_reject  # nor revision 2 commands


class RejectingRevision(LocalChannel):
    """A legacy device's answer to SET_VIRTIO_REV: it knows no such command."""

    def start(self, cpa: int) -> ChannelStatus:
        memory = self.subchannel.memory
        if Ccw.unpack(memory.read(cpa, 8)).cmd == CCW_CMD_SET_VIRTIO_REV:
            sense = bytes([SENSE_COMMAND_REJECT]).ljust(32, b"\0")
            return ChannelStatus(device=DONE | UnitStatus.UNIT_CHECK, cpa=cpa + 8, sense=sense)
        return super().start(cpa)


@pytest.mark.normative(N_REV_DRV)
def test_a_device_without_set_virtio_rev_is_driven_as_revision_0(tmp_path: Path) -> None:
    image = tmp_path / "d.img"
    image.write_bytes(bytes(1 << 20))
    device = BlkDevice(image, BlkOptions())
    try:
        memory = GuestMemory()
        memory.add(0, bytearray(16 << 20))
        channel = RejectingRevision(CcwDevice(device, memory))
        transport = CcwTransport(channel, memory, Allocator(0x1000, (16 << 20) - 0x1000))
        assert transport.revision == 0 and transport.legacy
        driver = BlkDriver(transport)
        driver.initialize()
        driver.write(0, b"legacy".ljust(512, b"\0"))
        assert driver.read(0, 512).startswith(b"legacy")
        assert channel.subchannel.revision == 0 and channel.subchannel.implied
        with pytest.raises(NoDevice):
            CcwTransport(channel, memory, Allocator(15 << 20, 0x10000), allow_legacy=False)
    finally:
        device.close()


# -- lengths, unknown commands, chaining --------------------------------------------------

LENGTHS = [
    (CCW_CMD_WRITE_STATUS, 1),
    (CCW_CMD_READ_FEAT, 5),
    (CCW_CMD_WRITE_FEAT, 5),
    (CCW_CMD_READ_VQ_CONF, 4),
    (CCW_CMD_SET_VQ, 32),
    (CCW_CMD_SET_IND, 8),
    (CCW_CMD_SET_CONF_IND, 8),
    (CCW_CMD_SET_IND_ADAPTER, 25),
    (CCW_CMD_SET_VIRTIO_REV, 4),
]


@pytest.mark.normative(N_BASIC_DEV, N_BASIC_DRV)
@pytest.mark.parametrize("cmd,size", LENGTHS, ids=[COMMAND_NAMES[c] for c, _ in LENGTHS])
def test_a_wrong_count_is_reported_and_the_next_reset_recovers(cmd: int, size: int) -> None:
    rig = Rig()
    if cmd != CCW_CMD_SET_VIRTIO_REV:
        assert rig.revision(2).ok
    # Length checks on: incorrect length, and the command is rejected, not executed.
    for count in (size - 1, size + 1):
        status, _ = rig.cmd(cmd, count=count)
        assert status.incorrect_length and status.command_reject, status
        assert status.residual == count
        needs_reset(rig, N_BASIC_DRV)
        assert COMMAND_NAMES[cmd] in rig.reason
        if cmd == CCW_CMD_SET_VIRTIO_REV:
            rig.ccw.enable()
            assert rig.revision(2).ok
        else:
            recovers(rig)
    # Length checks off: too little data is still a check condition (no incorrect length).
    status, _ = rig.cmd(cmd, count=size - 1, flags=CcwFlag.SLI)
    assert status.command_reject and not status.incorrect_length
    needs_reset(rig, N_BASIC_DRV)


@pytest.mark.normative(N_BASIC_DEV)
def test_a_longer_buffer_with_length_checks_off_is_accepted() -> None:
    rig = Rig()
    assert rig.revision(2).ok
    status, _ = rig.cmd(CCW_CMD_WRITE_STATUS, bytes([S.ACKNOWLEDGE]), count=16, flags=CcwFlag.SLI)
    assert status.ok and status.residual == 15
    assert rig.read_status() == S.ACKNOWLEDGE


@pytest.mark.normative(N_BASIC_DEV)
@pytest.mark.parametrize("cmd", [0x01, 0x02, 0x99, 0xFF, 0x14])
def test_unsupported_commands_get_command_reject(cmd: int) -> None:
    rig = Rig()
    assert rig.revision(2).ok
    status, _ = rig.cmd(cmd, b"\0" * 8)
    assert status.device == DONE | UnitStatus.UNIT_CHECK and status.command_reject
    # Not a broken rule: a driver may probe. BASIC SENSE says what happened, once.
    assert rig.device.needs_reset_reason is None
    assert rig.ok(CCW_CMD_BASIC_SENSE, read=32)[0] == SENSE_COMMAND_REJECT
    assert rig.ok(CCW_CMD_BASIC_SENSE, read=32)[0] == 0


@pytest.mark.normative(N_BASIC_DEV, N_BASIC_DRV)
def test_sense_id_names_the_control_unit_and_the_driver_checks_it() -> None:
    rig = Rig()
    ident = rig.ok(CCW_CMD_SENSE_ID, read=SENSE_ID_SIZE)
    assert ident[0] == 0xFF and int.from_bytes(ident[1:3], "big") == CU_TYPE == 0x3832
    assert ident[3] == 4 and ident[4:] == bytes(SENSE_ID_SIZE - 4)  # model: the rng's id
    status, short = rig.cmd(CCW_CMD_SENSE_ID, count=8, read=8, flags=CcwFlag.SLI)
    assert status.ok and short == ident[:8] and status.residual == 0

    class OtherUnit(LocalChannel):
        def __init__(self, subchannel: CcwDevice, ident: bytes) -> None:
            super().__init__(subchannel)
            self.ident = ident

        def start(self, cpa: int) -> ChannelStatus:
            ccw = Ccw.unpack(self.subchannel.memory.read(cpa, 8))
            if ccw.cmd == CCW_CMD_SENSE_ID:
                self.subchannel.memory.write(ccw.cda, self.ident[: ccw.count])
                return ChannelStatus(device=DONE, cpa=cpa + 8)
            return super().start(cpa)

    memory = rig.memory
    dasd = bytes([0xFF, 0x39, 0x90, 0xE9, 0x33, 0x90, 0x0A]).ljust(SENSE_ID_SIZE, b"\0")
    with pytest.raises(NoDevice, match="SENSE ID"):
        CcwTransport(OtherUnit(rig.ccw, dasd), memory, Allocator(0x10000, 0x10000))
    # Device type and model are ignored: only the control unit counts.
    odd = bytes([0xFF, 0x38, 0x32, 4, 0x12, 0x34, 0x56]).ljust(SENSE_ID_SIZE, b"\0")
    transport = CcwTransport(OtherUnit(rig.ccw, odd), memory, Allocator(0x10000, 0x10000))
    assert transport.device_id == 4


@pytest.mark.normative(N_BASIC_DEV)
def test_data_chaining_and_transfer_in_channel() -> None:
    rig = Rig()
    rig.memory.write(DATA, REV_INFO.pack(revision=2, length=0))
    rig.memory.write(DATA + 0x10, bytes([S.ACKNOWLEDGE]))
    # WRITE_FEAT's five bytes come from two data-chained CCWs, reached through a TIC.
    feat = FEATURE_DESC.pack(features=1, index=1)  # VIRTIO_F_VERSION_1
    rig.memory.write(DATA + 0x20, feat[:3])
    rig.memory.write(DATA + 0x30, feat[3:])
    cc, cd = CcwFlag.CC, CcwFlag.CD
    filler = [Ccw(0x99)] * 5  # never reached: the TIC jumps over them
    status = rig.run(
        Ccw(CCW_CMD_SET_VIRTIO_REV, cc, 4, DATA),
        Ccw(CCW_CMD_WRITE_STATUS, cc, 1, DATA + 0x10),
        Ccw(CCW_CMD_TIC, 0, 0, PROGRAM + 0x40),
        *filler,
        Ccw(CCW_CMD_WRITE_FEAT, cd, 3, DATA + 0x20),  # at PROGRAM + 0x40
        Ccw(0, 0, 2, DATA + 0x30),  # the rest of its data (the command code is ignored)
    )
    assert status.ok and status.cpa == PROGRAM + 0x50, status
    assert rig.device.driver_features == 1 << F.VIRTIO_F_VERSION_1
    assert rig.read_status() == S.ACKNOWLEDGE


@pytest.mark.normative(N_BASIC_DEV)
def test_a_chain_runs_in_order_and_stops_at_the_first_unit_check() -> None:
    rig = Rig()
    rig.memory.write(DATA, REV_INFO.pack(revision=2, length=0))
    rig.memory.write(DATA + 0x10, bytes([S.ACKNOWLEDGE, S.ACKNOWLEDGE | S.DRIVER]))
    cc = CcwFlag.CC
    status = rig.run(
        Ccw(CCW_CMD_SET_VIRTIO_REV, cc, 4, DATA),
        Ccw(CCW_CMD_WRITE_STATUS, cc, 1, DATA + 0x10),
        Ccw(CCW_CMD_TIC, 0, 0, PROGRAM + 0x40),
        Ccw(CCW_CMD_NOOP, 0, 0, 0),  # skipped by the TIC
        Ccw(0, 0, 0, 0),
        Ccw(0, 0, 0, 0),
        Ccw(0, 0, 0, 0),
        Ccw(0, 0, 0, 0),
        Ccw(CCW_CMD_WRITE_STATUS, cc, 1, DATA + 0x11),  # at PROGRAM + 0x40
        Ccw(0x99, cc, 0, 0),  # unsupported: the chain ends here
        Ccw(CCW_CMD_WRITE_STATUS, 0, 1, DATA + 0x12),  # never runs
    )
    assert status.command_reject and status.cpa == PROGRAM + 0x50
    assert rig.read_status() == S.ACKNOWLEDGE | S.DRIVER
    # Incorrect length ends a chain as well (SENSE ID with a short count, no SLI).
    status = rig.run(Ccw(CCW_CMD_SENSE_ID, cc, 8, DATA + 0x100), Ccw(CCW_CMD_VDEV_RESET, 0, 0, 0))
    assert status.incorrect_length and not status.unit_check and status.residual == 0
    assert rig.device.status == S.ACKNOWLEDGE | S.DRIVER  # the reset did not run


@pytest.mark.normative(N_BASIC_DEV)
def test_invalid_channel_programs_end_in_a_program_check() -> None:
    rig = Rig()
    assert rig.revision(2).ok
    cases = [
        rig.ccw.start(PROGRAM + 4),  # not a doubleword
        rig.ccw.start(MEMORY + 0x1000),  # outside guest memory
        rig.run(Ccw(CCW_CMD_TIC, 0, 0, PROGRAM)),  # TIC first
        rig.run(Ccw(CCW_CMD_NOOP, CcwFlag.CC, 0, 0), Ccw(CCW_CMD_TIC, 0, 0, PROGRAM + 8)),
        rig.run(Ccw(CCW_CMD_READ_STATUS, 0, 1, MEMORY + 8)),  # data outside memory
        rig.run(Ccw(CCW_CMD_READ_STATUS, 0, 1, 0x8000_0000)),  # not a 31-bit address
        rig.run(Ccw(CCW_CMD_READ_STATUS, CcwFlag.IDA, 1, DATA)),
        # A loop of NOOPs: the channel gives up after max_ccws.
        rig.run(Ccw(CCW_CMD_NOOP, CcwFlag.CC, 0, 0), Ccw(CCW_CMD_TIC, 0, 0, PROGRAM)),
    ]
    for status in cases:
        assert status.cc == 0 and status.program_check, status
    assert rig.device.needs_reset_reason is None  # the channel's business, not virtio's


def test_a_disabled_subchannel_and_a_pending_interrupt() -> None:
    rig = Rig()
    rig.ccw.disable()
    assert rig.run(Ccw(CCW_CMD_NOOP)).cc == 3
    rig.ccw.enable()
    rig.ccw.status_pending = True
    assert rig.run(Ccw(CCW_CMD_NOOP)).cc == 1
    assert rig.ccw.test_subchannel() and not rig.ccw.test_subchannel()
    assert rig.run(Ccw(CCW_CMD_NOOP)).ok


# -- status --------------------------------------------------------------------------------


@pytest.mark.normative(N_STATUS_DRV, N_REV_DEV)
@pytest.mark.parametrize("revision", [0, 1])
def test_read_status_is_refused_before_revision_2(revision: int) -> None:
    rig = Rig()
    assert rig.revision(revision).ok
    assert rig.status(S.ACKNOWLEDGE).ok
    status, _ = rig.cmd(CCW_CMD_READ_STATUS, read=1)
    assert status.command_reject
    needs_reset(rig, N_STATUS_DRV)
    recovers(rig)
    # The driver side never asks: it keeps what the device took.
    transport = ccw_loopback(RngDevice(), revision=revision)
    transport.write_status(S.ACKNOWLEDGE)
    assert transport.read_status() == S.ACKNOWLEDGE


@pytest.mark.normative(N_STATUS_DEV, N_STATUS_DRV)
def test_a_status_the_device_does_not_take_is_rejected_and_kept() -> None:
    rig = Rig()
    assert rig.revision(2).ok
    assert rig.status(S.ACKNOWLEDGE).ok and rig.status(S.ACKNOWLEDGE | S.DRIVER).ok
    assert rig.read_status() == S.ACKNOWLEDGE | S.DRIVER  # READ_STATUS: the current value
    rig.features(0)  # no VIRTIO_F_VERSION_1: FEATURES_OK is refused
    assert rig.status(S.ACKNOWLEDGE | S.DRIVER | S.FEATURES_OK).command_reject
    assert rig.read_status() == S.ACKNOWLEDGE | S.DRIVER
    # VIRTIO_F_RING_RESET is reserved on channel I/O: never offered, refused if accepted.
    rig.features(1 << F.VIRTIO_F_VERSION_1 | 1 << F.VIRTIO_F_RING_RESET)
    assert rig.status(S.ACKNOWLEDGE | S.DRIVER | S.FEATURES_OK).command_reject
    assert rig.read_status() == S.ACKNOWLEDGE | S.DRIVER
    assert rig.device.needs_reset_reason is None
    # The driver side assumes the old value after the reject.
    transport = ccw_loopback(RngDevice(), revision=1)
    transport.write_status(S.ACKNOWLEDGE)
    transport.write_status(S.ACKNOWLEDGE | S.DRIVER)
    transport.write_driver_features(0)
    transport.write_status(S.ACKNOWLEDGE | S.DRIVER | S.FEATURES_OK)
    assert transport.read_status() == S.ACKNOWLEDGE | S.DRIVER


def test_features_travel_little_endian_and_skip_the_reserved_bits() -> None:
    device = RngDevice(ring=RingOptions(ring_reset=True))
    rig = Rig(device)
    assert rig.revision(1).ok
    low = rig.ok(CCW_CMD_READ_FEAT, FEATURE_DESC.pack(index=0), read=5)
    high = rig.ok(CCW_CMD_READ_FEAT, FEATURE_DESC.pack(index=1), read=5)
    assert int.from_bytes(low[:4], "little") == device.offered_features & 0xFFFFFFFF
    offered_high = int.from_bytes(high[:4], "little")
    assert offered_high & 1  # VIRTIO_F_VERSION_1, bit 32
    assert device.offered_features >> F.VIRTIO_F_RING_RESET & 1
    assert not offered_high >> (F.VIRTIO_F_RING_RESET - 32) & 1
    assert high[4] == 1  # the index stays as the driver wrote it
    assert rig.ok(CCW_CMD_READ_FEAT, FEATURE_DESC.pack(index=9), read=5)[:4] == bytes(4)
    # No virtqueue reset on channel I/O (reserved for future use): the driver refuses.
    transport = ccw_loopback(RngDevice())
    assert not transport.read_device_features() >> F.VIRTIO_F_RING_RESET & 1
    with pytest.raises(NegotiationError, match="no virtqueue reset"):
        transport.reset_queue(0)
    assert not transport.queue_reset_done(0)


# -- queues --------------------------------------------------------------------------------


@pytest.mark.normative(N_INIT_DRV, N_VQ_DEV)
def test_queue_configuration_rules() -> None:
    rig = Rig()
    rig.to_features_ok()
    # READ_VQ_CONF: a queue the device lacks reads as size 0, which is no error.
    block = rig.ok(CCW_CMD_READ_VQ_CONF, VQ_CONFIG_BLOCK.pack(index=0), read=4)
    assert VQ_CONFIG_BLOCK.unpack(block)["max_queue_size"] == 64
    block = rig.ok(CCW_CMD_READ_VQ_CONF, VQ_CONFIG_BLOCK.pack(index=7), read=4)
    assert VQ_CONFIG_BLOCK.unpack(block) == {"index": 7, "max_queue_size": 0}
    assert rig.device.needs_reset_reason is None
    # SET_VQ for a queue that does not exist: rejected, a rule broken.
    assert rig.set_vq(7).command_reject
    needs_reset(rig, N_INIT_DRV)
    recovers(rig)
    rig.to_features_ok()
    assert rig.set_vq(0, res0=0xFFFFFFFF).ok  # res0 is ignored
    queue = rig.device.queues[0]
    assert (queue.size, queue.desc, queue.driver, queue.device) == (
        8,
        RING,
        RING + 0x100,
        RING + 0x200,
    )
    assert queue.enabled
    assert rig.status(ALL_STATUS).ok and rig.device.live
    # After DRIVER_OK there is no way back to a queue's configuration.
    assert rig.set_vq(0, desc=0x9000).command_reject
    needs_reset(rig, N_INIT_DRV)


@pytest.mark.normative(N_INIT_DRV)
def test_set_vq_before_features_ok_or_with_a_bad_size() -> None:
    rig = Rig()
    assert rig.revision(2).ok
    assert rig.set_vq(0).command_reject
    needs_reset(rig, N_INIT_DRV)
    recovers(rig)
    rig.to_features_ok()
    assert rig.set_vq(0, size=6).command_reject  # not a power of 2 for a split ring
    needs_reset(rig, N_INIT_DRV)


@pytest.mark.normative(N_INIT_DRV)
def test_legacy_set_vq_lays_the_ring_out_from_one_address() -> None:
    rig = Rig()
    assert rig.revision(0).ok and rig.device.legacy
    block = VQ_INFO_BLOCK_LEGACY.pack(queue=0x4000, align=4096, index=0, size=8)
    assert rig.ok(CCW_CMD_SET_VQ, block) == b""
    queue = rig.device.queues[0]
    assert (queue.desc, queue.driver, queue.device) == (0x4000, 0x4000 + 128, 0x5000)
    block = VQ_INFO_BLOCK_LEGACY.pack(queue=0x4100, align=4096, index=0, size=8)
    recovers(rig)
    assert rig.cmd(CCW_CMD_SET_VQ, block)[0].command_reject  # not aligned
    needs_reset(rig, N_INIT_DRV)


# -- notifications -----------------------------------------------------------------------------


def blk_over_ccw(
    tmp_path: Path, *, ring: RingOptions | None = None, **options: object
) -> tuple[BlkDevice, BlkDriver, CcwTransport]:
    image = tmp_path / "d.img"
    image.write_bytes(bytes(1 << 20))
    device = BlkDevice(image, BlkOptions(), ring=ring)
    transport = ccw_loopback(device, **options)  # type: ignore[arg-type]
    driver = BlkDriver(transport)
    driver.initialize()
    return device, driver, transport


def subchannel_of(transport: CcwTransport) -> tuple[LocalChannel, CcwDevice]:
    channel = transport.channel
    assert isinstance(channel, LocalChannel)
    return channel, channel.subchannel


@pytest.mark.normative(N_STATUS_DRV)
def test_config_changes_arrive_through_the_configuration_indicator(tmp_path: Path) -> None:
    device, driver, transport = blk_over_ccw(tmp_path, adapter=True)
    try:
        channel, ccw = subchannel_of(transport)
        assert ccw.config_indicators == transport.config_indicators_address
        before = transport.config_generation()
        with open(tmp_path / "d.img", "r+b") as f:
            f.truncate(2 << 20)
        ios = channel.io_interrupts
        device.update_capacity()
        # Bit 0 of the configuration indicators, and one classic I/O interrupt.
        assert transport.memory.read(transport.config_indicators_address, 8)[-1] & 1
        assert channel.io_interrupts == ios + 1 and ccw.status_pending
        device.update_config(0, bytes(device.config[:8]))  # while one is pending: no new interrupt
        assert channel.io_interrupts == ios + 1
        starts = ccw.programs
        assert transport.wait_interrupt(1.0)
        # The driver read the status (READ_STATUS) and the new capacity.
        assert ccw.programs > starts and driver.capacity == (2 << 20) // 512
        assert transport.config_generation() > before
        assert not ccw.status_pending
        assert transport.memory.read(transport.config_indicators_address, 8) == bytes(8)
    finally:
        device.close()


@pytest.mark.normative(N_STATUS_DRV)
def test_at_revision_2_a_needs_reset_is_seen_after_the_config_change(tmp_path: Path) -> None:
    device, driver, transport = blk_over_ccw(tmp_path)
    try:
        device.fail("a test failure")  # a live device tells the driver through config
        assert transport.wait_interrupt(1.0)
        assert driver.broken is not None
    finally:
        device.close()


def test_config_writes_reach_the_device_field_by_field(tmp_path: Path) -> None:
    device, driver, transport = blk_over_ccw(tmp_path, revision=1)
    try:
        assert driver.has(F.VIRTIO_BLK_F_CONFIG_WCE)
        driver.set_writeback(False)
        assert device.writeback is False and driver.geometry.writeback is False
        driver.set_writeback(True)
        assert device.writeback is True
        assert device.needs_reset_reason is None
        generation = transport.config_generation()
        device.config[0] ^= 1  # a change the driver sees only by reading
        transport.read_config(0, 8)
        assert transport.config_generation() == generation + 1
    finally:
        device.close()


@pytest.mark.normative(N_ADAPTER_DEV, N_ADAPTER_DRV)
def test_two_stage_indicators(tmp_path: Path) -> None:
    device, driver, transport = blk_over_ccw(tmp_path, adapter=True)
    try:
        channel, ccw = subchannel_of(transport)
        assert ccw.adapter is not None and transport.adapter_area is not None
        area, _length = transport.adapter_area
        summary = transport.summary_address
        memory = transport.memory
        # The driver clears the summary indicator before it looks at the queue bits.
        seen: list[int] = []
        used = driver._on_used

        def on_used(queue: int) -> None:
            seen.append(memory.read(summary, 1)[0])
            used(queue)

        transport.set_interrupt_handlers(on_used, driver._on_config)
        driver.write(0, b"a".ljust(512, b"\0"))
        assert seen and set(seen) == {0}
        # The device: queue bit (bit_nr + queue, from the left), summary 0x01, one
        # interrupt while the summary stays set.
        raised = len(channel.adapter_interrupts)
        ccw.queue_interrupt(0, 0xFFFF)
        assert memory.read(area, 1)[0] == 0x80 and memory.read(summary, 1) == b"\x01"
        ccw.queue_interrupt(0, 0xFFFF)
        assert len(channel.adapter_interrupts) == raised + 1
        assert transport.wait_interrupt(0)
        assert memory.read(summary, 1) == b"\0" and memory.read(area, 1) == b"\0"
        ccw.queue_interrupt(0, 0xFFFF)
        assert len(channel.adapter_interrupts) == raised + 2
    finally:
        device.close()


@pytest.mark.normative(N_ADAPTER_DEV)
def test_adapter_bit_numbers_start_at_the_left() -> None:
    rig = Rig()
    rig.to_features_ok()
    area = THININT_AREA.pack(summary_indicator=0x3000, indicator=0x3100, bit_nr=13, isc=5)
    assert rig.ok(CCW_CMD_SET_IND_ADAPTER, area) == b""
    rig.ccw.queue_interrupt(0, 0xFFFF)
    assert rig.memory.read(0x3100, 2) == bytes([0, 0x80 >> 5])  # bit 13: byte 1, 6th from left
    assert rig.memory.read(0x3000, 1) == b"\x01" and rig.sink.adapter == [5]
    rig.ccw.queue_interrupt(2, 0xFFFF)  # bit 15
    assert rig.memory.read(0x3101, 1)[0] == 0x04 | 0x01
    assert rig.sink.adapter == [5]  # the summary was already set
    assert rig.sink.io == []  # adapter interrupts only for queues


@pytest.mark.normative(N_TWO_STAGE_DEV)
def test_classic_and_two_stage_indicators_exclude_each_other() -> None:
    rig = Rig()
    assert rig.revision(2).ok
    assert rig.ok(CCW_CMD_SET_IND, INDICATOR_ADDRESS.pack(address=0x3000)) == b""
    area = THININT_AREA.pack(summary_indicator=0x3100, indicator=0x3200, bit_nr=0, isc=3)
    assert rig.cmd(CCW_CMD_SET_IND_ADAPTER, area)[0].command_reject
    needs_reset(rig, N_TWO_STAGE_DEV)
    recovers(rig)  # a reset forgets the indicators
    assert rig.ok(CCW_CMD_SET_IND_ADAPTER, area) == b""
    assert rig.cmd(CCW_CMD_SET_IND, INDICATOR_ADDRESS.pack(address=0x3000))[0].command_reject
    assert rig.device.status & S.DEVICE_NEEDS_RESET
    # The configuration change indicators go with either.
    recovers(rig)
    assert rig.ok(CCW_CMD_SET_IND_ADAPTER, area) == b""
    assert rig.ok(CCW_CMD_SET_CONF_IND, INDICATOR_ADDRESS.pack(address=0x3300)) == b""


def test_indicators_outside_guest_memory_are_refused() -> None:
    rig = Rig()
    assert rig.revision(2).ok
    status, _ = rig.cmd(CCW_CMD_SET_IND, INDICATOR_ADDRESS.pack(address=MEMORY - 4))
    assert status.command_reject and rig.device.status & S.DEVICE_NEEDS_RESET
    recovers(rig)
    area = THININT_AREA.pack(summary_indicator=0x3000, indicator=0x3100, bit_nr=1 << 40, isc=3)
    assert rig.cmd(CCW_CMD_SET_IND_ADAPTER, area)[0].command_reject
    recovers(rig)
    area = THININT_AREA.pack(summary_indicator=0x3000, indicator=0x3100, bit_nr=0, isc=8)
    assert rig.cmd(CCW_CMD_SET_IND_ADAPTER, area)[0].command_reject


def test_a_legacy_device_without_adapter_interrupts_gets_classic_ones(tmp_path: Path) -> None:
    image = tmp_path / "d.img"
    image.write_bytes(bytes(1 << 20))
    device = BlkDevice(image, BlkOptions())
    try:
        memory = GuestMemory()
        memory.add(0, bytearray(16 << 20))
        subchannel = CcwDevice(device, memory, legacy_adapter=False)
        transport = CcwTransport(
            LocalChannel(subchannel), memory, Allocator(0x1000, 15 << 20), revision=0, adapter=True
        )
        driver = BlkDriver(transport)
        driver.initialize()
        assert not transport.adapter_active and subchannel.indicators is not None
        driver.write(1, b"classic".ljust(512, b"\0"))
        assert driver.read(1, 512).startswith(b"classic")
    finally:
        device.close()


@pytest.mark.normative(N_NOTIFY_DEV, N_NOTIFY_DRV)
def test_the_notify_hypercall_and_its_cookie(tmp_path: Path) -> None:
    device, driver, transport = blk_over_ccw(tmp_path)
    try:
        _channel, ccw = subchannel_of(transport)
        driver.write(0, b"1".ljust(512, b"\0"))
        hits = ccw.cookie_hits
        driver.write(1, b"2".ljust(512, b"\0"))
        # The driver passed the cookie of the previous notification back.
        assert ccw.cookie_hits > hits
        # The leftmost 32 bits of GPR2 are ignored; another subchannel's id is not.
        cookie = ccw.hypercall_notify(0xDEADBEEF << 32 | ccw.schid, 0, 0)
        assert cookie >= 0
        assert ccw.hypercall_notify(subchannel_id(5), 0, 0) < 0
        assert device.needs_reset_reason is None
        assert ccw.hypercall_notify(ccw.schid, 9, cookie) < 0  # no queue 9
        assert device.status & S.DEVICE_NEEDS_RESET
    finally:
        device.close()


def test_notification_data_over_the_hypercall(tmp_path: Path) -> None:
    ring = RingOptions(notification_data=True)
    device, driver, _transport = blk_over_ccw(tmp_path, ring=ring)
    try:
        assert driver.has(F.VIRTIO_F_NOTIFICATION_DATA)
        for sector in range(4):
            driver.write(sector, bytes([sector]) * 512)
        assert driver.read(3, 512) == bytes([3]) * 512
        assert device.needs_reset_reason is None
    finally:
        device.close()


@pytest.mark.normative(N_RESET_DEV, N_RESET_DRV)
def test_after_vdev_reset_the_device_notifies_nothing(tmp_path: Path) -> None:
    device, driver, transport = blk_over_ccw(tmp_path, revision=1)
    try:
        channel, ccw = subchannel_of(transport)
        transport.wait_interrupt(0)
        transport.write_status(0)
        # Revision 1 has no READ_STATUS: the reset is done once VDEV_RESET ended.
        assert transport.read_status() == 0 and device.status == 0
        indicators = transport.memory.read(transport.indicators_address, 8)
        ios = channel.io_interrupts
        ccw.queue_interrupt(0, 0xFFFF)
        ccw.config_interrupt(0xFFFF)
        device.update_config(0, bytes(device.config[:8]))
        assert channel.io_interrupts == ios and not ccw.status_pending
        assert transport.memory.read(transport.indicators_address, 8) == indicators
        # And it comes back.
        driver.initialize()
        driver.write(0, b"again".ljust(512, b"\0"))
        assert driver.read(0, 512).startswith(b"again")
    finally:
        device.close()


# -- anything a driver can write ----------------------------------------------------------


class Watched:
    """Guest memory that counts attempts to reach outside it (they fail, as in GuestMemory)."""

    def __init__(self, size: int) -> None:
        self.memory = GuestMemory()
        self.memory.add(0, bytearray(size))
        self.size = size
        self.outside = 0

    def _check(self, addr: int, length: int) -> None:
        if addr < 0 or length < 0 or addr + length > self.size:
            self.outside += 1

    def view(self, addr: int, length: int) -> memoryview:
        self._check(addr, length)
        return self.memory.view(addr, length)

    def iovecs(self, addr: int, length: int) -> list[memoryview]:
        self._check(addr, length)
        return self.memory.iovecs(addr, length)

    def read(self, addr: int, length: int) -> bytes:
        self._check(addr, length)
        return self.memory.read(addr, length)

    def write(self, addr: int, data: bytes | bytearray | memoryview) -> None:
        self._check(addr, len(data))
        self.memory.write(addr, data)


SMALL = 1 << 16
CODES = sorted(COMMAND_NAMES)
SLOTS = [DATA + 0x40 * i for i in range(4)]
# Well-formed commands too (right count and payload), so that random programs also get
# deep into the device: past the revision, through the status sequence, to live queues.
WELL_FORMED = [
    *((CCW_CMD_SET_VIRTIO_REV, REV_INFO.pack(revision=r, length=0)) for r in REVISIONS),
    *(
        (CCW_CMD_WRITE_STATUS, bytes([v]))
        for v in (
            S.ACKNOWLEDGE,
            S.ACKNOWLEDGE | S.DRIVER,
            S.ACKNOWLEDGE | S.DRIVER | S.FEATURES_OK,
            ALL_STATUS,
            S.ACKNOWLEDGE | S.DRIVER | S.DRIVER_OK,  # the legacy way to go live
        )
    ),
    (CCW_CMD_WRITE_FEAT, FEATURE_DESC.pack(features=1, index=1)),
    (CCW_CMD_READ_FEAT, FEATURE_DESC.pack(index=0)),
    (CCW_CMD_SET_VQ, VQ_INFO_BLOCK.pack(desc=RING, index=0, size=8, driver=RING + 0x100)),
    (CCW_CMD_SET_VQ, VQ_INFO_BLOCK_LEGACY.pack(queue=0x4000, align=4096, index=0, size=8)),
    (CCW_CMD_READ_VQ_CONF, VQ_CONFIG_BLOCK.pack(index=0)),
    (CCW_CMD_SET_IND, INDICATOR_ADDRESS.pack(address=0x3000)),
    (CCW_CMD_SET_CONF_IND, INDICATOR_ADDRESS.pack(address=0x3008)),
    (
        CCW_CMD_SET_IND_ADAPTER,
        THININT_AREA.pack(summary_indicator=0x3100, indicator=0x3200, bit_nr=3, isc=2),
    ),
    (CCW_CMD_READ_STATUS, b"\0"),
    (CCW_CMD_VDEV_RESET, b""),
]
well_formed = st.builds(
    lambda pair, flags, slot: (pair[0], flags, len(pair[1]), slot, pair[1]),
    st.sampled_from(WELL_FORMED),
    st.sampled_from([0, CcwFlag.CC, CcwFlag.SLI]),
    st.sampled_from(SLOTS),
)
ccws = well_formed | st.tuples(
    st.sampled_from(CODES) | st.integers(0, 255),
    st.sampled_from([0, CcwFlag.CC, CcwFlag.SLI, CcwFlag.CC | CcwFlag.SLI, CcwFlag.CD])
    | st.integers(0, 255),
    st.sampled_from([0, 1, 4, 5, 8, 16, 25, 32]) | st.integers(0, 0xFFFF),
    st.sampled_from(SLOTS) | st.integers(0, 0xFFFFFFFF),
    st.binary(max_size=32),
)
# The way a driver brings the device up, one program per step ("bring-up" runs a prefix).
BRING_UP = [
    (CCW_CMD_SET_VIRTIO_REV, REV_INFO.pack(revision=2, length=0)),
    (CCW_CMD_WRITE_STATUS, bytes([S.ACKNOWLEDGE])),
    (CCW_CMD_WRITE_STATUS, bytes([S.ACKNOWLEDGE | S.DRIVER])),
    (CCW_CMD_WRITE_FEAT, FEATURE_DESC.pack(features=1, index=1)),
    (CCW_CMD_WRITE_STATUS, bytes([S.ACKNOWLEDGE | S.DRIVER | S.FEATURES_OK])),
    (CCW_CMD_SET_IND, INDICATOR_ADDRESS.pack(address=0x3000)),
    (CCW_CMD_SET_CONF_IND, INDICATOR_ADDRESS.pack(address=0x3008)),
    (CCW_CMD_SET_VQ, VQ_INFO_BLOCK.pack(desc=RING, index=0, size=8, driver=RING + 0x100)),
    (CCW_CMD_WRITE_STATUS, bytes([ALL_STATUS])),
]
operations = st.one_of(
    st.tuples(st.just("program"), st.lists(ccws, min_size=1, max_size=5)),
    st.tuples(st.just("bring-up"), st.integers(1, len(BRING_UP))),
    st.tuples(st.just("start"), st.integers(0, 0xFFFFFFFF)),
    st.tuples(
        st.just("notify"),
        st.sampled_from([DEFAULT_SCHID]) | st.integers(0, (1 << 64) - 1),
        st.sampled_from([0, 1, 0x10000]) | st.integers(0, 0xFFFFFFFF),
    ),
    st.tuples(st.just("enable")),
    st.tuples(st.just("tsch")),
)


def check(status: ChannelStatus, memory: Watched) -> None:
    assert status.cc in (0, 1, 3)
    if status.cc == 0:
        # A normal end, or one the driver can tell: unit check or a channel check.
        assert status.ok or status.unit_check or status.subchannel, status
    if memory.outside:
        # Reaching outside guest memory never looks like success.
        assert not status.ok, status
    memory.outside = 0


@pytest.mark.normative(N_BASIC_DEV)
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(operations, max_size=12))
def test_any_channel_program_is_answered_and_never_raises(
    ops: list[tuple[object, ...]],
) -> None:
    memory = Watched(SMALL)
    device = RngDevice()
    sink = Recorder()
    ccw = CcwDevice(device, memory, sink=sink, max_ccws=64)
    ccw.enable()
    for op in ops:
        memory.outside = 0
        status: ChannelStatus | None = None
        if op[0] == "program":
            program = op[1]
            assert isinstance(program, list)
            for i, (cmd, flags, count, cda, payload) in enumerate(program):
                memory.write(PROGRAM + 8 * i, Ccw(cmd, flags, count, cda).pack())
                if cda + len(payload) <= SMALL:
                    memory.write(cda, payload)
            memory.outside = 0
            status = ccw.start(PROGRAM)
        elif op[0] == "bring-up":
            steps = op[1]
            assert isinstance(steps, int)
            for cmd, payload in BRING_UP[:steps]:
                memory.write(DATA, payload)
                memory.write(PROGRAM, Ccw(cmd, 0, len(payload), DATA).pack())
                check(ccw.start(PROGRAM), memory)
        elif op[0] == "start":
            cpa = op[1]
            assert isinstance(cpa, int)
            status = ccw.start(cpa)
        elif op[0] == "notify":
            gpr2, data = op[1], op[2]
            assert isinstance(gpr2, int) and isinstance(data, int)
            ccw.hypercall_notify(gpr2, data, 0)
        elif op[0] == "enable":
            ccw.enable()
        else:
            ccw.test_subchannel()
        if status is not None:
            check(status, memory)
    # Whatever happened, a reset brings the device back.
    ccw.enable()
    ccw.test_subchannel()
    base = DATA
    memory.write(base, REV_INFO.pack(revision=1, length=0))
    memory.write(PROGRAM, Ccw(CCW_CMD_SET_VIRTIO_REV, CcwFlag.CC, 4, base).pack())
    memory.write(PROGRAM + 8, Ccw(CCW_CMD_VDEV_RESET, 0, 0, 0).pack())
    status = ccw.start(PROGRAM)
    assert status.ok, status
    assert device.status == 0 and device.needs_reset_reason is None


def test_guest_memory_errors_stay_inside_the_device() -> None:
    # The watched memory really refuses what lies outside: nothing is read from there.
    memory = Watched(SMALL)
    with pytest.raises(GuestMemoryError):
        memory.read(SMALL - 1, 2)
    ccw = CcwDevice(RngDevice(), memory)
    ccw.enable()
    memory.write(PROGRAM, Ccw(CCW_CMD_SENSE_ID, CcwFlag.SLI, 4, SMALL - 2).pack())
    status = ccw.start(PROGRAM)
    assert status.program_check and memory.outside
