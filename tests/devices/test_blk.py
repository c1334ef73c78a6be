"""virtio-blk: the device model and the driver together over loopback."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from virtio.core.device import RingOptions
from virtio.devices.blk import BlkDevice, BlkDriver, BlkError, BlkOptions
from virtio.devices.blk.wire import (
    BLK_DISCARD_WRITE_ZEROES,
    BLK_REQ_HEADER,
    S_IOERR,
    S_UNSUPP,
    T_DISCARD,
    T_IN,
    T_WRITE_ZEROES,
)
from virtio.spec import features as F
from virtio.spec.status import DeviceStatus as S
from virtio.transport.loopback import Loopback

N_DEV_OP = "devicenormative:Device Types / Block Device / Device Operation"
N_DRV_OP = "drivernormative:Device Types / Block Device / Device Operation"
N_DEV_INIT = "devicenormative:Device Types / Block Device / Device Initialization"
N_DRV_INIT = "drivernormative:Device Types / Block Device / Device Initialization"
N_INDIRECT_DEV = (
    "devicenormative:Basic Facilities of a Virtio Device / Virtqueues / "
    "The Virtqueue Descriptor Table / Indirect Descriptors"
)
N_IN_ORDER = "devicenormative:Reserved Feature Bits"
MIB = 1 << 20
RINGS = {
    "split": RingOptions(packed=False),
    "packed": RingOptions(),
    "split-in-order": RingOptions(packed=False, in_order=True),
    "packed-in-order": RingOptions(in_order=True),
    "no-indirect": RingOptions(indirect=False, event_idx=False),
}


@pytest.fixture
def image(tmp_path: Path) -> Path:
    path = tmp_path / "disk.img"
    path.write_bytes(bytes(4 * MIB))
    return path


def connect(
    image: Path, options: BlkOptions | None = None, ring: RingOptions | None = None, **lb: object
) -> tuple[BlkDevice, Loopback, BlkDriver]:
    device = BlkDevice(image, options or BlkOptions(), ring=ring)
    loopback = Loopback(device, **lb)  # type: ignore[arg-type]
    driver = BlkDriver(loopback)
    driver.initialize()
    return device, loopback, driver


@pytest.fixture
def blk(image: Path) -> Iterator[tuple[BlkDevice, Loopback, BlkDriver]]:
    device, lb, driver = connect(image)
    yield device, lb, driver
    lb.close()
    device.close()


@pytest.mark.normative(N_DEV_OP, N_DRV_OP, N_INDIRECT_DEV, N_IN_ORDER)
@pytest.mark.parametrize("ring", list(RINGS), ids=list(RINGS))
@pytest.mark.parametrize("threaded", [False, True], ids=["sync", "threaded"])
def test_write_read_back_and_image_on_disk(image: Path, ring: str, threaded: bool) -> None:
    device, lb, driver = connect(image, ring=RINGS[ring], threaded=threaded)
    try:
        payload = bytes(range(256)) * 16 * 64  # 256 KiB across many segments
        driver.write(100, payload)
        assert driver.read(100, len(payload)) == payload
        driver.flush()
    finally:
        lb.close()
        device.close()
    assert image.read_bytes()[100 * 512 : 100 * 512 + len(payload)] == payload


@pytest.mark.normative(N_DRV_OP, N_DEV_OP)
def test_driver_refuses_bad_requests_and_device_answers_ioerr(
    blk: tuple[BlkDevice, Loopback, BlkDriver],
) -> None:
    _device, _lb, driver = blk
    with pytest.raises(ValueError, match="multiple of 512"):
        driver.write(0, b"x" * 100)
    with pytest.raises(ValueError, match="beyond capacity"):
        driver.read(driver.capacity, 512)
    # Sent raw, past the end: the device says IOERR and touches nothing.
    request = driver.submit(0, [BLK_REQ_HEADER.pack(type=T_IN, sector=driver.capacity)], [512, 1])
    driver.kick(0)
    driver.wait(request)
    assert driver.status_of(request) == S_IOERR
    driver.release(request)


@pytest.mark.normative(N_DEV_OP)
def test_get_id(image: Path) -> None:
    device, lb, driver = connect(image, BlkOptions(serial="disk-0042"))
    assert driver.get_id() == "disk-0042"
    lb.close()
    device.close()


@pytest.mark.normative(N_DEV_OP, N_DRV_OP)
def test_discard_and_write_zeroes(blk: tuple[BlkDevice, Loopback, BlkDriver]) -> None:
    _device, _lb, driver = blk
    driver.write(0, b"\x77" * 65536)
    driver.write_zeroes([(16, 16)])
    assert driver.read(16, 8192) == bytes(8192)
    assert driver.read(0, 8192) == b"\x77" * 8192
    driver.discard([(64, 8)])
    # Unknown flags and unmap on discard are UNSUPP.
    for req_type, flags in ((T_DISCARD, 1), (T_WRITE_ZEROES, 2)):
        segment = BLK_DISCARD_WRITE_ZEROES.pack_raw(0, 8, flags)
        request = driver.submit(0, [BLK_REQ_HEADER.pack(type=req_type), segment], [1])
        driver.kick(0)
        driver.wait(request)
        assert driver.status_of(request) == S_UNSUPP
        driver.release(request)


@pytest.mark.normative(N_DEV_OP, N_DRV_OP)
def test_read_only_device(image: Path) -> None:
    image.write_bytes(b"keep" + bytes(4 * MIB - 4))
    device, lb, driver = connect(image, BlkOptions(read_only=True))
    try:
        assert driver.has(F.VIRTIO_BLK_F_RO)
        assert not driver.has(F.VIRTIO_BLK_F_DISCARD)
        with pytest.raises(BlkError, match="IOERR"):
            driver.write_unchecked(0, b"x" * 512)
        assert driver.read(0, 512)[:4] == b"keep"
    finally:
        lb.close()
        device.close()
    assert image.read_bytes()[:4] == b"keep"


@pytest.mark.normative(N_DEV_INIT, N_DRV_INIT)
def test_multiqueue_and_topology(image: Path) -> None:
    options = BlkOptions(num_queues=4, physical_block_size=4096, opt_io_size=8)
    device, lb, driver = connect(image, options)
    try:
        assert driver.has(F.VIRTIO_BLK_F_MQ) and len(driver.queues) == 4
        assert driver.geometry.physical_block_exp == 3 and driver.geometry.opt_io_size == 8
        for q in range(4):
            driver.write(q * 8, bytes([q]) * 4096, queue=q)
        for q in range(4):
            assert driver.read(q * 8, 4096, queue=(q + 1) % 4) == bytes([q]) * 4096
    finally:
        lb.close()
        device.close()


@pytest.mark.normative(N_DEV_INIT, N_DRV_OP)
def test_writeback_toggle_and_capacity_change(image: Path) -> None:
    device, lb, driver = connect(image)
    try:
        assert driver.has(F.VIRTIO_BLK_F_CONFIG_WCE) and driver.has(F.VIRTIO_BLK_F_FLUSH)
        assert driver.geometry.writeback is True
        driver.set_writeback(False)
        assert driver.geometry.writeback is False and device.writeback is False
        driver.write(0, b"s" * 512)  # writethrough: durable on completion
        with open(image, "r+b") as f:
            f.truncate(8 * MIB)
        changes = driver.config_changes
        device.update_capacity()
        assert driver.config_changes == changes + 1
        assert driver.capacity == 8 * MIB // 512
    finally:
        lb.close()
        device.close()


@pytest.mark.normative(N_DRV_OP)
def test_malformed_request_needs_reset(blk: tuple[BlkDevice, Loopback, BlkDriver]) -> None:
    device, lb, driver = blk
    driver.queues[0].add([(lb.allocator.alloc(8), 8)], [], "short")  # no header, no status
    driver.kick(0)
    assert lb.read_status() & S.DEVICE_NEEDS_RESET
    assert device.needs_reset_reason is not None and N_DRV_OP in device.needs_reset_reason


def test_bad_options_are_refused(image: Path) -> None:
    for bad in (BlkOptions(logical_block_size=1000), BlkOptions(num_queues=0)):
        with pytest.raises(ValueError):
            BlkDevice(image, bad)
