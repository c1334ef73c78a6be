"""Loopback: a driver and a device in one process over shared guest memory.

The driver talks to :class:`Loopback` as to any transport; it forwards
register accesses to the device model and delivers the device's notifications
back. With ``threaded=True`` the device runs in its own thread, woken by kicks,
so the two ends really race over the rings the way a VM and a back-end do.
With an IOMMU base, the driver sees an IOVA space (VIRTIO_F_ACCESS_PLATFORM)
and the device translates every address it is given.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable

from virtio.core.device import DeviceHooks, VirtioDevice
from virtio.memory import Allocator, GuestMemory, Memory, PageTable, TranslatedMemory
from virtio.queue import RingLayout


def _nothing(_: int) -> None:
    pass


def _nothing_config() -> None:
    pass


class Loopback(DeviceHooks):
    """An in-process transport joining one device model and one driver."""

    def __init__(
        self,
        device: VirtioDevice,
        *,
        memory_size: int = 64 << 20,
        threaded: bool = False,
        memfd: bool = False,
        iommu_base: int | None = None,
    ) -> None:
        self.device = device
        self.device_id = device.device_id
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
        device.hooks = self
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
        self._kicks: queue.SimpleQueue[int | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        if threaded:
            self._thread = threading.Thread(
                target=self._device_loop, name="virtio-device", daemon=True
            )
            self._thread.start()

    def close(self) -> None:
        if self._thread is not None:
            self._kicks.put(None)
            self._thread.join(timeout=5)
            self._thread = None
        if self._memfd is not None:
            import os

            os.close(self._memfd)
            self._memfd = None

    def __enter__(self) -> Loopback:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- the device's side: DeviceHooks -------------------------------------------

    def notify_used(self, queue_index: int) -> None:
        self.interrupts += 1
        if self.threaded:
            with self._irq:
                self._pending_used.add(queue_index)
                self._irq.notify_all()
        else:
            self._used_handler(queue_index)

    def notify_config(self) -> None:
        if self.threaded:
            with self._irq:
                self._pending_config = True
                self._irq.notify_all()
        else:
            self._config_handler()

    def _device_loop(self) -> None:
        while True:
            index = self._kicks.get()
            if index is None:
                return
            with self._lock:
                self.device.notify(index)

    # -- the driver's side: DriverTransport ----------------------------------------

    def read_status(self) -> int:
        with self._lock:
            return self.device.read_status()

    def write_status(self, value: int) -> None:
        with self._lock:
            self.device.write_status(value)

    def read_device_features(self) -> int:
        with self._lock:
            return self.device.read_device_features()

    def write_driver_features(self, value: int) -> None:
        with self._lock:
            self.device.write_driver_features(value)

    def read_config(self, offset: int, size: int) -> bytes:
        with self._lock:
            return self.device.read_config(offset, size)

    def write_config(self, offset: int, data: bytes) -> None:
        with self._lock:
            self.device.write_config(offset, data)

    def config_generation(self) -> int:
        with self._lock:
            return self.device.config_generation

    def num_queues(self) -> int:
        return len(self.device.queues)

    def queue_max_size(self, index: int) -> int:
        return self.device.queues[index].max_size

    def setup_queue(self, index: int, layout: RingLayout) -> None:
        with self._lock:
            self.device.configure_queue(
                index,
                size=layout.size,
                desc=layout.desc,
                driver=layout.driver,
                device=layout.device,
            )
            self.device.enable_queue(index)

    def reset_queue(self, index: int) -> None:
        with self._lock:
            self.device.reset_queue(index)

    def notify(self, index: int, value: int) -> None:
        self.kicks += 1
        if self.threaded:
            self._kicks.put(index)
        else:
            self.device.notify(index, value)

    def set_interrupt_handlers(
        self, used: Callable[[int], None], config: Callable[[], None]
    ) -> None:
        self._used_handler = used
        self._config_handler = config

    def wait_interrupt(self, timeout: float | None) -> bool:
        """Deliver pending notifications in the caller's thread; False on timeout."""
        if not self.threaded:
            return False
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
