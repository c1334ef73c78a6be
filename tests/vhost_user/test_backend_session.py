"""The sans-IO back-end session, driven message by message like a (hostile) front-end."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from virtio.devices.blk import BlkDevice, BlkOptions
from virtio.memory import Buffer
from virtio.queue import RingLayout
from virtio.spec import features as F
from virtio.vhost_user.backend import BackendSession
from virtio.vhost_user.wire import (
    CONFIG_HEADER,
    F_PROTOCOL_FEATURES,
    FLAG_NEED_REPLY,
    INFLIGHT,
    MEM_REGION,
    MEM_TABLE_HEADER,
    SINGLE_MEM_REGION,
    VERSION,
    VRING_ADDR,
    Decoder,
    Message,
    ProtocolFeature,
    Request,
    VhostUserError,
    encode,
    state_message,
    u64_message,
)

MEM = 1 << 20
USER = 0x7000_0000
N_BLK_DEV_OP = "devicenormative:Device Types / Block Device / Device Operation"


class FakeHost:
    """Records what the session asks of the OS; memory is plain bytearrays."""

    def __init__(self) -> None:
        self.closed: list[int] = []
        self.signals: list[int] = []
        self.kicks: dict[int, int | None] = {}
        self.sent: list[Message] = []
        self.maps: dict[int, bytearray] = {}

    def map(self, fd: int, size: int, offset: int) -> Buffer:
        if size > 64 * MEM:
            raise OSError("too big")
        buf = self.maps.setdefault(fd, bytearray(max(size + offset, MEM)))
        return memoryview(buf)[offset : offset + size]

    def unmap(self, buffer: Buffer) -> None:
        pass

    def close(self, fd: int) -> None:
        self.closed.append(fd)
        os.close(fd)

    def watch_kick(self, index: int, fd: int | None) -> None:
        self.kicks[index] = fd

    def unwatch_kick(self, index: int) -> None:
        self.kicks.pop(index, None)

    def signal(self, fd: int) -> None:
        self.signals.append(fd)

    def create_shared(self, size: int) -> tuple[int, Buffer]:
        r, w = os.pipe()
        os.close(w)
        return r, memoryview(bytearray(size))

    def send_backend_request(self, fd: int, msg: Message) -> None:
        self.sent.append(msg)


def fd() -> int:
    r, w = os.pipe()
    os.close(w)
    return r


@pytest.fixture
def session(tmp_path: os.PathLike[str]) -> Iterator[tuple[BackendSession, FakeHost]]:
    image = os.path.join(tmp_path, "disk.img")
    with open(image, "wb") as f:
        f.truncate(1 << 20)
    device = BlkDevice(image, BlkOptions(num_queues=2))
    host = FakeHost()
    s = BackendSession(device, host)
    yield s, host
    s.close()
    device.close()


def handshake(s: BackendSession, protocol: int | None = None) -> int:
    (reply,) = s.handle(Message(Request.GET_FEATURES))
    offered = reply.u64()
    (reply,) = s.handle(Message(Request.GET_PROTOCOL_FEATURES))
    s.handle(
        u64_message(Request.SET_PROTOCOL_FEATURES, reply.u64() if protocol is None else protocol)
    )
    s.handle(Message(Request.SET_OWNER))
    features = (
        1 << F.VIRTIO_F_VERSION_1 | 1 << F_PROTOCOL_FEATURES | 1 << F.VIRTIO_BLK_F_FLUSH
    ) & offered
    s.handle(u64_message(Request.SET_FEATURES, features))
    table = MEM_TABLE_HEADER.struct.pack(1, 0) + MEM_REGION.struct.pack(0, MEM, USER, 0)
    s.handle(Message(Request.SET_MEM_TABLE, table, fds=[fd()]))
    return offered


def start_ring(s: BackendSession, index: int = 0, base: int = 0x1000) -> RingLayout:
    layout = RingLayout.contiguous(base, 8)
    s.handle(state_message(Request.SET_VRING_NUM, index, 8))
    s.handle(state_message(Request.SET_VRING_BASE, index, 0))
    addr = VRING_ADDR.struct.pack(
        index, 0, USER + layout.desc, USER + layout.device, USER + layout.driver, 0
    )
    s.handle(Message(Request.SET_VRING_ADDR, addr))
    s.handle(Message(Request.SET_VRING_CALL, index.to_bytes(8, "little"), fds=[fd()]))
    s.handle(Message(Request.SET_VRING_KICK, index.to_bytes(8, "little"), fds=[fd()]))
    s.handle(state_message(Request.SET_VRING_ENABLE, index, 1))
    return layout


def test_full_start_up_sequence(session: tuple[BackendSession, FakeHost]) -> None:
    s, _host = session
    offered = handshake(s)
    assert offered >> F_PROTOCOL_FEATURES & 1 and offered >> F.VIRTIO_F_VERSION_1 & 1
    start_ring(s, 0)
    start_ring(s, 1, base=0x4000)
    assert all(v.started for v in s.vrings)
    assert s.device.queues[0].ring is not None
    (reply,) = s.handle(state_message(Request.GET_VRING_BASE, 0, 0))
    assert reply.state() == (0, 0)
    assert not s.vrings[0].started
    (reply,) = s.handle(Message(Request.GET_QUEUE_NUM))
    assert reply.u64() == 2


@pytest.mark.normative(N_BLK_DEV_OP)
def test_config_space_through_the_protocol(session: tuple[BackendSession, FakeHost]) -> None:
    s, _host = session
    handshake(s)
    msg = Message(Request.GET_CONFIG, CONFIG_HEADER.struct.pack(0, 8, 0) + bytes(8))
    (reply,) = s.handle(msg)
    capacity = int.from_bytes(reply.payload[CONFIG_HEADER.size :], "little")
    assert capacity == (1 << 20) // 512
    bad = Message(Request.GET_CONFIG, CONFIG_HEADER.struct.pack(0, 300, 0) + bytes(300))
    (reply,) = s.handle(bad)
    assert reply.payload == b""  # the protocol's way to say it failed


def test_reply_ack_success_and_failure(session: tuple[BackendSession, FakeHost]) -> None:
    s, _host = session
    handshake(s)
    ok = state_message(Request.SET_VRING_NUM, 0, 8, VERSION | FLAG_NEED_REPLY)
    (reply,) = s.handle(ok)
    assert reply.is_reply and reply.u64() == 0
    bad = state_message(Request.SET_VRING_NUM, 0, 3, VERSION | FLAG_NEED_REPLY)
    (reply,) = s.handle(bad)
    assert reply.u64() != 0  # refused, the connection goes on


HOSTILE = [
    ("SET_FEATURES with bits not offered", lambda: u64_message(Request.SET_FEATURES, 1 << 63)),
    ("SET_VRING_NUM wrong size", lambda: Message(Request.SET_VRING_NUM, b"\0" * 7)),
    ("queue index out of range", lambda: state_message(Request.SET_VRING_NUM, 9, 8)),
    ("split ring size not a power of 2", lambda: state_message(Request.SET_VRING_NUM, 0, 6)),
    ("SET_VRING_KICK without its fd", lambda: Message(Request.SET_VRING_KICK, bytes(8))),
    (
        "SET_VRING_CALL with extra fds",
        lambda: Message(Request.SET_VRING_CALL, bytes(8), fds=[fd(), fd()]),
    ),
    ("unexpected fd on SET_OWNER", lambda: Message(Request.SET_OWNER, fds=[fd()])),
    (
        "SET_MEM_TABLE fds do not match regions",
        lambda: Message(
            Request.SET_MEM_TABLE,
            MEM_TABLE_HEADER.struct.pack(2, 0) + MEM_REGION.struct.pack(0, MEM, USER, 0) * 2,
            fds=[fd()],
        ),
    ),
    (
        "overlapping memory regions",
        lambda: Message(
            Request.SET_MEM_TABLE,
            MEM_TABLE_HEADER.struct.pack(2, 0)
            + MEM_REGION.struct.pack(0, MEM, USER, 0)
            + MEM_REGION.struct.pack(MEM // 2, MEM, USER + 2 * MEM, 0),
            fds=[fd(), fd()],
        ),
    ),
    (
        "zero-sized memory region",
        lambda: Message(
            Request.SET_MEM_TABLE,
            MEM_TABLE_HEADER.struct.pack(1, 0) + MEM_REGION.struct.pack(0, 0, USER, 0),
            fds=[fd()],
        ),
    ),
    ("unknown request", lambda: Message(999)),
    ("unknown vring fd bits", lambda: u64_message(Request.SET_VRING_ERR, 1 << 20)),
    ("SET_VRING_ENABLE value 2", lambda: state_message(Request.SET_VRING_ENABLE, 0, 2)),
]


@pytest.mark.parametrize("name,make", HOSTILE, ids=[h[0] for h in HOSTILE])
def test_hostile_messages_are_refused_and_leak_nothing(
    session: tuple[BackendSession, FakeHost], name: str, make: object
) -> None:
    s, host = session
    handshake(s)
    msg = make()  # type: ignore[operator]
    assert isinstance(msg, Message)
    fds = list(msg.fds)
    with pytest.raises(VhostUserError):
        s.handle(msg)
    for descriptor in fds:
        assert descriptor in host.closed, f"{name}: fd {descriptor} leaked"


def test_ring_outside_memory_is_refused(session: tuple[BackendSession, FakeHost]) -> None:
    s, _host = session
    handshake(s)
    s.handle(state_message(Request.SET_VRING_NUM, 0, 8))
    addr = VRING_ADDR.struct.pack(0, 0, USER + 2 * MEM, USER + 0x3000, USER + 0x2000, 0)
    s.handle(Message(Request.SET_VRING_ADDR, addr))
    with pytest.raises(VhostUserError, match="no memory region"):
        s.handle(Message(Request.SET_VRING_KICK, bytes(8), fds=[fd()]))


def test_features_needing_protocol_bits(session: tuple[BackendSession, FakeHost]) -> None:
    s, _host = session
    handshake(s, protocol=0)
    with pytest.raises(VhostUserError, match="CONFIG"):
        s.handle(Message(Request.GET_CONFIG, CONFIG_HEADER.struct.pack(0, 4, 0) + bytes(4)))
    with pytest.raises(VhostUserError, match="CONFIGURE_MEM_SLOTS"):
        s.handle(Message(Request.ADD_MEM_REG, SINGLE_MEM_REGION.pack(), fds=[fd()]))


def test_memory_slots_add_and_remove(session: tuple[BackendSession, FakeHost]) -> None:
    s, _host = session
    handshake(s)
    region = SINGLE_MEM_REGION.struct.pack(0, 4 * MEM, MEM, USER + 4 * MEM, 0)
    s.handle(Message(Request.ADD_MEM_REG, region, fds=[fd()]))
    assert len(s.regions) == 2
    # The same region again (QEMU's multiqueue net: one vhost device per queue pair)
    # is counted, not mapped twice; each REM_MEM_REG takes one count back.
    s.handle(Message(Request.ADD_MEM_REG, region, fds=[fd()]))
    assert len(s.regions) == 2
    overlapping = SINGLE_MEM_REGION.struct.pack(0, 4 * MEM + MEM // 2, MEM, USER + 8 * MEM, 0)
    with pytest.raises(VhostUserError, match="overlaps"):
        s.handle(Message(Request.ADD_MEM_REG, overlapping, fds=[fd()]))
    s.handle(Message(Request.REM_MEM_REG, region))
    assert len(s.regions) == 2
    s.handle(Message(Request.REM_MEM_REG, region))
    assert len(s.regions) == 1
    with pytest.raises(VhostUserError, match="no region"):
        s.handle(Message(Request.REM_MEM_REG, region))


def test_inflight_fd_round_trip(session: tuple[BackendSession, FakeHost]) -> None:
    s, _host = session
    handshake(s)
    (reply,) = s.handle(Message(Request.GET_INFLIGHT_FD, INFLIGHT.pack(num_queues=2, queue_size=8)))
    size, offset, nq, qs, _pad = INFLIGHT.struct.unpack(reply.payload)
    assert (offset, nq, qs) == (0, 2, 8) and size > 0 and len(reply.fds) == 1
    s.handle(Message(Request.SET_INFLIGHT_FD, reply.payload, fds=[fd()]))
    start_ring(s)
    assert s.device.queues[0].ring is not None
    assert s.device.queues[0].ring.tracker is not None


def test_status_and_reset_device(session: tuple[BackendSession, FakeHost]) -> None:
    s, _host = session
    handshake(s)
    start_ring(s)
    s.handle(u64_message(Request.SET_STATUS, 0x0F))
    (reply,) = s.handle(Message(Request.GET_STATUS))
    assert reply.u64() == 0x0F
    s.handle(Message(Request.RESET_DEVICE))
    assert not any(v.started for v in s.vrings)
    assert s.device.status == 0


def test_decoder_frames_split_and_joined_messages() -> None:
    msgs = [
        u64_message(Request.SET_FEATURES, 5),
        Message(Request.GET_FEATURES),
        state_message(Request.SET_VRING_NUM, 1, 64),
    ]
    stream = b"".join(encode(m) for m in msgs)
    for cut in range(len(stream) + 1):
        decoder = Decoder()
        out = list(decoder.feed(stream[:cut])) + list(decoder.feed(stream[cut:]))
        assert [(m.request, m.payload) for m in out] == [(m.request, m.payload) for m in msgs]
    with pytest.raises(VhostUserError, match="version"):
        list(Decoder().feed(encode(Message(1, flags=2))))
    with pytest.raises(VhostUserError, match="too big"):
        list(Decoder().feed(b"\x01\0\0\0\x01\0\0\0\xff\xff\xff\x00"))


def test_protocol_feature_numbers() -> None:
    assert (int(ProtocolFeature.INFLIGHT_SHMFD), int(ProtocolFeature.STATUS)) == (12, 16)
    assert (int(Request.GET_INFLIGHT_FD), int(Request.SET_STATUS)) == (31, 39)
    assert INFLIGHT.size == 24 and VRING_ADDR.size == 40 and SINGLE_MEM_REGION.size == 40


def test_dirty_page_logging(session: tuple[BackendSession, FakeHost]) -> None:
    """With VHOST_F_LOG_ALL, every page the device writes is marked in the shared log."""
    from virtio.memory import Allocator, GuestMemory
    from virtio.queue import driver_queue
    from virtio.vhost_user.wire import F_LOG_ALL, LOG, VRING_F_LOG

    s, _host = session
    handshake(s)
    features = 1 << F.VIRTIO_F_VERSION_1 | 1 << F_PROTOCOL_FEATURES | 1 << F_LOG_ALL
    s.handle(Message(Request.SET_LOG_BASE, LOG.pack(mmap_size=64, mmap_offset=0), fds=[fd()]))
    layout = RingLayout.contiguous(0x1000, 8)
    s.handle(state_message(Request.SET_VRING_NUM, 0, 8))
    addr = VRING_ADDR.struct.pack(
        0,
        VRING_F_LOG,
        USER + layout.desc,
        USER + layout.device,
        USER + layout.driver,
        layout.device,
    )
    s.handle(Message(Request.SET_VRING_ADDR, addr))
    s.handle(u64_message(Request.SET_FEATURES, features))
    s.handle(Message(Request.SET_VRING_KICK, bytes(8), fds=[fd()]))
    s.handle(state_message(Request.SET_VRING_ENABLE, 0, 1))
    # The driver side, in the same memory: a read request into page 0x20.
    memory = GuestMemory()
    memory.add(0, s.regions[0].buffer)
    queue = driver_queue(memory, layout, allocator=Allocator(0x8000, 0x10000))
    header = bytes(16)  # VIRTIO_BLK_T_IN, sector 0
    memory.write(0x9000, header)
    queue.add([(0x9000, 16)], [(0x20000, 512), (0xA000, 1)], "read")
    s.kick(0)
    assert queue.get_used() == [("read", 513)]
    log = bytes(memoryview(s.log))  # type: ignore[arg-type]

    def page_bit(page: int) -> int:
        return log[page >> 3] >> (page & 7) & 1

    assert page_bit(0x20000 // 4096) == 1  # the data buffer
    assert page_bit(0xA000 // 4096) == 1  # the status byte
    assert page_bit(layout.device // 4096) == 1  # the used ring
    assert page_bit(0x9000 // 4096) == 0  # read-only to the device: not dirty


def test_polling_ring_without_a_kick_fd(session: tuple[BackendSession, FakeHost]) -> None:
    """VRING_NOFD on SET_VRING_KICK: no eventfd, the adapter polls the ring instead."""
    from virtio.vhost_user.wire import VRING_NOFD

    s, host = session
    handshake(s)
    (reply,) = s.handle(Message(Request.GET_MAX_MEM_SLOTS))
    assert reply.u64() >= 8
    layout = RingLayout.contiguous(0x1000, 8)
    s.handle(state_message(Request.SET_VRING_NUM, 0, 8))
    addr = VRING_ADDR.struct.pack(
        0, 0, USER + layout.desc, USER + layout.device, USER + layout.driver, 0
    )
    s.handle(Message(Request.SET_VRING_ADDR, addr))
    s.handle(u64_message(Request.SET_VRING_KICK, VRING_NOFD))
    s.handle(u64_message(Request.SET_VRING_CALL, VRING_NOFD))
    assert host.kicks == {0: None}  # asked to poll
    with pytest.raises(VhostUserError, match="unexpected fds"):
        s.handle(Message(Request.SET_VRING_KICK, VRING_NOFD.to_bytes(8, "little"), fds=[fd()]))
