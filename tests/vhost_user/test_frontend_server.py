"""pyvirtio's vhost-user front-end and back-end, in one process, over a real socket."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from virtio.core.device import RingOptions
from virtio.devices.blk import BlkDevice, BlkDriver, BlkError, BlkOptions
from virtio.spec import features as F
from virtio.vhost_user.frontend import connect_blk
from virtio.vhost_user.server import VhostUserServer
from virtio.vhost_user.wire import VhostUserError

N_BLK_DEV_OP = "devicenormative:Device Types / Block Device / Device Operation"
N_BLK_DRV_OP = "drivernormative:Device Types / Block Device / Device Operation"
N_INIT_DRV = "drivernormative:General Initialization And Device Operation / Device Initialization"


def serve(tmp_path: Path, options: BlkOptions, ring: RingOptions | None = None) -> Iterator[Path]:
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(4 << 20))
    device = BlkDevice(image, options, ring=ring)
    server = VhostUserServer(tmp_path / "vu.sock", device)
    server.bind()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield tmp_path / "vu.sock"
    finally:
        server.stop()
        thread.join(timeout=5)
        device.close()


@pytest.fixture
def socket_path(tmp_path: Path) -> Iterator[Path]:
    yield from serve(tmp_path, BlkOptions(num_queues=2))


@pytest.mark.normative(N_BLK_DEV_OP, N_BLK_DRV_OP, N_INIT_DRV)
@pytest.mark.parametrize("packed", [False, True])
def test_blk_driver_over_vhost_user(socket_path: Path, packed: bool) -> None:
    with connect_blk(str(socket_path), num_queues=2) as frontend:
        driver = BlkDriver(frontend, avoid_features=0 if packed else 1 << F.VIRTIO_F_RING_PACKED)
        driver.initialize()
        assert driver.has(F.VIRTIO_F_RING_PACKED) == packed
        assert len(driver.queues) == 2
        for queue in (0, 1):
            data = bytes([queue + 1]) * 8192
            driver.write(16 * queue, data, queue=queue)
            assert driver.read(16 * queue, 8192, queue=1 - queue) == data
        driver.flush()
        assert driver.get_id() == "pyvirtio"
        driver.write_zeroes([(0, 8)])
        assert driver.read(0, 4096) == bytes(4096)
        driver.reset()
    image = socket_path.parent / "disk.img"
    assert image.read_bytes()[16 * 512 : 16 * 512 + 8192] == b"\x02" * 8192


def test_reconnects_are_served(socket_path: Path) -> None:
    for round_ in range(3):
        with connect_blk(str(socket_path)) as frontend:
            driver = BlkDriver(frontend)
            driver.initialize()
            driver.write(round_ * 8, bytes([round_ + 7]) * 4096)
            assert driver.read(round_ * 8, 4096) == bytes([round_ + 7]) * 4096
            driver.reset()


@pytest.mark.normative(N_BLK_DEV_OP)
def test_read_only_export_refuses_writes(tmp_path: Path) -> None:
    for path in serve(tmp_path, BlkOptions(read_only=True)):
        with connect_blk(str(path)) as frontend:
            driver = BlkDriver(frontend)
            driver.initialize()
            assert driver.geometry.read_only
            with pytest.raises(BlkError, match="IOERR"):
                driver.write_unchecked(0, b"x" * 512)
            assert driver.read(0, 512) == bytes(512)


def test_connecting_to_nothing_is_a_clear_error(tmp_path: Path) -> None:
    with (
        pytest.raises(VhostUserError, match="cannot connect"),
        connect_blk(str(tmp_path / "missing.sock")),
    ):
        pass


def test_a_hostile_front_end_is_dropped_and_the_next_one_served(socket_path: Path) -> None:
    import socket as sockets

    from virtio.vhost_user.wire import HEADER, Message, Request, encode

    bad_messages = [
        HEADER.struct.pack(Request.GET_FEATURES, 0x2, 0),  # wrong protocol version
        HEADER.struct.pack(Request.SET_FEATURES, 0x1, 1 << 20),  # absurd payload size
        encode(Message(Request.SET_VRING_NUM, b"\0" * 3)),  # wrong payload size
        encode(Message(777)),  # unknown request
        b"\x01\x00",  # a truncated header, then silence
    ]
    for data in bad_messages:
        with sockets.socket(sockets.AF_UNIX, sockets.SOCK_STREAM) as raw:
            raw.settimeout(10)
            raw.connect(str(socket_path))
            raw.sendall(data)
            if len(data) < HEADER.size:
                raw.shutdown(sockets.SHUT_WR)
            assert raw.recv(64) == b""  # the back-end closed this connection
    with connect_blk(str(socket_path)) as frontend:
        driver = BlkDriver(frontend)
        driver.initialize()
        driver.write(0, b"\x11" * 512)
        assert driver.read(0, 512) == b"\x11" * 512
        driver.reset()
