"""virtio-mmio: the register map of "Virtio Over MMIO", device side and driver side.

:class:`MmioDevice` is the device side: a memory-mapped register window
(version 2, or the legacy version 1 with GuestPageSize, QueueAlign and
QueuePFN) mapped onto the core's device transport seam, with a
level-triggered interrupt line. Every access is checked the way the driver
requirements put it (32-bit aligned accesses to the control registers, no
writes to read-only registers, no reads of write-only ones, nothing outside
the map, no queue configuration while QueueReady is set): a driver that
breaks them puts the device in DEVICE_NEEDS_RESET, naming the rule.

:class:`MmioTransport` is the driver side: a :class:`~virtio.core.driver.DriverTransport`
over any :class:`MmioBus` (reads and writes of the window, an interrupt line
to wait on). :class:`LocalMmioBus` joins the two in one process;
a bus that reaches QEMU's own virtio-mmio devices (through qtest) plugs in
the same way.

The registers are little-endian. A version 1 device is a legacy interface:
its rings and configuration fields use the guest's byte order.
"""

from __future__ import annotations

import enum
import logging
import threading
from collections.abc import Callable
from typing import Protocol

from virtio.core.device import VirtioDevice
from virtio.core.driver import count_queues
from virtio.core.registers import ISR_CONFIG, ISR_QUEUE, DeviceRegisters
from virtio.core.shm import MemoryWindow, ShmWindow
from virtio.core.status import Interface
from virtio.errors import NegotiationError, VirtioError
from virtio.layout import ByteOrder
from virtio.memory import Allocator, GuestMemory, Memory
from virtio.queue import RingLayout
from virtio.queue.common import LEGACY_QUEUE_ALIGN
from virtio.spec import features as F
from virtio.transport.blocking import serve_events, wait_until

log = logging.getLogger("virtio.transport.mmio")

MAGIC = 0x74726976  # "virt", little-endian
VENDOR_ID = 0x50595654  # "TVYP": pyvirtio's devices
CONFIG = 0x100
NO_REGION = (1 << 64) - 1  # SHMLen of a shared memory region that does not exist
_PAGE = 4096

N_MMIO_DEV = (
    "devicenormative:Virtio Transport Options / Virtio Over MMIO / MMIO Device Register Layout"
)
N_MMIO_DRV = (
    "drivernormative:Virtio Transport Options / Virtio Over MMIO / MMIO Device Register Layout"
)
N_MMIO_INIT_DRV = (
    "drivernormative:Virtio Transport Options / Virtio Over MMIO / "
    "MMIO-specific Initialization And Device Operation / Device Initialization"
)


class Reg(enum.IntEnum):
    """Control register offsets (version 2 names; the legacy ones where they differ)."""

    MAGIC_VALUE = 0x000
    VERSION = 0x004
    DEVICE_ID = 0x008
    VENDOR_ID = 0x00C
    DEVICE_FEATURES = 0x010
    DEVICE_FEATURES_SEL = 0x014
    DRIVER_FEATURES = 0x020
    DRIVER_FEATURES_SEL = 0x024
    GUEST_PAGE_SIZE = 0x028  # legacy
    QUEUE_SEL = 0x030
    QUEUE_SIZE_MAX = 0x034
    QUEUE_SIZE = 0x038
    QUEUE_ALIGN = 0x03C  # legacy
    QUEUE_PFN = 0x040  # legacy
    QUEUE_READY = 0x044
    QUEUE_NOTIFY = 0x050
    INTERRUPT_STATUS = 0x060
    INTERRUPT_ACK = 0x064
    STATUS = 0x070
    QUEUE_DESC_LOW = 0x080
    QUEUE_DESC_HIGH = 0x084
    QUEUE_DRIVER_LOW = 0x090
    QUEUE_DRIVER_HIGH = 0x094
    QUEUE_DEVICE_LOW = 0x0A0
    QUEUE_DEVICE_HIGH = 0x0A4
    SHM_SEL = 0x0AC
    SHM_LEN_LOW = 0x0B0
    SHM_LEN_HIGH = 0x0B4
    SHM_BASE_LOW = 0x0B8
    SHM_BASE_HIGH = 0x0BC
    QUEUE_RESET = 0x0C0
    CONFIG_GENERATION = 0x0FC


R = Reg
_COMMON_READ = {R.MAGIC_VALUE, R.VERSION, R.DEVICE_ID, R.VENDOR_ID, R.DEVICE_FEATURES}
_COMMON_READ |= {R.QUEUE_SIZE_MAX, R.INTERRUPT_STATUS, R.STATUS}
_COMMON_WRITE = {R.DEVICE_FEATURES_SEL, R.DRIVER_FEATURES, R.DRIVER_FEATURES_SEL, R.QUEUE_SEL}
_COMMON_WRITE |= {R.QUEUE_SIZE, R.QUEUE_NOTIFY, R.INTERRUPT_ACK, R.STATUS}
#: (readable, writable) control registers, by version.
DIRECTIONS: dict[int, tuple[frozenset[Reg], frozenset[Reg]]] = {
    2: (
        frozenset(
            _COMMON_READ
            | {R.QUEUE_READY, R.SHM_LEN_LOW, R.SHM_LEN_HIGH, R.SHM_BASE_LOW, R.SHM_BASE_HIGH}
            | {R.QUEUE_RESET, R.CONFIG_GENERATION}
        ),
        frozenset(
            _COMMON_WRITE
            | {R.QUEUE_READY, R.QUEUE_DESC_LOW, R.QUEUE_DESC_HIGH, R.QUEUE_DRIVER_LOW}
            | {R.QUEUE_DRIVER_HIGH, R.QUEUE_DEVICE_LOW, R.QUEUE_DEVICE_HIGH, R.SHM_SEL}
            | {R.QUEUE_RESET}
        ),
    ),
    1: (
        frozenset(_COMMON_READ | {R.QUEUE_PFN}),
        frozenset(_COMMON_WRITE | {R.GUEST_PAGE_SIZE, R.QUEUE_ALIGN, R.QUEUE_PFN}),
    ),
}
# Queue registers the driver must leave alone while QueueReady is set (version 2).
_QUEUE_CONFIG = {R.QUEUE_SIZE, R.QUEUE_DESC_LOW, R.QUEUE_DESC_HIGH, R.QUEUE_DRIVER_LOW}
_QUEUE_CONFIG |= {R.QUEUE_DRIVER_HIGH, R.QUEUE_DEVICE_LOW, R.QUEUE_DEVICE_HIGH}
_ADDRESS = {
    R.QUEUE_DESC_LOW: ("queue_desc", 0),
    R.QUEUE_DESC_HIGH: ("queue_desc", 32),
    R.QUEUE_DRIVER_LOW: ("queue_driver", 0),
    R.QUEUE_DRIVER_HIGH: ("queue_driver", 32),
    R.QUEUE_DEVICE_LOW: ("queue_device", 0),
    R.QUEUE_DEVICE_HIGH: ("queue_device", 32),
}
_LOW32 = 0xFFFFFFFF
# Registers that are the seam's attribute of the same meaning, read or written as is.
_SEAM_READS = {
    R.DEVICE_ID: "device_id",
    R.DEVICE_FEATURES: "device_feature",
    R.QUEUE_SIZE_MAX: "queue_max_size",
    R.QUEUE_READY: "queue_enable",
    R.QUEUE_PFN: "queue_pfn",
    R.INTERRUPT_STATUS: "interrupt_status",
    R.STATUS: "status",
    R.QUEUE_RESET: "queue_reset",
    R.CONFIG_GENERATION: "config_generation",
}
_SEAM_WRITES = {
    R.DEVICE_FEATURES_SEL: "device_feature_select",
    R.DRIVER_FEATURES: "driver_feature",
    R.DRIVER_FEATURES_SEL: "driver_feature_select",
    R.QUEUE_SEL: "queue_select",
    R.QUEUE_RESET: "queue_reset",
    R.QUEUE_ALIGN: "queue_align",
    R.QUEUE_PFN: "queue_pfn",
}


class MmioDevice:
    """A device behind a virtio-mmio register window (the device side of the transport).

    ``irq(level)`` drives the interrupt line: raised while InterruptStatus has
    a bit set, lowered when the driver acknowledges the last one. Shared
    memory regions are placed at ``shm_base[id]`` in the guest's physical
    address space (0 when not given).
    """

    def __init__(
        self,
        device: VirtioDevice,
        *,
        version: int = 2,
        legacy_order: ByteOrder = "little",
        irq: Callable[[bool], None] | None = None,
        shm_base: dict[int, int] | None = None,
    ) -> None:
        if version not in DIRECTIONS:
            raise ValueError(f"virtio-mmio version {version} (1 or 2)")
        self.device = device
        self.version = version
        self.irq = irq or (lambda _level: None)
        self.shm_base = dict(shm_base or {})
        self.shm_select = 0
        self.line = False
        self.registers = DeviceRegisters(
            device,
            interrupts=self,
            interface=Interface.LEGACY if version == 1 else Interface.MODERN,
            legacy_order=legacy_order,
        )
        self.readable, self.writable = DIRECTIONS[version]

    # -- InterruptSink: a level-triggered line ---------------------------------------

    def queue_interrupt(self, queue: int, vector: int) -> None:
        self._update_line()

    def config_interrupt(self, vector: int) -> None:
        self._update_line()

    def _update_line(self) -> None:
        level = bool(self.registers.interrupt_status)
        if level != self.line:
            self.line = level
            self.irq(level)

    # -- accesses ------------------------------------------------------------------------

    def _refuse(self, what: str) -> None:
        self.device.fail(what, N_MMIO_DRV)

    def read(self, offset: int, size: int) -> int:
        """A driver read of ``size`` bytes at ``offset`` of the window."""
        if offset >= CONFIG:
            return self._read_config(offset - CONFIG, size)
        reg = self._control(offset, size, "read")
        if reg is None:
            return 0
        if reg not in self.readable:
            self._refuse(f"driver read write-only register {reg.name} ({offset:#x})")
            return 0
        return self._read(reg) & _LOW32

    def write(self, offset: int, size: int, value: int) -> None:
        """A driver write of ``size`` bytes at ``offset`` of the window."""
        if offset >= CONFIG:
            self._write_config(offset - CONFIG, size, value)
            return
        reg = self._control(offset, size, "write")
        if reg is None:
            return
        if reg not in self.writable:
            self._refuse(f"driver wrote read-only register {reg.name} ({offset:#x})")
            return
        self._write(reg, value & _LOW32)

    def _control(self, offset: int, size: int, what: str) -> Reg | None:
        if size != 4 or offset % 4:
            self._refuse(f"driver {what} of {size} bytes at {offset:#x}: registers are 32-bit")
            return None
        try:
            return Reg(offset)
        except ValueError:
            self._refuse(f"driver {what} at {offset:#x}, which is no register")
            return None

    def _config_access(self, offset: int, size: int, what: str) -> bool:
        if size not in (1, 2, 4) or offset % size:
            self._refuse(f"config {what} of {size} bytes at {offset:#x}: not an aligned 1/2/4")
            return False
        return True

    def _read_config(self, offset: int, size: int) -> int:
        if not self._config_access(offset, size, "read"):
            return 0
        return int.from_bytes(self.registers.read_config(offset, size), "little")

    def _write_config(self, offset: int, size: int, value: int) -> None:
        if self._config_access(offset, size, "write"):
            self.registers.write_config(
                offset, (value & ((1 << 8 * size) - 1)).to_bytes(size, "little")
            )

    def _read(self, reg: Reg) -> int:
        regs = self.registers
        seam = _SEAM_READS.get(reg)
        if seam is not None:
            return int(getattr(regs, seam))
        if reg is R.MAGIC_VALUE:
            return MAGIC
        if reg is R.VERSION:
            return self.version
        if reg is R.VENDOR_ID:
            return VENDOR_ID
        # The shared memory registers.
        region = next((r for r in regs.shared_memory_regions if r.id == self.shm_select), None)
        if reg in (R.SHM_LEN_LOW, R.SHM_LEN_HIGH):
            length = NO_REGION if region is None else region.length
            return length if reg is R.SHM_LEN_LOW else length >> 32
        base = NO_REGION if region is None else self.shm_base.get(region.id, 0)
        return base if reg is R.SHM_BASE_LOW else base >> 32

    def _write(self, reg: Reg, value: int) -> None:
        regs = self.registers
        if reg in _QUEUE_CONFIG and regs.queue_enable:
            self._refuse(f"driver wrote {reg.name} of queue {regs.queue_select} while it is ready")
            return
        seam = _SEAM_WRITES.get(reg)
        if seam is not None:
            setattr(regs, seam, value)
        elif reg is R.QUEUE_SIZE:
            if value > regs.queue_max_size:
                self._refuse(f"QueueSize {value} > QueueSizeMax {regs.queue_max_size}")
                return
            regs.queue_size = value
        elif reg in _ADDRESS:
            name, shift = _ADDRESS[reg]
            current = int(getattr(regs, name))
            setattr(regs, name, current & ~(_LOW32 << shift) | value << shift)
        elif reg is R.QUEUE_READY:
            regs.queue_enable = value & 1
        elif reg is R.QUEUE_NOTIFY:
            regs.notify(value)
        elif reg is R.INTERRUPT_ACK:
            if value & ~(ISR_QUEUE | ISR_CONFIG):
                self._refuse(f"InterruptACK {value:#x} sets undefined bits")
                return
            regs.ack_interrupt(value)
            self._update_line()
        elif reg is R.STATUS:
            regs.status = value
            if value == 0:
                self._update_line()  # a reset clears InterruptStatus
        elif reg is R.SHM_SEL:
            self.shm_select = value
        elif reg is R.GUEST_PAGE_SIZE:
            if value == 0 or value & (value - 1):
                self._refuse(f"GuestPageSize {value} is not a power of 2")
                return
            regs.guest_page_size = value


class MmioBus(Protocol):
    """How a driver reaches a virtio-mmio window: accesses and an interrupt line."""

    def read(self, offset: int, size: int) -> int: ...

    def write(self, offset: int, size: int, value: int) -> None: ...

    def wait_interrupt(self, timeout: float | None) -> bool:
        """Block until the interrupt line is raised (True) or ``timeout`` passes."""


class NoDevice(VirtioError):
    """The window holds no virtio device (bad magic, unknown version, or device id 0)."""


class MmioTransport:
    """The driver side of virtio-mmio: a DriverTransport over an :class:`MmioBus`."""

    def __init__(
        self,
        bus: MmioBus,
        memory: Memory,
        allocator: Allocator,
        *,
        legacy_order: ByteOrder = "little",
        page_size: int = _PAGE,
    ) -> None:
        self.bus = bus
        self.memory = memory
        self.allocator = allocator
        # Initialization begins with MagicValue and Version, then DeviceID; a device
        # id of 0 is a placeholder: nothing else may be touched.
        magic = bus.read(R.MAGIC_VALUE, 4)
        if magic != MAGIC:
            raise NoDevice(f"no virtio-mmio device: magic {magic:#x}", N_MMIO_INIT_DRV)
        self.version = bus.read(R.VERSION, 4)
        if self.version not in (1, 2):
            raise NoDevice(f"virtio-mmio version {self.version} is not 1 or 2", N_MMIO_INIT_DRV)
        self.device_id = bus.read(R.DEVICE_ID, 4)
        if self.device_id == 0:
            raise NoDevice("virtio-mmio placeholder (device id 0)", N_MMIO_INIT_DRV)
        self.vendor_id = bus.read(R.VENDOR_ID, 4)
        self.legacy = self.version == 1
        self.legacy_order: ByteOrder = legacy_order
        self.queue_align = LEGACY_QUEUE_ALIGN
        self.page_size = page_size
        self._used: Callable[[int], None] = lambda _q: None
        self._config: Callable[[], None] = lambda: None
        self._queues: set[int] = set()
        self._queue_count: int | None = None

    def shared_memory_window(self, shmid: int) -> ShmWindow | None:
        """Region ``shmid`` at the guest-physical base the SHM registers give (version 2)."""
        if self.version < 2:
            return None
        self.bus.write(R.SHM_SEL, 4, shmid)
        length = self.bus.read(R.SHM_LEN_LOW, 4) | self.bus.read(R.SHM_LEN_HIGH, 4) << 32
        base = self.bus.read(R.SHM_BASE_LOW, 4) | self.bus.read(R.SHM_BASE_HIGH, 4) << 32
        if length == NO_REGION or base == NO_REGION:
            return None
        return MemoryWindow(self.memory, base, length)

    # -- DriverTransport ------------------------------------------------------------------

    def read_status(self) -> int:
        return self.bus.read(R.STATUS, 4)

    def write_status(self, value: int) -> None:
        self.bus.write(R.STATUS, 4, value)
        if value == 0:
            self._queues.clear()

    def read_device_features(self) -> int:
        value = 0
        for word in range(1 if self.legacy else F.FEATURE_WORDS):
            self.bus.write(R.DEVICE_FEATURES_SEL, 4, word)
            value |= self.bus.read(R.DEVICE_FEATURES, 4) << (32 * word)
        return value

    def write_driver_features(self, value: int) -> None:
        for word in range(1 if self.legacy else F.FEATURE_WORDS):
            self.bus.write(R.DRIVER_FEATURES_SEL, 4, word)
            self.bus.write(R.DRIVER_FEATURES, 4, value >> (32 * word) & _LOW32)

    def read_config(self, offset: int, size: int) -> bytes:
        out = bytearray()
        pos, end = offset, offset + size
        while pos < end:
            # The widest aligned access that fits: 4, 2 or 1 bytes.
            width = next(w for w in (4, 2, 1) if pos % w == 0 and pos + w <= end)
            out += self.bus.read(CONFIG + pos, width).to_bytes(width, "little")
            pos += width
        return bytes(out)

    def write_config(self, offset: int, data: bytes) -> None:
        pos = 0
        while pos < len(data):
            at = offset + pos
            width = next(w for w in (4, 2, 1) if at % w == 0 and pos + w <= len(data))
            self.bus.write(CONFIG + at, width, int.from_bytes(data[pos : pos + width], "little"))
            pos += width

    def config_generation(self) -> int:
        return 0 if self.legacy else self.bus.read(R.CONFIG_GENERATION, 4)

    def num_queues(self) -> int:
        """MMIO has no queue count: probe QueueSizeMax until a queue is missing."""
        if self._queue_count is None:
            self._queue_count = count_queues(self.queue_max_size)
        return self._queue_count

    def queue_max_size(self, index: int) -> int:
        self.bus.write(R.QUEUE_SEL, 4, index)
        return self.bus.read(R.QUEUE_SIZE_MAX, 4)

    def setup_queue(self, index: int, layout: RingLayout) -> None:
        bus = self.bus
        if self.legacy and not self._queues:
            # Before the first queue, the legacy driver says how big a page is.
            bus.write(R.GUEST_PAGE_SIZE, 4, self.page_size)
        bus.write(R.QUEUE_SEL, 4, index)
        if self.legacy:
            bus.write(R.QUEUE_SIZE, 4, layout.size)
            bus.write(R.QUEUE_ALIGN, 4, self.queue_align)
            bus.write(R.QUEUE_PFN, 4, layout.desc // self.page_size)
        else:
            bus.write(R.QUEUE_SIZE, 4, layout.size)
            for low, addr in (
                (R.QUEUE_DESC_LOW, layout.desc),
                (R.QUEUE_DRIVER_LOW, layout.driver),
                (R.QUEUE_DEVICE_LOW, layout.device),
            ):
                bus.write(low, 4, addr & _LOW32)
                bus.write(low + 4, 4, addr >> 32)
            bus.write(R.QUEUE_READY, 4, 1)
        self._queues.add(index)

    def reset_queue(self, index: int) -> None:
        self.bus.write(R.QUEUE_SEL, 4, index)
        self.bus.write(R.QUEUE_RESET, 4, 1)

    def queue_reset_done(self, index: int) -> bool:
        self.bus.write(R.QUEUE_SEL, 4, index)
        return self.bus.read(R.QUEUE_RESET, 4) == 0 and self.bus.read(R.QUEUE_READY, 4) == 0

    def notify(self, index: int, value: int) -> None:
        self.bus.write(R.QUEUE_NOTIFY, 4, value)

    def set_interrupt_handlers(
        self, used: Callable[[int], None], config: Callable[[], None]
    ) -> None:
        self._used = used
        self._config = config

    def wait_interrupt(self, timeout: float | None) -> bool:
        """Wait for the line; read InterruptStatus, acknowledge it, then handle it."""
        if not self.bus.wait_interrupt(timeout):
            return False
        status = self.bus.read(R.INTERRUPT_STATUS, 4) & (ISR_QUEUE | ISR_CONFIG)
        if not status:
            return False
        self.bus.write(R.INTERRUPT_ACK, 4, status)
        if status & ISR_QUEUE:
            # The used buffer bit stands for every active queue.
            for index in sorted(self._queues):
                self._used(index)
        if status & ISR_CONFIG:
            self._config()
        return True

    def wait_until(self, predicate: Callable[[], bool], timeout: float) -> bool:
        done = wait_until(predicate, timeout, self.wait_interrupt)
        # A condition met by looking at the ring may leave its interrupt pending: the
        # line is level-triggered, so handle and acknowledge it now.
        self.wait_interrupt(0)
        return done


class LocalMmioBus:
    """An :class:`MmioBus` straight onto an :class:`MmioDevice` in the same process.

    The device runs in the caller's thread, within each access; while the
    driver waits for the line, the device's own event sources are served.
    """

    def __init__(self, window: MmioDevice) -> None:
        self.window = window
        self._level = threading.Event()
        window.irq = self._irq
        self.accesses = 0

    def _irq(self, level: bool) -> None:
        if level:
            self._level.set()
        else:
            self._level.clear()

    def read(self, offset: int, size: int) -> int:
        self.accesses += 1
        return self.window.read(offset, size)

    def write(self, offset: int, size: int, value: int) -> None:
        self.accesses += 1
        self.window.write(offset, size, value)

    def wait_interrupt(self, timeout: float | None) -> bool:
        if self._level.is_set():
            return True
        serve_events(self.window.device.events, timeout)
        return self._level.is_set()


def mmio_loopback(
    device: VirtioDevice,
    *,
    version: int = 2,
    legacy_order: ByteOrder = "little",
    memory_size: int = 64 << 20,
) -> MmioTransport:
    """A driver transport reaching ``device`` through its virtio-mmio registers, in process."""
    memory = GuestMemory()
    memory.add(0, bytearray(memory_size), name="guest-ram")
    device.attach_memory(memory)
    window = MmioDevice(device, version=version, legacy_order=legacy_order)
    # The first page stays unused: address 0 is never a valid buffer (or QueuePFN).
    allocator = Allocator(0x1000, memory_size - 0x1000)
    try:
        return MmioTransport(LocalMmioBus(window), memory, allocator, legacy_order=legacy_order)
    except NoDevice as err:
        raise NegotiationError(str(err)) from err
