"""The device side of the basic facilities: status, features, config space, queues.

:class:`VirtioDevice` is a sans-IO state machine. Transports reach it only
through :class:`~virtio.core.registers.DeviceRegisters`, the register-shaped
seam every transport adapter (loopback, vhost-user, PCI, MMIO, CCW) maps its
own registers onto; the device reaches the driver through
:class:`DeviceHooks`, which the seam implements. A device type subclasses
:class:`VirtioDevice`, declaring its id, features, configuration space and
queues, and serves buffers in :meth:`VirtioDevice.handle_chain`.

A chain can be completed at once (``handle_chain`` returns the bytes
written) or kept and completed later with :meth:`VirtioDevice.complete`, in
any order unless VIRTIO_F_IN_ORDER was negotiated (then the core holds
early completions back until those before them are done). Completions are
pushed in batches with one notification decision per batch. A device that
waits on file descriptors or timers asks for them through ``self.events``
(:class:`~virtio.core.events.EventSources`); its host serves them.

A driver that breaks the spec puts the device into DEVICE_NEEDS_RESET with a
logged reason naming the normative id; the device then serves nothing until
it is reset.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import ClassVar

from virtio.core.events import EventSources
from virtio.core.status import Action, Interface, StatusViolation, interpret, is_live
from virtio.errors import RingError, SpecViolation
from virtio.layout import ByteOrder
from virtio.memory import Buffer, GuestMemory, Memory, Translate, TranslatedMemory
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
# The bits tested per request, as plain ints (IntFlag arithmetic is slow).
_NEEDS_RESET = int(S.DEVICE_NEEDS_RESET)
_RUNNING = int(S.DRIVER_OK | S.SUSPEND)

#: What ``handle_chain`` returns for a chain the device keeps, to complete later.
DEFERRED = None

# Core bits a legacy interface knows (the rest need VIRTIO_F_VERSION_1).
_LEGACY_CORE = (
    1 << F.VIRTIO_F_NOTIFY_ON_EMPTY
    | 1 << F.VIRTIO_F_ANY_LAYOUT
    | 1 << F.VIRTIO_F_INDIRECT_DESC
    | 1 << F.VIRTIO_F_EVENT_IDX
)
_CORE_MASK = sum(1 << bit for bit in F.CORE_FEATURE_BITS)


class DeviceHooks:
    """How the device reaches the driver; the transport seam overrides these."""

    def notify_used(self, queue_index: int) -> None:
        """Send a used buffer notification (an interrupt) for a queue."""

    def notify_config(self) -> None:
        """Send a configuration change notification."""


@dataclass(frozen=True)
class SharedMemoryRegion:
    """A shared memory region the device exposes (id, length, and its host memory)."""

    id: int
    length: int
    backing: Buffer | None = field(default=None, repr=False)


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
    vector: int = 0xFFFF
    ring: DeviceQueue | None = field(default=None, repr=False)
    #: Chains the device kept (handle_chain returned DEFERRED), by identity.
    deferred: dict[int, Chain] = field(default_factory=dict, repr=False)
    #: With VIRTIO_F_IN_ORDER and deferred chains: popped chains not yet released,
    #: and the written length of those completed out of turn.
    in_order: deque[Chain] = field(default_factory=deque, repr=False)
    done_early: dict[int, int] = field(default_factory=dict, repr=False)

    def clear(self) -> None:
        self.size = self.max_size
        self.desc = self.driver = self.device = 0
        self.enabled = False
        self.vector = 0xFFFF
        self.ring = None
        self.deferred.clear()
        self.in_order.clear()
        self.done_early.clear()


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
    #: Chains served per batch before their used entries are pushed. Small batches
    #: let a driver that polls the used ring refill it while the device works on.
    batch_limit: ClassVar[int] = 8

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
        self.hooks = hooks or DeviceHooks()
        self.events = EventSources()
        #: A transport that watches what the device writes (vhost-user dirty logging)
        #: sees every batch of used buffers here, right after it reaches the ring.
        self.used_hook: Callable[[int, Sequence[tuple[Chain, int]]], None] | None = None
        self.queues = [QueueState(i, queue_max_size) for i in range(num_queues)]
        for q in self.queues:
            q.clear()
        #: How many queues exist with the negotiated features (all, before negotiation).
        self.queue_count = num_queues
        self.memory: Memory | None = None
        self.iommu: Translate | None = None
        self.interface = Interface.MODERN
        #: The guest's byte order, used through a legacy interface (the transport knows it).
        self.legacy_order: ByteOrder = "little"
        self.config = bytearray(self.config_size())
        self.config_generation = 0
        #: The status byte, a plain int (tested per request: IntFlag arithmetic is slow).
        self.status = 0
        self.driver_features = 0
        self.negotiated = 0
        self.needs_reset_reason: str | None = None
        #: Whether the features a driver accepts must meet each other's requirements.
        #: A vhost-user back-end turns it off: its front-end negotiated with the driver
        #: and keeps some features to itself (QEMU serves net's control queue, so the
        #: back-end sees VIRTIO_NET_F_MQ without VIRTIO_NET_F_CTRL_VQ).
        self.check_requirements = True
        self._config_change_pending = False
        #: Queues the driver notified after FEATURES_OK but before DRIVER_OK.
        self._early_notified: set[int] = set()
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

    def legacy_features(self) -> int:
        """Legacy-only bits offered through a legacy interface (e.g. VIRTIO_F_ANY_LAYOUT)."""
        return 0

    def config_size(self) -> int:
        return 0

    def build_config(self) -> None:
        """Fill ``self.config`` (at creation and after each reset), in ``self.byteorder``."""

    def validate_features(self, features: int) -> str | None:
        """A reason to refuse FEATURES_OK for this subset, or None to accept."""
        return None

    def queues_for_features(self, features: int) -> int:
        """How many queues the device has once ``features`` are negotiated."""
        return len(self.queues)

    def config_read(self, offset: int, size: int) -> bytes:
        """A driver read of the config space; override for fields read with side effects."""
        return bytes(self.config[offset : offset + size])

    def config_write(self, offset: int, data: bytes) -> bool:
        """Apply a driver write to the config space; False if the field is read-only."""
        return False

    def shared_memory_regions(self) -> Sequence[SharedMemoryRegion]:
        """The shared memory regions this device exposes (none by default)."""
        return ()

    def on_features_ok(self) -> None:
        """Features are negotiated (``self.negotiated``): queue roles may depend on them."""

    def on_driver_ok(self) -> None:
        """The driver set DRIVER_OK: the device is live."""

    def on_reset(self) -> None:
        """Forget device-type state (device reset)."""

    def handle_chain(self, queue_index: int, chain: Chain) -> int | None:
        """Serve one buffer: the bytes written into it, or DEFERRED to complete it later."""
        raise NotImplementedError

    def quiesce(self, queue_index: int) -> None:
        """Complete every deferred chain of a queue now (before its state is saved)."""

    def describe(self) -> str:
        """A short description for logs (``virtio serve``'s start-up line)."""
        return f"{type(self).__name__}, {len(self.queues)} queues"

    def flush_backend(self) -> None:
        """Make what the device completed durable (a front-end left, or shutdown)."""

    def close(self) -> None:
        """Release the device's host resources (files, threads)."""

    # -- feature helpers -------------------------------------------------------

    def has(self, bit: int) -> bool:
        """Whether a feature bit was negotiated."""
        return bool(self.negotiated >> bit & 1)

    @property
    def live(self) -> bool:
        return is_live(self.status)

    @property
    def legacy(self) -> bool:
        return self.interface is Interface.LEGACY

    @property
    def byteorder(self) -> ByteOrder:
        """The byte order of rings, config fields and headers on the interface in use."""
        return self.legacy_order if self.legacy else "little"

    def use_interface(self, interface: Interface, legacy_order: ByteOrder = "little") -> None:
        """The transport says which interface the driver uses; the device resets to it."""
        self.interface = interface
        self.legacy_order = legacy_order
        self.reset()

    # -- driver-facing: status -------------------------------------------------

    def read_status(self) -> int:
        return self.status

    def write_status(self, value: int) -> None:
        try:
            write = interpret(self.interface, self.status, value)
        except StatusViolation as err:
            self.fail(err.reason, err.normative)
            return
        if write.reset:
            self.reset()
            return
        if self.status & S.DEVICE_NEEDS_RESET and not all(
            step.action is Action.FAIL for step in write.steps
        ):
            return  # nothing moves forward until the driver resets the device
        if write.resume:
            self._resume()
        for i, step in enumerate(write.steps):
            if step.action is Action.NEGOTIATE:
                reason = self._check_features(self.driver_features)
                if reason is not None:
                    log.info("refusing FEATURES_OK: %s", reason)
                    later = write.steps[i + 1 :]
                    if any(s.action is Action.GO_LIVE for s in later):
                        # A modern device never goes live without FEATURES_OK.
                        self.fail(
                            "driver set DRIVER_OK in the same write as FEATURES_OK, "
                            "which the device refused",
                            N_INIT_DRV,
                        )
                    return
                self.status |= int(step.bit)
                self._negotiated(self.driver_features)
            elif step.action is Action.GO_LIVE:
                self.status |= int(step.bit)
                self._go_live()
            elif step.action is Action.SUSPEND:
                self._suspend()
            elif step.action is Action.FAIL:
                self.status |= int(step.bit)
                log.info("driver set FAILED")
            else:
                self.status |= int(step.bit)

    def _check_features(self, features: int) -> str | None:
        extra = features & ~self.offered_features
        if extra:
            return f"driver accepted features not offered: {extra:#x} [{N_FEATURES_DRV}]"
        if not features >> F.VIRTIO_F_VERSION_1 & 1:
            return f"driver did not accept VIRTIO_F_VERSION_1 [{N_RESERVED_DEV}]"
        if self.check_requirements:
            problems = F.unmet_requirements(self.device_id, features)
            if problems:
                return f"{'; '.join(problems)} [{N_FEATURES_DRV}]"
        return self.validate_features(features)

    def _negotiated(self, features: int) -> None:
        self.negotiated = features
        self.queue_count = min(len(self.queues), self.queues_for_features(features))
        self._apply_memory()
        self.on_features_ok()

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
        for q in self.active_queues():
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
        early, self._early_notified = self._early_notified, set()
        for index in sorted(early):
            self.process_queue(index)

    def _suspend(self) -> None:
        if not self.has(F.VIRTIO_F_SUSPEND) or not self.status & S.DRIVER_OK:
            # Operations on SUSPEND before full initialization are ignored.
            log.info("ignoring SUSPEND: device not initialized or feature not negotiated")
            return
        # Finish what is being processed, then present SUSPEND without DRIVER_OK.
        for q in self.queues:
            if q.deferred:
                self.quiesce(q.index)
        self.status = int((self.status & ~S.DRIVER_OK) | S.SUSPEND)

    def _resume(self) -> None:
        self.status = int((self.status & ~S.SUSPEND) | S.DRIVER_OK)
        if self._config_change_pending:
            self._config_change_pending = False
            self.hooks.notify_config()
        for q in self.queues:
            if q.ring is not None:
                self.process_queue(q.index)

    # -- driver-facing: features ----------------------------------------------

    def read_device_features(self) -> int:
        """The offer on the interface in use (a legacy interface has 32 bits)."""
        if self.legacy:
            legacy_bits = self.offered_features & 0xFFFFFFFF & (~_CORE_MASK | _LEGACY_CORE)
            return int(legacy_bits | self.legacy_features())
        return self.offered_features

    def write_driver_features(self, value: int) -> None:
        if self.status & S.FEATURES_OK or (self.legacy and self.status & S.DRIVER_OK):
            if value != self.driver_features:
                self.fail("driver changed its features after FEATURES_OK", N_INIT_DRV)
            return
        self.driver_features = value
        if self.legacy:
            # A legacy device acts on the features as they are written.
            extra = value & ~self.read_device_features()
            if extra:
                self.fail(f"driver accepted features not offered: {extra:#x}", N_FEATURES_DRV)
                return
            self._negotiated(value)

    # -- driver-facing: configuration space -----------------------------------

    def read_config(self, offset: int, size: int) -> bytes:
        if offset < 0 or size < 0 or offset + size > len(self.config):
            # Reads past the end return zeroes, the way an unbacked register reads.
            out = bytearray(max(size, 0))
            start = max(0, offset)
            end = min(len(self.config), offset + size)
            if end > start:
                out[start - offset : end - offset] = self.config_read(start, end - start)
            return bytes(out)
        return self.config_read(offset, size)

    def write_config(self, offset: int, data: bytes) -> None:
        if not self.status & S.FEATURES_OK and not (self.legacy and self.status & S.DRIVER):
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

    def active_queues(self) -> list[QueueState]:
        """The queues that exist with the features negotiated (all of them before that)."""
        return self.queues[: self.queue_count]

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
        if index >= self.queue_count:
            self.fail(f"driver enabled queue {index}, which the features leave out", N_INIT_DRV)
            return
        q.enabled = True
        if self.status & S.DRIVER_OK:
            # Re-enabling after a queue reset on a live device.
            try:
                self._start_queue(q)
            except SpecViolation as err:
                self.fail(err.message, err.normative)

    def reset_queue(self, index: int) -> None:
        """Per-queue reset (VIRTIO_F_RING_RESET)."""
        self.queue(index)  # the queue exists
        if not self.has(F.VIRTIO_F_RING_RESET):
            self.fail("queue reset without VIRTIO_F_RING_RESET", N_QRESET_DEV)
            return
        self.stop_queue(index)

    def stop_queue(self, index: int) -> None:
        """Forget a queue's ring and configuration; completions still pending are dropped."""
        q = self.queue(index)
        if q.deferred:
            # Work in flight still writes into the queue's buffers: let it finish first.
            self.quiesce(index)
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
            order=self.byteorder,
        )

    # -- driver-facing: notifications ------------------------------------------

    def notify(self, index: int, *, rearm: bool = True) -> int:
        """An available buffer notification (a kick) for queue ``index``; chains served.

        ``rearm=False``: the transport goes on polling the ring, so available
        buffer notifications stay off (see :meth:`process_queue`).
        """
        status = self.status
        if status & _NEEDS_RESET:
            return 0
        if not status & _RUNNING:
            if status & S.FEATURES_OK and 0 <= index < self.queue_count:
                # Linux's virtio_balloon kicks its stats queue before DRIVER_OK. The
                # device consumes nothing yet (it MUST NOT before DRIVER_OK) and
                # serves the queue once the driver sets it.
                log.info("driver notified queue %d before DRIVER_OK: served at DRIVER_OK", index)
                self._early_notified.add(index)
                return 0
            self.fail(f"driver notified queue {index} before DRIVER_OK", N_INIT_DRV)
            return 0
        if not 0 <= index < self.queue_count:
            self.fail(f"driver notified queue {index}, which does not exist", N_INIT_DRV)
            return 0
        if self.status & S.SUSPEND:
            self.fail(f"driver notified queue {index} while suspended", N_SUSPEND_DRV)
            return 0
        return self.process_queue(index, rearm=rearm)

    def process_queue(self, index: int, *, rearm: bool = True) -> int:
        """Serve everything available on a queue; returns how many chains were served.

        Available buffer notifications stay off while the device works. With
        ``rearm`` (a notification woke the device) they are turned back on once
        the ring is empty, and the ring is checked once more; without it (a
        transport polling the ring) they stay off until :meth:`rearm_queue`.
        """
        q = self.queues[index]
        ring = q.ring
        if ring is None or not self.live:
            return 0
        served = 0
        try:
            while True:
                chains = ring.pop_many(self.batch_limit)
                if not chains:
                    if not rearm or not ring.enable_notifications():
                        break
                    continue
                ring.disable_notifications()
                served += len(chains)
                if not self.serve_chains(index, chains):
                    break
        except SpecViolation as err:
            self.fail(err.message, err.normative)
        return served

    def rearm_queue(self, index: int) -> int:
        """Stop polling a queue: notifications back on, and serve what arrived meanwhile."""
        ring = self.queues[index].ring
        if ring is None or not self.live:
            return 0
        try:
            if not ring.enable_notifications():
                return 0
        except SpecViolation as err:
            self.fail(err.message, err.normative)
            return 0
        return self.process_queue(index)

    def serve_chains(self, index: int, chains: Sequence[Chain]) -> bool:
        """Hand popped chains to the device type and push what it completed at once.

        Also how a transport resubmits chains it recovered (vhost-user inflight
        records). False when the device failed on one of them: the rest are
        not served.
        """
        q = self.queues[index]
        ring = q.ring
        assert ring is not None
        handle = self.handle_chain
        done: list[tuple[Chain, int]] = []
        deferred = False
        for chain in chains:
            written = handle(index, chain)
            if self.status & _NEEDS_RESET:
                return False  # the device failed: stop at this chain
            if written is None:
                q.deferred[id(chain)] = chain
                deferred = True
            else:
                done.append((chain, written))
        if ring.in_order and (deferred or q.in_order):
            # Completions wait for chains popped ahead of them.
            self._release_in_order(q, chains, done)
        elif done:
            self._push(q, done)
        return True

    def _push(self, q: QueueState, items: Sequence[tuple[Chain, int]]) -> None:
        """One batch of used buffers, one notification decision."""
        ring = q.ring
        assert ring is not None
        ring.push_many(items)
        if self.used_hook is not None:
            self.used_hook(q.index, items)
        if self.live and ring.needs_notify():
            self.hooks.notify_used(q.index)

    def pop_available(self, index: int, limit: int) -> list[Chain]:
        """Pop up to ``limit`` chains without serving them.

        For a device that fills buffers when data arrives rather than when the
        driver notifies (net's receive queues); it returns them with
        :meth:`push_used`. A broken ring fails the device and pops nothing.
        """
        ring = self.queues[index].ring
        if ring is None or not self.live:
            return []
        try:
            return ring.pop_many(limit)
        except SpecViolation as err:
            self.fail(err.message, err.normative)
            return []

    def pop_receive_buffer(self, index: int, normative: str) -> Chain | None:
        """One available buffer for the device to fill (a receive queue's), or None.

        A buffer with device-readable parts breaks the rule ``normative`` names:
        the device fails and takes nothing.
        """
        chains = self.pop_available(index, 1)
        if not chains:
            return None
        chain = chains[0]
        if chain.read_len:
            self.fail(f"receive queue {index}: buffer has device-readable parts", normative)
            return None
        return chain

    def push_used(self, index: int, items: Sequence[tuple[Chain, int]]) -> None:
        """Return chains taken with :meth:`pop_available`, as one batch."""
        q = self.queues[index]
        if q.ring is None or self.status & _NEEDS_RESET or not items:
            return
        try:
            self._push(q, items)
        except SpecViolation as err:
            self.fail(err.message, err.normative)

    def complete(self, queue_index: int, chain: Chain, written: int) -> None:
        """Return one chain the device kept (see :meth:`complete_many`)."""
        self.complete_many(queue_index, ((chain, written),))

    def complete_many(self, queue_index: int, items: Sequence[tuple[Chain, int]]) -> None:
        """Return chains the device kept, as one batch with one notification decision.

        Completions of a queue that was reset (or a device that was reset or
        failed) since the chain was popped are dropped: that ring is gone.
        With VIRTIO_F_IN_ORDER, a chain completed before those popped ahead of
        it waits for them.
        """
        q = self.queues[queue_index]
        ring = q.ring
        if ring is None or self.status & _NEEDS_RESET:
            return
        mine = [(c, n) for c, n in items if q.deferred.pop(id(c), None) is c]
        if len(mine) != len(items):
            log.debug(
                "queue %d: dropping %d stale completions", queue_index, len(items) - len(mine)
            )
        if not mine:
            return
        if ring.in_order:
            self._release_in_order(q, (), mine)
            return
        self._push(q, mine)

    def _release_in_order(
        self, q: QueueState, popped: Sequence[Chain], done: Sequence[tuple[Chain, int]]
    ) -> None:
        """Push completions in the order the chains were popped (VIRTIO_F_IN_ORDER)."""
        ring = q.ring
        assert ring is not None
        q.in_order.extend(popped)
        early = q.done_early
        for chain, written in done:
            early[id(chain)] = written
        ready: list[tuple[Chain, int]] = []
        order = q.in_order
        while order and id(order[0]) in early:
            chain = order.popleft()
            ready.append((chain, early.pop(id(chain))))
        if ready:
            self._push(q, ready)

    @property
    def deferred_count(self) -> int:
        return sum(len(q.deferred) for q in self.queues)

    # -- device-initiated ------------------------------------------------------

    def fail(self, reason: str, normative: str | None = None) -> None:
        """Enter DEVICE_NEEDS_RESET because of a driver's error."""
        where = f" [{normative}]" if normative else ""
        if self.status & S.DEVICE_NEEDS_RESET:
            return  # the first reason is the one worth keeping
        self.needs_reset_reason = f"{reason}{where}"
        log.warning("%s: DEVICE_NEEDS_RESET: %s%s", type(self).__name__, reason, where)
        was_live = bool(self.status & S.DRIVER_OK)
        self.status |= _NEEDS_RESET
        if was_live:
            self.hooks.notify_config()

    def reset(self) -> None:
        """Device reset: status 0, queues and features forgotten."""
        self.status = 0
        self.driver_features = 0
        self.negotiated = 0
        self.queue_count = len(self.queues)
        self.needs_reset_reason = None
        self._config_change_pending = False
        self._early_notified.clear()
        for q in self.queues:
            if q.deferred:
                self.quiesce(q.index)  # nothing may touch guest memory after the reset
            q.clear()
        if isinstance(self.memory, TranslatedMemory):
            self.memory = self.memory.memory
        self.config[:] = bytes(len(self.config))
        self.build_config()
        self.on_reset()

    def attach_memory(self, memory: Memory, iommu: Translate | None = None) -> None:
        self.memory = memory
        self.iommu = iommu


ChainHandler = Callable[[int, Chain], "int | None"]

__all__ = [
    "DEFERRED",
    "ChainHandler",
    "DeviceHooks",
    "QueueState",
    "RingError",
    "RingOptions",
    "SharedMemoryRegion",
    "VirtioDevice",
]
