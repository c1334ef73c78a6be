"""The device transport seam: one register-shaped interface to a device model.

Every transport adapter reaches a device only through
:class:`DeviceRegisters`: the vhost-user back-end today, the PCI, MMIO and
Channel I/O register models next, the in-process loopback for tests. Its
fields are the common registers those transports share (PCI's
``virtio_pci_common_cfg``, MMIO's register map, CCW's commands map onto
them): feature words behind a select register, status, configuration
generation and space, a queue select with size, addresses, enable and
reset, notification offsets, MSI-X style vectors, an ISR for transports
without vectors, the legacy page frame number, and the shared memory
regions. A transport maps its own register offsets onto these attributes
and implements :class:`InterruptSink`; it never touches the device model.

Like rust-vmm's ``QueueT`` this is plain state set register by register;
all meaning (negotiation, ring start, failures) stays in the device model.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Protocol

from virtio.core.device import DeviceHooks, QueueState, SharedMemoryRegion, VirtioDevice
from virtio.core.status import Interface
from virtio.layout import ByteOrder
from virtio.memory import Memory, Translate
from virtio.queue import Chain, DeviceQueue, RingLayout, decode_notification
from virtio.queue.common import LEGACY_QUEUE_ALIGN
from virtio.spec import features as F

log = logging.getLogger("virtio.registers")

#: A vector register value meaning "no MSI-X vector: do not interrupt".
NO_VECTOR = 0xFFFF
#: ISR status bits (PCI ISR capability, MMIO InterruptStatus).
ISR_QUEUE = 1
ISR_CONFIG = 2

N_INIT_DRV = "drivernormative:General Initialization And Device Operation / Device Initialization"


class InterruptSink(Protocol):
    """How a transport delivers the device's notifications to the driver."""

    def queue_interrupt(self, queue: int, vector: int) -> None:
        """A used buffer notification for ``queue`` (``vector``: its MSI-X vector or NO_VECTOR)."""

    def config_interrupt(self, vector: int) -> None:
        """A configuration change notification."""


class DeviceRegisters(DeviceHooks):
    """The common virtio registers of one device, as a transport sees them.

    ``interface`` is the interface the driver uses through this transport
    (a legacy PCI I/O BAR, MMIO version 1 or CCW revision 0 are legacy);
    ``legacy_order`` is the guest's byte order, which the legacy interface
    uses for rings and fields (little-endian on x86, big-endian for Channel
    I/O). ``vectors`` is how many MSI-X vectors the transport provides (0:
    none, interrupts are signalled through the ISR).
    """

    def __init__(
        self,
        device: VirtioDevice,
        *,
        interrupts: InterruptSink | None = None,
        interface: Interface = Interface.MODERN,
        legacy_order: ByteOrder = "little",
        vectors: int = 0,
    ) -> None:
        self.device = device
        self.interrupts = interrupts
        self.vectors = vectors
        self.device_feature_select = 0
        self.driver_feature_select = 0
        self.queue_select = 0
        self.config_vector = NO_VECTOR
        self.isr = 0
        # Legacy interface: pages are this big (MMIO version 1 GuestPageSize).
        self.guest_page_size = 4096
        self._queue_align = [LEGACY_QUEUE_ALIGN] * len(device.queues)
        self._pfn = [0] * len(device.queues)
        device.hooks = self
        device.use_interface(interface, legacy_order)

    def use_interface(self, interface: Interface, legacy_order: ByteOrder = "little") -> None:
        """A transitional device: the driver chose this interface. The device resets."""
        self.device.use_interface(interface, legacy_order)
        self._reset_registers()

    def attach_memory(self, memory: Memory, iommu: Translate | None = None) -> None:
        """The guest memory the device's buffers and rings live in (and its IOMMU)."""
        self.device.attach_memory(memory, iommu)

    # -- identification ------------------------------------------------------------

    @property
    def device_id(self) -> int:
        return self.device.device_id

    @property
    def num_queues(self) -> int:
        """How many queues the device can have (the most any feature set allows)."""
        return len(self.device.queues)

    @property
    def legacy(self) -> bool:
        return self.device.legacy

    @property
    def interface(self) -> Interface:
        return self.device.interface

    @property
    def needs_reset_reason(self) -> str | None:
        """Why the device set DEVICE_NEEDS_RESET (with the normative id), if it did."""
        return self.device.needs_reset_reason

    @property
    def byteorder(self) -> ByteOrder:
        return self.device.byteorder

    # -- features ------------------------------------------------------------------

    @property
    def device_feature(self) -> int:
        """32 bits of the device's offer, selected by ``device_feature_select``."""
        return self.device.read_device_features() >> (32 * self.device_feature_select) & (
            0xFFFFFFFF if 0 <= self.device_feature_select < F.FEATURE_WORDS else 0
        )

    @property
    def driver_feature(self) -> int:
        select = self.driver_feature_select
        if not 0 <= select < F.FEATURE_WORDS:
            return 0
        return self.device.driver_features >> (32 * select) & 0xFFFFFFFF

    @driver_feature.setter
    def driver_feature(self, value: int) -> None:
        select = self.driver_feature_select
        if not 0 <= select < F.FEATURE_WORDS:
            if value:
                log.info("ignoring driver feature word %d = %#x", select, value)
            return
        shift = 32 * select
        current = self.device.driver_features
        merged = current & ~(0xFFFFFFFF << shift) | (value & 0xFFFFFFFF) << shift
        self.device.write_driver_features(merged)

    @property
    def device_features(self) -> int:
        """The whole offer on this interface (for transports that move 64 bits at once)."""
        return self.device.read_device_features()

    @property
    def offered_features(self) -> int:
        """The modern interface's offer, whatever interface is in use (vhost-user asks it)."""
        return self.device.offered_features

    def write_driver_features(self, value: int) -> None:
        """All driver features at once (for transports that move 64 bits at once)."""
        self.device.write_driver_features(value)

    # -- status and configuration ----------------------------------------------------------

    @property
    def status(self) -> int:
        return self.device.read_status()

    @status.setter
    def status(self, value: int) -> None:
        if value == 0:
            self._reset_registers()
        self.device.write_status(value)

    def _reset_registers(self) -> None:
        self.isr = 0
        self.config_vector = NO_VECTOR
        self._pfn = [0] * len(self._pfn)
        self._queue_align = [LEGACY_QUEUE_ALIGN] * len(self._queue_align)

    @property
    def config_generation(self) -> int:
        return self.device.config_generation

    @property
    def config_size(self) -> int:
        return len(self.device.config)

    def read_config(self, offset: int, size: int) -> bytes:
        return self.device.read_config(offset, size)

    def write_config(self, offset: int, data: bytes) -> None:
        self.device.write_config(offset, data)

    @property
    def config_msix_vector(self) -> int:
        return self.config_vector

    @config_msix_vector.setter
    def config_msix_vector(self, value: int) -> None:
        self.config_vector = self._vector(value)

    def _vector(self, value: int) -> int:
        # A vector the transport cannot map reads back as NO_VECTOR.
        value &= 0xFFFF
        return value if value < self.vectors else NO_VECTOR

    # -- queues --------------------------------------------------------------------------

    def _selected(self) -> QueueState | None:
        index = self.queue_select
        if 0 <= index < len(self.device.queues):
            return self.device.queues[index]
        return None

    def _selected_for_write(self, what: str) -> QueueState | None:
        q = self._selected()
        if q is None:
            log.info("ignoring %s write: queue %d does not exist", what, self.queue_select)
        return q

    @property
    def queue_max_size(self) -> int:
        """0 when the selected queue does not exist (with the features negotiated)."""
        q = self._selected()
        if q is None or q.index >= self.device.queue_count:
            return 0
        return q.max_size

    @property
    def queue_size(self) -> int:
        q = self._selected()
        return 0 if q is None else q.size

    @queue_size.setter
    def queue_size(self, value: int) -> None:
        if self._selected_for_write("queue size") is not None:
            self.device.configure_queue(self.queue_select, size=value)

    def _address(self, part: str) -> int:
        q = self._selected()
        return 0 if q is None else int(getattr(q, part))

    @property
    def queue_desc(self) -> int:
        return self._address("desc")

    @queue_desc.setter
    def queue_desc(self, value: int) -> None:
        if self._selected_for_write("queue_desc") is not None:
            self.device.configure_queue(self.queue_select, desc=value)

    @property
    def queue_driver(self) -> int:
        return self._address("driver")

    @queue_driver.setter
    def queue_driver(self, value: int) -> None:
        if self._selected_for_write("queue_driver") is not None:
            self.device.configure_queue(self.queue_select, driver=value)

    @property
    def queue_device(self) -> int:
        return self._address("device")

    @queue_device.setter
    def queue_device(self, value: int) -> None:
        if self._selected_for_write("queue_device") is not None:
            self.device.configure_queue(self.queue_select, device=value)

    @property
    def queue_enable(self) -> int:
        q = self._selected()
        return int(q is not None and q.enabled)

    @queue_enable.setter
    def queue_enable(self, value: int) -> None:
        q = self._selected_for_write("queue_enable")
        if q is None:
            return
        if value:
            if not q.enabled:
                self.device.enable_queue(q.index)
        elif q.enabled:
            # MMIO lets the driver clear QueueReady to stop a queue.
            self.device.stop_queue(q.index)

    @property
    def queue_reset(self) -> int:
        # The reset completes within the write, so it never reads as ongoing.
        return 0

    @queue_reset.setter
    def queue_reset(self, value: int) -> None:
        if value & 1 and self._selected_for_write("queue_reset") is not None:
            self.device.reset_queue(self.queue_select)

    @property
    def queue_notify_off(self) -> int:
        """Each queue notifies at its own offset: its index (times the transport's multiplier)."""
        q = self._selected()
        return 0 if q is None else q.index

    @property
    def queue_notify_config_data(self) -> int:
        q = self._selected()
        return 0 if q is None else q.notify_config_data

    @property
    def queue_msix_vector(self) -> int:
        q = self._selected()
        return NO_VECTOR if q is None else q.vector

    @queue_msix_vector.setter
    def queue_msix_vector(self, value: int) -> None:
        q = self._selected_for_write("queue_msix_vector")
        if q is not None:
            q.vector = self._vector(value)

    # -- the legacy interface's queue registers ------------------------------------------

    @property
    def queue_align(self) -> int:
        q = self._selected()
        return LEGACY_QUEUE_ALIGN if q is None else self._queue_align[q.index]

    @queue_align.setter
    def queue_align(self, value: int) -> None:
        q = self._selected_for_write("QueueAlign")
        if q is not None:
            if value <= 0 or value & (value - 1):
                self.device.fail(f"queue align {value} is not a power of 2", N_INIT_DRV)
                return
            self._queue_align[q.index] = value

    @property
    def queue_pfn(self) -> int:
        q = self._selected()
        return 0 if q is None else self._pfn[q.index]

    @queue_pfn.setter
    def queue_pfn(self, value: int) -> None:
        """Legacy: the ring's guest page frame number; 0 stops the queue."""
        q = self._selected_for_write("QueuePFN")
        if q is None:
            return
        self._pfn[q.index] = value
        if value == 0:
            self.device.stop_queue(q.index)
            return
        base = value * self.guest_page_size
        align = self._queue_align[q.index]
        if base % align:
            self.device.fail(f"queue {q.index}: ring at {base:#x} not {align}-aligned", N_INIT_DRV)
            return
        layout = RingLayout.legacy(base, q.size, align)
        self.device.configure_queue(
            q.index, desc=layout.desc, driver=layout.driver, device=layout.device
        )
        self.device.enable_queue(q.index)

    # -- notifications ---------------------------------------------------------------------

    def notify(
        self, value: int | None = None, *, queue: int | None = None, rearm: bool = True
    ) -> int:
        """An available buffer notification, as the transport received it.

        ``queue`` is the queue the transport's notify address (or kick fd)
        names, if it names one; ``value`` is what the driver wrote, if the
        transport carries a value. With VIRTIO_F_NOTIFICATION_DATA that is the
        notification data (the queue number, or its config data with
        VIRTIO_F_NOTIF_CONFIG_DATA, and the next available position);
        otherwise it is the queue number (or its config data). Returns how many
        chains the device served; ``rearm=False`` is for a transport that goes
        on polling the ring (notifications stay off).
        """
        device = self.device
        if value is None:
            if queue is None:
                raise ValueError("a notification names its queue or carries a value")
            return device.notify(queue, rearm=rearm)
        if device.has(F.VIRTIO_F_NOTIFICATION_DATA):
            vqn, next_pos, wrap = decode_notification(
                value, packed=device.has(F.VIRTIO_F_RING_PACKED)
            )
            log.debug("notification data: vq %d, next %d, wrap %s", vqn, next_pos, wrap)
        else:
            vqn = value & 0xFFFF
        if device.has(F.VIRTIO_F_NOTIF_CONFIG_DATA):
            vqn = next((q.index for q in device.queues if q.notify_config_data == vqn), vqn)
        # The address a transport's notification arrived at names the queue where it can.
        return device.notify(vqn if queue is None else queue, rearm=rearm)

    # -- interrupts: the device's hooks ------------------------------------------------------

    def notify_used(self, queue_index: int) -> None:
        self.isr |= ISR_QUEUE
        if self.interrupts is not None:
            self.interrupts.queue_interrupt(queue_index, self.device.queues[queue_index].vector)

    def notify_config(self) -> None:
        self.isr |= ISR_CONFIG
        if self.interrupts is not None:
            self.interrupts.config_interrupt(self.config_vector)

    def read_isr(self) -> int:
        """Read the ISR status, which clears it (PCI)."""
        value, self.isr = self.isr, 0
        return value

    @property
    def interrupt_status(self) -> int:
        """The ISR bits, without clearing them (MMIO InterruptStatus)."""
        return self.isr

    def ack_interrupt(self, bits: int) -> None:
        """Clear ISR bits (MMIO InterruptACK)."""
        self.isr &= ~bits

    # -- shared memory and ring state ----------------------------------------------------------

    @property
    def shared_memory_regions(self) -> Sequence[SharedMemoryRegion]:
        return self.device.shared_memory_regions()

    def device_queue(self, index: int) -> DeviceQueue | None:
        """The live ring of a queue, for adapters that save or restore its position."""
        if 0 <= index < len(self.device.queues):
            return self.device.queues[index].ring
        return None

    # -- what transports that own the rings' lifetime need (vhost-user) ---------------------

    def allow_queue_sizes(self, largest: int) -> None:
        """Let the driver pick ring sizes up to ``largest`` (a VMM chooses them, not us)."""
        for q in self.device.queues:
            q.max_size = max(q.max_size, largest)

    def drain_queue(self, index: int) -> None:
        """Complete the queue's deferred requests now (before its position is read)."""
        q = self.device.queue(index)
        if q.deferred:
            self.device.quiesce(index)

    def stop_queue(self, index: int) -> None:
        """Stop and forget a queue, whatever the features (a vhost-user ring stop)."""
        self.device.stop_queue(index)

    def poll_queue(self, index: int) -> int:
        """Serve a queue without a notification, leaving notifications off (polling)."""
        return self.device.process_queue(index, rearm=False)

    def rearm_queue(self, index: int) -> int:
        """Stop polling: notifications back on; serves what arrived in the meantime."""
        return self.device.rearm_queue(index)

    def resubmit(self, index: int, chains: Sequence[Chain]) -> None:
        """Serve chains recovered from outside the ring (an inflight record) again."""
        self.device.serve_chains(index, chains)

    @property
    def used_hook(self) -> Callable[[int, Sequence[tuple[Chain, int]]], None] | None:
        """Called with every batch of used buffers (a transport that logs dirty pages)."""
        return self.device.used_hook

    @used_hook.setter
    def used_hook(self, hook: Callable[[int, Sequence[tuple[Chain, int]]], None] | None) -> None:
        self.device.used_hook = hook
