"""virtio-pci: a PCI function's configuration space and BARs, device side and driver side.

:class:`PciFunction` is the device side: a type 0 configuration header with
BAR sizing, command and status, and the capability list (MSI-X, and the
virtio structures: common configuration, notifications, ISR, device
configuration, PCI configuration access); the BARs behind them (BAR4: the
modern structures, BAR1: the MSI-X table and PBA, BAR0 on a transitional
function: the legacy I/O registers). All of it is mapped onto the core's
device transport seam; interrupts leave as MSI-X messages (honouring the
function and vector masks and the PBA) or as the INTx level with the ISR.
An access the driver requirements forbid puts the device in
DEVICE_NEEDS_RESET, naming the rule.

:class:`PciTransport` is the driver side over any :class:`PciBus` (the
function's configuration space, its BARs and its interrupts): it walks the
capabilities, negotiates, sets the queues up, uses MSI-X where present and
INTx with the ISR otherwise, and drives a transitional function through the
legacy I/O BAR when asked to (or when it has nothing else). Accesses are
BAR-relative: where the BARs sit in an address space is the bus's business
(the bus of a real machine assigns them, as firmware does).
"""

from __future__ import annotations

import enum
import logging
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from virtio.core.device import SharedMemoryRegion, VirtioDevice
from virtio.core.registers import ISR_CONFIG, ISR_QUEUE, NO_VECTOR, DeviceRegisters
from virtio.core.shm import AccessWindow, ShmWindow
from virtio.core.status import Interface
from virtio.errors import NegotiationError, VirtioError
from virtio.layout import ByteOrder
from virtio.memory import Allocator, GuestMemory, Memory
from virtio.queue import RingLayout
from virtio.queue.common import LEGACY_QUEUE_ALIGN
from virtio.spec import features as F
from virtio.transport.blocking import serve_events, wait_until

log = logging.getLogger("virtio.transport.pci")

VENDOR = 0x1AF4
MODERN_BASE = 0x1040
#: Transitional PCI device ids (virtio device id -> PCI device id).
TRANSITIONAL = {1: 0x1000, 2: 0x1001, 5: 0x1002, 3: 0x1003, 8: 0x1004, 4: 0x1005, 9: 0x1009}
_CLASS = {1: 0x020000, 2: 0x010000, 8: 0x010000, 3: 0x078000}  # network, storage, comms
_OTHER_CLASS = 0xFF0000

N_PCI_DEV = "devicenormative:Virtio Transport Options / Virtio Over PCI Bus / PCI Device Discovery"
N_LAYOUT_DRV = "drivernormative:Virtio Transport Options / Virtio Over PCI Bus / PCI Device Layout"
N_COMMON_DRV = (
    "drivernormative:Virtio Transport Options / Virtio Over PCI Bus / PCI Device Layout / "
    "Common configuration structure layout"
)
N_CFG_ACCESS_DRV = (
    "drivernormative:Virtio Transport Options / Virtio Over PCI Bus / PCI Device Layout / "
    "PCI configuration access capability"
)
N_CAPS_DRV = (
    "drivernormative:Virtio Transport Options / Virtio Over PCI Bus / "
    "Virtio Structure PCI Capabilities"
)
N_MSIX_DRV = (
    "drivernormative:Virtio Transport Options / Virtio Over PCI Bus / "
    "PCI-specific Initialization And Device Operation / Device Initialization / "
    "MSI-X Vector Configuration"
)


class CapType(enum.IntEnum):
    COMMON = 1
    NOTIFY = 2
    ISR = 3
    DEVICE = 4
    PCI_CFG = 5
    SHARED_MEMORY = 8
    VENDOR_DATA = 9


# The configuration header.
CFG_VENDOR, CFG_DEVICE, CFG_COMMAND, CFG_STATUS = 0x00, 0x02, 0x04, 0x06
CFG_REVISION, CFG_CLASS, CFG_HEADER_TYPE = 0x08, 0x09, 0x0E
CFG_BAR0, CFG_SUBSYS_VENDOR, CFG_SUBSYS_ID = 0x10, 0x2C, 0x2E
CFG_CAPS, CFG_INT_LINE, CFG_INT_PIN = 0x34, 0x3C, 0x3D
CMD_IO, CMD_MEMORY, CMD_BUS_MASTER, CMD_INTX_DISABLE = 1, 2, 4, 1 << 10
STATUS_INTERRUPT, STATUS_CAP_LIST = 1 << 3, 1 << 4
CAP_MSIX, CAP_VENDOR = 0x11, 0x09
MSIX_ENABLE, MSIX_MASK_ALL = 1 << 15, 1 << 14

# Where this model puts things.
BAR_LEGACY, BAR_MSIX, BAR_SHM, BAR_MODERN = 0, 1, 2, 4
MODERN_SIZE = 0x4000
GUARD_SIZE = 0x20  # a non-transitional function's decoy legacy I/O BAR
GUARD_STATUS = 18  # the legacy device status register's offset in it
SHM_ALIGN = 0x1000
COMMON_OFF, ISR_OFF, DEVICE_OFF, NOTIFY_OFF = 0x0000, 0x1000, 0x2000, 0x3000
NOTIFY_MULTIPLIER = 4
MSIX_SIZE, MSIX_PBA = 0x1000, 0x800
LEGACY_SIZE = 0x100  # legacy registers (24 bytes) and the device configuration after them

# virtio_pci_common_cfg: offset -> (field, width, writable)
COMMON: dict[int, tuple[str, int, bool]] = {
    0x00: ("device_feature_select", 4, True),
    0x04: ("device_feature", 4, False),
    0x08: ("driver_feature_select", 4, True),
    0x0C: ("driver_feature", 4, True),
    0x10: ("config_msix_vector", 2, True),
    0x12: ("num_queues", 2, False),
    0x14: ("device_status", 1, True),
    0x15: ("config_generation", 1, False),
    0x16: ("queue_select", 2, True),
    0x18: ("queue_size", 2, True),
    0x1A: ("queue_msix_vector", 2, True),
    0x1C: ("queue_enable", 2, True),
    0x1E: ("queue_notify_off", 2, False),
    0x20: ("queue_desc", 4, True),
    0x24: ("queue_desc_hi", 4, True),
    0x28: ("queue_driver", 4, True),
    0x2C: ("queue_driver_hi", 4, True),
    0x30: ("queue_device", 4, True),
    0x34: ("queue_device_hi", 4, True),
    0x38: ("queue_notif_config_data", 2, False),
    0x3A: ("queue_reset", 2, True),
    0x3C: ("admin_queue_index", 2, False),
    0x3E: ("admin_queue_num", 2, False),
}
COMMON_SIZE = 0x40

# The legacy I/O BAR: offset -> (field, width, writable); the MSI-X vector
# registers exist only while MSI-X is enabled, and shift the device configuration.
LEGACY: dict[int, tuple[str, int, bool]] = {
    0x00: ("host_features", 4, False),
    0x04: ("guest_features", 4, True),
    0x08: ("queue_pfn", 4, True),
    0x0C: ("queue_size", 2, False),
    0x0E: ("queue_select", 2, True),
    0x10: ("queue_notify", 2, True),
    0x12: ("device_status", 1, True),
    0x13: ("isr", 1, False),
}
LEGACY_MSIX: dict[int, tuple[str, int, bool]] = {
    0x14: ("config_msix_vector", 2, True),
    0x16: ("queue_msix_vector", 2, True),
}


@dataclass
class Bar:
    index: int
    size: int
    io: bool
    base: int = 0
    wide: bool = False  # a 64-bit prefetchable memory BAR: its high half is the next register

    def register(self) -> int:
        flags = 1 if self.io else (0xC if self.wide else 0)  # 64-bit, prefetchable
        return (self.base & ~(self.size - 1) & 0xFFFFFFFF) | flags

    def high_register(self) -> int:
        return (self.base & ~(self.size - 1)) >> 32


class PciFunction:
    """A virtio device as one PCI function (the device side of virtio-pci).

    ``msix_vectors`` is the MSI-X table size (0: no MSI-X capability).
    ``transitional`` adds the legacy I/O BAR and gives the function its
    transitional device id. ``msi(address, data)`` sends an MSI-X message;
    ``intx(level)`` drives INTA#. ``notify(value, queue)``, when given, receives
    every available buffer notification instead of the device serving it during
    the register write: a host that must answer the access first (as QEMU's
    ioeventfd does for a vCPU) serves it right after, with
    :meth:`serve_notification`.
    """

    def __init__(
        self,
        device: VirtioDevice,
        *,
        transitional: bool = False,
        msix_vectors: int = 2,
        legacy_order: ByteOrder = "little",
        msi: Callable[[int, int], None] | None = None,
        intx: Callable[[bool], None] | None = None,
        notify: Callable[[int, int | None], object] | None = None,
        vendor_data: Sequence[tuple[int, bytes]] = (),
        legacy_guard: bool = False,
    ) -> None:
        if transitional and device.device_id not in TRANSITIONAL:
            raise ValueError(f"device type {device.device_id} has no transitional PCI id")
        if legacy_guard and transitional:
            raise ValueError("a transitional function has a real legacy BAR, not a guard")
        for vendor_id, data in vendor_data:
            if vendor_id == VENDOR or not 0 <= vendor_id <= 0xFFFF:
                raise ValueError(f"vendor data capability: vendor_id {vendor_id:#x}")
            if (6 + len(data)) % 4 or 6 + len(data) > 0x40:
                raise ValueError("vendor data capability: its size must be a multiple of 4, <= 64")
        if not 0 <= msix_vectors <= 0x800:
            raise ValueError("MSI-X table size is 0..2048")
        self.device = device
        self.transitional = transitional
        self.msix_vectors = msix_vectors
        self.legacy_order: ByteOrder = legacy_order
        self.msi = msi or (lambda _addr, _data: None)
        self.intx = intx or (lambda _level: None)
        self.notify = notify or self.serve_notification
        self.registers = DeviceRegisters(device, interrupts=self, vectors=msix_vectors)
        self.command = 0
        self.vendor_data = list(vendor_data)
        self.legacy_guard = legacy_guard
        self.fenced = False  # a legacy driver tripped the guard: every BAR reads 0
        self.bars: dict[int, Bar] = {BAR_MODERN: Bar(BAR_MODERN, MODERN_SIZE, io=False)}
        if msix_vectors:
            self.bars[BAR_MSIX] = Bar(BAR_MSIX, MSIX_SIZE, io=False)
        if transitional:
            self.bars[BAR_LEGACY] = Bar(BAR_LEGACY, LEGACY_SIZE, io=True)
        elif legacy_guard:
            self.bars[BAR_LEGACY] = Bar(BAR_LEGACY, GUARD_SIZE, io=True)
        # Shared memory regions: one 64-bit BAR, each region at a page-aligned offset.
        self.shm: dict[int, tuple[int, SharedMemoryRegion]] = {}
        at = 0
        for region in self.registers.shared_memory_regions:
            self.shm[region.id] = (at, region)
            at += -(-region.length // SHM_ALIGN) * SHM_ALIGN
        if self.shm:
            size = 1 << max(at - 1, SHM_ALIGN - 1).bit_length()
            self.bars[BAR_SHM] = Bar(BAR_SHM, size, io=False, wide=True)
        self.msix_table = bytearray(16 * msix_vectors)
        self.pending = bytearray(max(1, (msix_vectors + 63) // 64) * 8)
        self._clear_msix()
        self.intx_level = False
        self.generation = 0
        self._generation_seen = 0
        self.caps = self._capabilities()
        self.config_space = self._header()

    # -- the configuration space -------------------------------------------------------

    @property
    def pci_device_id(self) -> int:
        if self.transitional:
            return TRANSITIONAL[self.device.device_id]
        return MODERN_BASE + self.device.device_id

    @property
    def interrupt_line(self) -> int:
        """The Interrupt Line register: the IRQ firmware routed INTA# to."""
        return self.config_space[CFG_INT_LINE]

    def reset(self) -> None:
        """A PCI function reset (the bus's reset): the device resets, BARs and MSI-X clear."""
        self.registers.status = 0
        self.command = 0
        self.fenced = False
        for bar in self.bars.values():
            bar.base = 0
        self._clear_msix()
        self.config_space = self._header()
        self._update_intx()

    def _clear_msix(self) -> None:
        self.msix_control = max(self.msix_vectors - 1, 0)  # disabled, table size - 1
        self.msix_table[:] = bytes(len(self.msix_table))
        for vector in range(self.msix_vectors):
            self.msix_table[16 * vector + 12] = 1  # every vector starts masked
        self.pending[:] = bytes(len(self.pending))

    def _capabilities(self) -> bytearray:
        """The capability list, placed from 0x40 on."""
        caps = bytearray()

        def add(body: bytes) -> None:
            caps.extend(body)

        at = 0x40
        chain: list[bytes] = []
        if self.msix_vectors:
            # MSI-X: message control, table offset/BIR, PBA offset/BIR.
            chain.append(
                struct.pack("<BBHII", CAP_MSIX, 0, self.msix_control, BAR_MSIX, MSIX_PBA | BAR_MSIX)
            )
        cap = struct.Struct("<BBBBBBHII")
        for cfg_type, offset, length in (
            (CapType.COMMON, COMMON_OFF, COMMON_SIZE),
            (CapType.NOTIFY, NOTIFY_OFF, NOTIFY_MULTIPLIER * max(1, self.registers.num_queues)),
            (CapType.ISR, ISR_OFF, 1),
            (CapType.DEVICE, DEVICE_OFF, max(4, self.registers.config_size)),
        ):
            size = cap.size + (4 if cfg_type is CapType.NOTIFY else 0)
            body = cap.pack(CAP_VENDOR, 0, size, cfg_type, BAR_MODERN, 0, 0, offset, length)
            if cfg_type is CapType.NOTIFY:
                body += struct.pack("<I", NOTIFY_MULTIPLIER)
            chain.append(body)
        cap64 = struct.Struct("<BBBBBBHIIII")
        for shmid, (offset, region) in self.shm.items():
            chain.append(
                cap64.pack(
                    CAP_VENDOR, 0, cap64.size, CapType.SHARED_MEMORY, BAR_SHM, shmid, 0,
                    offset & 0xFFFFFFFF, region.length & 0xFFFFFFFF,
                    offset >> 32, region.length >> 32,
                )
            )  # fmt: skip
        for vendor_id, data in self.vendor_data:
            head = struct.pack(
                "<BBBBH", CAP_VENDOR, 0, 6 + len(data), CapType.VENDOR_DATA, vendor_id
            )
            chain.append(head + data)
        # PCI configuration access: a window onto the BARs through the config space.
        chain.append(
            cap.pack(CAP_VENDOR, 0, cap.size + 4, CapType.PCI_CFG, 0, 0, 0, 0, 0) + bytes(4)
        )
        for i, body in enumerate(chain):
            nxt = at + len(body) if i + 1 < len(chain) else 0
            entry = bytearray(body)
            entry[1] = nxt
            if i == 0:
                self._msix_at = at if self.msix_vectors else None
            add(bytes(entry))
            at += len(body)
        self._cfg_cap_at = 0x40 + len(caps) - (cap.size + 4)
        if 0x40 + len(caps) > 0x100:
            raise ValueError("the capabilities do not fit in the configuration space")
        return caps

    def _header(self) -> bytearray:
        space = bytearray(256)
        virtio_id = self.device.device_id
        struct.pack_into("<HH", space, CFG_VENDOR, VENDOR, self.pci_device_id)
        space[CFG_REVISION] = 0 if self.transitional else 1
        klass = _CLASS.get(virtio_id, _OTHER_CLASS)
        space[CFG_CLASS : CFG_CLASS + 3] = klass.to_bytes(3, "little")
        space[CFG_HEADER_TYPE] = 0
        subsystem = virtio_id if self.transitional else 0x40 + virtio_id
        struct.pack_into("<HH", space, CFG_SUBSYS_VENDOR, VENDOR, subsystem)
        space[CFG_CAPS] = 0x40
        space[CFG_INT_PIN] = 1  # INTA#
        space[0x40 : 0x40 + len(self.caps)] = self.caps
        return space

    def config_read(self, offset: int, size: int) -> int:
        """A read of the function's configuration space."""
        if size not in (1, 2, 4) or offset % size or not 0 <= offset <= 256 - size:
            return (1 << 8 * size) - 1 if size in (1, 2, 4) else 0
        if CFG_BAR0 <= offset < CFG_BAR0 + 24:
            value = b"".join(self._bar_register(i).to_bytes(4, "little") for i in range(6))
            start = offset - CFG_BAR0
            return int.from_bytes(value[start : start + size], "little")
        space = self.config_space
        struct.pack_into("<H", space, CFG_COMMAND, self.command)
        status = STATUS_CAP_LIST | (STATUS_INTERRUPT if self.intx_level else 0)
        struct.pack_into("<H", space, CFG_STATUS, status)
        if self._msix_at is not None:
            struct.pack_into("<H", space, self._msix_at + 2, self.msix_control)
        if self._cfg_cap_at <= offset < self._cfg_cap_at + 20 and offset >= self._cfg_cap_at + 16:
            self._cfg_window_read()
        return int.from_bytes(space[offset : offset + size], "little")

    def config_write(self, offset: int, size: int, value: int) -> None:
        """A write of the function's configuration space (BARs, command, MSI-X, cfg window)."""
        if size not in (1, 2, 4) or offset % size or not 0 <= offset <= 256 - size:
            return
        data = (value & ((1 << 8 * size) - 1)).to_bytes(size, "little")
        if offset == CFG_COMMAND and size >= 2:
            self.command = int.from_bytes(data[:2], "little") & (
                CMD_IO | CMD_MEMORY | CMD_BUS_MASTER | CMD_INTX_DISABLE
            )
            self._update_intx()
            return
        if CFG_BAR0 <= offset < CFG_BAR0 + 24 and size == 4:
            index = (offset - CFG_BAR0) // 4
            bar = self.bars.get(index)
            below = self.bars.get(index - 1)
            if bar is not None:
                # Writing all ones and reading back sizes the BAR, as on any PCI device.
                high = bar.base & ~0xFFFFFFFF
                bar.base = (high | value & 0xFFFFFFFF) & ~(bar.size - 1)
            elif below is not None and below.wide:
                low = below.base & 0xFFFFFFFF
                below.base = ((value & 0xFFFFFFFF) << 32 | low) & ~(below.size - 1)
            return
        if offset == CFG_INT_LINE and size == 1:
            self.config_space[CFG_INT_LINE] = data[0]
            return
        if self._msix_at is not None and offset == self._msix_at + 2 and size == 2:
            mask = MSIX_ENABLE | MSIX_MASK_ALL
            control = int.from_bytes(data, "little")
            self.msix_control = (self.msix_control & ~mask) | (control & mask)
            self._deliver_pending()
            self._update_intx()
            return
        if self._cfg_cap_at <= offset < self._cfg_cap_at + 20:
            self._cfg_window_write(offset - self._cfg_cap_at, data)
            return
        log.debug("ignoring config write %d@%#x", size, offset)

    def _bar_register(self, index: int) -> int:
        bar = self.bars.get(index)
        if bar is not None:
            return bar.register()
        below = self.bars.get(index - 1)
        return below.high_register() if below is not None and below.wide else 0

    # the PCI configuration access capability: bar, offset, length, data
    def _cfg_fields(self) -> tuple[int, int, int]:
        at = self._cfg_cap_at
        bar = self.config_space[at + 4]
        offset, length = struct.unpack_from("<II", self.config_space, at + 8)
        return bar, offset, length

    def _cfg_window_write(self, rel: int, data: bytes) -> None:
        at = self._cfg_cap_at
        if rel in (4, 8, 12):  # cap.bar, cap.offset, cap.length
            self.config_space[at + rel : at + rel + len(data)] = data
            return
        if rel < 16:
            self.device.fail("driver wrote a read-only field of a virtio capability", N_CAPS_DRV)
            return
        self.config_space[at + rel : at + rel + len(data)] = data
        bar, offset, length = self._cfg_fields()
        if self._cfg_window_ok(bar, offset, length):
            value = int.from_bytes(self.config_space[at + 16 : at + 16 + length], "little")
            self.bar_write(bar, offset, length, value)

    def _cfg_window_read(self) -> None:
        at = self._cfg_cap_at
        bar, offset, length = self._cfg_fields()
        if self._cfg_window_ok(bar, offset, length):
            value = self.bar_read(bar, offset, length)
            self.config_space[at + 16 : at + 16 + length] = value.to_bytes(length, "little")

    def _cfg_window_ok(self, bar: int, offset: int, length: int) -> bool:
        if length not in (1, 2, 4) or offset % length or bar != BAR_MODERN:
            self.device.fail(
                f"PCI configuration access to BAR {bar} offset {offset:#x} length {length}",
                N_CFG_ACCESS_DRV,
            )
            return False
        return True

    # -- the BARs ------------------------------------------------------------------------

    def locate(self, address: int, io: bool) -> tuple[int, int] | None:
        """Which BAR (and offset) a bus address falls in, from the bases the driver set."""
        for bar in self.bars.values():
            if bar.io == io and bar.base and bar.base <= address < bar.base + bar.size:
                return bar.index, address - bar.base
        return None

    def bar_read(self, bar: int, offset: int, size: int) -> int:
        if self.fenced:
            return 0
        if bar == BAR_MODERN:
            return self._modern_read(offset, size)
        if bar == BAR_MSIX and self.msix_vectors:
            return self._msix_read(offset, size)
        if bar == BAR_LEGACY and self.transitional:
            return self._legacy_read(offset, size)
        if bar == BAR_SHM and self.shm:
            return int.from_bytes(self._shm_window(offset, size) or bytes(size), "little")
        if bar == BAR_LEGACY and self.legacy_guard:
            return 0
        return (1 << 8 * size) - 1

    def bar_write(self, bar: int, offset: int, size: int, value: int) -> None:
        if self.fenced:
            return
        if bar == BAR_MODERN:
            self._modern_write(offset, size, value)
        elif bar == BAR_MSIX and self.msix_vectors:
            self._msix_write(offset, size, value)
        elif bar == BAR_LEGACY and self.transitional:
            self._legacy_write(offset, size, value)
        elif bar == BAR_SHM and self.shm:
            window = self._shm_window(offset, size)
            if window is not None:
                window[:] = (value & ((1 << 8 * size) - 1)).to_bytes(size, "little")
        elif (
            bar == BAR_LEGACY
            and self.legacy_guard
            and (offset, size, value) == (GUARD_STATUS, 1, 0)
        ):
            # A legacy driver resetting a device it cannot drive: from now on the
            # function looks empty to it, so it fails instead of misprogramming us.
            log.warning("a legacy driver reset the non-transitional function: fenced off")
            self.fenced = True

    def _shm_window(self, offset: int, size: int) -> memoryview | None:
        """The bytes of a shared memory region behind a BAR access (None: a hole)."""
        for start, region in self.shm.values():
            if start <= offset and offset + size <= start + region.length:
                if region.backing is None:
                    return None
                return memoryview(region.backing).cast("B")[offset - start : offset - start + size]
        return None

    def _refuse(self, why: str, normative: str = N_LAYOUT_DRV) -> None:
        self.device.fail(why, normative)

    def _use(self, interface: Interface) -> None:
        """A transitional device serves whichever interface the driver resets it through."""
        regs = self.registers
        if regs.interface is not interface and regs.status == 0:
            log.info("the driver uses the %s interface", interface.name.lower())
            regs.use_interface(interface, self.legacy_order)

    def _modern_read(self, offset: int, size: int) -> int:
        if COMMON_OFF <= offset < COMMON_OFF + COMMON_SIZE:
            self._use(Interface.MODERN)
            return self._common_read(offset - COMMON_OFF, size)
        if ISR_OFF <= offset < ISR_OFF + 4:
            return self._read_isr() if offset == ISR_OFF else 0
        if DEVICE_OFF <= offset < NOTIFY_OFF:
            return self._device_config_read(offset - DEVICE_OFF, size)
        return 0

    def _modern_write(self, offset: int, size: int, value: int) -> None:
        if COMMON_OFF <= offset < COMMON_OFF + COMMON_SIZE:
            self._use(Interface.MODERN)
            self._common_write(offset - COMMON_OFF, size, value)
        elif DEVICE_OFF <= offset < NOTIFY_OFF:
            self._device_config_write(offset - DEVICE_OFF, size, value)
        elif NOTIFY_OFF <= offset < NOTIFY_OFF + NOTIFY_MULTIPLIER * self.registers.num_queues:
            queue = (offset - NOTIFY_OFF) // NOTIFY_MULTIPLIER
            data = self.registers.device.has(F.VIRTIO_F_NOTIFICATION_DATA)
            if size != (4 if data else 2):
                self._refuse(
                    f"a {8 * size}-bit notification (must be {32 if data else 16}-bit)",
                    "drivernormative:Virtio Transport Options / Virtio Over PCI Bus / "
                    "PCI-specific Initialization And Device Operation / Available Buffer Notifications",
                )
                return
            self.notify(value, queue)

    def serve_notification(
        self, value: int, queue: int | None = None, *, rearm: bool = True
    ) -> int:
        """Serve an available buffer notification (a queue index, or its data); chains served."""
        return self.registers.notify(value, queue=queue, rearm=rearm)

    def _field(
        self, table: dict[int, tuple[str, int, bool]], offset: int, size: int, what: str
    ) -> tuple[str, int, bool] | None:
        entry = table.get(offset)
        if entry is None or entry[1] != size:
            self._refuse(f"{what} access of {size} bytes at {offset:#x}: not a field's width")
            return None
        return entry

    def _common_read(self, offset: int, size: int) -> int:
        entry = self._field(COMMON, offset, size, "common configuration")
        if entry is None:
            return 0
        regs = self.registers
        name = entry[0]
        if name == "device_status":
            return regs.status
        if name == "config_generation":
            return self._config_generation()
        if name == "num_queues":
            return regs.num_queues
        if name.endswith("_hi"):
            return int(getattr(regs, name[:-3])) >> 32
        if name in ("queue_desc", "queue_driver", "queue_device"):
            return int(getattr(regs, name)) & 0xFFFFFFFF
        if name in ("admin_queue_index", "admin_queue_num"):
            return 0
        return int(getattr(regs, name))

    def _common_write(self, offset: int, size: int, value: int) -> None:
        entry = self._field(COMMON, offset, size, "common configuration")
        if entry is None:
            return
        name, _width, writable = entry
        if not writable:
            self._refuse(f"driver wrote {name}, which is read-only", N_COMMON_DRV)
            return
        regs = self.registers
        if name == "device_status":
            regs.status = value
            if value == 0:
                self._update_intx()
        elif name.endswith("_hi") or name in ("queue_desc", "queue_driver", "queue_device"):
            field_name = name.removesuffix("_hi")
            shift = 32 if name.endswith("_hi") else 0
            current = int(getattr(regs, field_name))
            setattr(regs, field_name, current & ~(0xFFFFFFFF << shift) | value << shift)
        elif name == "queue_enable":
            if value == 0:
                self._refuse("driver wrote 0 to queue_enable", N_COMMON_DRV)
                return
            regs.queue_enable = 1
        elif name == "queue_size":
            packed = regs.device.has(F.VIRTIO_F_RING_PACKED)
            if value == 0 or (not packed and value & (value - 1)):
                self._refuse(f"queue_size {value}", N_COMMON_DRV)
                return
            regs.queue_size = value
        elif name in ("config_msix_vector", "queue_msix_vector"):
            if value != NO_VECTOR and value >= self.msix_vectors:
                self._refuse(f"{name} {value} outside the MSI-X table", N_MSIX_DRV)
                return
            setattr(regs, name, value)
        else:
            setattr(regs, name, value)

    def _config_generation(self) -> int:
        # An 8-bit generation that moves once per change the driver could have seen,
        # so it cannot wrap back to a value the driver read before the change.
        self._note_config_change()
        return self.generation

    def _note_config_change(self) -> None:
        current = self.registers.config_generation
        if current != self._generation_seen:
            self._generation_seen = current
            self.generation = (self.generation + 1) & 0xFF

    def _device_config_read(self, offset: int, size: int) -> int:
        if size not in (1, 2, 4) or offset % size:
            self._refuse(f"device configuration read of {size} bytes at {offset:#x}")
            return 0
        self._note_config_change()
        return int.from_bytes(self.registers.read_config(offset, size), "little")

    def _device_config_write(self, offset: int, size: int, value: int) -> None:
        if size not in (1, 2, 4) or offset % size:
            self._refuse(f"device configuration write of {size} bytes at {offset:#x}")
            return
        data = (value & ((1 << 8 * size) - 1)).to_bytes(size, "little")
        self.registers.write_config(offset, data)

    def _read_isr(self) -> int:
        value = self.registers.read_isr()
        self._update_intx()
        return value

    # -- the legacy I/O BAR ----------------------------------------------------------------

    def _legacy_map(self) -> tuple[dict[int, tuple[str, int, bool]], int]:
        if self.msix_control & MSIX_ENABLE:
            return {**LEGACY, **LEGACY_MSIX}, 0x18
        return LEGACY, 0x14

    def _legacy_read(self, offset: int, size: int) -> int:
        self._use(Interface.LEGACY)
        table, config_at = self._legacy_map()
        if offset >= config_at:
            return int.from_bytes(self.registers.read_config(offset - config_at, size), "little")
        entry = self._field(table, offset, size, "legacy register")
        if entry is None:
            return 0
        regs = self.registers
        name = entry[0]
        if name == "host_features":
            regs.device_feature_select = 0
            return regs.device_feature
        if name == "guest_features":
            regs.driver_feature_select = 0
            return regs.driver_feature
        if name == "queue_size":
            return regs.queue_max_size
        if name == "device_status":
            return regs.status
        if name == "isr":
            return self._read_isr()
        if name == "queue_notify":
            return 0
        return int(getattr(regs, name))

    def _legacy_write(self, offset: int, size: int, value: int) -> None:
        self._use(Interface.LEGACY)
        table, config_at = self._legacy_map()
        if offset >= config_at:
            self.registers.write_config(
                offset - config_at, (value & ((1 << 8 * size) - 1)).to_bytes(size, "little")
            )
            return
        entry = self._field(table, offset, size, "legacy register")
        if entry is None:
            return
        name, _width, writable = entry
        regs = self.registers
        if not writable:
            self._refuse(f"driver wrote the read-only legacy register {name}")
        elif name == "guest_features":
            regs.driver_feature_select = 0
            regs.driver_feature = value
        elif name == "queue_notify":
            self.notify(value, None)
        elif name == "device_status":
            regs.status = value
            if value == 0:
                self._update_intx()
        elif name == "queue_pfn":
            # The legacy queue size is the device's: the driver cannot choose it.
            regs.queue_size = regs.queue_max_size
            regs.queue_pfn = value
        else:
            setattr(regs, name, value)

    # -- MSI-X ------------------------------------------------------------------------------

    def _msix_read(self, offset: int, size: int) -> int:
        if offset >= MSIX_PBA:
            rel = offset - MSIX_PBA
            return int.from_bytes(self.pending[rel : rel + size], "little")
        return int.from_bytes(self.msix_table[offset : offset + size], "little")

    def _msix_write(self, offset: int, size: int, value: int) -> None:
        if offset >= MSIX_PBA or offset + size > len(self.msix_table):
            return  # the PBA is read-only
        data = (value & ((1 << 8 * size) - 1)).to_bytes(size, "little")
        self.msix_table[offset : offset + size] = data
        self._deliver_pending()

    def _masked(self, vector: int) -> bool:
        return bool(self.msix_control & MSIX_MASK_ALL or self.msix_table[16 * vector + 12] & 1)

    def _send(self, vector: int) -> None:
        if vector == NO_VECTOR or vector >= self.msix_vectors:
            return  # MSI-X on, no vector mapped: no interrupt
        if self._masked(vector):
            self.pending[vector // 8] |= 1 << (vector % 8)
            return
        addr_lo, addr_hi, data, _control = struct.unpack_from("<IIII", self.msix_table, 16 * vector)
        if self.command & CMD_BUS_MASTER:
            self.msi(addr_lo | addr_hi << 32, data)

    def _deliver_pending(self) -> None:
        if not self.msix_control & MSIX_ENABLE:
            return
        for vector in range(self.msix_vectors):
            bit = 1 << (vector % 8)
            if self.pending[vector // 8] & bit and not self._masked(vector):
                self.pending[vector // 8] &= ~bit
                self._send(vector)

    # -- InterruptSink ---------------------------------------------------------------------

    def queue_interrupt(self, queue: int, vector: int) -> None:
        if self.msix_control & MSIX_ENABLE:
            self._send(vector)
        else:
            self._update_intx()

    def config_interrupt(self, vector: int) -> None:
        if self.msix_control & MSIX_ENABLE:
            self._send(vector)
        else:
            self._update_intx()

    def _update_intx(self) -> None:
        level = (
            not self.msix_control & MSIX_ENABLE
            and not self.command & CMD_INTX_DISABLE
            and bool(self.registers.interrupt_status)
        )
        if level != self.intx_level:
            self.intx_level = level
            self.intx(level)


# -- the driver side ---------------------------------------------------------------------------


class PciBus(Protocol):
    """How a driver reaches one PCI function: its config space, its BARs, its interrupts."""

    def config_read(self, offset: int, size: int) -> int: ...

    def config_write(self, offset: int, size: int, value: int) -> None: ...

    def bar_read(self, bar: int, offset: int, size: int) -> int: ...

    def bar_write(self, bar: int, offset: int, size: int, value: int) -> None: ...

    def msix_message(self, vector: int) -> tuple[int, int]:
        """The MSI-X (address, data) to program for ``vector``."""

    def wait_interrupt(self, timeout: float | None) -> list[int]:
        """The MSI-X vectors that fired (-1 for INTx), or [] after ``timeout``."""


class NotVirtio(VirtioError):
    """The function is not a virtio device this driver can use."""


@dataclass(frozen=True)
class Cap:
    cfg_type: int
    bar: int
    offset: int
    length: int
    at: int  # where the capability sits in the configuration space
    multiplier: int = 0


class PciTransport:
    """The driver side of virtio-pci: a DriverTransport over a :class:`PciBus`."""

    def __init__(
        self,
        bus: PciBus,
        memory: Memory,
        allocator: Allocator,
        *,
        force_legacy: bool = False,
        use_msix: bool = True,
        legacy_order: ByteOrder = "little",
    ) -> None:
        self.bus = bus
        self.memory = memory
        self.allocator = allocator
        vendor, pci_id = bus.config_read(CFG_VENDOR, 2), bus.config_read(CFG_DEVICE, 2)
        if vendor != VENDOR or not 0x1000 <= pci_id <= 0x107F:
            raise NotVirtio(f"PCI {vendor:04x}:{pci_id:04x} is not a virtio function")
        self.pci_device_id = pci_id
        self.revision = bus.config_read(CFG_REVISION, 1)
        if pci_id >= MODERN_BASE:
            self.device_id = pci_id - MODERN_BASE
        else:
            # Transitional: the subsystem device id is the virtio device id.
            self.device_id = bus.config_read(CFG_SUBSYS_ID, 2)
        self.caps: dict[int, Cap] = {}
        #: Shared memory regions: id -> (BAR, offset, length).
        self.shared_memory: dict[int, tuple[int, int, int]] = {}
        #: Vendor data capabilities: (where, vendor_id).
        self.vendor_data: list[tuple[int, int]] = []
        self.msix_at: int | None = None
        self.msix_size = 0
        self._walk_capabilities()
        modern = all(t in self.caps for t in (CapType.COMMON, CapType.NOTIFY, CapType.ISR))
        legacy_bar = pci_id < MODERN_BASE and bus.config_read(CFG_BAR0, 4) & 1
        if force_legacy or not modern:
            if not legacy_bar:
                raise NotVirtio("no legacy I/O BAR to fall back on, and no modern capabilities")
            self.legacy = True
        else:
            self.legacy = False
        self.legacy_order: ByteOrder = legacy_order
        self.queue_align = LEGACY_QUEUE_ALIGN
        command = CMD_MEMORY | CMD_BUS_MASTER | (CMD_IO if self.legacy else 0)
        bus.config_write(CFG_COMMAND, 2, bus.config_read(CFG_COMMAND, 2) | command)
        self.vectors = 0
        if use_msix and self.msix_at is not None and self.msix_size >= 2:
            self._enable_msix()
        self._used: Callable[[int], None] = lambda _q: None
        self._config: Callable[[], None] = lambda: None
        self._queue_vectors: dict[int, int] = {}
        self._driver_features = 0

    def _walk_capabilities(self) -> None:
        bus = self.bus
        if not bus.config_read(CFG_STATUS, 2) & STATUS_CAP_LIST:
            return
        at, seen = bus.config_read(CFG_CAPS, 1) & ~3, 0
        while at and seen < 48:
            seen += 1
            kind = bus.config_read(at, 1)
            nxt = bus.config_read(at + 1, 1) & ~3
            if kind == CAP_MSIX:
                self.msix_at = at
                self.msix_size = (bus.config_read(at + 2, 2) & 0x7FF) + 1
            elif kind == CAP_VENDOR:
                cfg_type = bus.config_read(at + 3, 1)
                bar = bus.config_read(at + 4, 1)
                if cfg_type == CapType.VENDOR_DATA:
                    # Only its vendor_id is read: what follows means something only to
                    # a driver that knows that vendor's format (this one knows none).
                    self.vendor_data.append((at, bus.config_read(at + 4, 2)))
                elif cfg_type == CapType.SHARED_MEMORY and bar <= 5:
                    shmid = bus.config_read(at + 5, 1)
                    offset = bus.config_read(at + 8, 4) | bus.config_read(at + 16, 4) << 32
                    length = bus.config_read(at + 12, 4) | bus.config_read(at + 20, 4) << 32
                    self.shared_memory.setdefault(shmid, (bar, offset, length))
                # The first of each type is the one to use; reserved types and BARs are ignored.
                elif (
                    cfg_type in CapType._value2member_map_
                    and bar <= 5
                    and cfg_type not in self.caps
                ):
                    offset = bus.config_read(at + 8, 4)
                    length = bus.config_read(at + 12, 4)
                    multiplier = bus.config_read(at + 16, 4) if cfg_type == CapType.NOTIFY else 0
                    self.caps[cfg_type] = Cap(cfg_type, bar, offset, length, at, multiplier)
            at = nxt

    def _enable_msix(self) -> None:
        bus, at = self.bus, self.msix_at
        assert at is not None
        table_bir = bus.config_read(at + 4, 4)
        bar, offset = table_bir & 7, table_bir & ~7
        self.vectors = min(self.msix_size, 2)  # one for the configuration, one for the queues
        for vector in range(self.vectors):
            address, data = bus.msix_message(vector)
            entry = offset + 16 * vector
            bus.bar_write(bar, entry, 4, address & 0xFFFFFFFF)
            bus.bar_write(bar, entry + 4, 4, address >> 32)
            bus.bar_write(bar, entry + 8, 4, data)
            bus.bar_write(bar, entry + 12, 4, 0)  # unmasked
        control = bus.config_read(at + 2, 2)
        bus.config_write(at + 2, 2, (control | MSIX_ENABLE) & ~MSIX_MASK_ALL)

    # -- register access ---------------------------------------------------------------------

    def _common(self, field_offset: int, size: int, value: int | None = None) -> int:
        cap = self.caps[CapType.COMMON]
        if value is None:
            return self.bus.bar_read(cap.bar, cap.offset + field_offset, size)
        self.bus.bar_write(cap.bar, cap.offset + field_offset, size, value)
        return value

    def _legacy(self, offset: int, size: int, value: int | None = None) -> int:
        if value is None:
            return self.bus.bar_read(BAR_LEGACY, offset, size)
        self.bus.bar_write(BAR_LEGACY, offset, size, value)
        return value

    def read_shared_memory(self, shmid: int, offset: int, size: int) -> int:
        """Read from shared memory region ``shmid`` (through its BAR)."""
        bar, start, length = self.shared_memory[shmid]
        if not 0 <= offset <= length - size:
            raise ValueError(f"shared memory region {shmid}: {size} bytes at {offset:#x}")
        return self.bus.bar_read(bar, start + offset, size)

    def write_shared_memory(self, shmid: int, offset: int, size: int, value: int) -> None:
        bar, start, length = self.shared_memory[shmid]
        if not 0 <= offset <= length - size:
            raise ValueError(f"shared memory region {shmid}: {size} bytes at {offset:#x}")
        self.bus.bar_write(bar, start + offset, size, value)

    def shared_memory_window(self, shmid: int) -> ShmWindow | None:
        if shmid not in self.shared_memory:
            return None
        return AccessWindow(
            self.shared_memory[shmid][2],
            lambda offset, size: self.read_shared_memory(shmid, offset, size),
            lambda offset, size, value: self.write_shared_memory(shmid, offset, size, value),
        )

    # -- DriverTransport -------------------------------------------------------------------------

    def read_status(self) -> int:
        return self._legacy(0x12, 1) if self.legacy else self._common(0x14, 1)

    def write_status(self, value: int) -> None:
        if self.legacy:
            self._legacy(0x12, 1, value)
        else:
            self._common(0x14, 1, value)
        if value == 0:
            self._queue_vectors.clear()
        elif self.vectors and value == 1:
            self._map_config_vector()

    def _map_config_vector(self) -> None:
        if self.legacy:
            self._legacy(0x14, 2, 0)
            ok = self._legacy(0x14, 2) == 0
        else:
            self._common(0x10, 2, 0)
            ok = self._common(0x10, 2) == 0
        if not ok:
            # The device could not map it: interrupts by INTx instead.
            log.info("config vector refused: falling back to INTx")
            self.vectors = 0

    def read_device_features(self) -> int:
        if self.legacy:
            return self._legacy(0x00, 4)
        value = 0
        for word in range(F.FEATURE_WORDS):
            self._common(0x00, 4, word)
            value |= self._common(0x04, 4) << (32 * word)
        return value

    def write_driver_features(self, value: int) -> None:
        self._driver_features = value
        if self.legacy:
            self._legacy(0x04, 4, value & 0xFFFFFFFF)
            return
        for word in range(F.FEATURE_WORDS):
            self._common(0x08, 4, word)
            self._common(0x0C, 4, value >> (32 * word) & 0xFFFFFFFF)

    def _device_config(self) -> tuple[int, int]:
        if self.legacy:
            return BAR_LEGACY, 0x18 if self.vectors else 0x14
        cap = self.caps[CapType.DEVICE]
        return cap.bar, cap.offset

    def read_config(self, offset: int, size: int) -> bytes:
        bar, base = self._device_config()
        out = bytearray()
        pos, end = offset, offset + size
        while pos < end:
            width = next(w for w in (4, 2, 1) if pos % w == 0 and pos + w <= end)
            out += self.bus.bar_read(bar, base + pos, width).to_bytes(width, "little")
            pos += width
        return bytes(out)

    def write_config(self, offset: int, data: bytes) -> None:
        bar, base = self._device_config()
        pos = 0
        while pos < len(data):
            at = offset + pos
            width = next(w for w in (4, 2, 1) if at % w == 0 and pos + w <= len(data))
            self.bus.bar_write(
                bar, base + at, width, int.from_bytes(data[pos : pos + width], "little")
            )
            pos += width

    def config_generation(self) -> int:
        return 0 if self.legacy else self._common(0x15, 1)

    def num_queues(self) -> int:
        if not self.legacy:
            return self._common(0x12, 2)
        count = 0
        while count < 1024 and self.queue_max_size(count):
            count += 1
        return count

    def queue_max_size(self, index: int) -> int:
        if self.legacy:
            self._legacy(0x0E, 2, index)
            return self._legacy(0x0C, 2)
        self._common(0x16, 2, index)
        return self._common(0x18, 2)

    def setup_queue(self, index: int, layout: RingLayout) -> None:
        vector = 1 if self.vectors else NO_VECTOR
        if self.legacy:
            self._legacy(0x0E, 2, index)
            if self.vectors:
                self._legacy(0x16, 2, vector)
                if self._legacy(0x16, 2) != vector:
                    raise NegotiationError(f"queue {index}: MSI-X vector refused", N_MSIX_DRV)
            self._legacy(0x08, 4, layout.desc // 4096)
        else:
            self._common(0x16, 2, index)
            self._common(0x18, 2, layout.size)
            for off, addr in ((0x20, layout.desc), (0x28, layout.driver), (0x30, layout.device)):
                self._common(off, 4, addr & 0xFFFFFFFF)
                self._common(off + 4, 4, addr >> 32)
            if self.vectors:
                self._common(0x1A, 2, vector)
                if self._common(0x1A, 2) != vector:
                    raise NegotiationError(f"queue {index}: MSI-X vector refused", N_MSIX_DRV)
            self._common(0x1C, 2, 1)
        self._queue_vectors[index] = vector

    def reset_queue(self, index: int) -> None:
        if self.legacy:
            raise NegotiationError("a legacy interface has no queue reset")
        self._common(0x16, 2, index)
        self._common(0x3A, 2, 1)

    def queue_reset_done(self, index: int) -> bool:
        self._common(0x16, 2, index)
        done = self._common(0x3A, 2) == 0 and self._common(0x1C, 2) == 0
        if done:
            self._queue_vectors.pop(index, None)
        return done

    def notify(self, index: int, value: int) -> None:
        if self.legacy:
            self._legacy(0x10, 2, index)
            return
        cap = self.caps[CapType.NOTIFY]
        self._common(0x16, 2, index)
        off = self._common(0x1E, 2)
        # With VIRTIO_F_NOTIFICATION_DATA a notification is 32 bits, otherwise 16.
        wide = self._driver_features >> F.VIRTIO_F_NOTIFICATION_DATA & 1
        self.bus.bar_write(cap.bar, cap.offset + off * cap.multiplier, 4 if wide else 2, value)

    def set_interrupt_handlers(
        self, used: Callable[[int], None], config: Callable[[], None]
    ) -> None:
        self._used = used
        self._config = config

    def wait_interrupt(self, timeout: float | None) -> bool:
        fired = self.bus.wait_interrupt(timeout)
        if not fired:
            return False
        for vector in fired:
            if vector < 0:
                # INTx: the ISR says what happened, and reading it lowers the line.
                isr = self._legacy(0x13, 1) if self.legacy else self._isr()
                if isr & ISR_QUEUE:
                    for index in sorted(self._queue_vectors):
                        self._used(index)
                if isr & ISR_CONFIG:
                    self._config()
            elif vector == 0:
                self._config()
            else:
                for index, queue_vector in sorted(self._queue_vectors.items()):
                    if queue_vector == vector:
                        self._used(index)
        return True

    def _isr(self) -> int:
        cap = self.caps[CapType.ISR]
        return self.bus.bar_read(cap.bar, cap.offset, 1)

    def wait_until(self, predicate: Callable[[], bool], timeout: float) -> bool:
        done = wait_until(predicate, timeout, self.wait_interrupt)
        self.wait_interrupt(0)  # an interrupt the ring already answered: take it
        return done


class LocalPciBus:
    """A :class:`PciBus` straight onto a :class:`PciFunction` in the same process."""

    def __init__(self, function: PciFunction) -> None:
        self.function = function
        self._fired: list[int] = []
        self._level = False
        function.msi = self._msi
        function.intx = self._intx
        self.accesses = 0
        self.messages = 0
        # Firmware's job on a real machine: give the BARs addresses.
        for i, bar in enumerate(sorted(function.bars.values(), key=lambda b: b.index)):
            base = (0x1000 + 0x100 * i) if bar.io else 0xE000_0000 + 0x10_0000 * i
            function.config_write(CFG_BAR0 + 4 * bar.index, 4, base)

    def _msi(self, address: int, data: int) -> None:
        self.messages += 1
        self._fired.append(data)

    def _intx(self, level: bool) -> None:
        self._level = level

    def config_read(self, offset: int, size: int) -> int:
        self.accesses += 1
        return self.function.config_read(offset, size)

    def config_write(self, offset: int, size: int, value: int) -> None:
        self.accesses += 1
        self.function.config_write(offset, size, value)

    def bar_read(self, bar: int, offset: int, size: int) -> int:
        self.accesses += 1
        return self.function.bar_read(bar, offset, size)

    def bar_write(self, bar: int, offset: int, size: int, value: int) -> None:
        self.accesses += 1
        self.function.bar_write(bar, offset, size, value)

    def msix_message(self, vector: int) -> tuple[int, int]:
        return 0xFEE0_0000, vector  # the data names the vector

    def wait_interrupt(self, timeout: float | None) -> list[int]:
        if not self._fired and not self._level:
            serve_events(self.function.device.events, timeout)
        fired, self._fired = self._fired, []
        if self._level:
            fired.append(-1)
        return fired


def pci_loopback(
    device: VirtioDevice,
    *,
    transitional: bool = False,
    force_legacy: bool = False,
    msix_vectors: int = 2,
    legacy_order: ByteOrder = "little",
    memory_size: int = 64 << 20,
) -> PciTransport:
    """A driver transport reaching ``device`` through a PCI function's registers, in process."""
    memory = GuestMemory()
    memory.add(0, bytearray(memory_size), name="guest-ram")
    device.attach_memory(memory)
    function = PciFunction(
        device, transitional=transitional, msix_vectors=msix_vectors, legacy_order=legacy_order
    )
    allocator = Allocator(0x1000, memory_size - 0x1000)
    try:
        return PciTransport(
            LocalPciBus(function),
            memory,
            allocator,
            force_legacy=force_legacy,
            legacy_order=legacy_order,
        )
    except NotVirtio as err:
        raise NegotiationError(str(err)) from err
