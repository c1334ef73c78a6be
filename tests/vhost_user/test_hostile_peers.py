"""Hostile and broken vhost-user peers: whatever one sends, only its own connection ends.

Memory regions no mapping can honour (sizes and offsets of 2^63 and more,
ranges wrapping past 2^64), exceptions no handler foresaw, a device model
that crashes while serving a kick, malformed messages that carry fds, and a
back-end request split across reads: each is refused with a one-line error,
leaks no fd, and leaves the server serving the next front-end.
"""

from __future__ import annotations

import gc
import logging
import os
import queue
import re
import select
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from tests.vhost_user.test_backend_session import MEM, USER, FakeHost, fd, handshake
from virtio.devices.blk import BlkDevice, BlkDriver, BlkOptions
from virtio.memory import Buffer
from virtio.queue import Chain
from virtio.spec.device_ids import DeviceId
from virtio.vhost_user.backend import BackendSession
from virtio.vhost_user.frontend import VhostUserFrontend, connect_blk
from virtio.vhost_user.io import PeerClosed, recv_message, send_message
from virtio.vhost_user.server import OsHost, VhostUserServer
from virtio.vhost_user.wire import (
    CONFIG_HEADER,
    F_PROTOCOL_FEATURES,
    FLAG_NEED_REPLY,
    FLAG_REPLY,
    HEADER,
    MAX_FDS,
    MEM_REGION,
    MEM_TABLE_HEADER,
    SINGLE_MEM_REGION,
    VERSION,
    BackendRequest,
    Decoder,
    Message,
    ProtocolFeature,
    Request,
    VhostUserError,
    encode,
    u64_message,
)

TOP = 1 << 64
OTHER_USER = USER + 16 * MEM  # a user range clear of the handshake's region

# (name, guest_addr, size, user_addr, mmap_offset, what the error says)
BAD_REGIONS = [
    ("size 2^63", 16 * MEM, 1 << 63, OTHER_USER, 0, r"size 0x8000000000000000 is 2\^63 or more"),
    ("mmap offset 2^63", 16 * MEM, MEM, OTHER_USER, 1 << 63, r"mmap offset 0x8000000000000000"),
    (
        "mmap offset + size past 2^64",
        16 * MEM,
        8192,
        OTHER_USER,
        TOP - 4096,
        r"ends beyond 2\^63",
    ),
    ("guest range wraps past 2^64", TOP - 4096, 8192, OTHER_USER, 0, r"guest range .* 2\^64"),
    ("user range wraps past 2^64", 16 * MEM, 8192, TOP - 4096, 0, r"user range .* 2\^64"),
]
REGION_IDS = [r[0] for r in BAD_REGIONS]


def mem_table(*regions: tuple[int, int, int, int], fds: list[int]) -> Message:
    payload = MEM_TABLE_HEADER.struct.pack(len(regions), 0)
    for region in regions:
        payload += MEM_REGION.struct.pack(*region)
    return Message(Request.SET_MEM_TABLE, payload, fds=fds)


def add_mem_reg(region: tuple[int, int, int, int], fd: int) -> Message:
    return Message(Request.ADD_MEM_REG, SINGLE_MEM_REGION.struct.pack(0, *region), fds=[fd])


def open_fds() -> int:
    gc.collect()  # earlier tests' garbage must not close fds mid-count
    return len(os.listdir("/proc/self/fd"))


def wait_for_fds(count: int) -> int:
    """The fd count once it is back to ``count`` (or what it is after a grace period)."""
    deadline = time.monotonic() + 2
    while open_fds() != count and time.monotonic() < deadline:
        time.sleep(0.01)
    return open_fds()


class RecordingHost(FakeHost):
    """A FakeHost that also records every mapping asked of it."""

    def __init__(self) -> None:
        super().__init__()
        self.mapped: list[tuple[int, int]] = []  # (size, offset)

    def map(self, fd: int, size: int, offset: int) -> Buffer:
        self.mapped.append((size, offset))
        return super().map(fd, size, offset)


@pytest.fixture
def session(tmp_path: Path) -> Iterator[tuple[BackendSession, RecordingHost]]:
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(1 << 20))
    device = BlkDevice(image, BlkOptions(num_queues=2))
    host = RecordingHost()
    s = BackendSession(device, host)
    handshake(s)
    host.mapped.clear()
    yield s, host
    s.close()
    device.close()


# -- the session: region fields refused before anything is mapped -----------------------------


@pytest.mark.parametrize("name,guest,size,user,offset,says", BAD_REGIONS, ids=REGION_IDS)
def test_set_mem_table_with_an_impossible_region(
    session: tuple[BackendSession, RecordingHost],
    name: str,
    guest: int,
    size: int,
    user: int,
    offset: int,
    says: str,
) -> None:
    s, host = session
    # The bad region first: the good one's fd is still unused when it fails.
    fds = [fd(), fd()]
    bad = mem_table((guest, size, user, offset), (0, MEM, USER, 0), fds=list(fds))
    with pytest.raises(VhostUserError, match=f"^SET_MEM_TABLE: memory region .*{says}") as err:
        s.handle(bad)
    assert "\n" not in str(err.value)
    assert all(d in host.closed for d in fds), f"{name}: an fd leaked"
    assert host.mapped == []  # refused before any mapping was tried
    assert s.regions == []  # a failed table leaves no half of it behind


@pytest.mark.parametrize("name,guest,size,user,offset,says", BAD_REGIONS, ids=REGION_IDS)
def test_add_mem_reg_with_an_impossible_region(
    session: tuple[BackendSession, RecordingHost],
    name: str,
    guest: int,
    size: int,
    user: int,
    offset: int,
    says: str,
) -> None:
    s, host = session
    descriptor = fd()
    with pytest.raises(VhostUserError, match=f"^ADD_MEM_REG: memory region .*{says}") as err:
        s.handle(add_mem_reg((guest, size, user, offset), descriptor))
    assert "\n" not in str(err.value)
    assert descriptor in host.closed and host.mapped == []
    assert len(s.regions) == 1  # the handshake's region is untouched


def test_a_refused_region_is_acked_as_failed_with_reply_ack(
    session: tuple[BackendSession, RecordingHost],
) -> None:
    s, host = session
    msg = add_mem_reg((TOP - 4096, 8192, OTHER_USER, 0), fd())
    msg.flags |= FLAG_NEED_REPLY
    descriptor = msg.fds[0]
    (reply,) = s.handle(msg)
    assert reply.is_reply and reply.u64() == 1
    assert descriptor in host.closed


@pytest.mark.parametrize("name,guest,size,user,offset,says", BAD_REGIONS, ids=REGION_IDS)
def test_impossible_regions_against_real_mmap(
    tmp_path: Path,
    name: str,
    guest: int,
    size: int,
    user: int,
    offset: int,
    says: str,
) -> None:
    """The adapter's OsHost, a real memfd: nothing reaches mmap, nothing leaks."""
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(1 << 20))
    device = BlkDevice(image, BlkOptions())
    with select.epoll() as poller:
        s = BackendSession(device, OsHost(poller))
        s.handle(
            u64_message(Request.SET_PROTOCOL_FEATURES, 1 << ProtocolFeature.CONFIGURE_MEM_SLOTS)
        )
        before = open_fds()
        region = (guest, size, user, offset)
        for request in (Request.SET_MEM_TABLE, Request.ADD_MEM_REG):
            memfd = os.memfd_create("hostile")
            os.ftruncate(memfd, MEM)
            if request == Request.SET_MEM_TABLE:
                msg = mem_table(region, fds=[memfd])
            else:
                msg = add_mem_reg(region, memfd)
            with pytest.raises(VhostUserError, match=says):
                s.handle(msg)
            assert open_fds() == before, f"{name}: fd leaked"
        s.close()
    device.close()


def test_real_mmap_failure_names_the_message_and_the_region(tmp_path: Path) -> None:
    """An offset the checks allow but the file does not have: mmap's error, in one line."""
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(1 << 20))
    device = BlkDevice(image, BlkOptions())
    with select.epoll() as poller:
        s = BackendSession(device, OsHost(poller))
        before = open_fds()
        memfd = os.memfd_create("small")
        os.ftruncate(memfd, MEM)
        with pytest.raises(VhostUserError) as err:
            s.handle(mem_table((0, 4096, USER, (1 << 63) - 4096), fds=[memfd]))
        text = str(err.value)
        assert text.startswith("SET_MEM_TABLE: cannot map region at guest 0x0 (size 0x1000")
        assert "ValueError" in text and "\n" not in text
        assert open_fds() == before
        s.close()
    device.close()


# -- the session: exceptions no handler foresaw ------------------------------------------------


class ExplodingHost(FakeHost):
    """A host whose mmap fails with what the real one raises for out-of-range numbers."""

    def __init__(self, exc: BaseException) -> None:
        super().__init__()
        self.exc = exc
        self.armed = False

    def map(self, fd: int, size: int, offset: int) -> Buffer:
        if self.armed:
            raise self.exc
        return super().map(fd, size, offset)


def test_an_unexpected_mmap_error_becomes_a_vhost_user_error(tmp_path: Path) -> None:
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(1 << 20))
    device = BlkDevice(image, BlkOptions())
    host = ExplodingHost(OverflowError("Python int too large to convert to C long"))
    s = BackendSession(device, host)
    handshake(s)
    host.armed = True
    fds = [fd(), fd()]
    msg = mem_table((0, MEM, USER, 0), (4 * MEM, MEM, USER + 4 * MEM, 0), fds=list(fds))
    with pytest.raises(VhostUserError) as err:
        s.handle(msg)
    assert str(err.value) == (
        "SET_MEM_TABLE: cannot map region at guest 0x0 (size 0x100000, mmap offset 0x0): "
        "OverflowError: Python int too large to convert to C long"
    )
    assert isinstance(err.value.__cause__, OverflowError)
    assert all(d in host.closed for d in fds)
    assert s.regions == []
    s.close()
    device.close()


def test_keyboard_interrupt_is_not_swallowed_and_fds_are_still_closed(tmp_path: Path) -> None:
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(1 << 20))
    device = BlkDevice(image, BlkOptions())
    host = ExplodingHost(KeyboardInterrupt())
    s = BackendSession(device, host)
    handshake(s)
    host.armed = True
    fds = [fd(), fd()]
    with pytest.raises(KeyboardInterrupt):
        s.handle(mem_table((0, MEM, USER, 0), (4 * MEM, MEM, USER + 4 * MEM, 0), fds=list(fds)))
    assert all(d in host.closed for d in fds)
    s.close()
    device.close()


class BuggyConfigBlk(BlkDevice):
    def write_config(self, offset: int, data: bytes) -> None:
        raise ZeroDivisionError("division by zero")


def test_a_bug_in_a_handler_names_the_message_and_gets_no_ack(tmp_path: Path) -> None:
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(1 << 20))
    device = BuggyConfigBlk(image, BlkOptions())
    host = FakeHost()
    s = BackendSession(device, host)
    handshake(s)
    payload = CONFIG_HEADER.struct.pack(0, 1, 0) + b"\x01"
    # Even with REPLY_ACK asked for: the state may be half-changed, the connection goes.
    msg = Message(Request.SET_CONFIG, payload, VERSION | FLAG_NEED_REPLY)
    with pytest.raises(VhostUserError, match=r"^SET_CONFIG: ZeroDivisionError: division by zero$"):
        s.handle(msg)
    s.close()
    device.close()


# -- reading through the decoder ---------------------------------------------------------------


def test_decoder_says_what_it_needs_next() -> None:
    decoder = Decoder()
    assert decoder.needed == HEADER.size
    data = encode(u64_message(Request.SET_FEATURES, 5))
    assert list(decoder.feed(data[:5])) == []
    assert decoder.needed == 7
    assert list(decoder.feed(data[5:12])) == []
    assert decoder.needed == 8  # the header is whole: now the payload
    assert list(decoder.feed(data[12:15])) == []
    assert decoder.needed == 5
    (msg,) = decoder.feed(data[15:])
    assert msg.u64() == 5 and decoder.needed == HEADER.size
    (empty,) = decoder.feed(encode(Message(Request.GET_FEATURES)))
    assert empty.payload == b"" and decoder.needed == HEADER.size


def test_decoder_takes_data_and_fds_even_before_iteration() -> None:
    decoder = Decoder()
    descriptor = fd()
    decoder.feed(encode(Message(Request.SET_OWNER))[:4], [descriptor])  # not iterated
    assert decoder.pending_bytes == 4
    assert decoder.reset() == [descriptor]
    os.close(descriptor)
    assert decoder.needed == HEADER.size


def test_fds_stay_with_their_own_message() -> None:
    """Two messages with fds queued back to back: each read gets only its own."""
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with a, b:
        pipes = [os.pipe() for _ in range(3)]
        for tag, (_r, w) in enumerate(pipes):
            os.write(w, bytes([tag]))
            os.close(w)
        send_message(a, Message(Request.SET_VRING_KICK, bytes(8), fds=[pipes[0][0]]))
        send_message(a, Message(Request.SET_MEM_TABLE, bytes(8), fds=[p[0] for p in pipes[1:]]))
        for r, _w in pipes:
            os.close(r)
        first, second = recv_message(b), recv_message(b)
        assert first.request == Request.SET_VRING_KICK and second.request == Request.SET_MEM_TABLE
        assert [os.read(f, 1) for f in first.fds] == [b"\x00"]
        assert sorted(os.read(f, 1) for f in second.fds) == [b"\x01", b"\x02"]
        for f in first.fds + second.fds:
            os.close(f)


def _bad_version(size: int = 0) -> bytes:
    return HEADER.struct.pack(Request.SET_OWNER, 0x2, size)


MALFORMED = [
    ("bad version", _bad_version(), 2, VhostUserError, "version"),
    (
        "payload too big",
        HEADER.struct.pack(Request.SET_MEM_TABLE, VERSION, 1 << 20),
        1,
        VhostUserError,
        "too big",
    ),
    (
        "closed mid-message",
        HEADER.struct.pack(Request.SET_VRING_KICK, VERSION, 8) + b"\0\0",
        1,
        PeerClosed,
        "mid-message",
    ),
    ("closed mid-header", b"\x0c\0\0", 1, PeerClosed, "mid-message"),
    (
        "more fds than a message may carry",
        encode(Message(Request.SET_MEM_TABLE, bytes(8))),
        MAX_FDS + 1,
        VhostUserError,
        "more than 8 fds",
    ),
]


@pytest.mark.parametrize("name,data,nfds,exc,says", MALFORMED, ids=[m[0] for m in MALFORMED])
def test_fds_of_a_malformed_message_are_closed(
    name: str, data: bytes, nfds: int, exc: type[Exception], says: str
) -> None:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with a, b:
        b.settimeout(5)
        before = open_fds()
        fds = [fd() for _ in range(nfds)]
        socket.send_fds(a, [data], fds)
        for f in fds:
            os.close(f)
        a.shutdown(socket.SHUT_WR)
        with pytest.raises(exc, match=says):
            recv_message(b)
        assert open_fds() == before, f"{name}: fds leaked"


# -- a real server: hostile front-ends are dropped, the next one is served ------------------------


@contextmanager
def running_server(device: BlkDevice, path: Path) -> Iterator[VhostUserServer]:
    server = VhostUserServer(path, device)
    server.bind()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.stop()
        thread.join(timeout=5)
        assert not thread.is_alive()


def make_image(tmp_path: Path) -> Path:
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(4 << 20))
    return image


def send_and_expect_drop(path: Path, messages: list[Message]) -> None:
    """A raw front-end sends ``messages``; the back-end must close the connection."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as raw:
        raw.settimeout(10)
        raw.connect(str(path))
        for msg in messages:
            send_message(raw, msg)
        assert raw.recv(64) == b""


def round_trip(path: Path, fill: int) -> None:
    with connect_blk(str(path)) as frontend:
        driver = BlkDriver(frontend)
        driver.initialize()
        driver.write(8, bytes([fill]) * 4096)
        assert driver.read(8, 4096) == bytes([fill]) * 4096
        driver.reset()


def server_errors(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "virtio.vhost_user.server" and r.levelno >= logging.ERROR
    ]


def hostile_region_messages(
    region: tuple[int, int, int, int], memfd: int
) -> list[tuple[str, list[Message]]]:
    mem_slots = u64_message(Request.SET_PROTOCOL_FEATURES, 1 << ProtocolFeature.CONFIGURE_MEM_SLOTS)
    return [
        ("SET_MEM_TABLE", [mem_table(region, fds=[memfd])]),
        ("ADD_MEM_REG", [mem_slots, add_mem_reg(region, memfd)]),
    ]


def test_impossible_regions_drop_only_that_front_end(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="virtio.vhost_user.server")
    device = BlkDevice(make_image(tmp_path), BlkOptions())
    path = tmp_path / "vu.sock"
    with running_server(device, path) as server:
        before = open_fds()
        for name, guest, size, user, offset, says in BAD_REGIONS:
            memfd = os.memfd_create("hostile")
            os.ftruncate(memfd, MEM)
            try:
                for request, messages in hostile_region_messages(
                    (guest, size, user, offset), memfd
                ):
                    caplog.clear()
                    send_and_expect_drop(path, messages)
                    (line,) = server_errors(caplog)
                    assert line.startswith(f"front-end sent a bad {request}: memory region"), line
                    assert f"{request}: {request}" not in line
                    assert re.search(says, line), (name, line)
            finally:
                os.close(memfd)
            assert wait_for_fds(before) == before, f"{name}: the server leaked fds"
        round_trip(path, 0x5A)
        assert server.connections == 2 * len(BAD_REGIONS) + 1
    device.close()


class ModelBug(RuntimeError):
    pass


class CrashingBlk(BlkDevice):
    """A device model with a bug that fires while it serves a request."""

    crash = False

    # Any: what the model returns passes through untouched, whatever its type.
    def handle_chain(self, queue_index: int, chain: Chain) -> Any:
        if self.crash:
            raise ModelBug("the model tripped over its own feet")
        return super().handle_chain(queue_index, chain)


def test_a_device_model_bug_while_serving_a_kick_drops_only_that_connection(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    device = CrashingBlk(make_image(tmp_path), BlkOptions())
    path = tmp_path / "vu.sock"

    def crash() -> None:
        with connect_blk(str(path)) as frontend:
            driver = BlkDriver(frontend)
            driver.initialize()
            device.crash = True
            with pytest.raises(VhostUserError, match="back-end closed the connection"):
                driver.write(0, b"\x77" * 512, timeout=10)

    with running_server(device, path) as server:
        before = open_fds()
        crash()  # the front-end's own guest mapping goes with this frame
        assert server_errors(caplog) == [
            "ring 0: serving a kick failed, closing the connection: "
            "ModelBug: the model tripped over its own feet"
        ]
        assert wait_for_fds(before) == before
        device.crash = False
        round_trip(path, 0x66)
        assert server.connections == 2
    device.close()


def test_a_bug_in_a_message_handler_drops_only_that_connection(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    device = BuggyConfigBlk(make_image(tmp_path), BlkOptions())
    path = tmp_path / "vu.sock"
    with running_server(device, path):
        payload = CONFIG_HEADER.struct.pack(0, 1, 0) + b"\x01"
        send_and_expect_drop(
            path,
            [
                u64_message(Request.SET_PROTOCOL_FEATURES, 1 << ProtocolFeature.CONFIG),
                Message(Request.SET_CONFIG, payload),
            ],
        )
        assert server_errors(caplog) == [
            "front-end sent a bad SET_CONFIG: ZeroDivisionError: division by zero"
        ]
        round_trip(path, 0x42)
    device.close()


def test_keyboard_interrupt_in_a_handler_still_stops_the_server(tmp_path: Path) -> None:
    class InterruptedBlk(BlkDevice):
        def write_config(self, offset: int, data: bytes) -> None:
            raise KeyboardInterrupt

    device = InterruptedBlk(make_image(tmp_path), BlkOptions())
    path = tmp_path / "vu.sock"
    server = VhostUserServer(path, device)
    server.bind()
    outcome: list[BaseException] = []

    def serve() -> None:
        try:
            server.serve_forever()
        except BaseException as exc:  # the thread's way to report it
            outcome.append(exc)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    payload = CONFIG_HEADER.struct.pack(0, 1, 0) + b"\x01"
    send_and_expect_drop(
        path,
        [
            u64_message(Request.SET_PROTOCOL_FEATURES, 1 << ProtocolFeature.CONFIG),
            Message(Request.SET_CONFIG, payload),
        ],
    )
    thread.join(timeout=5)
    assert not thread.is_alive()
    assert len(outcome) == 1 and isinstance(outcome[0], KeyboardInterrupt)
    assert not path.exists()  # the server cleaned up on its way out
    device.close()


# -- the front-end's back-end request channel ------------------------------------------------------


@contextmanager
def fake_backend(path: Path) -> Iterator[queue.Queue[socket.socket]]:
    """Just enough back-end for a front-end's handshake; hands over its request channel."""
    channels: queue.Queue[socket.socket] = queue.Queue()
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(1)
    features = 1 << F_PROTOCOL_FEATURES | 1 << 32  # VIRTIO_F_VERSION_1
    answers: dict[int, int] = {
        Request.GET_FEATURES: features,
        Request.GET_PROTOCOL_FEATURES: 1 << ProtocolFeature.BACKEND_REQ,
    }

    def serve() -> None:
        conn, _ = listener.accept()
        with conn:
            while True:
                try:
                    msg = recv_message(conn)
                except (PeerClosed, OSError):
                    return
                if msg.request in answers:
                    reply = u64_message(msg.request, answers[msg.request], VERSION | FLAG_REPLY)
                    send_message(conn, reply)
                elif msg.request == Request.SET_BACKEND_REQ_FD:
                    channels.put(socket.socket(fileno=msg.fds.pop()))
                for f in msg.fds:
                    os.close(f)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield channels
    finally:
        listener.close()
        thread.join(timeout=5)


@contextmanager
def frontend_with_channel(
    tmp_path: Path,
) -> Iterator[tuple[VhostUserFrontend, socket.socket, list[int]]]:
    path = tmp_path / "fake.sock"
    with fake_backend(path) as channels:
        frontend = VhostUserFrontend(
            str(path), device_id=DeviceId.BLOCK, memory_size=1 << 20, timeout=5
        )
        channel = channels.get(timeout=5)
        config_changes: list[int] = []
        frontend.set_interrupt_handlers(
            lambda _q: None, lambda: config_changes.append(frontend.config_generation())
        )
        try:
            with channel:
                channel.settimeout(5)
                yield frontend, channel, config_changes
        finally:
            frontend.close()


def wait_until(frontend: VhostUserFrontend, done: Callable[[], bool]) -> None:
    deadline = time.monotonic() + 5
    while not done():
        assert time.monotonic() < deadline, "the front-end never served the request"
        frontend.wait_interrupt(0.2)


@pytest.mark.parametrize("need_reply", [False, True], ids=["no reply", "need reply"])
@pytest.mark.parametrize("cut", [1, 6, 11])
def test_a_back_end_request_split_across_reads_is_served_once(
    tmp_path: Path, cut: int, need_reply: bool
) -> None:
    with frontend_with_channel(tmp_path) as (frontend, channel, changes):
        flags = VERSION | (FLAG_NEED_REPLY if need_reply else 0)
        data = encode(Message(BackendRequest.CONFIG_CHANGE_MSG, flags=flags))
        channel.sendall(data[:cut])
        assert frontend.wait_interrupt(2.0)  # the first piece arrives and is kept
        time.sleep(0.05)  # the rest takes its time
        assert changes == [] and frontend.config_generation() == 0
        channel.sendall(data[cut:])
        wait_until(frontend, lambda: bool(changes))
        assert changes == [1] and frontend.config_generation() == 1
        if need_reply:
            reply = recv_message(channel)
            assert reply.is_reply and reply.request == BackendRequest.CONFIG_CHANGE_MSG
            assert reply.u64() == 0
        assert not frontend.wait_interrupt(0.1)
        assert changes == [1]
        assert frontend.backend_sock is not None  # the channel is still open


def test_a_back_end_request_split_inside_its_payload_is_answered(tmp_path: Path) -> None:
    with frontend_with_channel(tmp_path) as (frontend, channel, changes):
        msg = u64_message(BackendRequest.VRING_CALL, 0, VERSION | FLAG_NEED_REPLY)
        data = encode(msg) + encode(Message(BackendRequest.CONFIG_CHANGE_MSG))
        channel.sendall(data[:15])
        frontend.wait_interrupt(2.0)
        time.sleep(0.05)
        channel.sendall(data[15:])
        wait_until(frontend, lambda: bool(changes))
        reply = recv_message(channel)
        assert reply.is_reply and reply.request == BackendRequest.VRING_CALL
        assert changes == [1]


def test_fds_on_the_back_end_channel_are_closed(tmp_path: Path) -> None:
    with frontend_with_channel(tmp_path) as (frontend, channel, changes):
        before = open_fds()
        stray = fd()
        socket.send_fds(channel, [encode(Message(BackendRequest.CONFIG_CHANGE_MSG))], [stray])
        os.close(stray)
        wait_until(frontend, lambda: bool(changes))
        assert open_fds() == before


def test_a_malformed_back_end_request_closes_only_the_channel(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with frontend_with_channel(tmp_path) as (frontend, channel, changes):
        channel.sendall(_bad_version())
        wait_until(frontend, lambda: frontend.backend_sock is None)
        assert channel.recv(1) == b""  # the front-end closed its end
        assert changes == []
        assert any("bad protocol version" in r.getMessage() for r in caplog.records)
        assert not frontend.wait_interrupt(0.1)  # the main connection goes on
