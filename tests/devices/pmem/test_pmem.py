"""virtio-pmem: the device model and the driver, in process (register-level loopback)."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import pytest

from virtio.devices.pmem import PmemDevice, PmemDriver
from virtio.devices.pmem import options as O
from virtio.devices.pmem import wire as W
from virtio.devices.pmem.driver import PmemError
from virtio.devices.registry import DeviceSettings, device_type
from virtio.errors import NegotiationError
from virtio.queue import Chain, ChainWriter
from virtio.spec.status import DeviceStatus as S
from virtio.transport.loopback import Loopback
from virtio.transport.pci import pci_loopback

PMEM = "Device Types / PMEM Device"
N_INIT_DEV = f"devicenormative:{PMEM} / Device Initialization"
N_INIT_DRV = f"drivernormative:{PMEM} / Device Initialization"
N_FLUSH_DEV = f"devicenormative:{PMEM} / Device Operation / Virtqueue flush"
N_RETURN_DEV = f"devicenormative:{PMEM} / Device Operation / Virtqueue return"

SIZE = 1 << 20
START = 0x8000000  # above the loopback's 64 MiB of RAM


@pytest.fixture
def backing(tmp_path: Path) -> Path:
    path = tmp_path / "pmem.img"
    path.write_bytes(b"\0" * SIZE)
    return path


def test_wire_round_trips() -> None:
    assert W.unpack_request(W.pack_request(W.REQ_TYPE_FLUSH)) == 0
    assert W.pack_response(W.RET_FAILURE) == b"\xff\xff\xff\xff"
    assert W.unpack_response(W.pack_response(-1)) == -1
    assert W.unpack_response(W.pack_response(0)) == 0
    assert W.unpack_config(W.pack_config(START, SIZE)) == (START, SIZE)
    for bad in (b"", b"\0\0\0"):
        with pytest.raises(ValueError):
            W.unpack_request(bad)
        with pytest.raises(ValueError):
            W.unpack_response(bad)


@pytest.mark.normative(N_INIT_DEV, N_INIT_DRV)
def test_start_and_size_without_the_shared_memory_region(backing: Path) -> None:
    device = PmemDevice(backing, start=START)
    with Loopback(device) as lb:
        # The VMM's part: the file at START in guest-physical memory.
        lb.guest.add(START, device.mapping, name="pmem")
        driver = PmemDriver(lb, features=0)
        driver.initialize()
        assert not driver.has(W.F_SHMEM_REGION)
        assert driver.config() == (START, SIZE)
        window = driver.window()
        assert window.length == SIZE
        window.write(SIZE - 5, b"tail!")
        assert driver.flush() == W.RET_OK
        assert backing.read_bytes()[-5:] == b"tail!"
        with pytest.raises(ValueError, match="outside"):
            window.read(SIZE - 4, 5)


@pytest.mark.normative(N_INIT_DEV, N_INIT_DRV)
def test_the_shared_memory_region(backing: Path) -> None:
    device = PmemDevice(backing, start=START)
    with Loopback(device) as lb:
        driver = PmemDriver(lb)
        driver.initialize()
        assert driver.has(W.F_SHMEM_REGION)
        assert driver.config() == (0, 0)  # SHOULD be zero with the region
        [region] = device.shared_memory_regions()
        assert (region.id, region.length) == (W.SHMEM_ID, SIZE)
        window = driver.window()
        window.write(4096, b"persistent")
        assert window.read(4096, 10) == b"persistent"
        assert driver.flush() == W.RET_OK
        assert backing.read_bytes()[4096:4106] == b"persistent"
        lb.write_status(0)
        assert device.config[:16] == W.pack_config(START, SIZE)  # back after a reset


@pytest.mark.normative(N_INIT_DEV)
def test_without_a_start_the_driver_must_take_the_region(backing: Path) -> None:
    device = PmemDevice(backing)
    assert device.config[:16] == bytes(16)
    with Loopback(device) as lb:
        with pytest.raises(NegotiationError, match="FEATURES_OK"):
            PmemDriver(lb, features=0).initialize()
        driver = PmemDriver(lb)
        driver.initialize()
        assert driver.window().length == SIZE
    with pytest.raises(ValueError, match="start or the shared"):
        PmemDevice(backing, shmem_region=False)


@pytest.mark.normative(N_FLUSH_DEV, N_RETURN_DEV)
def test_flush_is_an_fsync_and_survives_a_reset(
    backing: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    synced: list[int] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        synced.append(fd)
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    device = PmemDevice(backing, start=START)
    with Loopback(device, threaded=True) as lb:
        driver = PmemDriver(lb)
        driver.initialize()
        driver.window().write(0, b"A" * 64)
        assert driver.flush() == W.RET_OK
        assert synced == [device.fd] and device.flushes == 1
        driver.reset()
        again = PmemDriver(lb)
        again.initialize()
        assert again.window().read(0, 64) == b"A" * 64
    device.close()
    with open(backing, "rb") as f:
        assert f.read(64) == b"A" * 64


@pytest.mark.normative(N_RETURN_DEV)
def test_a_failed_fsync_answers_minus_one(backing: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(fd: int) -> None:
        raise OSError(5, "Input/output error")

    device = PmemDevice(backing, start=START)
    with Loopback(device) as lb:
        driver = PmemDriver(lb)
        driver.initialize()
        monkeypatch.setattr(os, "fsync", broken)
        assert driver.flush() == W.RET_FAILURE
        monkeypatch.undo()
        assert driver.flush() == W.RET_OK  # the device goes on
        assert not lb.read_status() & S.DEVICE_NEEDS_RESET


# -- a hostile driver -----------------------------------------------------------------------


@pytest.mark.normative(N_RETURN_DEV)
def test_unknown_and_short_requests_answer_minus_one(backing: Path) -> None:
    device = PmemDevice(backing, start=START)
    with Loopback(device) as lb:
        driver = PmemDriver(lb)
        driver.initialize()
        assert driver.request(7) == W.RET_FAILURE
        written, data = driver.call(0, [b"\0\0"], [4])
        assert written == 4 and W.unpack_response(data) == W.RET_FAILURE
        assert device.flushes == 0
        assert not lb.read_status() & S.DEVICE_NEEDS_RESET


@pytest.mark.normative(N_RETURN_DEV)
def test_no_room_for_ret_fails_the_device(backing: Path) -> None:
    device = PmemDevice(backing, start=START)
    with Loopback(device) as lb:
        driver = PmemDriver(lb)
        driver.initialize()
        req = driver.submit(0, [W.pack_request(W.REQ_TYPE_FLUSH)], [3])
        driver.kick(0)
        assert lb.read_status() & S.DEVICE_NEEDS_RESET
        assert N_RETURN_DEV in (device.needs_reset_reason or "")
        assert not req.done


# -- a hostile device -----------------------------------------------------------------------


class OddAnswers(PmemDevice):
    answer = W.pack_response(5)

    def handle_chain(self, queue_index: int, chain: Chain) -> int | None:
        return ChainWriter(chain).write(self.answer)


def test_answers_outside_the_spec_are_driver_errors(backing: Path) -> None:
    device = OddAnswers(backing, start=START)
    with Loopback(device) as lb:
        driver = PmemDriver(lb)
        driver.initialize()
        with pytest.raises(PmemError, match="ret 5"):
            driver.flush()
        device.answer = b"\0\0"
        with pytest.raises(PmemError, match="wrote 2 bytes"):
            driver.flush()


def test_a_region_the_transport_does_not_show(backing: Path) -> None:
    device = PmemDevice(backing, start=START)
    with Loopback(device) as lb:
        driver = PmemDriver(lb)
        driver.initialize()
        # As a transport that cannot reach the region.
        lb.shared_memory_window = lambda shmid: None  # type: ignore[method-assign]
        with pytest.raises(NegotiationError, match="no shared memory region 0"):
            driver.window()
    device.close()


# -- the options ------------------------------------------------------------------------------


def test_serve_options(backing: Path, tmp_path: Path) -> None:
    kind = device_type("pmem")
    assert kind.device_id == 27 and kind.device is PmemDevice
    parser = argparse.ArgumentParser()
    O.add_arguments(parser)
    device = O.from_arguments(
        parser.parse_args([str(backing), "--start", "0x240000000", "--no-shmem-region"]),
        DeviceSettings(),
    )
    try:
        assert isinstance(device, PmemDevice)
        assert device.start == 0x240000000 and device.size == SIZE
        assert not device.offered_features >> W.F_SHMEM_REGION & 1
        assert device.shared_memory_regions() == ()
        assert "0x240000000" in device.describe()
    finally:
        device.close()
    empty = tmp_path / "empty"
    empty.touch()
    with pytest.raises(ValueError, match="empty"):
        O.from_arguments(parser.parse_args([str(empty), "--start", "0"]), DeviceSettings())
    with pytest.raises(FileNotFoundError):
        O.from_arguments(parser.parse_args([str(tmp_path / "none")]), DeviceSettings())
    example = kind.example(tmp_path, DeviceSettings())
    assert isinstance(example, PmemDevice) and example.size == 16 << 20
    example.close()


@pytest.mark.normative(N_INIT_DRV, N_FLUSH_DEV)
def test_the_region_through_a_pci_bar(backing: Path) -> None:
    device = PmemDevice(backing)  # no start: only the shared memory region
    transport = pci_loopback(device)
    assert transport.shared_memory[W.SHMEM_ID][2] == SIZE
    driver = PmemDriver(transport)
    driver.initialize()
    window = driver.window()
    assert window.length == SIZE
    window.write(SIZE - 13, b"through a BAR")  # unaligned: 8, 4 and 1-byte accesses
    assert window.read(SIZE - 13, 13) == b"through a BAR"
    assert driver.flush() == W.RET_OK
    assert backing.read_bytes()[-13:] == b"through a BAR"
    device.close()
