"""The vhost-user front-end: the VMM's side, as a transport for pyvirtio drivers.

:class:`VhostUserFrontend` owns guest memory (memfd regions it shares with
the back-end), talks the protocol over a Unix socket, and presents the
device to a :class:`~virtio.core.driver.VirtioDriver` exactly like any other
transport: the driver core runs on top of it unchanged.

The device status register lives here, as it does in a VMM, and moves by
the core's status table (``virtio.core.status``): the step that sets
FEATURES_OK sends SET_FEATURES and the memory table, each queue's setup
sends its ring, and a reset stops every ring with GET_VRING_BASE. A status
write the table refuses is the driver's error, refused here before the
back-end hears of it.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import select
import socket
from collections.abc import Callable, Iterator

from virtio.core.status import Action, Interface, StatusViolation, interpret
from virtio.layout import ByteOrder
from virtio.memory import Allocator, GuestMemory, Memory
from virtio.queue import RingLayout
from virtio.queue.common import LEGACY_QUEUE_ALIGN
from virtio.spec.device_ids import DeviceId
from virtio.transport.blocking import wait_until
from virtio.vhost_user.io import PeerClosed, recv_chunk, recv_message, send_message
from virtio.vhost_user.wire import (
    CONFIG_HEADER,
    F_LOG_ALL,
    F_PROTOCOL_FEATURES,
    FLAG_NEED_REPLY,
    FLAG_REPLY,
    MEM_REGION,
    MEM_TABLE_HEADER,
    VERSION,
    VRING_ADDR,
    VRING_STATE,
    BackendRequest,
    Decoder,
    Message,
    ProtocolFeature,
    Request,
    VhostUserError,
    encode,
    expect_size,
    state_message,
    u64_message,
)

log = logging.getLogger("virtio.vhost_user.frontend")

P = ProtocolFeature
WANTED_PROTOCOL = sum(
    1 << bit for bit in (P.MQ, P.REPLY_ACK, P.CONFIG, P.BACKEND_REQ, P.RESET_DEVICE)
)


def _host_address(buffer: object) -> int:
    """The process address of a writable buffer (what a VMM reports as user address)."""
    probe = ctypes.c_char.from_buffer(buffer)  # type: ignore[arg-type]
    try:
        return ctypes.addressof(probe)
    finally:
        del probe


def _nothing(_: int) -> None:
    pass


def _nothing_config() -> None:
    pass


class VhostUserFrontend:
    """A DriverTransport that reaches a device through a vhost-user back-end."""

    # The front-end presents the modern interface (VIRTIO_F_VERSION_1).
    legacy = False
    legacy_order: ByteOrder = "little"
    queue_align = LEGACY_QUEUE_ALIGN

    def __init__(
        self,
        path: str,
        *,
        device_id: int,
        memory_size: int = 256 << 20,
        queue_max_size: int = 256,
        timeout: float = 10.0,
        num_queues: int | None = None,
    ) -> None:
        self.path = path
        self.device_id = device_id
        self.timeout = timeout
        self._queue_max = queue_max_size
        self.guest = GuestMemory()
        region, self.memfd = self.guest.add_memfd(0, memory_size, name="pyvirtio-guest")
        # User addresses are our real mapping's addresses, as in a VMM: unique per
        # process, so a back-end can never confuse them with a previous front-end's.
        self.user_base = _host_address(region.owner)
        self.memory: Memory = self.guest
        self.allocator = Allocator(0x1000, memory_size - 0x1000)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        self.sock.settimeout(timeout)
        try:
            self.sock.connect(path)
        except OSError as err:
            self.sock.close()
            os.close(self.memfd)
            raise VhostUserError(f"cannot connect to {path}: {err}") from err
        self.poller = select.epoll()
        self.status = 0
        self.driver_features = 0
        self.protocol = 0
        self.backend_sock: socket.socket | None = None
        # One decoder per back-end request channel: a message may arrive in pieces.
        self._backend_decoder: Decoder | None = None
        self._used_handler: Callable[[int], None] = _nothing
        self._config_handler: Callable[[], None] = _nothing_config
        self.kick_fds: dict[int, int] = {}
        self.call_fds: dict[int, int] = {}  # fd -> queue
        self.started: set[int] = set()
        self._generation = 0
        self.closed = False
        self._handshake(num_queues)

    # -- plumbing ------------------------------------------------------------------------

    def _send(self, msg: Message) -> None:
        try:
            send_message(self.sock, msg)
        except OSError as err:
            raise VhostUserError(
                f"back-end connection lost while sending {msg.name()}: {err}"
            ) from err

    def _recv(self, request: int) -> Message:
        self.sock.settimeout(self.timeout)
        try:
            msg = recv_message(self.sock)
        except PeerClosed as err:
            raise VhostUserError(
                f"back-end closed the connection (waiting for {Request(request).name})"
            ) from err
        except TimeoutError as err:
            raise VhostUserError(f"no reply to {Request(request).name} in {self.timeout}s") from err
        except OSError as err:
            raise VhostUserError(f"back-end connection lost: {err}") from err
        return self._check_reply(msg, request)

    def _check_reply(self, msg: Message, request: int) -> Message:
        if not msg.is_reply or msg.request != request:
            for fd in msg.fds:
                os.close(fd)
            raise VhostUserError(
                f"expected a reply to {Request(request).name}, got {msg.name()} "
                f"(flags {msg.flags:#x})"
            )
        return msg

    def _call(self, msg: Message) -> Message:
        self._send(msg)
        return self._recv(msg.request)

    def _tell(self, msg: Message) -> None:
        """Send a request without a reply body; with REPLY_ACK, wait for the ack."""
        if self.protocol >> P.REPLY_ACK & 1:
            msg.flags |= FLAG_NEED_REPLY
            reply = self._call(msg)
            if reply.u64() != 0:
                raise VhostUserError(f"back-end refused {msg.name()}")
        else:
            self._send(msg)

    def _handshake(self, num_queues: int | None) -> None:
        features = self._call(Message(Request.GET_FEATURES)).u64()
        self.backend_features = features
        if features >> F_PROTOCOL_FEATURES & 1:
            offered = self._call(Message(Request.GET_PROTOCOL_FEATURES)).u64()
            self.protocol = offered & WANTED_PROTOCOL
            self._send(u64_message(Request.SET_PROTOCOL_FEATURES, self.protocol))
        self._send(Message(Request.SET_OWNER))
        if self.protocol >> P.MQ & 1:
            self._num_queues = self._call(Message(Request.GET_QUEUE_NUM)).u64()
        else:
            self._num_queues = 1
        if num_queues is not None:
            if num_queues > self._num_queues:
                raise VhostUserError(
                    f"back-end has {self._num_queues} queues, {num_queues} requested"
                )
            self._num_queues = num_queues
        if self.protocol >> P.BACKEND_REQ & 1:
            ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
            self.backend_sock = ours
            self._backend_decoder = Decoder()
            self.poller.register(ours.fileno(), select.EPOLLIN)
            try:
                self._tell(Message(Request.SET_BACKEND_REQ_FD, fds=[theirs.fileno()]))
            finally:
                theirs.close()

    # -- DriverTransport -------------------------------------------------------------------

    def read_status(self) -> int:
        return self.status

    def write_status(self, value: int) -> None:
        try:
            write = interpret(Interface.MODERN, self.status, value)
        except StatusViolation as err:
            raise VhostUserError(f"status {value:#x}: {err.reason} [{err.normative}]") from err
        if write.reset:
            self._reset()
            return
        for step in write.steps:
            if step.action is Action.NEGOTIATE:
                wire = self.driver_features
                if self.backend_features >> F_PROTOCOL_FEATURES & 1:
                    wire |= 1 << F_PROTOCOL_FEATURES
                self._tell(u64_message(Request.SET_FEATURES, wire))
                self._send_mem_table()
        self.status = value & 0xFF

    def _send_mem_table(self) -> None:
        regions = self.guest.regions
        payload = MEM_TABLE_HEADER.struct.pack(len(regions), 0)
        for region in regions:
            payload += MEM_REGION.struct.pack(
                region.gpa, region.size, self.user_base + region.gpa, 0
            )
        self._tell(Message(Request.SET_MEM_TABLE, payload, fds=[self.memfd]))

    def read_device_features(self) -> int:
        return self.backend_features & ~(1 << F_PROTOCOL_FEATURES | 1 << F_LOG_ALL)

    def write_driver_features(self, value: int) -> None:
        self.driver_features = value

    def read_config(self, offset: int, size: int) -> bytes:
        if not self.protocol >> P.CONFIG & 1:
            return bytes(size)
        # Back-ends commonly answer from the start of the space whatever offset is
        # asked (QEMU always asks from 0), so ask from 0 and cut out the range.
        end = offset + size
        if end > 256:
            raise VhostUserError(f"config range {offset}+{size} beyond 256 bytes")
        msg = Message(Request.GET_CONFIG, CONFIG_HEADER.struct.pack(0, end, 0) + bytes(end))
        reply = self._call(msg)
        if len(reply.payload) != CONFIG_HEADER.size + end:
            raise VhostUserError(f"GET_CONFIG of {end} bytes failed (device config is shorter?)")
        return reply.payload[CONFIG_HEADER.size + offset : CONFIG_HEADER.size + end]

    def write_config(self, offset: int, data: bytes) -> None:
        if not self.protocol >> P.CONFIG & 1:
            raise VhostUserError("back-end has no config space access (CONFIG not negotiated)")
        payload = CONFIG_HEADER.struct.pack(offset, len(data), 0) + data
        self._tell(Message(Request.SET_CONFIG, payload))

    def config_generation(self) -> int:
        return self._generation

    def num_queues(self) -> int:
        return self._num_queues

    def queue_max_size(self, index: int) -> int:
        return self._queue_max if index < self._num_queues else 0

    def setup_queue(self, index: int, layout: RingLayout) -> None:
        self._tell(state_message(Request.SET_VRING_NUM, index, layout.size))
        base = 0x8000_8000 if layout.packed else 0  # packed: both wrap counters start at 1
        self._tell(state_message(Request.SET_VRING_BASE, index, base))
        addr = VRING_ADDR.struct.pack(
            index,
            0,
            self.user_base + layout.desc,
            self.user_base + layout.device,
            self.user_base + layout.driver,
            0,
        )
        self._tell(Message(Request.SET_VRING_ADDR, addr))
        call = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.call_fds[call] = index
        self.poller.register(call, select.EPOLLIN)
        self._tell(Message(Request.SET_VRING_CALL, index.to_bytes(8, "little"), fds=[call]))
        kick = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        old = self.kick_fds.pop(index, None)
        if old is not None:
            os.close(old)
        self.kick_fds[index] = kick
        self._tell(Message(Request.SET_VRING_KICK, index.to_bytes(8, "little"), fds=[kick]))
        if self.backend_features >> F_PROTOCOL_FEATURES & 1:
            self._tell(state_message(Request.SET_VRING_ENABLE, index, 1))
        self.started.add(index)

    def reset_queue(self, index: int) -> None:
        self._stop_ring(index)

    def queue_reset_done(self, index: int) -> bool:
        # GET_VRING_BASE answers once the back-end has stopped the ring.
        return index not in self.started

    def _stop_ring(self, index: int) -> int:
        if self.backend_features >> F_PROTOCOL_FEATURES & 1:
            # Disable first, as a VMM does, so the back-end stops taking requests.
            self._tell(state_message(Request.SET_VRING_ENABLE, index, 0))
        reply = self._call(state_message(Request.GET_VRING_BASE, index, 0))
        expect_size(reply, VRING_STATE.size)
        _index, base = reply.state()
        self.started.discard(index)
        for fd, q in list(self.call_fds.items()):
            if q == index:
                self.poller.unregister(fd)
                os.close(fd)
                del self.call_fds[fd]
        return base

    def notify(self, index: int, value: int) -> None:
        fd = self.kick_fds.get(index)
        if fd is None:
            raise VhostUserError(f"queue {index} is not set up")
        os.eventfd_write(fd, 1)

    def set_interrupt_handlers(
        self, used: Callable[[int], None], config: Callable[[], None]
    ) -> None:
        self._used_handler = used
        self._config_handler = config

    def wait_until(self, predicate: Callable[[], bool], timeout: float) -> bool:
        return wait_until(predicate, timeout, self.wait_interrupt)

    def wait_interrupt(self, timeout: float | None) -> bool:
        """Wait for a call eventfd or a back-end request; False on timeout."""
        events = self.poller.poll(-1 if timeout is None else timeout)
        if not events:
            # Only a quiet spell costs the liveness probe (a syscall per wait would not).
            self._check_alive()
        delivered = False
        for fd, _mask in events:
            if fd in self.call_fds:
                with contextlib.suppress(BlockingIOError):
                    os.eventfd_read(fd)
                self._used_handler(self.call_fds[fd])
                delivered = True
            elif self.backend_sock is not None and fd == self.backend_sock.fileno():
                self._backend_request()
                delivered = True
        return delivered

    def _check_alive(self) -> None:
        # A dead back-end shows as a readable (EOF) or errored main socket.
        ready, _, errored = select.select([self.sock], [], [self.sock], 0)
        if ready or errored:
            try:
                data = self.sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
            except BlockingIOError:
                return
            except OSError as err:
                raise VhostUserError(f"back-end connection lost: {err}") from err
            if not data:
                raise VhostUserError("back-end closed the connection")

    def _backend_request(self) -> None:
        """Serve the next back-end request, or buffer what has arrived of it so far."""
        sock, decoder = self.backend_sock, self._backend_decoder
        assert sock is not None and decoder is not None
        while True:
            # Header first, then payload (as recv_message does), without blocking: what
            # has arrived of a message waits in the channel's decoder for the rest.
            try:
                data, fds = recv_chunk(sock, decoder.needed, socket.MSG_DONTWAIT)
            except BlockingIOError:
                return
            except (OSError, VhostUserError) as err:
                log.warning("back-end request channel: %s; closing it", err)
                self._close_backend_channel()
                return
            try:
                messages = list(decoder.feed(data, fds))
            except VhostUserError as err:
                log.warning("back-end request channel: %s; closing it", err)
                self._close_backend_channel()
                return
            if not data:
                if decoder.pending_bytes:
                    log.warning("back-end request channel closed mid-message")
                self._close_backend_channel()
                return
            for msg in messages:
                try:
                    self._serve_backend_request(sock, msg)
                except OSError as err:
                    log.warning("back-end request channel: cannot reply: %s; closing it", err)
                    self._close_backend_channel()
                # One message per wake-up bounds the work; epoll reports the rest.
                return

    def _serve_backend_request(self, sock: socket.socket, msg: Message) -> None:
        for fd in msg.fds:  # no fd-passing feature is negotiated on this channel
            os.close(fd)
        if msg.request == BackendRequest.CONFIG_CHANGE_MSG:
            self._generation += 1
            self._config_handler()
        if msg.need_reply:
            reply = Message(msg.request, (0).to_bytes(8, "little"), VERSION | FLAG_REPLY)
            sock.sendall(encode(reply))

    def _close_backend_channel(self) -> None:
        sock, decoder = self.backend_sock, self._backend_decoder
        self.backend_sock = self._backend_decoder = None
        if decoder is not None:
            for fd in decoder.reset():
                os.close(fd)
        if sock is not None:
            with contextlib.suppress(OSError, ValueError):
                self.poller.unregister(sock.fileno())
            sock.close()

    # -- teardown ---------------------------------------------------------------------------

    def _reset(self) -> None:
        for index in sorted(self.started):
            with contextlib.suppress(VhostUserError):
                self._stop_ring(index)
        if self.protocol >> P.RESET_DEVICE & 1 and self.status:
            with contextlib.suppress(VhostUserError):
                self._tell(Message(Request.RESET_DEVICE))
        self.status = 0

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        with contextlib.suppress(VhostUserError, OSError):
            self._reset()
        for fd in list(self.kick_fds.values()) + list(self.call_fds):
            with contextlib.suppress(OSError):
                os.close(fd)
        self.kick_fds.clear()
        self.call_fds.clear()
        self._close_backend_channel()
        self.poller.close()
        self.sock.close()
        os.close(self.memfd)

    def __enter__(self) -> VhostUserFrontend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@contextlib.contextmanager
def connect_blk(
    path: str, *, num_queues: int = 1, memory_size: int = 256 << 20, queue_size: int = 256
) -> Iterator[VhostUserFrontend]:
    """A front-end for a vhost-user-blk back-end at ``path``."""
    frontend = VhostUserFrontend(
        path,
        device_id=DeviceId.BLOCK,
        memory_size=memory_size,
        queue_max_size=queue_size,
        num_queues=num_queues,
    )
    try:
        yield frontend
    finally:
        frontend.close()
