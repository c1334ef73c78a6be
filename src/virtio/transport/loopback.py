"""Loopback: a driver and a device in one process over shared guest memory.

The driver talks to :class:`Loopback` as to any transport; the loopback
reaches the device model only through the device transport seam
(:class:`~virtio.core.registers.DeviceRegisters`), register by register, the
way a PCI or MMIO model does, and implements the seam's interrupt sink to
deliver the device's notifications back. With ``threaded=True`` the device
runs in its own thread, woken by kicks, so the two ends really race over the
rings the way a VM and a back-end do. With an IOMMU base, the driver sees an
IOVA space (VIRTIO_F_ACCESS_PLATFORM) and the device translates every
address it is given. With ``legacy=True`` the device is driven through its
legacy interface, in the guest byte order ``legacy_order``.

The loopback is also the device's host: it serves the file descriptors and
timers the device asks for (``device.events``), in the device thread or,
without one, while the driver waits.
"""

from __future__ import annotations

import os
import queue
import threading
from collections.abc import Callable

from virtio.core.device import VirtioDevice
from virtio.core.registers import DeviceRegisters
from virtio.core.shm import BufferWindow, ShmWindow
from virtio.core.status import Interface
from virtio.layout import ByteOrder
from virtio.memory import Allocator, GuestMemory, Memory, PageTable, TranslatedMemory
from virtio.queue import RingLayout
from virtio.queue.common import LEGACY_QUEUE_ALIGN
from virtio.spec import features as F
from virtio.transport.blocking import serve_events, wait_until


def _nothing(_: int) -> None:
    pass


def _nothing_config() -> None:
    pass


class Loopback:
    """An in-process transport joining one device model and one driver."""

    def __init__(
        self,
        device: VirtioDevice,
        *,
        memory_size: int = 64 << 20,
        threaded: bool = False,
        memfd: bool = False,
        iommu_base: int | None = None,
        legacy: bool = False,
        legacy_order: ByteOrder = "little",
        vectors: int = 0,
    ) -> None:
        self.device = device
        self.device_id = device.device_id
        self.legacy = legacy
        self.legacy_order: ByteOrder = legacy_order
        self.queue_align = LEGACY_QUEUE_ALIGN
        self.guest = GuestMemory()
        if memfd:
            _region, fd = self.guest.add_memfd(0, memory_size)
            self._memfd: int | None = fd
        else:
            self.guest.add(0, bytearray(memory_size), name="guest-ram")
            self._memfd = None
        # The first page stays unused so that address 0 is never a valid buffer.
        self.memory: Memory
        if iommu_base is None:
            self.memory = self.guest
            self.allocator = Allocator(0x1000, memory_size - 0x1000)
            device.attach_memory(self.guest)
        else:
            table = PageTable()
            table.map(iommu_base, 0, memory_size)
            self.page_table = table
            self.memory = TranslatedMemory(self.guest, table)
            self.allocator = Allocator(iommu_base + 0x1000, memory_size - 0x1000)
            device.attach_memory(self.guest, table)
        self.registers = DeviceRegisters(
            device,
            interrupts=self,
            interface=Interface.LEGACY if legacy else Interface.MODERN,
            legacy_order=legacy_order,
            vectors=vectors,
        )
        self._used_handler: Callable[[int], None] = _nothing
        self._config_handler: Callable[[], None] = _nothing_config
        self.kicks = 0
        self.interrupts = 0
        self.threaded = threaded
        # Serializes every touch of the device model between the two threads.
        self._lock = threading.RLock()
        self._pending_used: set[int] = set()
        self._pending_config = False
        self._irq = threading.Condition(threading.Lock())
        # Kicks carry the reset epoch they were sent in: one still queued when the
        # driver resets the device is stale (a real device never sees it after).
        self._kicks: queue.SimpleQueue[tuple[int, int] | None] = queue.SimpleQueue()
        self._epoch = 0
        self._wake = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._thread: threading.Thread | None = None
        if threaded:
            self._thread = threading.Thread(
                target=self._device_loop, name="virtio-device", daemon=True
            )
            self._thread.start()

    def close(self) -> None:
        if self._thread is not None:
            self._kicks.put(None)
            os.eventfd_write(self._wake, 1)
            self._thread.join(timeout=5)
            self._thread = None
        if self._wake >= 0:
            os.close(self._wake)
            self._wake = -1
        if self._memfd is not None:
            os.close(self._memfd)
            self._memfd = None

    def __enter__(self) -> Loopback:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- the device's side: the seam's interrupt sink ------------------------------

    def queue_interrupt(self, queue: int, vector: int) -> None:
        self.interrupts += 1
        if self.threaded:
            with self._irq:
                self._pending_used.add(queue)
                self._irq.notify_all()
        else:
            self._used_handler(queue)

    def config_interrupt(self, vector: int) -> None:
        if self.threaded:
            with self._irq:
                self._pending_config = True
                self._irq.notify_all()
        else:
            self._config_handler()

    def _device_loop(self) -> None:
        while True:
            self._serve_device_events(None, wake=True)
            while True:
                try:
                    index = self._kicks.get_nowait()
                except queue.Empty:
                    break
                if index is None:
                    return
                epoch, queue_index = index
                with self._lock:
                    if epoch == self._epoch:
                        self.registers.notify(queue=queue_index)

    def _serve_device_events(self, timeout: float | None, *, wake: bool = False) -> bool:
        """Wait for the device's fds and timers (and kicks, in the device thread)."""
        return serve_events(
            self.device.events, timeout, wake_fds=(self._wake,) if wake else (), lock=self._lock
        )

    def shared_memory_window(self, shmid: int) -> ShmWindow | None:
        """The device's own buffer for region ``shmid`` (this process maps it)."""
        for region in self.registers.shared_memory_regions:
            if region.id == shmid:
                return BufferWindow(region)
        return None

    # -- the driver's side: DriverTransport, mapped onto the registers -------------

    def read_status(self) -> int:
        with self._lock:
            return self.registers.status

    def write_status(self, value: int) -> None:
        with self._lock:
            if value == 0:
                self._epoch += 1
            self.registers.status = value

    def read_device_features(self) -> int:
        with self._lock:
            regs = self.registers
            words = 1 if self.legacy else F.FEATURE_WORDS
            value = 0
            for select_ in range(words):
                regs.device_feature_select = select_
                value |= regs.device_feature << (32 * select_)
            return value

    def write_driver_features(self, value: int) -> None:
        with self._lock:
            regs = self.registers
            for select_ in range(1 if self.legacy else F.FEATURE_WORDS):
                regs.driver_feature_select = select_
                regs.driver_feature = value >> (32 * select_) & 0xFFFFFFFF

    def read_config(self, offset: int, size: int) -> bytes:
        with self._lock:
            return self.registers.read_config(offset, size)

    def write_config(self, offset: int, data: bytes) -> None:
        with self._lock:
            self.registers.write_config(offset, data)

    def config_generation(self) -> int:
        with self._lock:
            return self.registers.config_generation

    def num_queues(self) -> int:
        return self.registers.num_queues

    def queue_max_size(self, index: int) -> int:
        with self._lock:
            self.registers.queue_select = index
            return self.registers.queue_max_size

    def setup_queue(self, index: int, layout: RingLayout) -> None:
        with self._lock:
            regs = self.registers
            regs.queue_select = index
            if self.legacy:
                regs.queue_align = self.queue_align
                regs.queue_size = layout.size
                regs.queue_pfn = layout.desc // regs.guest_page_size
                return
            regs.queue_size = layout.size
            regs.queue_desc = layout.desc
            regs.queue_driver = layout.driver
            regs.queue_device = layout.device
            if regs.vectors:
                regs.queue_msix_vector = index + 1
            regs.queue_enable = 1

    def reset_queue(self, index: int) -> None:
        with self._lock:
            self.registers.queue_select = index
            self.registers.queue_reset = 1

    def queue_reset_done(self, index: int) -> bool:
        """queue_reset and queue_enable both read 0 (the PCI and MMIO rule)."""
        with self._lock:
            regs = self.registers
            regs.queue_select = index
            return regs.queue_reset == 0 and regs.queue_enable == 0

    def notify(self, index: int, value: int) -> None:
        self.kicks += 1
        if self.threaded:
            self._kicks.put((self._epoch, index))
            os.eventfd_write(self._wake, 1)
        else:
            self.registers.notify(value, queue=index)

    def set_interrupt_handlers(
        self, used: Callable[[int], None], config: Callable[[], None]
    ) -> None:
        self._used_handler = used
        self._config_handler = config

    def wait_interrupt(self, timeout: float | None) -> bool:
        """Deliver pending notifications in the caller's thread; False on timeout.

        Without a device thread the device's own event sources (fds, timers)
        are served here, in the waiting driver's thread.
        """
        if not self.threaded:
            return self._serve_device_events(timeout)
        with self._irq:
            if not self._pending_used and not self._pending_config:
                self._irq.wait(timeout)
            used = sorted(self._pending_used)
            self._pending_used.clear()
            config = self._pending_config
            self._pending_config = False
        for index in used:
            self._used_handler(index)
        if config:
            self._config_handler()
        return bool(used) or config

    def wait_until(self, predicate: Callable[[], bool], timeout: float) -> bool:
        return wait_until(predicate, timeout, self.wait_interrupt)
