"""The vhost-user back-end as a sans-IO state machine over a pyvirtio device model.

:class:`BackendSession` takes one decoded front-end message at a time and
returns the replies to send. Everything that touches the operating system
(mapping a memory fd, watching a kick eventfd, signalling a call eventfd,
creating the inflight memfd) goes through the :class:`Host` the adapter
supplies, so the whole protocol runs in tests without sockets or VMs.

The session reaches the device model only through the device transport
seam (:class:`~virtio.core.registers.DeviceRegisters`), and drives it the way
a driver would, along the status table's path: SET_FEATURES walks the status
through FEATURES_OK (or, for a legacy guest that did not accept
VIRTIO_F_VERSION_1, takes the legacy interface, which has no such step), the
first ring start sets DRIVER_OK, and each ring's addresses, size and base
configure one queue register by register. The session is the seam's
interrupt sink: a used buffer notification signals the ring's call eventfd,
a configuration change goes over the back-end request channel.

Fd ownership: every fd that arrives with a message belongs to the session
from the moment ``handle`` is called. It keeps the ones it uses (kick, call,
err, back-end request channel), closes them when replaced or at
:meth:`close`, and closes everything else before ``handle`` returns, also
on error.
"""

from __future__ import annotations

import ctypes
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

from virtio.core.device import VirtioDevice
from virtio.core.registers import DeviceRegisters
from virtio.core.status import Interface, Phase, path
from virtio.errors import SpecViolation, one_line
from virtio.memory import Buffer, GuestMemory
from virtio.queue import Chain, PackedDeviceQueue, SplitDeviceQueue
from virtio.queue.common import MAX_QUEUE_SIZE
from virtio.spec import features as F
from virtio.spec.status import DeviceStatus as S
from virtio.vhost_user.inflight import InflightPacked, InflightSplit, packed_region_size
from virtio.vhost_user.wire import (
    CONFIG_HEADER,
    F_LOG_ALL,
    F_PROTOCOL_FEATURES,
    INFLIGHT,
    LOG,
    LOG_PAGE,
    MAX_CONFIG_SIZE,
    MAX_MEM_REGIONS,
    MEM_REGION,
    MEM_TABLE_HEADER,
    SINGLE_MEM_REGION,
    U64,
    VRING_ADDR,
    VRING_F_LOG,
    VRING_INDEX_MASK,
    VRING_NOFD,
    VRING_STATE,
    BackendRequest,
    Message,
    ProtocolFeature,
    Request,
    VhostUserError,
    expect_size,
    reply_to,
)

log = logging.getLogger("virtio.vhost_user.backend")


def inflight_region_size(queue_size: int) -> int:
    """Bytes of one queue's inflight record: room for a split or a packed record."""
    return packed_region_size(queue_size)


def _address_of(view: memoryview) -> int:
    """The process address of a writable buffer (to map a view back to guest memory)."""
    probe = ctypes.c_char.from_buffer(view)
    try:
        return ctypes.addressof(probe)
    finally:
        del probe


P = ProtocolFeature
DEFAULT_PROTOCOL_FEATURES = sum(
    1 << bit
    for bit in (
        P.MQ,
        P.LOG_SHMFD,
        P.REPLY_ACK,
        P.BACKEND_REQ,
        P.CONFIG,
        P.INFLIGHT_SHMFD,
        P.RESET_DEVICE,
        P.CONFIGURE_MEM_SLOTS,
        P.STATUS,
    )
)
MAX_MEM_SLOTS = 32
_FILE_OFFSET_LIMIT = 1 << 63  # mmap takes a signed 64-bit size and file offset

# Messages that carry their own reply; REPLY_ACK adds nothing to them.
_HAS_REPLY = {
    Request.GET_FEATURES,
    Request.GET_PROTOCOL_FEATURES,
    Request.GET_VRING_BASE,
    Request.GET_QUEUE_NUM,
    Request.GET_CONFIG,
    Request.GET_INFLIGHT_FD,
    Request.GET_MAX_MEM_SLOTS,
    Request.GET_STATUS,
}


class Host(Protocol):
    """What the session needs from the operating system; the adapter provides it."""

    def map(self, fd: int, size: int, offset: int) -> Buffer:
        """Map ``size`` bytes of ``fd`` at ``offset``, shared and writable."""

    def unmap(self, buffer: Buffer) -> None: ...

    def close(self, fd: int) -> None: ...

    def watch_kick(self, index: int, fd: int | None) -> None:
        """Call ``session.kick(index)`` when ``fd`` is readable (None: poll the ring)."""

    def unwatch_kick(self, index: int) -> None:
        """Stop watching or polling ring ``index``."""

    def signal(self, fd: int) -> None:
        """Write an eventfd (the call or err fd)."""

    def create_shared(self, size: int) -> tuple[int, Buffer]:
        """A new zeroed shared-memory fd of ``size`` bytes, and its mapping."""

    def send_backend_request(self, fd: int, msg: Message) -> None:
        """Send a message on the back-end request channel."""


@dataclass
class Region:
    guest_addr: int
    size: int
    user_addr: int
    mmap_offset: int
    buffer: Buffer = field(repr=False)
    #: How many times the front-end added this same region (see ADD_MEM_REG).
    added: int = 1


@dataclass
class Vring:
    index: int
    num: int = 0
    desc: int | None = None
    used: int | None = None
    avail: int | None = None
    log_addr: int = 0
    flags: int = 0
    base: int = 0
    kick_fd: int | None = None
    kick_set: bool = False
    call_fd: int | None = None
    err_fd: int | None = None
    enabled: bool = False
    started: bool = False


class BackendSession:
    """One front-end connection's protocol state, serving one device model."""

    def __init__(
        self,
        device: VirtioDevice,
        host: Host,
        *,
        protocol_features: int = DEFAULT_PROTOCOL_FEATURES,
        max_queue_size: int | None = None,
    ) -> None:
        self.device = device
        self.host = host
        self.registers = regs = DeviceRegisters(device, interrupts=self)
        # The front-end negotiated with the driver and may keep features to itself.
        device.check_requirements = False
        self.num_queues = regs.num_queues
        # Over vhost-user the front-end (the VMM, or the guest through it) picks the
        # ring size; the back-end takes any size the rings allow.
        self.max_queue_size = max_queue_size or MAX_QUEUE_SIZE
        regs.allow_queue_sizes(self.max_queue_size)
        self.offered_protocol = protocol_features
        self.features = 0
        self.protocol = 0
        self.owner = False
        self.features_set = False
        self.regions: list[Region] = []
        self.memory = GuestMemory()
        self.vrings = [Vring(i) for i in range(self.num_queues)]
        self.backend_fd: int | None = None
        self.log_fd: int | None = None
        self.log: Buffer | None = None
        self.inflight_fd: int | None = None
        self.inflight: Buffer | None = None
        self.inflight_queue_size = 0
        self.status = 0
        self.closed = False
        regs.attach_memory(self.memory)
        regs.used_hook = self._log_used

    # -- what the front-end sees as features -----------------------------------

    @property
    def offered_features(self) -> int:
        return self.registers.offered_features | 1 << F_PROTOCOL_FEATURES | 1 << F_LOG_ALL

    def _has_protocol(self, bit: int) -> bool:
        return bool(self.protocol >> bit & 1)

    # -- InterruptSink: the device reaches the front-end ------------------------------

    def queue_interrupt(self, queue: int, vector: int) -> None:
        fd = self.vrings[queue].call_fd
        if fd is not None:
            self.host.signal(fd)

    def config_interrupt(self, vector: int) -> None:
        if self.backend_fd is not None and self._has_protocol(P.CONFIG):
            self.host.send_backend_request(
                self.backend_fd, Message(BackendRequest.CONFIG_CHANGE_MSG)
            )
        if self.registers.status & S.DEVICE_NEEDS_RESET:
            for vring in self.vrings:
                if vring.err_fd is not None:
                    self.host.signal(vring.err_fd)

    # -- messages ---------------------------------------------------------------------

    def handle(self, msg: Message) -> list[Message]:
        """Handle one front-end message; returns the replies to send, in order."""
        fds = list(msg.fds)
        msg.fds = fds
        try:
            try:
                request = Request(msg.request)
            except ValueError:
                raise VhostUserError(f"unknown request {msg.request}") from None
            handler = getattr(self, f"_on_{request.name.lower()}", None)
            if handler is None:
                raise VhostUserError(f"{request.name} is not supported")
            if msg.need_reply and not self._has_protocol(P.REPLY_ACK):
                log.debug("%s asks for a reply without REPLY_ACK", request.name)
            reply: Message | None = handler(msg)
        except (VhostUserError, SpecViolation) as err:
            if msg.need_reply and self._has_protocol(P.REPLY_ACK) and msg.request not in _HAS_REPLY:
                log.warning("%s failed: %s", msg.name(), err)
                return [reply_to(msg, U64.struct.pack(1))]
            raise
        except Exception as err:
            # A bug, or an input no check foresaw: the state may be half-changed, so
            # no ack; the adapter drops the connection. KeyboardInterrupt passes.
            raise VhostUserError(f"{msg.name()}: {one_line(err)}") from err
        finally:
            self._close_fds(fds)
        if reply is not None:
            return [reply]
        if msg.need_reply and self._has_protocol(P.REPLY_ACK):
            return [reply_to(msg, U64.struct.pack(0))]
        return []

    def _close_fds(self, fds: list[int]) -> None:
        # Whatever a handler did not take (it removes what it keeps) is closed.
        while fds:
            self.host.close(fds.pop())

    def _take_fd(self, msg: Message) -> int:
        if len(msg.fds) != 1:
            raise VhostUserError(f"{msg.name()}: expected 1 fd, got {len(msg.fds)}")
        return msg.fds.pop()

    def _no_fds(self, msg: Message) -> None:
        if msg.fds:
            raise VhostUserError(f"{msg.name()}: unexpected fds ({len(msg.fds)})")

    def _vring(self, index: int, msg: Message) -> Vring:
        if not 0 <= index < self.num_queues:
            raise VhostUserError(
                f"{msg.name()}: queue {index} out of range ({self.num_queues} queues)"
            )
        return self.vrings[index]

    def _u64_reply(self, msg: Message, value: int) -> Message:
        return reply_to(msg, U64.struct.pack(value))

    # features ---------------------------------------------------------------------

    def _on_get_features(self, msg: Message) -> Message:
        self._no_fds(msg)
        expect_size(msg, 0)
        # vhost-user carries 64 feature bits: higher ones cannot be negotiated here.
        return self._u64_reply(msg, self.offered_features & (1 << 64) - 1)

    def _on_set_features(self, msg: Message) -> None:
        self._no_fds(msg)
        value = msg.u64()
        extra = value & ~self.offered_features
        if extra:
            raise VhostUserError(f"SET_FEATURES: bits {extra:#x} were not offered")
        if self.features_set and any(v.started for v in self.vrings):
            # Only VHOST_F_LOG_ALL may change while rings run (migration).
            if (value ^ self.features) & ~(1 << F_LOG_ALL):
                raise VhostUserError("SET_FEATURES changed virtio features while rings run")
            self.features = value
            return
        self.features = value
        self.features_set = True
        virtio = value & ~(1 << F_PROTOCOL_FEATURES | 1 << F_LOG_ALL)
        # A guest that did not take VIRTIO_F_VERSION_1 drives the legacy interface
        # (a transitional device through its legacy I/O BAR), in its own byte order:
        # little-endian here (cross-endian rings need SET_VRING_ENDIAN, refused).
        legacy = not virtio >> F.VIRTIO_F_VERSION_1 & 1
        interface = Interface.LEGACY if legacy else Interface.MODERN
        if legacy:
            log.info("the guest drives the legacy interface (no VIRTIO_F_VERSION_1)")
        regs = self.registers
        regs.use_interface(interface)
        for status in path(interface, Phase.DRIVER):
            regs.status = status
        regs.write_driver_features(virtio)
        if not legacy:
            *_, status = path(interface, Phase.FEATURES_OK)
            regs.status = status
            if not regs.status & S.FEATURES_OK:
                raise VhostUserError(f"device refused features {virtio:#x}")
        if regs.status & S.DEVICE_NEEDS_RESET:
            raise VhostUserError(f"device refused features {virtio:#x}: {regs.needs_reset_reason}")

    def _on_get_protocol_features(self, msg: Message) -> Message:
        self._no_fds(msg)
        expect_size(msg, 0)
        return self._u64_reply(msg, self.offered_protocol)

    def _on_set_protocol_features(self, msg: Message) -> None:
        self._no_fds(msg)
        value = msg.u64()
        extra = value & ~self.offered_protocol
        if extra:
            raise VhostUserError(f"SET_PROTOCOL_FEATURES: bits {extra:#x} were not offered")
        self.protocol = value

    def _on_set_owner(self, msg: Message) -> None:
        self._no_fds(msg)
        expect_size(msg, 0)
        self.owner = True

    def _on_reset_owner(self, msg: Message) -> None:
        self._no_fds(msg)
        for vring in self.vrings:
            self._stop(vring)

    def _on_get_queue_num(self, msg: Message) -> Message:
        self._no_fds(msg)
        return self._u64_reply(msg, self.num_queues)

    def _on_get_max_mem_slots(self, msg: Message) -> Message:
        self._no_fds(msg)
        self._require(P.CONFIGURE_MEM_SLOTS, msg)
        return self._u64_reply(msg, MAX_MEM_SLOTS)

    def _require(self, bit: int, msg: Message) -> None:
        if not self._has_protocol(bit):
            raise VhostUserError(
                f"{msg.name()} needs protocol feature {ProtocolFeature(bit).name}, not negotiated"
            )

    # memory -------------------------------------------------------------------------------

    def _check_region(
        self, what: str, guest_addr: int, size: int, user_addr: int, mmap_offset: int
    ) -> None:
        """Refuse a region no mapping could honour, before anything is mapped."""
        where = f"{what}: memory region at guest {guest_addr:#x}"
        if size == 0:
            raise VhostUserError(f"{where} has size 0")
        if size >= _FILE_OFFSET_LIMIT:
            raise VhostUserError(f"{where}: size {size:#x} is 2^63 or more")
        if mmap_offset + size > _FILE_OFFSET_LIMIT:
            # mmap offsets are signed 64-bit file offsets (off_t).
            raise VhostUserError(
                f"{where}: mmap offset {mmap_offset:#x} + size {size:#x} ends beyond 2^63"
            )
        for value, name in ((guest_addr, "guest"), (user_addr, "user")):
            if value + size > 1 << 64:
                raise VhostUserError(f"{where}: {name} range {value:#x}+{size:#x} wraps past 2^64")
        for r in self.regions:
            if guest_addr < r.guest_addr + r.size and r.guest_addr < guest_addr + size:
                raise VhostUserError(f"{where} overlaps another (guest {r.guest_addr:#x})")
            if user_addr < r.user_addr + r.size and r.user_addr < user_addr + size:
                raise VhostUserError(
                    f"{what}: memory region at user {user_addr:#x} overlaps another"
                )

    def _add_region(
        self, what: str, fd: int, guest_addr: int, size: int, user_addr: int, offset: int
    ) -> None:
        # The fd is closed whatever happens: the mapping keeps the memory.
        try:
            self._check_region(what, guest_addr, size, user_addr, offset)
            try:
                buffer = self.host.map(fd, size, offset)
            except Exception as err:
                raise VhostUserError(
                    f"{what}: cannot map region at guest {guest_addr:#x} "
                    f"(size {size:#x}, mmap offset {offset:#x}): {one_line(err)}"
                ) from err
        finally:
            self.host.close(fd)
        try:
            self.memory.add(guest_addr, buffer, name=f"region@{guest_addr:#x}")
        except BaseException:
            self.host.unmap(buffer)
            raise
        self.regions.append(Region(guest_addr, size, user_addr, offset, buffer))

    def _on_set_mem_table(self, msg: Message) -> None:
        payload = msg.payload
        if len(payload) < MEM_TABLE_HEADER.size:
            raise VhostUserError("SET_MEM_TABLE: payload shorter than its header")
        nregions, _pad = MEM_TABLE_HEADER.struct.unpack_from(payload, 0)
        if not 1 <= nregions <= MAX_MEM_REGIONS:
            raise VhostUserError(f"SET_MEM_TABLE: {nregions} regions (1..{MAX_MEM_REGIONS})")
        expected = MEM_TABLE_HEADER.size + nregions * MEM_REGION.size
        # Front-ends send their whole fixed-size array (QEMU 8 entries, UML 2): the
        # payload may be longer than the regions in use, in whole entries.
        longest = MEM_TABLE_HEADER.size + MAX_MEM_REGIONS * MEM_REGION.size
        if (
            not expected <= len(payload) <= longest
            or (len(payload) - MEM_TABLE_HEADER.size) % MEM_REGION.size
        ):
            raise VhostUserError(f"SET_MEM_TABLE: payload is {len(payload)} bytes for {nregions}")
        if len(msg.fds) != nregions:
            raise VhostUserError(f"SET_MEM_TABLE: {nregions} regions but {len(msg.fds)} fds")
        entries = [
            MEM_REGION.struct.unpack_from(payload, MEM_TABLE_HEADER.size + i * MEM_REGION.size)
            for i in range(nregions)
        ]
        running = [v for v in self.vrings if v.started]
        saved = {v.index: self._ring_state(v) for v in running}
        for v in running:
            self._stop(v)
        self._drop_memory()
        try:
            for guest_addr, size, user_addr, offset in entries:
                # Taken one by one: handle() closes the ones left if a region fails.
                fd = msg.fds.pop(0)
                self._add_region(msg.name(), fd, guest_addr, size, user_addr, offset)
        except BaseException:
            self._drop_memory()
            raise
        for v in running:
            v.base = saved[v.index]
            self._maybe_start(v)

    def _on_add_mem_reg(self, msg: Message) -> None:
        self._require(P.CONFIGURE_MEM_SLOTS, msg)
        expect_size(msg, SINGLE_MEM_REGION.size)
        fd = self._take_fd(msg)
        _pad, guest_addr, size, user_addr, offset = SINGLE_MEM_REGION.struct.unpack(msg.payload)
        for region in self.regions:
            if (region.guest_addr, region.size, region.user_addr, region.mmap_offset) == (
                guest_addr,
                size,
                user_addr,
                offset,
            ):
                # QEMU's multiqueue net has one vhost device per queue pair on the
                # same socket, and each adds every region: count it, map it once.
                self.host.close(fd)
                region.added += 1
                return
        if len(self.regions) >= MAX_MEM_SLOTS:
            self.host.close(fd)
            raise VhostUserError(f"ADD_MEM_REG: all {MAX_MEM_SLOTS} memory slots are used")
        self._add_region(msg.name(), fd, guest_addr, size, user_addr, offset)

    def _on_rem_mem_reg(self, msg: Message) -> None:
        self._require(P.CONFIGURE_MEM_SLOTS, msg)
        expect_size(msg, SINGLE_MEM_REGION.size)
        if len(msg.fds) > 1:
            raise VhostUserError(f"REM_MEM_REG: {len(msg.fds)} fds")
        # An fd here is tolerated and closed unused.
        _pad, guest_addr, size, user_addr, _offset = SINGLE_MEM_REGION.struct.unpack(msg.payload)
        for region in self.regions:
            if (region.guest_addr, region.size, region.user_addr) == (guest_addr, size, user_addr):
                if region.added > 1:
                    region.added -= 1
                    return
                for vring in self.vrings:
                    if vring.started and self._ring_in_region(vring, region):
                        raise VhostUserError("REM_MEM_REG: a running ring lives in that region")
                self.regions.remove(region)
                self.memory.remove(guest_addr)
                self.host.unmap(region.buffer)
                return
        raise VhostUserError(f"REM_MEM_REG: no region at guest {guest_addr:#x} size {size:#x}")

    def _ring_in_region(self, vring: Vring, region: Region) -> bool:
        return any(
            addr is not None and region.user_addr <= addr < region.user_addr + region.size
            for addr in (vring.desc, vring.used, vring.avail)
        )

    def _drop_memory(self) -> None:
        for region in self.regions:
            self.memory.remove(region.guest_addr)
            self.host.unmap(region.buffer)
        self.regions = []

    def user_to_guest(self, user_addr: int, length: int) -> int:
        """Translate a front-end user address range to a guest address."""
        for r in self.regions:
            if r.user_addr <= user_addr and user_addr + length <= r.user_addr + r.size:
                return r.guest_addr + (user_addr - r.user_addr)
        raise VhostUserError(f"ring address {user_addr:#x}+{length:#x} is in no memory region")

    # rings --------------------------------------------------------------------------------

    @property
    def packed(self) -> bool:
        return bool(self.features >> F.VIRTIO_F_RING_PACKED & 1)

    def _on_set_vring_num(self, msg: Message) -> None:
        self._no_fds(msg)
        index, num = msg.state()
        vring = self._vring(index, msg)
        if not 1 <= num <= self.max_queue_size:
            raise VhostUserError(f"SET_VRING_NUM: size {num} outside 1..{self.max_queue_size}")
        if not self.packed and num & (num - 1):
            raise VhostUserError(f"SET_VRING_NUM: split ring size {num} is not a power of 2")
        if vring.started:
            raise VhostUserError(f"SET_VRING_NUM: ring {index} is running")
        vring.num = num

    def _on_set_vring_addr(self, msg: Message) -> None:
        self._no_fds(msg)
        expect_size(msg, VRING_ADDR.size)
        index, flags, desc, used, avail, log_addr = VRING_ADDR.struct.unpack(msg.payload)
        vring = self._vring(index, msg)
        vring.flags, vring.desc, vring.used, vring.avail, vring.log_addr = (
            flags,
            desc,
            used,
            avail,
            log_addr,
        )
        if vring.started:
            # Only the logging flag may change on a running ring; restart to pick it up.
            state = self._ring_state(vring)
            self._stop(vring)
            vring.base = state
            self._maybe_start(vring)

    def _on_set_vring_base(self, msg: Message) -> None:
        self._no_fds(msg)
        index, num = msg.state()
        vring = self._vring(index, msg)
        if vring.started:
            raise VhostUserError(f"SET_VRING_BASE: ring {index} is running")
        vring.base = num

    def _on_get_vring_base(self, msg: Message) -> Message:
        self._no_fds(msg)
        index, _num = msg.state()
        vring = self._vring(index, msg)
        state = self._ring_state(vring) if vring.started else vring.base
        self._stop(vring)
        # GET_VRING_BASE stops the ring: its kick fd is no longer watched.
        self.host.unwatch_kick(index)
        if vring.kick_fd is not None:
            self.host.close(vring.kick_fd)
            vring.kick_fd = None
        vring.kick_set = False
        return reply_to(msg, VRING_STATE.struct.pack(index, state))

    def _vring_fd(self, msg: Message) -> tuple[Vring, int | None]:
        value = msg.u64()
        if value & ~(VRING_INDEX_MASK | VRING_NOFD):
            raise VhostUserError(f"{msg.name()}: unknown bits in {value:#x}")
        vring = self._vring(value & VRING_INDEX_MASK, msg)
        if value & VRING_NOFD:
            self._no_fds(msg)
            return vring, None
        return vring, self._take_fd(msg)

    def _on_set_vring_kick(self, msg: Message) -> None:
        vring, fd = self._vring_fd(msg)
        if vring.kick_fd is not None:
            self.host.close(vring.kick_fd)
        vring.kick_fd = fd
        vring.kick_set = True
        self.host.watch_kick(vring.index, fd)
        if not self._has_feature_protocol():
            vring.enabled = True  # without protocol features rings start enabled
        self._maybe_start(vring)

    def _has_feature_protocol(self) -> bool:
        return bool(self.features >> F_PROTOCOL_FEATURES & 1)

    def _on_set_vring_call(self, msg: Message) -> None:
        vring, fd = self._vring_fd(msg)
        if vring.call_fd is not None:
            self.host.close(vring.call_fd)
        vring.call_fd = fd

    def _on_set_vring_err(self, msg: Message) -> None:
        vring, fd = self._vring_fd(msg)
        if vring.err_fd is not None:
            self.host.close(vring.err_fd)
        vring.err_fd = fd

    def _on_set_vring_enable(self, msg: Message) -> None:
        self._no_fds(msg)
        index, num = msg.state()
        vring = self._vring(index, msg)
        if num not in (0, 1):
            raise VhostUserError(f"SET_VRING_ENABLE: value {num} is not 0 or 1")
        # QEMU's net front-end enables and disables queue pairs as the guest picks
        # them, which may come before SET_FEATURES: then the offer is what counts.
        offered = not self.features_set and self.offered_features >> F_PROTOCOL_FEATURES & 1
        if not self._has_feature_protocol() and not offered:
            raise VhostUserError("SET_VRING_ENABLE without VHOST_USER_F_PROTOCOL_FEATURES")
        vring.enabled = bool(num)
        if vring.enabled:
            self._maybe_start(vring)
            if vring.started:
                self.kick(index)

    def _ring_state(self, vring: Vring) -> int:
        q = self.registers.device_queue(vring.index)
        if isinstance(q, SplitDeviceQueue):
            return q.last_avail
        if isinstance(q, PackedDeviceQueue):
            avail = q.next_avail | q.avail_wrap << 15
            used = q.next_used | q.used_wrap << 15
            return avail | used << 16
        return vring.base

    def _maybe_start(self, vring: Vring) -> None:
        if vring.started or not vring.kick_set or not self.features_set:
            return
        if vring.desc is None or vring.used is None or vring.avail is None or not vring.num:
            raise VhostUserError(f"ring {vring.index} kicked before its size and addresses")
        if not self.regions:
            raise VhostUserError(f"ring {vring.index} started without a memory table")
        packed = self.packed
        num = vring.num
        desc_len = 16 * num
        driver_len = 4 if packed else 6 + 2 * num
        device_len = 4 if packed else 6 + 8 * num
        desc = self.user_to_guest(vring.desc, desc_len)
        driver = self.user_to_guest(vring.avail, driver_len)
        devarea = self.user_to_guest(vring.used, device_len)
        regs = self.registers
        if not regs.status & S.DRIVER_OK:
            *_, live = path(regs.interface, Phase.LIVE)
            regs.status = live
        regs.queue_select = vring.index
        regs.queue_size = num
        regs.queue_desc, regs.queue_driver, regs.queue_device = desc, driver, devarea
        regs.queue_enable = 1
        q = regs.device_queue(vring.index)
        if q is None:
            raise VhostUserError(
                f"ring {vring.index} could not start: {regs.needs_reset_reason or 'unknown'}"
            )
        if isinstance(q, SplitDeviceQueue):
            q.set_base(vring.base & 0xFFFF)
            resubmit = self._attach_inflight(vring, q)
        else:
            assert isinstance(q, PackedDeviceQueue)
            # Packed base: avail offset | wrap << 15, and the same for used in the
            # high half. A bare 0 comes from front-ends that know no packed state:
            # a fresh ring, where both wrap counters start at 1.
            avail, used = vring.base & 0xFFFF, vring.base >> 16 & 0xFFFF
            if vring.base == 0:
                avail = used = 1 << 15
            elif used == 0 and avail >> 15:
                # DPDK's virtio-user sends the available half only (0x8000 for a
                # fresh ring): the used side starts where the available one does.
                used = avail
            q.set_base(avail & 0x7FFF, avail >> 15, used & 0x7FFF, used >> 15)
            resubmit = self._attach_inflight(vring, q)
        vring.started = True
        if resubmit:
            log.info(
                "ring %d: serving %d requests again after a restart", vring.index, len(resubmit)
            )
            regs.resubmit(vring.index, resubmit)

    def _attach_inflight(
        self, vring: Vring, q: SplitDeviceQueue | PackedDeviceQueue
    ) -> list[Chain]:
        if self.inflight is None or not self.inflight_queue_size:
            return []
        # One record per queue, sized for either ring kind (the packed one is larger).
        region = inflight_region_size(self.inflight_queue_size)
        if vring.num > self.inflight_queue_size or (vring.index + 1) * region > len(
            memoryview(self.inflight)
        ):
            # The front-end sized the record for smaller rings than it then set up
            # (QEMU does so on virtio-mmio): serve the ring without the record.
            log.warning(
                "ring %d has %d entries, its inflight record %d: not tracking it",
                vring.index,
                vring.num,
                self.inflight_queue_size,
            )
            return []
        view = memoryview(self.inflight)[vring.index * region : (vring.index + 1) * region]
        if isinstance(q, SplitDeviceQueue):
            return InflightSplit(view, vring.num).resume(q)
        return InflightPacked(view, vring.num).resume(q)

    def _stop(self, vring: Vring) -> None:
        if not vring.started:
            return
        # Requests still in flight complete first: the base reported must cover them.
        self.registers.drain_queue(vring.index)
        vring.base = self._ring_state(vring)
        vring.started = False
        self.registers.stop_queue(vring.index)

    def kick(self, index: int, *, rearm: bool = True) -> int:
        """The ring's kick fd fired (or a poll is due): serve what is available.

        Returns the chains served. ``rearm=False`` leaves kicks off: the adapter
        goes on polling the ring, and calls :meth:`rearm` when it stops.
        """
        vring = self.vrings[index]
        if not vring.started:
            self._maybe_start(vring)
        if vring.started and vring.enabled:
            return self.registers.notify(queue=index, rearm=rearm)
        return 0

    def poll(self) -> int:
        """Serve every running ring without waiting for kicks; kicks stay off. Chains served."""
        served = 0
        for vring in self.vrings:
            if vring.started and vring.enabled:
                served += self.registers.poll_queue(vring.index)
        return served

    def rearm(self) -> int:
        """Stop polling: kicks back on for every running ring (serving what came meanwhile)."""
        served = 0
        for vring in self.vrings:
            if vring.started and vring.enabled:
                served += self.registers.rearm_queue(vring.index)
        return served

    # dirty-page logging (VHOST_F_LOG_ALL, for live migration) ------------------------------

    @property
    def logging(self) -> bool:
        return self.log is not None and bool(self.features >> F_LOG_ALL & 1)

    def mark_dirty(self, gpa: int, length: int) -> None:
        """Set the log bits of the pages ``gpa..gpa+length`` touches."""
        log_view = self.log
        if log_view is None or length <= 0:
            return
        view = memoryview(log_view)
        first, last = gpa // LOG_PAGE, (gpa + length - 1) // LOG_PAGE
        for page in range(first, last + 1):
            byte = page >> 3
            if byte < view.nbytes:
                # A plain read-modify-write can only set extra bits when it races the
                # front-end clearing the log, never lose one of ours.
                view[byte] |= 1 << (page & 7)
        if self.log_fd is not None:
            self.host.signal(self.log_fd)

    def _log_used(self, queue_index: int, items: Sequence[tuple[Chain, int]]) -> None:
        """The device returned buffers: log the bytes it wrote and the ring it wrote to."""
        if not self.logging:
            return
        for chain, written in items:
            remaining = written
            for piece in chain.writable:
                if remaining <= 0:
                    break
                gpa = self._gpa_of(piece)
                if gpa is not None:
                    self.mark_dirty(gpa, min(piece.nbytes, remaining))
                remaining -= piece.nbytes
        self._log_used_ring(self.vrings[queue_index])

    def _gpa_of(self, view: memoryview) -> int | None:
        address = _address_of(view)
        for region in self.regions:
            base = _address_of(memoryview(region.buffer))
            if base <= address < base + region.size:
                return region.guest_addr + (address - base)
        return None

    def _log_used_ring(self, vring: Vring) -> None:
        if not vring.flags & VRING_F_LOG:
            return
        if self.packed and vring.desc is not None:
            # A packed ring's used descriptors are written into the descriptor ring.
            self.mark_dirty(self.user_to_guest(vring.desc, 16 * vring.num), 16 * vring.num)
            return
        self.mark_dirty(vring.log_addr, 6 + 8 * vring.num)

    # config, status, reset ------------------------------------------------------------------

    def _on_get_config(self, msg: Message) -> Message:
        self._no_fds(msg)
        self._require(P.CONFIG, msg)
        if len(msg.payload) < CONFIG_HEADER.size:
            raise VhostUserError("GET_CONFIG: payload shorter than its header")
        offset, size, flags = CONFIG_HEADER.struct.unpack_from(msg.payload, 0)
        if size > MAX_CONFIG_SIZE or len(msg.payload) != CONFIG_HEADER.size + size:
            # A zero-length reply is the protocol's way to say the request failed.
            log.warning("GET_CONFIG: bad size %d (payload %d bytes)", size, len(msg.payload))
            return reply_to(msg, b"")
        data = self.registers.read_config(offset, size)
        return reply_to(msg, CONFIG_HEADER.struct.pack(offset, size, flags) + data)

    def _on_set_config(self, msg: Message) -> None:
        self._no_fds(msg)
        self._require(P.CONFIG, msg)
        if len(msg.payload) < CONFIG_HEADER.size:
            raise VhostUserError("SET_CONFIG: payload shorter than its header")
        offset, size, _flags = CONFIG_HEADER.struct.unpack_from(msg.payload, 0)
        if size > MAX_CONFIG_SIZE or len(msg.payload) != CONFIG_HEADER.size + size:
            raise VhostUserError(f"SET_CONFIG: bad size {size}")
        data = msg.payload[CONFIG_HEADER.size :]
        if offset + size > self.registers.config_size:
            raise VhostUserError(f"SET_CONFIG: {offset}+{size} outside the config space")
        self.registers.write_config(offset, data)

    def _on_set_backend_req_fd(self, msg: Message) -> None:
        self._require(P.BACKEND_REQ, msg)
        fd = self._take_fd(msg)
        if self.backend_fd is not None:
            self.host.close(self.backend_fd)
        self.backend_fd = fd

    def _on_set_status(self, msg: Message) -> None:
        self._no_fds(msg)
        self._require(P.STATUS, msg)
        value = msg.u64()
        if value > 0xFF:
            raise VhostUserError(f"SET_STATUS: {value:#x} is not a status byte")
        if value == 0:
            self._reset_device()
        self.status = value

    def _on_get_status(self, msg: Message) -> Message:
        self._no_fds(msg)
        self._require(P.STATUS, msg)
        return self._u64_reply(msg, self.status | (self.registers.status & S.DEVICE_NEEDS_RESET))

    def _on_reset_device(self, msg: Message) -> None:
        self._no_fds(msg)
        self._require(P.RESET_DEVICE, msg)
        self._reset_device()

    def _reset_device(self) -> None:
        for vring in self.vrings:
            self._stop(vring)
            vring.base = 0
            vring.enabled = False
        self.features_set = False
        self.registers.status = 0

    # inflight and logging -------------------------------------------------------------------

    def _on_get_inflight_fd(self, msg: Message) -> Message:
        self._no_fds(msg)
        self._require(P.INFLIGHT_SHMFD, msg)
        expect_size(msg, INFLIGHT.size)
        _size, _off, num_queues, queue_size, _pad = INFLIGHT.struct.unpack(msg.payload)
        if not 1 <= num_queues <= self.num_queues or not 1 <= queue_size <= 32768:
            raise VhostUserError(f"GET_INFLIGHT_FD: {num_queues} queues of {queue_size}")
        size = num_queues * inflight_region_size(queue_size)
        fd, buffer = self.host.create_shared(size)
        self._set_inflight(fd, buffer, queue_size)
        return reply_to(msg, INFLIGHT.struct.pack(size, 0, num_queues, queue_size, bytes(4)), [fd])

    def _on_set_inflight_fd(self, msg: Message) -> None:
        self._require(P.INFLIGHT_SHMFD, msg)
        expect_size(msg, INFLIGHT.size)
        fd = self._take_fd(msg)
        size, offset, num_queues, queue_size, _pad = INFLIGHT.struct.unpack(msg.payload)
        if (
            not 1 <= num_queues <= self.num_queues
            or not 1 <= queue_size <= 32768
            or size < num_queues * inflight_region_size(queue_size)
        ):
            self.host.close(fd)
            raise VhostUserError(f"SET_INFLIGHT_FD: {size} bytes for {num_queues}x{queue_size}")
        try:
            if size >= 1 << 63 or offset + size > 1 << 63:
                raise ValueError(f"size {size:#x} at offset {offset:#x} cannot be mapped")
            buffer = self.host.map(fd, size, offset)
        except Exception as err:  # the fd is ours: close it whatever the failure
            self.host.close(fd)
            raise VhostUserError(f"SET_INFLIGHT_FD: cannot map: {one_line(err)}") from err
        self._set_inflight(fd, buffer, queue_size)

    def _set_inflight(self, fd: int, buffer: Buffer, queue_size: int) -> None:
        if self.inflight is not None:
            self.host.unmap(self.inflight)
        if self.inflight_fd is not None:
            self.host.close(self.inflight_fd)
        self.inflight_fd, self.inflight, self.inflight_queue_size = fd, buffer, queue_size

    def _on_set_log_base(self, msg: Message) -> Message:
        self._require(P.LOG_SHMFD, msg)
        expect_size(msg, LOG.size)
        fd = self._take_fd(msg)
        size, offset = LOG.struct.unpack(msg.payload)
        try:
            buffer = self.host.map(fd, size, offset)
        except (OSError, ValueError) as err:
            raise VhostUserError(f"SET_LOG_BASE: cannot map the log: {err}") from err
        finally:
            self.host.close(fd)
        if self.log is not None:
            self.host.unmap(self.log)
        self.log = buffer
        return reply_to(msg, U64.struct.pack(0))

    def _on_set_log_fd(self, msg: Message) -> None:
        fd = self._take_fd(msg)
        if self.log_fd is not None:
            self.host.close(self.log_fd)
        self.log_fd = fd

    def _on_set_vring_endian(self, msg: Message) -> None:
        raise VhostUserError("SET_VRING_ENDIAN: legacy cross-endian rings are not supported")

    # teardown -------------------------------------------------------------------------------------

    def close(self) -> None:
        """The connection ended: stop rings, release every fd and mapping."""
        if self.closed:
            return
        self.closed = True
        for vring in self.vrings:
            self._stop(vring)
            for fd in (vring.kick_fd, vring.call_fd, vring.err_fd):
                if fd is not None:
                    self.host.close(fd)
            vring.kick_fd = vring.call_fd = vring.err_fd = None
        for fd in (self.backend_fd, self.log_fd, self.inflight_fd):
            if fd is not None:
                self.host.close(fd)
        self.backend_fd = self.log_fd = self.inflight_fd = None
        if self.inflight is not None:
            self.host.unmap(self.inflight)
            self.inflight = None
        if self.log is not None:
            self.host.unmap(self.log)
            self.log = None
        self._drop_memory()
        self.registers.status = 0
        self.registers.used_hook = None
