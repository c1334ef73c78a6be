"""The device side of the basic facilities: status, features, config space, queues.

:class:`VirtioDevice` is a sans-IO state machine. A transport (loopback,
vhost-user, PCI/MMIO register models) calls its driver-facing methods when the
driver reads or writes something, and receives the device's notifications
through :class:`DeviceHooks`. A device type subclasses it, declaring its id,
features, configuration space and queues, and handles buffers in
:meth:`VirtioDevice.handle_chain` (or a whole queue in
:meth:`VirtioDevice.process_queue`).

A driver that breaks the spec puts the device into DEVICE_NEEDS_RESET with a
logged reason naming the normative id; the device then serves nothing until
it is reset.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import ClassVar

from virtio.errors import RingError, SpecViolation
from virtio.memory import GuestMemory, Memory, Translate, TranslatedMemory
from virtio.queue import Chain, DeviceQueue, RingLayout, device_queue
from virtio.queue.common import MAX_QUEUE_SIZE
from virtio.spec import features as F
from virtio.spec.status import DeviceStatus

log = logging.getLogger("virtio.device")

N_STATUS_DRV = "drivernormative:Basic Facilities of a Virtio Device / Device Status Field"
N_STATUS_DEV = "devicenormative:Basic Facilities of a Virtio Device / Device Status Field"
N_FEATURES_DRV = "drivernormative:Basic Facilities of a Virtio Device / Feature Bits"
N_FEATURES_DEV = "devicenormative:Basic Facilities of a Virtio Device / Feature Bits"
N_RESET_DEV = "devicenormative:Basic Facilities of a Virtio Device / Device Reset"
N_CONFIG_DEV = "devicenormative:Basic Facilities of a Virtio Device / Device Configuration Space"
N_INIT_DRV = "drivernormative:General Initialization And Device Operation / Device Initialization"
N_SUSPEND_DEV = "devicenormative:General Initialization And Device Operation / Device Suspend"
N_SUSPEND_DRV = "drivernormative:General Initialization And Device Operation / Device Suspend"
N_QRESET_DEV = (
    "devicenormative:Basic Facilities of a Virtio Device / Virtqueues / Virtqueue Reset / "
    "Virtqueue Reset"
)
N_RESERVED_DEV = "devicenormative:Reserved Feature Bits"

S = DeviceStatus
# The bits only the device sets; a driver's write of them is ignored.
_DEVICE_OWNED = int(S.DEVICE_NEEDS_RESET)
# Each step of the initialization sequence and the step it needs first.
_PREREQ = {
    int(S.DRIVER): int(S.ACKNOWLEDGE),
    int(S.FEATURES_OK): int(S.DRIVER),
    int(S.DRIVER_OK): int(S.FEATURES_OK),
}


class DeviceHooks:
    """How the device reaches the driver; a transport overrides these."""

    def notify_used(self, queue_index: int) -> None:
        """Send a used buffer notification (an interrupt) for a queue."""

    def notify_config(self) -> None:
        """Send a configuration change notification."""


@dataclass
class QueueState:
    """One virtqueue as the driver configured it, and its ring once live."""

    index: int
    max_size: int
    size: int = 0
    desc: int = 0
    driver: int = 0
    device: int = 0
    enabled: bool = False
    notify_config_data: int = 0
    ring: DeviceQueue | None = field(default=None, repr=False)

    def clear(self) -> None:
        self.size = self.max_size
        self.desc = self.driver = self.device = 0
        self.enabled = False
        self.ring = None


@dataclass(frozen=True)
class RingOptions:
    """The ring features a device offers (core feature bits 28..40)."""

    indirect: bool = True
    event_idx: bool = True
    packed: bool = True
    in_order: bool = False
    notification_data: bool = False
    ring_reset: bool = True
    suspend: bool = True
    access_platform: bool = False

    def feature_bits(self) -> int:
        bits = 1 << F.VIRTIO_F_VERSION_1
        for enabled, bit in (
            (self.indirect, F.VIRTIO_F_INDIRECT_DESC),
            (self.event_idx, F.VIRTIO_F_EVENT_IDX),
            (self.packed, F.VIRTIO_F_RING_PACKED),
            (self.in_order, F.VIRTIO_F_IN_ORDER),
            (self.notification_data, F.VIRTIO_F_NOTIFICATION_DATA),
            (self.ring_reset, F.VIRTIO_F_RING_RESET),
            (self.suspend, F.VIRTIO_F_SUSPEND),
            (self.access_platform, F.VIRTIO_F_ACCESS_PLATFORM),
        ):
            if enabled:
                bits |= 1 << bit
        return bits


class VirtioDevice:
    """Base class of every device model."""

    device_id: ClassVar[int] = 0
    #: Whether requests complete in the order they were popped (allows IN_ORDER).
    completes_in_order: ClassVar[bool] = True

    def __init__(
        self,
        *,
        num_queues: int,
        queue_max_size: int = 256,
        ring: RingOptions | None = None,
        hooks: DeviceHooks | None = None,
    ) -> None:
        if not 1 <= queue_max_size <= MAX_QUEUE_SIZE:
            raise ValueError(f"queue size {queue_max_size} is outside 1..{MAX_QUEUE_SIZE}")
        self.ring_options = ring or RingOptions()
        if self.ring_options.in_order and not self.completes_in_order:
            raise ValueError(f"{type(self).__name__} cannot complete requests in order")
        self.hooks = hooks or DeviceHooks()
        self.queues = [QueueState(i, queue_max_size) for i in range(num_queues)]
        for q in self.queues:
            q.clear()
        self.memory: Memory | None = None
        self.iommu: Translate | None = None
        self.config = bytearray(self.config_size())
        self.config_generation = 0
        self.status = 0
        self.driver_features = 0
        self.negotiated = 0
        self.needs_reset_reason: str | None = None
        self._config_change_pending = False
        self.offered_features = self.ring_options.feature_bits() | self.device_features()
        problems = F.unmet_requirements(self.device_id, self.offered_features)
        if problems:
            # The device MUST NOT offer a feature which requires another not offered.
            raise ValueError(f"inconsistent offer ({N_FEATURES_DEV}): {'; '.join(problems)}")
        self.build_config()

    # -- what a device type declares ------------------------------------------

    def device_features(self) -> int:
        """Device-type feature bits offered (the core ring bits are added)."""
        return 0

    def config_size(self) -> int:
        return 0

    def build_config(self) -> None:
        """Fill ``self.config`` (called at creation and after each reset)."""

    def validate_features(self, features: int) -> str | None:
        """A reason to refuse FEATURES_OK for this subset, or None to accept."""
        return None

    def config_write(self, offset: int, data: bytes) -> bool:
        """Apply a driver write to the config space; False if the field is read-only."""
        return False

    def on_driver_ok(self) -> None:
        """The driver set DRIVER_OK: the device is live."""

    def on_reset(self) -> None:
        """Forget device-type state (device reset)."""

    def handle_chain(self, queue_index: int, chain: Chain) -> int:
        """Serve one buffer; returns how many bytes were written into it."""
        raise NotImplementedError

    # -- feature helpers -------------------------------------------------------

    def has(self, bit: int) -> bool:
        """Whether a feature bit was negotiated."""
        return bool(self.negotiated >> bit & 1)

    @property
    def live(self) -> bool:
        return (
            self.status & (S.DRIVER_OK | S.DEVICE_NEEDS_RESET | S.FAILED | S.SUSPEND) == S.DRIVER_OK
        )

    # -- driver-facing: status -------------------------------------------------

    def read_status(self) -> int:
        return self.status

    def write_status(self, value: int) -> None:
        value &= 0xFF
        if value == 0:
            self.reset()
            return
        old = self.status
        value &= ~_DEVICE_OWNED
        old_driver_bits = old & ~_DEVICE_OWNED
        if old & S.SUSPEND:
            self._write_status_suspended(value)
            return
        added = value & ~old_driver_bits
        cleared = old_driver_bits & ~value
        if cleared:
            self.fail(f"driver cleared status bits {DeviceStatus(cleared)!r}", N_STATUS_DRV)
            return
        if old & S.DEVICE_NEEDS_RESET and added & ~(S.FAILED | S.SUSPEND):
            # Nothing moves forward until the driver resets the device.
            return
        for bit, needed in _PREREQ.items():
            if added & bit and not value & needed:
                self.fail(
                    f"driver set {DeviceStatus(bit).name} before {DeviceStatus(needed).name}",
                    N_INIT_DRV,
                )
                return
        if added & S.SUSPEND:
            added &= ~S.SUSPEND
            value &= ~S.SUSPEND
            suspend = True
        else:
            suspend = False
        self.status = old | added
        if added & S.FEATURES_OK:
            reason = self._check_features(self.driver_features)
            if reason is not None:
                log.info("refusing FEATURES_OK: %s", reason)
                self.status &= ~S.FEATURES_OK
            else:
                self.negotiated = self.driver_features
                self._apply_memory()
        if added & S.DRIVER_OK:
            self._go_live()
        if added & S.FAILED:
            log.info("driver set FAILED")
        if suspend:
            self._suspend()

    def _check_features(self, features: int) -> str | None:
        extra = features & ~self.offered_features
        if extra:
            return f"driver accepted features not offered: {extra:#x} [{N_FEATURES_DRV}]"
        if not features >> F.VIRTIO_F_VERSION_1 & 1:
            return f"driver did not accept VIRTIO_F_VERSION_1 [{N_RESERVED_DEV}]"
        problems = F.unmet_requirements(self.device_id, features)
        if problems:
            return f"{'; '.join(problems)} [{N_FEATURES_DRV}]"
        return self.validate_features(features)

    def _apply_memory(self) -> None:
        if self.memory is None:
            return
        if self.has(F.VIRTIO_F_ACCESS_PLATFORM) and self.iommu is not None:
            base = self.memory
            if isinstance(base, TranslatedMemory):
                base = base.memory
            if isinstance(base, GuestMemory):
                self.memory = TranslatedMemory(base, self.iommu)

    def _go_live(self) -> None:
        for q in self.queues:
            if q.enabled and q.ring is None:
                try:
                    self._start_queue(q)
                except SpecViolation as err:
                    self.fail(err.message, err.normative)
                    return
        self.on_driver_ok()
        if self._config_change_pending:
            self._config_change_pending = False
            self.hooks.notify_config()

    def _suspend(self) -> None:
        if not self.has(F.VIRTIO_F_SUSPEND) or not self.status & S.DRIVER_OK:
            # Operations on SUSPEND before full initialization are ignored.
            log.info("ignoring SUSPEND: device not initialized or feature not negotiated")
            return
        # Requests are served synchronously, so nothing is in flight here.
        self.status = (self.status & ~S.DRIVER_OK) | S.SUSPEND

    def _write_status_suspended(self, value: int) -> None:
        if value & S.DRIVER_OK:
            self.status = (self.status & ~S.SUSPEND) | S.DRIVER_OK
            if self._config_change_pending:
                self._config_change_pending = False
                self.hooks.notify_config()
            for q in self.queues:
                if q.ring is not None:
                    self.process_queue(q.index)
        elif value & S.FAILED:
            self.status |= S.FAILED

    # -- driver-facing: features ----------------------------------------------

    def read_device_features(self) -> int:
        return self.offered_features

    def write_driver_features(self, value: int) -> None:
        if self.status & S.FEATURES_OK:
            if value != self.driver_features:
                self.fail("driver changed its features after FEATURES_OK", N_INIT_DRV)
            return
        self.driver_features = value

    # -- driver-facing: configuration space -----------------------------------

    def read_config(self, offset: int, size: int) -> bytes:
        if offset < 0 or size < 0 or offset + size > len(self.config):
            # Reads past the end return zeroes, the way an unbacked register reads.
            out = bytearray(size)
            start = max(0, offset)
            end = min(len(self.config), offset + size)
            if end > start:
                out[start - offset : end - offset] = self.config[start:end]
            return bytes(out)
        return bytes(self.config[offset : offset + size])

    def write_config(self, offset: int, data: bytes) -> None:
        if not self.status & S.FEATURES_OK:
            self.fail("driver wrote the configuration space before FEATURES_OK", N_INIT_DRV)
            return
        if self.status & S.SUSPEND:
            return  # ignored while suspended
        if offset < 0 or offset + len(data) > len(self.config):
            log.info("ignoring config write outside the space: %d+%d", offset, len(data))
            return
        if not self.config_write(offset, bytes(data)):
            log.info("ignoring write to read-only config bytes %d+%d", offset, len(data))

    def update_config(self, offset: int, data: bytes) -> None:
        """The device changes its own config space and tells the driver."""
        self.config[offset : offset + len(data)] = data
        self.config_generation = (self.config_generation + 1) & 0xFFFFFFFF
        if self.status & S.DRIVER_OK and not self.status & S.SUSPEND:
            self.hooks.notify_config()
        elif self.status & (S.DRIVER_OK | S.SUSPEND):
            self._config_change_pending = True

    # -- driver-facing: queues -------------------------------------------------

    def queue(self, index: int) -> QueueState:
        if not 0 <= index < len(self.queues):
            raise SpecViolation(f"queue {index} does not exist ({len(self.queues)} queues)")
        return self.queues[index]

    def configure_queue(
        self,
        index: int,
        *,
        size: int | None = None,
        desc: int | None = None,
        driver: int | None = None,
        device: int | None = None,
    ) -> None:
        q = self.queue(index)
        if q.enabled:
            self.fail(f"driver reconfigured enabled queue {index}", N_INIT_DRV)
            return
        if size is not None:
            packed = self.has(F.VIRTIO_F_RING_PACKED)
            if not 1 <= size <= q.max_size or (not packed and size & (size - 1)):
                self.fail(f"queue {index}: invalid size {size} (max {q.max_size})", N_INIT_DRV)
                return
            q.size = size
        if desc is not None:
            q.desc = desc
        if driver is not None:
            q.driver = driver
        if device is not None:
            q.device = device

    def enable_queue(self, index: int) -> None:
        q = self.queue(index)
        q.enabled = True
        if self.status & S.DRIVER_OK:
            # Re-enabling after a queue reset on a live device.
            try:
                self._start_queue(q)
            except SpecViolation as err:
                self.fail(err.message, err.normative)

    def reset_queue(self, index: int) -> None:
        """Per-queue reset (VIRTIO_F_RING_RESET)."""
        q = self.queue(index)
        if not self.has(F.VIRTIO_F_RING_RESET):
            self.fail("queue reset without VIRTIO_F_RING_RESET", N_QRESET_DEV)
            return
        # After the reset the queue executes nothing and notifies nothing.
        q.clear()

    def _start_queue(self, q: QueueState) -> None:
        if self.memory is None:
            raise SpecViolation("device has no guest memory attached")
        layout = RingLayout(
            q.size, q.desc, q.driver, q.device, packed=self.has(F.VIRTIO_F_RING_PACKED)
        )
        q.ring = device_queue(
            self.memory,
            layout,
            indirect=self.has(F.VIRTIO_F_INDIRECT_DESC),
            event_idx=self.has(F.VIRTIO_F_EVENT_IDX),
            in_order=self.has(F.VIRTIO_F_IN_ORDER),
        )

    # -- driver-facing: notifications ------------------------------------------

    def notify(self, index: int, data: int | None = None) -> None:
        """An available buffer notification (a kick) for queue ``index``."""
        if self.status & S.DEVICE_NEEDS_RESET:
            return
        if not self.status & (S.DRIVER_OK | S.SUSPEND):
            self.fail(f"driver notified queue {index} before DRIVER_OK", N_INIT_DRV)
            return
        if not 0 <= index < len(self.queues):
            self.fail(f"driver notified queue {index}, which does not exist", N_INIT_DRV)
            return
        if self.status & S.SUSPEND:
            self.fail(f"driver notified queue {index} while suspended", N_SUSPEND_DRV)
            return
        self.process_queue(index)

    def process_queue(self, index: int) -> None:
        """Serve everything available on a queue, then notify if the driver wants it."""
        q = self.queues[index]
        ring = q.ring
        if ring is None or not self.live:
            return
        handle = self.handle_chain
        try:
            while True:
                chains = ring.pop_many(ring.size)
                if not chains:
                    if not ring.enable_notifications():
                        break
                    continue
                ring.disable_notifications()
                ring.push_many([(chain, handle(index, chain)) for chain in chains])
                if ring.needs_notify():
                    self.hooks.notify_used(index)
        except SpecViolation as err:
            self.fail(err.message, err.normative)

    # -- device-initiated ------------------------------------------------------

    def fail(self, reason: str, normative: str | None = None) -> None:
        """Enter DEVICE_NEEDS_RESET because of a driver's error."""
        where = f" [{normative}]" if normative else ""
        if self.status & S.DEVICE_NEEDS_RESET:
            return  # the first reason is the one worth keeping
        self.needs_reset_reason = f"{reason}{where}"
        log.warning("%s: DEVICE_NEEDS_RESET: %s%s", type(self).__name__, reason, where)
        was_live = bool(self.status & S.DRIVER_OK)
        self.status |= S.DEVICE_NEEDS_RESET
        if was_live:
            self.hooks.notify_config()

    def reset(self) -> None:
        """Device reset: status 0, queues and features forgotten."""
        self.status = 0
        self.driver_features = 0
        self.negotiated = 0
        self.needs_reset_reason = None
        self._config_change_pending = False
        for q in self.queues:
            q.clear()
        if isinstance(self.memory, TranslatedMemory):
            self.memory = self.memory.memory
        self.config[:] = bytes(len(self.config))
        self.build_config()
        self.on_reset()

    def attach_memory(self, memory: Memory, iommu: Translate | None = None) -> None:
        self.memory = memory
        self.iommu = iommu


ChainHandler = Callable[[int, Chain], int]

__all__ = [
    "ChainHandler",
    "DeviceHooks",
    "QueueState",
    "RingError",
    "RingOptions",
    "VirtioDevice",
]
