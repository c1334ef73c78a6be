"""virtio-ccw: "Virtio Over Channel I/O", device side and driver side.

:class:`CcwDevice` is the device side: the virtual subchannel of a virtio
proxy device (control unit type 0x3832, model = the virtio device id). It
runs channel programs of format-1 CCWs out of guest memory (command
chaining, data chaining, transfer in channel, the suppress-length and skip
flags), answers the basic commands (NO-OPERATION, BASIC SENSE, SENSE ID)
and the virtio-ccw commands of revisions 0, 1 and 2, and maps them onto the
core's device transport seam. The ending status of a program is a
:class:`ChannelStatus` (what TEST SUBCHANNEL would store in the SCSW, with
the sense bytes as concurrent sense). Available buffer notifications arrive
through :meth:`CcwDevice.hypercall_notify` (DIAGNOSE 0x500, subcode 3); used
buffer and configuration change notifications leave as indicator bits in
guest memory and an I/O or adapter interrupt raised on a
:class:`CcwInterrupts` sink.

A driver that breaks the rules gets a unit check with command reject (and,
for a length the architecture checks, incorrect length); where it broke a
requirement rather than probed for an optional command, the device also
enters DEVICE_NEEDS_RESET naming the rule. Nothing a driver puts in guest
memory makes the device raise: bad CCW or data addresses end the program
with a program check.

:class:`CcwTransport` is the driver side, a
:class:`~virtio.core.driver.DriverTransport` over any :class:`Channel` (start
a channel program, the notify hypercall, wait for an interrupt, TEST
SUBCHANNEL). It checks SENSE ID, selects the highest revision the device
takes, sets up classic or two-stage (adapter) indicators, and drives a
revision 0 device through the legacy interface. :class:`LocalChannel` joins
the two in one process; :func:`ccw_loopback` builds any device type with it.

The channel structures are big-endian (s390 is); the feature words of
virtio_feature_desc are little-endian, as the spec says. Through revision 0
(legacy) rings and configuration fields use the guest's byte order, which
for s390 is big-endian too.

Not modelled: indirect data addressing (IDA/MIDA) and suspend of channel
programs end in a program check; the virtqueue reset (VIRTIO_F_RING_RESET),
the admin virtqueue and shared memory regions are reserved for future use on
channel I/O and are neither offered nor accepted.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from virtio.core.device import VirtioDevice
from virtio.core.driver import count_queues
from virtio.core.registers import DeviceRegisters
from virtio.core.status import Interface
from virtio.errors import GuestMemoryError, NegotiationError, SpecViolation, VirtioError
from virtio.layout import ByteOrder, Layout, be16, be32, be64, le32, u8
from virtio.memory import Allocator, GuestMemory, Memory
from virtio.queue import RingLayout
from virtio.queue.common import LEGACY_QUEUE_ALIGN
from virtio.spec import features as F
from virtio.spec.status import DeviceStatus as S
from virtio.transport.blocking import serve_events, wait_until

log = logging.getLogger("virtio.transport.ccw")

_SEC = "Virtio Transport Options / Virtio over channel I/O"
N_BASIC_DEV = f"devicenormative:{_SEC} / Basic Concepts"
N_BASIC_DRV = f"drivernormative:{_SEC} / Basic Concepts"
N_REV_DEV = f"devicenormative:{_SEC} / Device Initialization / Setting the Virtio Revision"
N_REV_DRV = f"drivernormative:{_SEC} / Device Initialization / Setting the Virtio Revision"
N_VQ_DEV = f"devicenormative:{_SEC} / Device Initialization / Configuring a Virtqueue"
N_STATUS_DEV = f"devicenormative:{_SEC} / Device Initialization / Communicating Status Information"
N_STATUS_DRV = f"drivernormative:{_SEC} / Device Initialization / Communicating Status Information"
N_TWO_STAGE_DEV = (
    f"devicenormative:{_SEC} / Device Initialization / Setting Up Indicators / "
    "Setting Up Two-Stage Queue Indicators"
)
N_ADAPTER_DEV = (
    f"devicenormative:{_SEC} / Device Operation / Host->Guest Notification / "
    "Notification via Adapter I/O Interrupts"
)
N_ADAPTER_DRV = (
    f"drivernormative:{_SEC} / Device Operation / Host->Guest Notification / "
    "Notification via Adapter I/O Interrupts"
)
N_NOTIFY_DEV = f"devicenormative:{_SEC} / Device Operation / Guest->Host Notification"
N_NOTIFY_DRV = f"drivernormative:{_SEC} / Device Operation / Guest->Host Notification"
N_RESET_DEV = f"devicenormative:{_SEC} / Device Operation / Resetting Devices"
N_RESET_DRV = f"drivernormative:{_SEC} / Device Operation / Resetting Devices"
N_INIT_DRV = "drivernormative:General Initialization And Device Operation / Device Initialization"
N_FEATURES_DRV = "drivernormative:Basic Facilities of a Virtio Device / Feature Bits"
# Rules in the chapter's running text, outside any normative block: named by section.
SEC_INDICATORS = f"sec:{_SEC} / Device Initialization / Setting Up Indicators"

#: The control unit type of every virtio-ccw proxy device (its model is the device id).
CU_TYPE = 0x3832
#: The channel path type of the virtual channel path.
CHPID_TYPE = 0x32

# The basic channel commands every channel device answers.
CCW_CMD_NOOP = 0x03
CCW_CMD_BASIC_SENSE = 0x04
CCW_CMD_TIC = 0x08
CCW_CMD_SENSE_ID = 0xE4
# The virtio-ccw commands ("Channel Commands for Virtio").
CCW_CMD_SET_VQ = 0x13
CCW_CMD_VDEV_RESET = 0x33
CCW_CMD_SET_IND = 0x43
CCW_CMD_SET_CONF_IND = 0x53
CCW_CMD_SET_IND_ADAPTER = 0x73
CCW_CMD_READ_FEAT = 0x12
CCW_CMD_WRITE_FEAT = 0x11
CCW_CMD_READ_CONF = 0x22
CCW_CMD_WRITE_CONF = 0x21
CCW_CMD_WRITE_STATUS = 0x31
CCW_CMD_READ_VQ_CONF = 0x32
CCW_CMD_SET_VIRTIO_REV = 0x83
CCW_CMD_READ_STATUS = 0x72

COMMAND_NAMES: dict[int, str] = {
    CCW_CMD_NOOP: "NOOP",
    CCW_CMD_BASIC_SENSE: "BASIC_SENSE",
    CCW_CMD_TIC: "TIC",
    CCW_CMD_SENSE_ID: "SENSE_ID",
    CCW_CMD_SET_VQ: "SET_VQ",
    CCW_CMD_VDEV_RESET: "VDEV_RESET",
    CCW_CMD_SET_IND: "SET_IND",
    CCW_CMD_SET_CONF_IND: "SET_CONF_IND",
    CCW_CMD_SET_IND_ADAPTER: "SET_IND_ADAPTER",
    CCW_CMD_READ_FEAT: "READ_FEAT",
    CCW_CMD_WRITE_FEAT: "WRITE_FEAT",
    CCW_CMD_READ_CONF: "READ_CONF",
    CCW_CMD_WRITE_CONF: "WRITE_CONF",
    CCW_CMD_WRITE_STATUS: "WRITE_STATUS",
    CCW_CMD_READ_VQ_CONF: "READ_VQ_CONF",
    CCW_CMD_SET_VIRTIO_REV: "SET_VIRTIO_REV",
    CCW_CMD_READ_STATUS: "READ_STATUS",
}
_REV0_COMMANDS = frozenset(
    {
        CCW_CMD_SET_VQ,
        CCW_CMD_VDEV_RESET,
        CCW_CMD_SET_IND,
        CCW_CMD_SET_CONF_IND,
        CCW_CMD_SET_IND_ADAPTER,
        CCW_CMD_READ_FEAT,
        CCW_CMD_WRITE_FEAT,
        CCW_CMD_READ_CONF,
        CCW_CMD_WRITE_CONF,
        CCW_CMD_WRITE_STATUS,
        CCW_CMD_READ_VQ_CONF,
        CCW_CMD_SET_VIRTIO_REV,
    }
)
#: The virtio-ccw commands each revision contains (revision 2 adds READ_STATUS).
REVISION_COMMANDS: dict[int, frozenset[int]] = {
    0: _REV0_COMMANDS,
    1: _REV0_COMMANDS,
    2: _REV0_COMMANDS | {CCW_CMD_READ_STATUS},
}
VIRTIO_COMMANDS = REVISION_COMMANDS[2]
MAX_REVISION = 2


def command_name(cmd: int) -> str:
    return COMMAND_NAMES.get(cmd, f"command {cmd:#04x}")


class CcwFlag(enum.IntFlag):
    """The flags byte of a CCW."""

    CD = 0x80  # chain data: the next CCW continues this one's data area
    CC = 0x40  # chain command: run the next CCW after this one ends normally
    SLI = 0x20  # suppress length indication
    SKIP = 0x10  # read commands: transfer nothing to storage
    PCI = 0x08  # program-controlled interruption
    IDA = 0x04  # indirect data addressing
    S = 0x02  # suspend
    MIDA = 0x01  # modified indirect data addressing


class UnitStatus(enum.IntFlag):
    """The device status byte of the SCSW."""

    ATTENTION = 0x80
    STATUS_MODIFIER = 0x40
    CONTROL_UNIT_END = 0x20
    BUSY = 0x10
    CHANNEL_END = 0x08
    DEVICE_END = 0x04
    UNIT_CHECK = 0x02
    UNIT_EXCEPTION = 0x01


class SubchannelStatus(enum.IntFlag):
    """The subchannel status byte of the SCSW."""

    PCI = 0x80
    INCORRECT_LENGTH = 0x40
    PROGRAM_CHECK = 0x20
    PROTECTION_CHECK = 0x10
    CHANNEL_DATA_CHECK = 0x08
    CHANNEL_CONTROL_CHECK = 0x04
    INTERFACE_CONTROL_CHECK = 0x02
    CHAINING_CHECK = 0x01


#: Sense byte 0: the device rejected the command.
SENSE_COMMAND_REJECT = 0x80
SENSE_SIZE = 32
SENSE_ID_SIZE = 256
_DONE = int(UnitStatus.CHANNEL_END | UnitStatus.DEVICE_END)
_UNIT_CHECK = _DONE | int(UnitStatus.UNIT_CHECK)

# The wire structures.
CCW1 = Layout("ccw1", [("cmd_code", u8), ("flags", u8), ("count", be16), ("cda", be32)])
FEATURE_DESC = Layout("virtio_feature_desc", [("features", le32), ("index", u8)])
VQ_INFO_BLOCK = Layout(
    "vq_info_block",
    [
        ("desc", be64),
        ("res0", be32),
        ("index", be16),
        ("size", be16),
        ("driver", be64),
        ("device", be64),
    ],
)
VQ_INFO_BLOCK_LEGACY = Layout(
    "vq_info_block_legacy", [("queue", be64), ("align", be32), ("index", be16), ("size", be16)]
)
VQ_CONFIG_BLOCK = Layout("vq_config_block", [("index", be16), ("max_queue_size", be16)])
REV_INFO = Layout("virtio_rev_info", [("revision", be16), ("length", be16)])
THININT_AREA = Layout(
    "virtio_thinint_area",
    [("summary_indicator", be64), ("indicator", be64), ("bit_nr", be64), ("isc", u8)],
)
INDICATOR_ADDRESS = Layout("indicator address", [("address", be64)])
INDICATORS = Layout("indicators", [("bits", be64)])
STATUS_BYTE = Layout("status", [("status", u8)])

#: Feature bits "reserved for future use" on channel I/O: never offered, never accepted.
CCW_RESERVED_FEATURES = 1 << F.VIRTIO_F_RING_RESET | 1 << F.VIRTIO_F_ADMIN_VQ
#: Classic queue indicators are one 64-bit value: one bit per queue.
CLASSIC_INDICATOR_BITS = 64
#: KVM's ring alignment for the legacy layout on s390.
CCW_RING_ALIGN = LEGACY_QUEUE_ALIGN
_EINVAL = 22
_ENODEV = 19
_ADDRESS_31 = 1 << 31


def _ints(layout: Layout, data: bytes) -> tuple[int, ...]:
    return tuple(int(v) for v in layout.unpack_raw(data))


def subchannel_id(sch_no: int, *, ssid: int = 0) -> int:
    """The 32-bit subchannel id word (the "one" bit, subchannel set, number)."""
    if not 0 <= sch_no <= 0xFFFF or not 0 <= ssid <= 3:
        raise ValueError(f"subchannel 0.{ssid}.{sch_no:04x} does not exist")
    return ssid << 17 | 1 << 16 | sch_no


DEFAULT_SCHID = subchannel_id(0)


@dataclass(frozen=True)
class Ccw:
    """A format-1 channel command word."""

    cmd: int
    flags: int = 0
    count: int = 0
    cda: int = 0

    SIZE = 8

    def pack(self) -> bytes:
        return CCW1.pack_raw(self.cmd, self.flags, self.count, self.cda)

    @classmethod
    def unpack(cls, raw: bytes) -> Ccw:
        cmd, flags, count, cda = _ints(CCW1, raw)
        return cls(cmd, flags, count, cda)


@dataclass(frozen=True)
class ChannelStatus:
    """How START SUBCHANNEL went and how its channel program ended.

    ``cc`` is the condition code (0: started, and the rest is the ending
    status; 1: an interrupt is pending, do TEST SUBCHANNEL first; 3: not
    operational, the subchannel is not enabled). ``device`` and
    ``subchannel`` are the SCSW status bytes, ``cpa`` points past the last
    CCW executed, ``residual`` is what its count did not transfer, and
    ``sense`` the sense bytes after a unit check (concurrent sense).
    """

    cc: int = 0
    device: int = 0
    subchannel: int = 0
    cpa: int = 0
    residual: int = 0
    sense: bytes = bytes(SENSE_SIZE)

    @property
    def ok(self) -> bool:
        return self.cc == 0 and self.device == _DONE and self.subchannel == 0

    @property
    def unit_check(self) -> bool:
        return bool(self.device & UnitStatus.UNIT_CHECK)

    @property
    def command_reject(self) -> bool:
        return self.unit_check and bool(self.sense[0] & SENSE_COMMAND_REJECT)

    @property
    def incorrect_length(self) -> bool:
        return bool(self.subchannel & SubchannelStatus.INCORRECT_LENGTH)

    @property
    def program_check(self) -> bool:
        return bool(self.subchannel & SubchannelStatus.PROGRAM_CHECK)

    def __str__(self) -> str:
        if self.cc:
            return f"cc {self.cc}"
        text = (
            f"device {UnitStatus(self.device)!r}, subchannel {SubchannelStatus(self.subchannel)!r}"
        )
        return text + (f", sense {self.sense[0]:#04x}" if self.unit_check else "")


class CcwInterrupts(Protocol):
    """How the host presents the device's interrupts to the guest."""

    def io_interrupt(self, schid: int) -> None:
        """An (unsolicited) I/O interrupt is now pending for the subchannel."""

    def adapter_interrupt(self, isc: int) -> None:
        """An adapter I/O interrupt for interruption subclass ``isc``."""


class _Reject(Exception):
    """End the command with unit check, command reject (and maybe incorrect length)."""

    def __init__(
        self,
        reason: str,
        normative: str | None = None,
        *,
        violation: bool = True,
        incorrect_length: bool = False,
    ) -> None:
        super().__init__(reason)
        self.reason = reason
        self.normative = normative
        # False: the driver may probe for this (an optional command or revision).
        self.violation = violation
        self.incorrect_length = incorrect_length


class _ProgramCheck(Exception):
    """The channel program itself is invalid (bad CCW, bad address)."""


@dataclass(frozen=True)
class _Adapter:
    summary: int
    indicator: int
    bit_nr: int
    isc: int


class _Data:
    """The data area of one command, as the channel presents it to the device.

    Data chaining joins the areas of several CCWs; the skip flag keeps a
    read command's data out of storage. Any address outside guest memory is
    a program check, never an access.
    """

    def __init__(self, memory: Memory, segments: list[tuple[int, int, bool]]) -> None:
        self.memory = memory
        self.segments = segments
        self.count = sum(n for _, n, _ in segments)

    def read(self, length: int) -> bytes:
        out = bytearray()
        for addr, n, _skip in self.segments:
            take = min(n, length - len(out))
            if take <= 0:
                break
            try:
                out += self.memory.read(addr, take)
            except GuestMemoryError as err:
                raise _ProgramCheck(f"data address {addr:#x}+{take}: {err}") from err
        return bytes(out)

    def write(self, data: bytes) -> None:
        pos = 0
        for addr, n, skip in self.segments:
            take = min(n, len(data) - pos)
            if take <= 0:
                break
            if not skip:
                try:
                    self.memory.write(addr, data[pos : pos + take])
                except GuestMemoryError as err:
                    raise _ProgramCheck(f"data address {addr:#x}+{take}: {err}") from err
            pos += take


def _check_length(data: _Data, expected: int, sli: bool, what: str) -> None:
    """The length rules of "Basic Concepts" for a command of fixed size ``expected``."""
    count = data.count
    if count == expected:
        return
    if sli:
        if count < expected:
            # Length checks off, but not enough data to act on: a check condition.
            raise _Reject(f"{what} with {count} bytes, it needs {expected}", N_BASIC_DRV)
        log.debug("%s with %d bytes (needs %d) and SLI: accepted", what, count, expected)
        return
    raise _Reject(
        f"{what} with count {count}, expected {expected} (length checks on)",
        N_BASIC_DRV,
        incorrect_length=True,
    )


# A command's handler: given the data area and SLI, the length it offered or needed.
Handler = Callable[[_Data, bool], int]


class CcwDevice:
    """The virtual subchannel of a virtio-ccw proxy device (the device side of the transport).

    ``max_revision`` is the highest revision the device accepts;
    a ``transitional`` device also accepts revision 0 (the legacy
    interface) and takes a driver that starts without SET_VIRTIO_REV for a
    legacy driver. ``adapter`` says whether the device supports two-stage
    (adapter) indicators, ``legacy_adapter`` whether it does so at revision 0
    too (some legacy devices do not). ``memory`` is the guest memory the
    channel programs and indicators are in; it is attached to the device
    for its rings too. The subchannel starts disabled: the driver enables it
    (MODIFY SUBCHANNEL) with :meth:`enable`.
    """

    def __init__(
        self,
        device: VirtioDevice,
        memory: Memory,
        *,
        schid: int = DEFAULT_SCHID,
        max_revision: int = MAX_REVISION,
        transitional: bool = True,
        adapter: bool = True,
        legacy_adapter: bool = True,
        legacy_order: ByteOrder = "big",
        sink: CcwInterrupts | None = None,
        max_ccws: int = 1024,
    ) -> None:
        if not 0 <= max_revision <= MAX_REVISION or (max_revision == 0 and not transitional):
            raise ValueError(f"virtio-ccw revision {max_revision} (0..{MAX_REVISION})")
        self.device = device
        self.memory = memory
        self.schid = schid
        self.max_revision = max_revision
        self.transitional = transitional
        self.adapter_capable = adapter
        self.legacy_adapter = legacy_adapter
        self.legacy_order: ByteOrder = legacy_order
        self.sink = sink
        self.max_ccws = max_ccws
        self.registers = DeviceRegisters(device, interrupts=self, legacy_order=legacy_order)
        self.registers.attach_memory(memory)
        self.enabled = False
        #: The selected revision (None: unset); ``implied``: a legacy driver never set it.
        self.revision: int | None = None
        self.implied = False
        self.sense = bytearray(SENSE_SIZE)
        #: An unsolicited I/O interrupt is pending (until TEST SUBCHANNEL).
        self.status_pending = False
        self.indicators: int | None = None
        self.config_indicators: int | None = None
        self.adapter: _Adapter | None = None
        self.programs = 0
        self.cookie_hits = 0
        self._handlers: dict[int, Handler] = {
            CCW_CMD_NOOP: self._noop,
            CCW_CMD_BASIC_SENSE: self._basic_sense,
            CCW_CMD_SENSE_ID: self._sense_id,
            CCW_CMD_SET_VIRTIO_REV: self._set_virtio_rev,
            CCW_CMD_READ_FEAT: self._read_feat,
            CCW_CMD_WRITE_FEAT: self._write_feat,
            CCW_CMD_READ_CONF: self._read_conf,
            CCW_CMD_WRITE_CONF: self._write_conf,
            CCW_CMD_WRITE_STATUS: self._write_status,
            CCW_CMD_READ_STATUS: self._read_status,
            CCW_CMD_READ_VQ_CONF: self._read_vq_conf,
            CCW_CMD_SET_VQ: self._set_vq,
            CCW_CMD_SET_IND: self._set_ind,
            CCW_CMD_SET_CONF_IND: self._set_conf_ind,
            CCW_CMD_SET_IND_ADAPTER: self._set_ind_adapter,
            CCW_CMD_VDEV_RESET: self._vdev_reset,
        }

    # -- the subchannel -------------------------------------------------------------------

    def enable(self) -> None:
        """The driver enables the subchannel: from now until SET_VIRTIO_REV, no revision."""
        self.enabled = True
        self.revision = None
        self.implied = False

    def disable(self) -> None:
        self.enabled = False

    def test_subchannel(self) -> bool:
        """TEST SUBCHANNEL: whether an unsolicited interrupt was pending; clears it."""
        pending, self.status_pending = self.status_pending, False
        return pending

    def start(self, cpa: int) -> ChannelStatus:
        """START SUBCHANNEL with the channel program at guest address ``cpa``; runs it."""
        if not self.enabled:
            return ChannelStatus(cc=3)
        if self.status_pending:
            return ChannelStatus(cc=1)
        self.programs += 1
        addr, fetched, first, after_tic = cpa, 0, True, False
        while True:
            started = False
            count = 0
            try:
                fetched += 1
                if fetched > self.max_ccws:
                    raise _ProgramCheck(f"channel program runs past {self.max_ccws} CCWs")
                ccw = self._fetch(addr)
                if ccw.cmd & 0x0F == CCW_CMD_TIC:
                    if first or after_tic:
                        raise _ProgramCheck("TIC as the first CCW, or TIC to a TIC")
                    addr, after_tic = ccw.cda, True
                    continue
                first = after_tic = False
                segments, flags, last = self._data_chain(addr, ccw)
                count = sum(n for _, n, _ in segments)
                started = True
                outcome = self._run_command(ccw.cmd, _Data(self.memory, segments), flags)
            except _ProgramCheck as err:
                log.info("subchannel %#x: program check at CCW %#x: %s", self.schid, addr, err)
                return ChannelStatus(
                    device=_DONE if started else 0,
                    subchannel=SubchannelStatus.PROGRAM_CHECK,
                    cpa=addr + Ccw.SIZE,
                    residual=count,
                )
            next_ccw = last + Ccw.SIZE
            device, subchannel, residual = outcome
            # Chaining goes on only after a normal end (incorrect length stops it too).
            if device != _DONE or subchannel or not flags & CcwFlag.CC:
                return ChannelStatus(
                    device=device,
                    subchannel=subchannel,
                    cpa=next_ccw,
                    residual=residual,
                    sense=bytes(self.sense),
                )
            addr = next_ccw

    def _fetch(self, addr: int) -> Ccw:
        if addr % 8 or not 0 <= addr < _ADDRESS_31:
            raise _ProgramCheck(f"CCW address {addr:#x} is not a doubleword below 2 GiB")
        try:
            return Ccw.unpack(self.memory.read(addr, Ccw.SIZE))
        except GuestMemoryError as err:
            raise _ProgramCheck(f"CCW at {addr:#x}: {err}") from err

    def _data_chain(self, addr: int, ccw: Ccw) -> tuple[list[tuple[int, int, bool]], int, int]:
        """The data segments of a command (following CD), its last flags and CCW address."""
        segments: list[tuple[int, int, bool]] = []
        while True:
            if ccw.flags & (CcwFlag.IDA | CcwFlag.MIDA | CcwFlag.S):
                raise _ProgramCheck(f"CCW flags {CcwFlag(ccw.flags)!r}: not supported here")
            if ccw.count and ccw.cda & _ADDRESS_31:
                raise _ProgramCheck(f"data address {ccw.cda:#x} is not a 31-bit address")
            segments.append((ccw.cda, ccw.count, bool(ccw.flags & CcwFlag.SKIP)))
            if not ccw.flags & CcwFlag.CD:
                return segments, ccw.flags, addr
            if not ccw.count:
                raise _ProgramCheck("a zero count with chain data")
            if len(segments) >= self.max_ccws:
                raise _ProgramCheck(f"data chain runs past {self.max_ccws} CCWs")
            addr += Ccw.SIZE
            ccw = self._fetch(addr)
            if ccw.cmd & 0x0F == CCW_CMD_TIC:
                raise _ProgramCheck("TIC in a data chain is not supported here")

    def _run_command(self, cmd: int, data: _Data, flags: int) -> tuple[int, int, int]:
        """Execute one command: (device status, subchannel status, residual count)."""
        sli = bool(flags & CcwFlag.SLI)
        if cmd != CCW_CMD_BASIC_SENSE:
            self.sense[:] = bytes(SENSE_SIZE)
        device = self.device
        was_failed = bool(device.status & S.DEVICE_NEEDS_RESET)
        try:
            handler = self._handlers.get(cmd)
            if handler is None:
                raise _Reject(f"unsupported {command_name(cmd)}", N_BASIC_DEV, violation=False)
            if cmd in VIRTIO_COMMANDS:
                self._check_revision(cmd)
            length = handler(data, sli)
            if not was_failed and device.status & S.DEVICE_NEEDS_RESET:
                # The command made the device fail (the core named the rule): it did not succeed.
                raise _Reject(device.needs_reset_reason or "device failed", violation=False)
        except _Reject as err:
            where = f" [{err.normative}]" if err.normative else ""
            log.info("subchannel %#x: command reject: %s%s", self.schid, err.reason, where)
            self.sense[0] = SENSE_COMMAND_REJECT
            if err.violation:
                device.fail(err.reason, err.normative)
            il = SubchannelStatus.INCORRECT_LENGTH if err.incorrect_length else 0
            return _UNIT_CHECK, int(il), data.count
        except SpecViolation as err:
            # A rule the core checks, raised rather than recorded: record it, reject.
            device.fail(err.message, err.normative)
            self.sense[0] = SENSE_COMMAND_REJECT
            return _UNIT_CHECK, 0, data.count
        # ``length`` is what the command offered or needed; a count that differs is an
        # incorrect length, unless the driver suppressed the indication.
        residual = data.count - min(length, data.count)
        if length != data.count and not sli:
            return _DONE, int(SubchannelStatus.INCORRECT_LENGTH), residual
        return _DONE, 0, residual

    def _check_revision(self, cmd: int) -> None:
        if self.revision is None:
            if cmd == CCW_CMD_SET_VIRTIO_REV:
                return
            if not self.transitional:
                raise _Reject(f"{command_name(cmd)} before SET_VIRTIO_REV", N_REV_DRV)
            # A legacy driver: carry on as if it had selected revision 0.
            log.info(
                "subchannel %#x: %s without a revision: a legacy driver",
                self.schid,
                command_name(cmd),
            )
            self._select(0, implied=True)
        if cmd == CCW_CMD_SET_VIRTIO_REV:
            return  # the handler knows when a second selection is allowed
        if cmd not in REVISION_COMMANDS[self.revision or 0]:
            normative = N_STATUS_DRV if cmd == CCW_CMD_READ_STATUS else N_REV_DEV
            raise _Reject(f"{command_name(cmd)} is not in revision {self.revision}", normative)

    def _select(self, revision: int, *, implied: bool = False) -> None:
        self.revision = revision
        self.implied = implied
        interface = Interface.LEGACY if revision == 0 else Interface.MODERN
        self.registers.use_interface(interface, self.legacy_order)  # resets the device
        self._forget_indicators()

    def _forget_indicators(self) -> None:
        self.indicators = self.config_indicators = None
        self.adapter = None

    def _mapped(self, addr: int, length: int) -> bool:
        try:
            self.memory.iovecs(addr, length)
        except GuestMemoryError:
            return False
        return True

    def _failed_since(self, was_failed: bool) -> None:
        device = self.device
        if not was_failed and device.status & S.DEVICE_NEEDS_RESET:
            raise _Reject(device.needs_reset_reason or "device failed", violation=False)

    # -- the basic commands -----------------------------------------------------------------

    def _noop(self, data: _Data, sli: bool) -> int:
        return data.count  # transfers nothing and ends normally

    def _basic_sense(self, data: _Data, sli: bool) -> int:
        sense = bytes(self.sense)
        data.write(sense[: data.count])
        self.sense[:] = bytes(SENSE_SIZE)
        return SENSE_SIZE

    def _sense_id(self, data: _Data, sli: bool) -> int:
        # reserved 0xff, control unit type 0x3832, model = the virtio device id, the rest 0.
        ident = bytes([0xFF, CU_TYPE >> 8, CU_TYPE & 0xFF, self.registers.device_id & 0xFF])
        data.write(ident.ljust(SENSE_ID_SIZE, b"\0")[: data.count])
        return SENSE_ID_SIZE

    # -- the virtio-ccw commands --------------------------------------------------------

    def _set_virtio_rev(self, data: _Data, sli: bool) -> int:
        if data.count < REV_INFO.size:
            _check_length(data, REV_INFO.size, sli, "SET_VIRTIO_REV")
        revision, length = _ints(REV_INFO, data.read(REV_INFO.size))
        _check_length(data, REV_INFO.size + length, sli, "SET_VIRTIO_REV")
        if self.revision is not None:
            if self.implied:
                raise _Reject("SET_VIRTIO_REV after commands of revision 0", N_REV_DEV)
            if revision != self.revision:
                raise _Reject(
                    f"driver selected revision {revision} after revision {self.revision}",
                    N_REV_DRV,
                )
            return REV_INFO.size + length  # the same revision again: nothing changes
        if length:
            raise _Reject(f"revision {revision} with {length} bytes of data", violation=False)
        if revision > self.max_revision or (revision == 0 and not self.transitional):
            raise _Reject(f"revision {revision} is not supported", N_REV_DEV, violation=False)
        self._select(revision)
        return REV_INFO.size

    def _read_feat(self, data: _Data, sli: bool) -> int:
        _check_length(data, FEATURE_DESC.size, sli, "READ_FEAT")
        # The driver names the word in the same area the device stores it to.
        index = data.read(FEATURE_DESC.size)[FEATURE_DESC.offset_of("index")]
        regs = self.registers
        regs.device_feature_select = index
        reserved = CCW_RESERVED_FEATURES >> (32 * index) & 0xFFFFFFFF if index < 2 else 0
        data.write((regs.device_feature & ~reserved).to_bytes(4, "little"))
        return FEATURE_DESC.size

    def _write_feat(self, data: _Data, sli: bool) -> int:
        _check_length(data, FEATURE_DESC.size, sli, "WRITE_FEAT")
        features, index = _ints(FEATURE_DESC, data.read(FEATURE_DESC.size))
        regs = self.registers
        regs.driver_feature_select = index
        regs.driver_feature = features
        return FEATURE_DESC.size

    def _config_count(self, data: _Data, sli: bool, what: str) -> int:
        # The driver transfers the space from its start, as far as it needs (at most all).
        size = self.registers.config_size
        if data.count <= size:
            return data.count
        if sli:
            return size
        raise _Reject(
            f"{what} of {data.count} bytes, the configuration space has {size}",
            N_BASIC_DRV,
            incorrect_length=True,
        )

    def _read_conf(self, data: _Data, sli: bool) -> int:
        n = self._config_count(data, sli, "READ_CONF")
        data.write(self.registers.read_config(0, n))
        return n

    def _write_conf(self, data: _Data, sli: bool) -> int:
        n = self._config_count(data, sli, "WRITE_CONF")
        new = data.read(n)
        regs = self.registers
        old = regs.read_config(0, n)
        # The whole space comes back: hand the seam only the bytes that changed, so a
        # field-wise device model sees writes of its fields, not of everything.
        pos = 0
        while pos < n:
            if new[pos] == old[pos]:
                pos += 1
                continue
            end = pos
            while end < n and new[end] != old[end]:
                end += 1
            regs.write_config(pos, new[pos:end])
            pos = end
        return n

    def _write_status(self, data: _Data, sli: bool) -> int:
        _check_length(data, STATUS_BYTE.size, sli, "WRITE_STATUS")
        value = data.read(1)[0]
        if value == 0:
            self._reset()
            return 1
        regs = self.registers
        before = regs.status
        if value & S.FEATURES_OK and not before & S.FEATURES_OK:
            regs.driver_feature_select = 1
            reserved = regs.driver_feature << 32 & CCW_RESERVED_FEATURES
            if reserved:
                raise _Reject(
                    f"refusing FEATURES_OK: features {reserved:#x} are reserved on channel I/O",
                    N_STATUS_DEV,
                    violation=False,
                )
        regs.status = value
        mask = 0xFF & ~int(S.DEVICE_NEEDS_RESET)
        if regs.status & mask == before & mask and value & mask != before & mask:
            # The device did not take the value: the status stays as it was.
            raise _Reject(
                f"device status stays {before:#x}, not {value:#x}", N_STATUS_DEV, violation=False
            )
        return 1

    def _read_status(self, data: _Data, sli: bool) -> int:
        _check_length(data, STATUS_BYTE.size, sli, "READ_STATUS")
        data.write(STATUS_BYTE.pack(status=self.registers.status & 0xFF))
        return 1

    def _read_vq_conf(self, data: _Data, sli: bool) -> int:
        _check_length(data, VQ_CONFIG_BLOCK.size, sli, "READ_VQ_CONF")
        index = _ints(VQ_CONFIG_BLOCK, data.read(VQ_CONFIG_BLOCK.size))[0]
        regs = self.registers
        regs.queue_select = index
        # A queue the device does not have (with the features so far) reads as size 0.
        data.write(VQ_CONFIG_BLOCK.pack(index=index, max_queue_size=regs.queue_max_size))
        return VQ_CONFIG_BLOCK.size

    def _set_vq(self, data: _Data, sli: bool) -> int:
        regs = self.registers
        legacy = self.revision == 0
        block = VQ_INFO_BLOCK_LEGACY if legacy else VQ_INFO_BLOCK
        _check_length(data, block.size, sli, "SET_VQ")
        raw = data.read(block.size)
        if legacy:
            address, align, index, size = _ints(block, raw)
            driver = device = 0
        else:
            # res0 is reserved: ignored, whatever it holds.
            address, _res0, index, size, driver, device = _ints(block, raw)
            align = 0
        if index >= regs.num_queues:
            raise _Reject(f"SET_VQ for queue {index}: the device has {regs.num_queues}", N_INIT_DRV)
        status = regs.status
        if status & S.DRIVER_OK:
            raise _Reject(
                f"SET_VQ for queue {index} after DRIVER_OK (no virtqueue reset on channel I/O)",
                N_INIT_DRV,
            )
        regs.queue_select = index
        if address == 0:
            regs.queue_enable = 0  # the driver takes the queue back
            return block.size
        if regs.queue_max_size == 0:
            raise _Reject(f"SET_VQ for queue {index}, absent with these features", N_INIT_DRV)
        if not legacy and not status & S.FEATURES_OK:
            raise _Reject(f"SET_VQ for queue {index} before FEATURES_OK", N_INIT_DRV)
        was_failed = bool(self.device.status & S.DEVICE_NEEDS_RESET)
        regs.queue_size = size
        self._failed_since(was_failed)
        if legacy:
            if align <= 0 or align & (align - 1) or address % align:
                raise _Reject(f"legacy queue {index} at {address:#x}, align {align}", N_INIT_DRV)
            layout = RingLayout.legacy(address, size, align)
            address, driver, device = layout.desc, layout.driver, layout.device
        regs.queue_desc = address
        regs.queue_driver = driver
        regs.queue_device = device
        regs.queue_enable = 1
        return block.size

    def _indicator_address(self, data: _Data, sli: bool, what: str) -> int:
        _check_length(data, INDICATOR_ADDRESS.size, sli, what)
        address = _ints(INDICATOR_ADDRESS, data.read(INDICATOR_ADDRESS.size))[0]
        if not self._mapped(address, INDICATORS.size):
            raise _Reject(f"{what}: indicators at {address:#x} are not in guest memory")
        return address

    def _set_ind(self, data: _Data, sli: bool) -> int:
        address = self._indicator_address(data, sli, "SET_IND")
        if self.adapter is not None:
            # The two mechanisms are mutually exclusive (Setting Up Classic Queue Indicators).
            raise _Reject("SET_IND after SET_IND_ADAPTER", SEC_INDICATORS)
        self.indicators = address
        return INDICATOR_ADDRESS.size

    def _set_conf_ind(self, data: _Data, sli: bool) -> int:
        self.config_indicators = self._indicator_address(data, sli, "SET_CONF_IND")
        return INDICATOR_ADDRESS.size

    def _set_ind_adapter(self, data: _Data, sli: bool) -> int:
        if not self.adapter_capable or (self.revision == 0 and not self.legacy_adapter):
            raise _Reject("adapter interrupts are not supported", violation=False)
        _check_length(data, THININT_AREA.size, sli, "SET_IND_ADAPTER")
        summary, indicator, bit_nr, isc = _ints(THININT_AREA, data.read(THININT_AREA.size))
        if self.indicators is not None:
            raise _Reject("SET_IND_ADAPTER after SET_IND", N_TWO_STAGE_DEV)
        if isc > 7:
            raise _Reject(f"SET_IND_ADAPTER: interruption subclass {isc} (0..7)")
        if not self._mapped(summary, 1) or not self._mapped(indicator + bit_nr // 8, 1):
            raise _Reject(
                f"SET_IND_ADAPTER: summary {summary:#x} or indicators {indicator:#x}"
                f" bit {bit_nr} are not in guest memory"
            )
        self.adapter = _Adapter(summary, indicator, bit_nr, isc)
        return THININT_AREA.size

    def _vdev_reset(self, data: _Data, sli: bool) -> int:
        _check_length(data, 0, sli, "VDEV_RESET")
        self._reset()
        return 0

    def _reset(self) -> None:
        # The reset is complete when the command ends: status 0, no queues, and no
        # indicators left to notify through.
        self.registers.status = 0
        self._forget_indicators()

    # -- notifications ----------------------------------------------------------------------

    def hypercall_notify(self, gpr2: int, data: int, cookie: int = 0) -> int:
        """DIAGNOSE 0x500 subcode 3: the driver notifies a queue; returns the host cookie.

        ``gpr2`` holds the subchannel id (its leftmost 32 bits are ignored),
        ``data`` the queue index or, with VIRTIO_F_NOTIFICATION_DATA, the
        notification data, ``cookie`` the cookie of the previous notification.
        A negative result is an error (no such subchannel or queue).
        """
        if gpr2 & 0xFFFFFFFF != self.schid or not self.enabled:
            return -_ENODEV
        queue = data & 0xFFFF
        exists = queue < self.registers.num_queues
        if exists and cookie == self._cookie(queue):
            self.cookie_hits += 1  # the cookie names the queue: no lookup needed
        self.registers.notify(data & 0xFFFFFFFF)
        return self._cookie(queue) if exists else -_EINVAL

    def _cookie(self, queue: int) -> int:
        return 1 << 62 | self.schid << 16 | queue

    # InterruptSink: the seam's notifications, turned into indicators and interrupts.

    def queue_interrupt(self, queue: int, vector: int) -> None:
        if self.adapter is not None:
            self._adapter_notify(self.adapter, queue)
        elif self.indicators is not None:
            if queue >= CLASSIC_INDICATOR_BITS:
                log.warning("queue %d has no classic indicator bit", queue)
                return
            self._set_indicator(self.indicators, 1 << queue)
        else:
            log.debug("queue %d: no indicators set up, no notification", queue)

    def config_interrupt(self, vector: int) -> None:
        # Configuration changes always use the classic indicators, bit 0.
        if self.config_indicators is not None:
            self._set_indicator(self.config_indicators, 1)

    def _set_indicator(self, address: int, bit: int) -> None:
        try:
            word = _ints(INDICATORS, self.memory.read(address, INDICATORS.size))[0]
            self.memory.write(address, INDICATORS.pack(bits=word | bit))
        except GuestMemoryError as err:
            log.warning("indicators at %#x: %s", address, err)
            return
        if not self.status_pending:
            self.status_pending = True
            if self.sink is not None:
                self.sink.io_interrupt(self.schid)

    def _adapter_notify(self, adapter: _Adapter, queue: int) -> None:
        bit = adapter.bit_nr + queue
        address = adapter.indicator + bit // 8
        try:
            # Bit numbers start at the left: bit 0 is the top bit of the first byte.
            byte = self.memory.read(address, 1)[0] | 0x80 >> bit % 8
            self.memory.write(address, bytes([byte]))
            prior = self.memory.read(adapter.summary, 1)[0]
            self.memory.write(adapter.summary, b"\x01")
        except GuestMemoryError as err:
            log.warning("adapter indicators for queue %d: %s", queue, err)
            return
        if not prior and self.sink is not None:
            # Only when the summary indicator was clear: one interrupt per summary.
            self.sink.adapter_interrupt(adapter.isc)


class Channel(Protocol):
    """How a driver reaches one virtio-ccw subchannel."""

    def enable(self) -> None:
        """Enable the subchannel (MODIFY SUBCHANNEL)."""

    def start(self, cpa: int) -> ChannelStatus:
        """START SUBCHANNEL on the program at ``cpa``; its ending status."""

    def test_subchannel(self) -> bool:
        """TEST SUBCHANNEL: clear a pending unsolicited interrupt (True if there was one)."""

    def notify(self, data: int, cookie: int) -> int:
        """The notify hypercall for this subchannel: the new host cookie, or < 0."""

    def wait_interrupt(self, timeout: float | None) -> bool:
        """Block until an I/O or adapter interrupt is pending (True) or ``timeout`` passes."""


class NoDevice(VirtioError):
    """The subchannel holds no virtio-ccw device (SENSE ID names another control unit)."""


class ChannelError(VirtioError):
    """A channel program the driver needed ended in an error."""


_SCRATCH = 4096


class CcwTransport:
    """The driver side of virtio-ccw: a DriverTransport over a :class:`Channel`.

    ``revision`` is the highest revision to try (then lower ones, down to 0
    when ``allow_legacy``). ``adapter`` asks for two-stage indicators (with
    interruption subclass ``isc`` and the queue bits from ``adapter_bit``),
    falling back to classic indicators when the device rejects them.
    """

    def __init__(
        self,
        channel: Channel,
        memory: Memory,
        allocator: Allocator,
        *,
        revision: int = MAX_REVISION,
        adapter: bool = False,
        isc: int = 3,
        adapter_bit: int = 0,
        legacy_order: ByteOrder = "big",
        allow_legacy: bool = True,
    ) -> None:
        self.channel = channel
        self.memory = memory
        self.allocator = allocator
        self.legacy_order: ByteOrder = legacy_order
        self.queue_align = CCW_RING_ALIGN
        self.want_adapter = adapter
        self.isc = isc
        self.adapter_bit = adapter_bit
        self._ccw = allocator.alloc(Ccw.SIZE, 8)
        self._scratch = allocator.alloc(_SCRATCH, 8)
        if self._scratch + _SCRATCH > _ADDRESS_31:
            raise ChannelError("CCW data areas must be below 2 GiB (no IDA here)")
        self._used: Callable[[int], None] = lambda _q: None
        self._config: Callable[[], None] = lambda: None
        self._queues: set[int] = set()
        self._queue_count: int | None = None
        self._cookies: dict[int, int] = {}
        self._status = 0  # what the device holds, as far as WRITE_STATUS said
        self._generation = 0
        self._config_cache = b""
        self._missed = False  # an interrupt taken by TSCH before a START: scan for it
        self.indicators_set = False
        self.adapter_active = False
        self.indicators_address = allocator.alloc(INDICATORS.size, 8)
        self.config_indicators_address = allocator.alloc(INDICATORS.size, 8)
        self.summary_address = allocator.alloc(1, 1)
        self.adapter_area: tuple[int, int] | None = None  # (address, bytes)
        channel.enable()
        # The driver MUST check the control unit type and ignore device type and model.
        status, ident = self._io(CCW_CMD_SENSE_ID, read=SENSE_ID_SIZE)
        if not status.ok or ident[0] != 0xFF or int.from_bytes(ident[1:3], "big") != CU_TYPE:
            raise NoDevice(f"no virtio-ccw device (SENSE ID: {status}, {ident[:4].hex()})")
        self.device_id = ident[3]
        self.revision = self._negotiate_revision(revision, allow_legacy)
        self.legacy = self.revision == 0

    def _negotiate_revision(self, highest: int, allow_legacy: bool) -> int:
        # Highest first, lower ones after each command reject.
        for revision in range(highest, -1 if allow_legacy else 0, -1):
            status, _ = self._io(
                CCW_CMD_SET_VIRTIO_REV, write=REV_INFO.pack(revision=revision, length=0)
            )
            if status.ok:
                return revision
            if not status.command_reject:
                raise ChannelError(f"SET_VIRTIO_REV {revision}: {status}")
        if not allow_legacy:
            raise NoDevice(f"the device takes none of revisions 1..{highest}")
        # A legacy device knows no SET_VIRTIO_REV: operate it as if revision 0 were set.
        return 0

    # -- channel programs ---------------------------------------------------------------

    def _io(
        self,
        cmd: int,
        *,
        write: bytes = b"",
        read: int = 0,
        count: int | None = None,
        flags: int = 0,
    ) -> tuple[ChannelStatus, bytes]:
        """One CCW: ``write`` goes into its data area first, ``read`` bytes come back."""
        n = max(len(write), read) if count is None else count
        if n > 0xFFFF:
            raise ChannelError(f"{command_name(cmd)} of {n} bytes: a CCW counts up to 65535")
        size = max(n, len(write), read, 1)
        area = self._scratch if size <= _SCRATCH else self.allocator.alloc(size, 8)
        try:
            if write:
                self.memory.write(area, write)
            self.memory.write(self._ccw, Ccw(cmd, flags, n, area).pack())
            for _ in range(100):
                status = self.channel.start(self._ccw)
                if status.cc != 1:
                    break
                # An interrupt is pending: take it (its indicators are scanned later).
                self.channel.test_subchannel()
                self._missed = True
            if status.cc:
                raise ChannelError(f"{command_name(cmd)}: subchannel not operational ({status})")
            return status, self.memory.read(area, read) if read else b""
        finally:
            if area != self._scratch:
                self.allocator.free(area)

    def _ok(self, cmd: int, *, write: bytes = b"", read: int = 0) -> bytes:
        status, data = self._io(cmd, write=write, read=read)
        if not status.ok:
            raise ChannelError(f"{command_name(cmd)}: {status}")
        return data

    # -- DriverTransport ------------------------------------------------------------------

    def read_status(self) -> int:
        if self.revision >= 2:
            return self._ok(CCW_CMD_READ_STATUS, read=1)[0]
        # Before revision 2 the driver may not read it: the last value the device took.
        return self._status

    def write_status(self, value: int) -> None:
        self._queue_count = None
        if value == 0:
            self._ok(CCW_CMD_VDEV_RESET)  # the reset is done when the command ends
            self._status = 0
            self._queues.clear()
            self._cookies.clear()
            self.indicators_set = False
            return
        if value & S.DRIVER_OK:
            self._ensure_indicators()
        status, _ = self._io(CCW_CMD_WRITE_STATUS, write=bytes([value & 0xFF]))
        if status.ok:
            self._status = value & 0xFF
        elif not status.command_reject:
            raise ChannelError(f"WRITE_STATUS {value:#x}: {status}")
        # A command reject: the device kept its previous status.

    def _feature_words(self) -> int:
        return 1 if self.legacy else F.FEATURE_WORDS

    def read_device_features(self) -> int:
        value = 0
        for index in range(self._feature_words()):
            data = self._ok(CCW_CMD_READ_FEAT, write=FEATURE_DESC.pack(index=index), read=5)
            value |= _ints(FEATURE_DESC, data)[0] << (32 * index)
        value &= ~CCW_RESERVED_FEATURES
        if self.revision < 2:
            # Suspending needs the status read back, which READ_STATUS brings.
            value &= ~(1 << F.VIRTIO_F_SUSPEND)
        return value

    def write_driver_features(self, value: int) -> None:
        self._queue_count = None
        for index in range(self._feature_words()):
            word = value >> (32 * index) & 0xFFFFFFFF
            self._ok(CCW_CMD_WRITE_FEAT, write=FEATURE_DESC.pack(features=word, index=index))

    def read_config(self, offset: int, size: int) -> bytes:
        data = self._ok(CCW_CMD_READ_CONF, read=offset + size)
        # No generation field on channel I/O: the driver counts the changes it sees
        # against the last copy of the space it read.
        cache = self._config_cache
        overlap = min(len(data), len(cache))
        if data[:overlap] != cache[:overlap]:
            self._generation += 1
        self._config_cache = data + cache[len(data) :]
        return data[offset:]

    def write_config(self, offset: int, data: bytes) -> None:
        end = offset + len(data)
        space = bytearray(self._ok(CCW_CMD_READ_CONF, read=end))
        space[offset:end] = data
        self._ok(CCW_CMD_WRITE_CONF, write=bytes(space))

    def config_generation(self) -> int:
        return self._generation

    def num_queues(self) -> int:
        """No queue count on channel I/O: ask READ_VQ_CONF until a queue is missing."""
        if self._queue_count is None:
            self._queue_count = count_queues(self.queue_max_size)
        return self._queue_count

    def queue_max_size(self, index: int) -> int:
        data = self._ok(
            CCW_CMD_READ_VQ_CONF, write=VQ_CONFIG_BLOCK.pack(index=index), read=VQ_CONFIG_BLOCK.size
        )
        return _ints(VQ_CONFIG_BLOCK, data)[1]

    def setup_queue(self, index: int, layout: RingLayout) -> None:
        self._ensure_indicators()
        if self.legacy:
            block = VQ_INFO_BLOCK_LEGACY.pack(
                queue=layout.desc, align=self.queue_align, index=index, size=layout.size
            )
        else:
            block = VQ_INFO_BLOCK.pack(
                desc=layout.desc,
                index=index,
                size=layout.size,
                driver=layout.driver,
                device=layout.device,
            )
        self._ok(CCW_CMD_SET_VQ, write=block)
        self._queues.add(index)

    def reset_queue(self, index: int) -> None:
        raise NegotiationError(
            "virtio-ccw has no virtqueue reset: VIRTIO_F_RING_RESET is reserved for future use"
        )

    def queue_reset_done(self, index: int) -> bool:
        return False

    def notify(self, index: int, value: int) -> None:
        # Pass back the cookie of the previous notification: the host's shortcut.
        cookie = self.channel.notify(value, self._cookies.get(index, 0))
        if cookie < 0:
            raise ChannelError(f"notify hypercall for queue {index} failed ({cookie})")
        self._cookies[index] = cookie

    def set_interrupt_handlers(
        self, used: Callable[[int], None], config: Callable[[], None]
    ) -> None:
        self._used = used
        self._config = config

    def wait_interrupt(self, timeout: float | None) -> bool:
        """Wait for an interrupt; TEST SUBCHANNEL, then look at every indicator."""
        woke = self.channel.wait_interrupt(timeout)
        if not woke and not self._missed:
            return False
        self._missed = False
        self.channel.test_subchannel()
        return self._scan()

    def wait_until(self, predicate: Callable[[], bool], timeout: float) -> bool:
        done = wait_until(predicate, timeout, self.wait_interrupt)
        # A condition met by looking at the ring may leave an interrupt pending: take it,
        # so the device can raise the next one.
        self.wait_interrupt(0)
        return done

    # -- indicators -------------------------------------------------------------------------

    def _ensure_indicators(self) -> None:
        """Set the indicators up once per reset (the device forgets them when it resets)."""
        if self.indicators_set:
            return
        self.adapter_active = False
        if self.want_adapter:
            self.adapter_active = self._set_adapter_indicators()
        if not self.adapter_active:
            self.memory.write(self.indicators_address, bytes(INDICATORS.size))
            self._ok(CCW_CMD_SET_IND, write=INDICATOR_ADDRESS.pack(address=self.indicators_address))
        self.memory.write(self.config_indicators_address, bytes(INDICATORS.size))
        self._ok(
            CCW_CMD_SET_CONF_IND,
            write=INDICATOR_ADDRESS.pack(address=self.config_indicators_address),
        )
        self.indicators_set = True

    def _set_adapter_indicators(self) -> bool:
        if self.adapter_area is None:
            length = (self.adapter_bit + max(self.num_queues(), 1) + 7) // 8
            self.adapter_area = (self.allocator.alloc(length, 8), length)
        area, length = self.adapter_area
        self.memory.write(area, bytes(length))
        self.memory.write(self.summary_address, b"\0")
        status, _ = self._io(
            CCW_CMD_SET_IND_ADAPTER,
            write=THININT_AREA.pack(
                summary_indicator=self.summary_address,
                indicator=area,
                bit_nr=self.adapter_bit,
                isc=self.isc,
            ),
        )
        if status.ok:
            return True
        if not status.command_reject:
            raise ChannelError(f"SET_IND_ADAPTER: {status}")
        log.info("device rejects adapter interrupts: classic queue indicators instead")
        return False

    def _take(self, address: int) -> int:
        word = _ints(INDICATORS, self.memory.read(address, INDICATORS.size))[0]
        if word:
            self.memory.write(address, bytes(INDICATORS.size))
        return word

    def _scan(self) -> bool:
        found = False
        if not self.indicators_set:
            return False
        if self.adapter_active and self.adapter_area is not None:
            area, length = self.adapter_area
            while True:
                # Clear the summary indicator first, then process the queue indicators.
                self.memory.write(self.summary_address, b"\0")
                bits = bytearray(self.memory.read(area, length))
                hits = [
                    q
                    for q in sorted(self._queues)
                    if bits[(b := self.adapter_bit + q) // 8] & 0x80 >> b % 8
                ]
                for q in hits:
                    b = self.adapter_bit + q
                    current = self.memory.read(area + b // 8, 1)[0]
                    self.memory.write(area + b // 8, bytes([current & ~(0x80 >> b % 8) & 0xFF]))
                for q in hits:
                    found = True
                    self._used(q)
                if not self.memory.read(self.summary_address, 1)[0]:
                    break
        else:
            word = self._take(self.indicators_address)
            for q in range(CLASSIC_INDICATOR_BITS):
                if word >> q & 1:
                    found = True
                    self._used(q)
        if self._take(self.config_indicators_address) & 1:
            found = True
            self._generation += 1
            self._config()
        return found


class LocalChannel:
    """A :class:`Channel` straight onto a :class:`CcwDevice` in the same process.

    The device runs in the caller's thread, within each channel program and
    hypercall; while the driver waits for an interrupt, the device's own
    event sources are served. The interrupts it raised are counted.
    """

    def __init__(self, subchannel: CcwDevice) -> None:
        self.subchannel = subchannel
        subchannel.sink = self
        self.io_interrupts = 0
        self.adapter_interrupts: list[int] = []
        self._adapter_pending = False

    # CcwInterrupts
    def io_interrupt(self, schid: int) -> None:
        self.io_interrupts += 1

    def adapter_interrupt(self, isc: int) -> None:
        self.adapter_interrupts.append(isc)
        self._adapter_pending = True

    # Channel
    def enable(self) -> None:
        self.subchannel.enable()

    def start(self, cpa: int) -> ChannelStatus:
        return self.subchannel.start(cpa)

    def test_subchannel(self) -> bool:
        return self.subchannel.test_subchannel()

    def notify(self, data: int, cookie: int) -> int:
        return self.subchannel.hypercall_notify(self.subchannel.schid, data, cookie)

    def _take_pending(self) -> bool:
        pending = self.subchannel.status_pending or self._adapter_pending
        self._adapter_pending = False
        return pending

    def wait_interrupt(self, timeout: float | None) -> bool:
        if self._take_pending():
            return True
        serve_events(self.subchannel.device.events, timeout)
        return self._take_pending()


def ccw_loopback(
    device: VirtioDevice | str,
    *,
    directory: Path | None = None,
    revision: int = MAX_REVISION,
    device_revision: int = MAX_REVISION,
    adapter: bool = False,
    device_adapter: bool = True,
    transitional: bool = True,
    legacy_order: ByteOrder = "big",
    memory_size: int = 64 << 20,
) -> CcwTransport:
    """A driver transport reaching ``device`` through virtio-ccw channel programs, in process.

    ``device`` is a device model, or the name of a registered device type
    (built with its example settings, its scratch files in ``directory``).
    ``revision`` is the highest the driver tries, ``device_revision`` the
    highest the device takes; ``adapter`` makes the driver ask for adapter
    indicators, ``device_adapter`` lets the device grant them.
    """
    if isinstance(device, str):
        from virtio.devices.registry import DeviceSettings, device_type

        if directory is None:
            raise ValueError(f"device type {device!r}: give a directory for its files")
        device = device_type(device).example(directory, DeviceSettings())
    if memory_size > _ADDRESS_31:
        raise ValueError("guest memory for channel programs stays below 2 GiB here")
    memory = GuestMemory()
    memory.add(0, bytearray(memory_size), name="guest-ram")
    subchannel = CcwDevice(
        device,
        memory,
        max_revision=device_revision,
        transitional=transitional,
        adapter=device_adapter,
        legacy_order=legacy_order,
    )
    # The first page stays unused: address 0 is never a valid buffer.
    allocator = Allocator(0x1000, memory_size - 0x1000)
    return CcwTransport(
        LocalChannel(subchannel),
        memory,
        allocator,
        revision=revision,
        adapter=adapter,
        legacy_order=legacy_order,
    )
