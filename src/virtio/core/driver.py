"""The driver side of the basic facilities: initialization, features, config, queues.

:class:`VirtioDriver` runs the sequence of "General Initialization And Device
Operation" against any :class:`DriverTransport` (the in-process loopback, the
vhost-user front-end, a register-level PCI/MMIO model), then moves requests
through its virtqueues. A device type's driver subclasses it.

The driver does not trust the device: ring errors, a status that lost bits or
DEVICE_NEEDS_RESET make the driver fail the outstanding requests with a clear
error instead of hanging.

Like the device, the driver core is sans-IO: it never sleeps and never reads
a clock. Used buffers, configuration changes and a device that needs a reset
arrive as :class:`DriverEvent` objects from :meth:`VirtioDriver.poll`; the
blocking helpers (:meth:`VirtioDriver.wait`, :meth:`VirtioDriver.call`, the
reset and suspend waits) ask the transport adapter to block, with its own
clock, until a condition holds.

Through a legacy interface (``transport.legacy``) the driver follows the
legacy sequence: 32 feature bits, no FEATURES_OK, rings laid out in one
block located by page frame number, and the guest's byte order in rings,
config fields and headers.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import ClassVar, Protocol

from virtio.core.status import Interface, Phase, path
from virtio.errors import DeviceNeedsReset, NegotiationError, SpecViolation, VirtioError
from virtio.layout import ByteOrder
from virtio.memory import Allocator, Memory
from virtio.queue import DriverQueue, RingLayout, driver_queue
from virtio.spec import features as F
from virtio.spec.status import DeviceStatus

log = logging.getLogger("virtio.driver")
S = DeviceStatus

N_INIT_DRV = "drivernormative:General Initialization And Device Operation / Device Initialization"
N_FEATURES_DRV = "drivernormative:Basic Facilities of a Virtio Device / Feature Bits"
N_RESET_DRV = "drivernormative:Basic Facilities of a Virtio Device / Device Reset"
N_STATUS_DEV = "devicenormative:Basic Facilities of a Virtio Device / Device Status Field"
N_CONFIG_DRV = "drivernormative:Basic Facilities of a Virtio Device / Device Configuration Space"
N_SUSPEND_DRV = "drivernormative:General Initialization And Device Operation / Device Suspend"
N_QRESET_DRV = (
    "drivernormative:Basic Facilities of a Virtio Device / Virtqueues / Virtqueue Reset / "
    "Virtqueue Reset"
)

# The core features this driver core knows how to use.
CORE_FEATURES = (
    F.VIRTIO_F_INDIRECT_DESC,
    F.VIRTIO_F_EVENT_IDX,
    F.VIRTIO_F_VERSION_1,
    F.VIRTIO_F_ACCESS_PLATFORM,
    F.VIRTIO_F_RING_PACKED,
    F.VIRTIO_F_IN_ORDER,
    F.VIRTIO_F_NOTIFICATION_DATA,
    F.VIRTIO_F_RING_RESET,
    F.VIRTIO_F_SUSPEND,
)


def count_queues(queue_max_size: Callable[[int], int], limit: int = 1024) -> int:
    """How many queues a device has, on a transport with no count: the first with size 0."""
    count = 0
    while count < limit and queue_max_size(count):
        count += 1
    return count


class DriverTransport(Protocol):
    """How a driver reaches a device: registers, rings' memory, notifications.

    ``legacy`` says the device is driven through a legacy interface, whose
    rings and fields are in ``legacy_order`` (the guest's byte order) and
    whose queues are given to ``setup_queue`` as :meth:`RingLayout.legacy`
    layouts aligned to ``queue_align``. ``wait_until`` is where blocking
    happens: the adapter waits on its interrupts, with its own clock.
    """

    device_id: int
    memory: Memory
    allocator: Allocator
    legacy: bool
    legacy_order: ByteOrder
    queue_align: int

    def read_status(self) -> int: ...
    def write_status(self, value: int) -> None: ...
    def read_device_features(self) -> int: ...
    def write_driver_features(self, value: int) -> None: ...
    def read_config(self, offset: int, size: int) -> bytes: ...
    def write_config(self, offset: int, data: bytes) -> None: ...
    def config_generation(self) -> int: ...
    def num_queues(self) -> int: ...
    def queue_max_size(self, index: int) -> int: ...
    def setup_queue(self, index: int, layout: RingLayout) -> None: ...
    def reset_queue(self, index: int) -> None: ...
    def queue_reset_done(self, index: int) -> bool: ...
    def notify(self, index: int, value: int) -> None: ...
    def set_interrupt_handlers(
        self, used: Callable[[int], None], config: Callable[[], None]
    ) -> None: ...
    def wait_interrupt(self, timeout: float | None) -> bool: ...
    def wait_until(self, predicate: Callable[[], bool], timeout: float) -> bool: ...


class Request:
    """One buffer in flight: its guest memory, and its result once used."""

    __slots__ = ("done", "error", "in_", "out", "queue", "token", "written")

    def __init__(
        self, queue: int, out: list[tuple[int, int]], in_: list[tuple[int, int]], token: object
    ) -> None:
        self.queue = queue
        self.out = out
        self.in_ = in_
        self.token = token
        self.done = False
        self.written = 0
        self.error: VirtioError | None = None


@dataclass(frozen=True)
class UsedBuffer:
    """The device returned a buffer (``request.written`` bytes written)."""

    queue: int
    request: Request


@dataclass(frozen=True)
class ConfigChanged:
    """The device changed its configuration space."""


@dataclass(frozen=True)
class NeedsReset:
    """The device set DEVICE_NEEDS_RESET (or broke the rings); the driver stopped using it."""

    reason: str


DriverEvent = UsedBuffer | ConfigChanged | NeedsReset


class VirtioDriver:
    """Base class of every driver."""

    device_id: ClassVar[int] = 0

    def __init__(
        self,
        transport: DriverTransport,
        *,
        features: int | None = None,
        queue_size: int | None = None,
        avoid_features: int = 0,
    ) -> None:
        self.transport = transport
        #: Features this driver is willing to accept (None: everything it knows).
        self.wanted = features
        self.avoid = avoid_features
        self.queue_size = queue_size
        self.negotiated = 0
        self.device_features = 0
        self.queues: list[DriverQueue] = []
        self.broken: str | None = None
        self.suspended = False
        self.config_changes = 0
        self._events: list[DriverEvent] = []
        self._used_pending: set[int] = set()
        transport.set_interrupt_handlers(self._on_used, self._on_config)

    # -- what a device type's driver declares ---------------------------------

    def supported_features(self) -> int:
        """Device-type feature bits this driver understands."""
        return 0

    def queues_wanted(self) -> int:
        """How many virtqueues to set up (after features are negotiated)."""
        return 1

    def setup(self) -> None:
        """Device-specific setup between FEATURES_OK and DRIVER_OK."""

    def on_config_change(self) -> None:
        """The device changed its configuration space."""

    # -- initialization ----------------------------------------------------------

    def has(self, bit: int) -> bool:
        return bool(self.negotiated >> bit & 1)

    @property
    def interface(self) -> Interface:
        return Interface.LEGACY if self.transport.legacy else Interface.MODERN

    @property
    def byteorder(self) -> ByteOrder:
        """The byte order of rings, config fields and headers on this interface."""
        return self.transport.legacy_order if self.transport.legacy else "little"

    def reset(self, timeout: float = 5.0) -> None:
        """Reset the device and wait until it reads back status 0."""
        t = self.transport
        t.write_status(0)
        if not t.wait_until(lambda: t.read_status() == 0, timeout):
            raise NegotiationError("device did not complete the reset", N_RESET_DRV)
        for q in self.queues:
            q.detach_unused()
        self.queues = []
        self.broken = None
        self._events.clear()
        self._used_pending.clear()

    def _set_status(self, bit: int) -> None:
        t = self.transport
        t.write_status(t.read_status() | bit)

    def _advance(self, steps: list[int], phase: Phase) -> None:
        """Write the status values of the initialization sequence up to ``phase``."""
        for value in path(self.interface, phase):
            if value not in steps:
                steps.append(value)
                self.transport.write_status(value)

    def choose_features(self, offered: int) -> int:
        """The subset to accept: known, wanted, with every requirement met."""
        known = self.supported_features()
        for bit in CORE_FEATURES:
            known |= 1 << bit
        accept = offered & known & ~self.avoid
        if self.wanted is not None:
            accept &= self.wanted | 1 << F.VIRTIO_F_VERSION_1
        # Drop features whose requirements are not accepted, until stable.
        while True:
            problems = F.unmet_requirements(self.device_id, accept)
            if not problems:
                return accept
            before = accept
            for bit in range(accept.bit_length()):
                name = F.feature_name(self.device_id, bit)
                if accept >> bit & 1 and any(p.startswith(name + " ") for p in problems):
                    accept &= ~(1 << bit)
            if accept == before:
                raise NegotiationError(f"cannot satisfy feature requirements: {problems}")

    def initialize(self) -> None:
        """Steps 1-8 of the device initialization sequence (the legacy one on a legacy interface)."""
        t = self.transport
        if t.device_id != self.device_id:
            raise NegotiationError(
                f"{type(self).__name__} drives device id {self.device_id}, found {t.device_id}"
            )
        self.reset()
        written: list[int] = []
        self._advance(written, Phase.DRIVER)  # ACKNOWLEDGE, then DRIVER
        offered = t.read_device_features()
        self.device_features = offered
        legacy = t.legacy
        if not legacy and not offered >> F.VIRTIO_F_VERSION_1 & 1:
            self._set_status(S.FAILED)
            raise NegotiationError("device does not offer VIRTIO_F_VERSION_1 (legacy only)")
        accept = self.choose_features(offered)
        t.write_driver_features(accept)
        if not legacy:
            self._advance(written, Phase.FEATURES_OK)
            if not t.read_status() & S.FEATURES_OK:
                self._set_status(S.FAILED)
                raise NegotiationError(
                    f"device refused features {accept:#x} (FEATURES_OK not set)", N_INIT_DRV
                )
        self.negotiated = accept
        try:
            self._setup_queues()
            self.setup()
        except Exception:
            self._set_status(S.FAILED)
            raise
        self._advance(written, Phase.LIVE)
        status = t.read_status()
        if status & S.DEVICE_NEEDS_RESET:
            raise DeviceNeedsReset("device needs a reset right after DRIVER_OK")

    def _setup_queues(self) -> None:
        t = self.transport
        count = self.queues_wanted()
        if count > t.num_queues():
            raise NegotiationError(f"need {count} queues, the device has {t.num_queues()}")
        packed = self.has(F.VIRTIO_F_RING_PACKED)
        for index in range(count):
            self.queues.append(self._make_queue(index, packed))

    def _make_queue(self, index: int, packed: bool) -> DriverQueue:
        t = self.transport
        max_size = t.queue_max_size(index)
        if max_size == 0:
            raise NegotiationError(f"queue {index} is not available")
        if t.legacy:
            # A legacy queue's size is the device's; its parts sit in one aligned block.
            size, align = max_size, t.queue_align
            base = t.allocator.alloc(RingLayout.legacy_bytes(size, align), max(align, 4096))
            layout = RingLayout.legacy(base, size, align)
        else:
            size = min(max_size, self.queue_size or max_size)
            if not packed:
                size = 1 << (size.bit_length() - 1)  # split rings need a power of 2
            base = t.allocator.alloc(RingLayout.contiguous(0, size, packed).total_bytes(), 4096)
            layout = RingLayout.contiguous(base, size, packed)
        q = driver_queue(
            t.memory,
            layout,
            indirect=self.has(F.VIRTIO_F_INDIRECT_DESC),
            event_idx=self.has(F.VIRTIO_F_EVENT_IDX),
            in_order=self.has(F.VIRTIO_F_IN_ORDER),
            allocator=t.allocator,
            vq_index=index,
            order=self.byteorder,
        )
        t.setup_queue(index, layout)
        return q

    def reset_queue(self, index: int, timeout: float = 5.0) -> list[object]:
        """Per-queue reset and re-enable (VIRTIO_F_RING_RESET); returns detached tokens.

        The buffers come back only once the device shows the reset complete
        (queue_reset and queue_enable read 0): until then it may still use them.
        """
        if not self.has(F.VIRTIO_F_RING_RESET):
            raise NegotiationError("VIRTIO_F_RING_RESET was not negotiated")
        t = self.transport
        t.reset_queue(index)
        if not t.wait_until(lambda: t.queue_reset_done(index), timeout):
            self._break(f"queue {index} did not finish its reset in {timeout}s")
            raise NegotiationError(f"queue {index} did not reset in {timeout}s", N_QRESET_DRV)
        q = self.queues[index]
        tokens = q.detach_unused()
        q.reset()
        t.setup_queue(index, q.ring.layout)
        return tokens

    def suspend(self, timeout: float = 5.0) -> None:
        """Suspend the device (VIRTIO_F_SUSPEND) and check that it did."""
        if not self.has(F.VIRTIO_F_SUSPEND):
            raise NegotiationError("VIRTIO_F_SUSPEND was not negotiated")
        t = self.transport
        if not t.read_status() & S.DRIVER_OK:
            raise NegotiationError("only a live device can be suspended", N_SUSPEND_DRV)
        t.write_status(t.read_status() | S.SUSPEND)
        # Verify: SUSPEND reads 1 and DRIVER_OK reads 0.
        self._wait_status(S.SUSPEND, S.DRIVER_OK, timeout, "suspend")
        self.suspended = True

    def resume(self, timeout: float = 5.0) -> None:
        """Resume a suspended device: DRIVER_OK again, wait for SUSPEND to clear."""
        t = self.transport
        t.write_status(t.read_status() | S.DRIVER_OK)
        self._wait_status(S.DRIVER_OK, S.SUSPEND, timeout, "resume")
        self.suspended = False

    def _wait_status(self, want: int, clear: int, timeout: float, what: str) -> None:
        t = self.transport

        def settled() -> bool:
            status = t.read_status()
            return bool(status & S.DEVICE_NEEDS_RESET or (status & want and not status & clear))

        if not t.wait_until(settled, timeout):
            raise NegotiationError(f"device did not {what} in {timeout}s", N_SUSPEND_DRV)
        if t.read_status() & S.DEVICE_NEEDS_RESET:
            self._break(f"device failed to {what}")
            raise DeviceNeedsReset(f"device failed to {what}")

    # -- configuration space ------------------------------------------------------

    def read_config(self, offset: int, size: int, *, retries: int = 100) -> bytes:
        """Read config bytes consistently: retry while the generation moves."""
        t = self.transport
        for _ in range(retries):
            before = t.config_generation()
            data = t.read_config(offset, size)
            if t.config_generation() == before:
                return data
        raise NegotiationError("config generation kept changing", N_CONFIG_DRV)

    # -- requests ----------------------------------------------------------------------

    def submit(
        self,
        queue: int,
        out: Sequence[bytes | bytearray | memoryview],
        in_sizes: Sequence[int] = (),
        token: object = None,
    ) -> Request:
        """Copy ``out`` into guest buffers, add writable buffers of ``in_sizes``."""
        self._check_usable()
        t = self.transport
        alloc = t.allocator
        out_segs: list[tuple[int, int]] = []
        in_segs: list[tuple[int, int]] = []
        try:
            for data in out:
                n = len(data)
                addr = alloc.alloc(max(n, 1), 16)
                t.memory.write(addr, data)
                out_segs.append((addr, n))
            for n in in_sizes:
                in_segs.append((alloc.alloc(max(n, 1), 16), n))
        except MemoryError:
            for addr, _ in out_segs + in_segs:
                alloc.free(addr)
            raise
        request = Request(queue, out_segs, in_segs, token)
        try:
            self.queues[queue].add(out_segs, in_segs, request)
        except Exception:
            self.release(request)
            raise
        return request

    def kick(self, queue: int) -> None:
        q = self.queues[queue]
        if q.kick_needed():
            value = q.notification_value() if self.has(F.VIRTIO_F_NOTIFICATION_DATA) else queue
            self.transport.notify(queue, value)

    def harvest(self, queue: int) -> list[Request]:
        """Collect used buffers of a queue; a hostile device breaks the driver cleanly."""
        try:
            used = self.queues[queue].get_used()
        except SpecViolation as err:
            self._break(f"device corrupted queue {queue}: {err}")
            raise
        done: list[Request] = []
        for token, written in used:
            assert isinstance(token, Request)
            token.done = True
            token.written = written
            done.append(token)
        return done

    def read_in(self, request: Request) -> bytes:
        """The bytes the device wrote (only the first ``written`` bytes count)."""
        t = self.transport
        remaining = request.written
        chunks = []
        for addr, n in request.in_:
            take = min(n, remaining)
            if take <= 0:
                break
            chunks.append(t.memory.read(addr, take))
            remaining -= take
        return b"".join(chunks)

    def read_in_full(self, request: Request) -> bytes:
        t = self.transport
        return b"".join(t.memory.read(addr, n) for addr, n in request.in_)

    def release(self, request: Request) -> None:
        alloc = self.transport.allocator
        for addr, _ in request.out + request.in_:
            alloc.free(addr)
        request.out = []
        request.in_ = []

    def poll(self) -> list[DriverEvent]:
        """Harvest every queue and return what happened since the last poll, in order."""
        for index in range(len(self.queues)):
            if self.broken is not None:
                break
            try:
                done = self.harvest(index)
            except SpecViolation:
                continue  # recorded as a NeedsReset event by harvest
            self._events.extend(UsedBuffer(index, request) for request in done)
        events, self._events = self._events, []
        self._used_pending.clear()
        return events

    def wait(self, request: Request, timeout: float = 30.0) -> Request:
        """Block (in the transport) until ``request`` is used, or the device breaks."""

        queue = self.queues[request.queue]

        def finished() -> bool:
            self._check_usable()
            if not request.done:
                self.harvest(request.queue)
            if not request.done and queue.enable_interrupts():
                # Ask for a used buffer notification (with event idx: used_event =
                # the next entry), then look once more: it may have come meanwhile.
                self.harvest(request.queue)
            return request.done

        if not self.transport.wait_until(finished, timeout):
            raise TimeoutError(f"request on queue {request.queue} not completed in {timeout}s")
        return request

    def call(
        self,
        queue: int,
        out: Sequence[bytes | bytearray | memoryview],
        in_sizes: Sequence[int] = (),
        timeout: float = 30.0,
    ) -> tuple[int, bytes]:
        """Submit, kick, wait; returns (written, the full writable bytes)."""
        request = self.submit(queue, out, in_sizes)
        try:
            self.kick(queue)
            self.wait(request, timeout)
            return request.written, self.read_in_full(request)
        finally:
            if request.done:
                self.release(request)

    # -- interrupts ----------------------------------------------------------------------

    def _on_used(self, queue: int) -> None:
        # Used buffers are harvested by whoever polls or waits; remember where to look.
        self._used_pending.add(queue)

    def _on_config(self) -> None:
        self.config_changes += 1
        status = self.transport.read_status()
        if status & S.DEVICE_NEEDS_RESET:
            self._break("device set DEVICE_NEEDS_RESET")
            return
        self._events.append(ConfigChanged())
        self.on_config_change()

    def _check_usable(self) -> None:
        if self.broken is not None:
            raise DeviceNeedsReset(self.broken)
        if self.suspended:
            # No new buffers and no notifications while the device is suspended.
            raise NegotiationError("device is suspended", N_SUSPEND_DRV)

    def _break(self, reason: str) -> None:
        if self.broken is None:
            log.warning("driver stops using the device: %s", reason)
            self.broken = reason
            self._events.append(NeedsReset(reason))
