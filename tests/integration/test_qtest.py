"""pyvirtio's drivers against QEMU's own virtio-mmio devices, through qtest.

QEMU runs a firmware that only halts; pyvirtio's virtio-mmio driver reads and
writes the device windows and guest RAM through qtest and sees the interrupt
lines, so QEMU's virtio-blk-device and virtio-rng-device (not written here)
check our driver side, in both the modern (version 2) and the legacy
(version 1) register layout.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from virtio.devices.blk import BlkDriver
from virtio.devices.rng import RngDriver
from virtio.spec import features as F
from virtio.spec.status import DeviceStatus as S
from virtio.vm.qtest import QtestMmioBus, qemu_machine

N_MMIO_INIT_DRV = (
    "drivernormative:Virtio Transport Options / Virtio Over MMIO / "
    "MMIO-specific Initialization And Device Operation / Device Initialization"
)
N_MMIO_NOTIFY_DRV = (
    "drivernormative:Virtio Transport Options / Virtio Over MMIO / "
    "MMIO-specific Initialization And Device Operation / Notifications From The Device"
)
N_MMIO_DRV = (
    "drivernormative:Virtio Transport Options / Virtio Over MMIO / MMIO Device Register Layout"
)
N_BLK_DRV_OP = "drivernormative:Device Types / Block Device / Device Operation"
N_ENTROPY_DRV = "drivernormative:Device Types / Entropy Device / Device Operation"
N_INIT_DRV = "drivernormative:General Initialization And Device Operation / Device Initialization"


@pytest.mark.normative(N_MMIO_INIT_DRV, N_MMIO_NOTIFY_DRV, N_MMIO_DRV, N_INIT_DRV, N_BLK_DRV_OP)
@pytest.mark.normative(N_ENTROPY_DRV)
@pytest.mark.parametrize("modern", [True, False], ids=["mmio-v2", "mmio-v1-legacy"])
def test_blk_and_rng_drivers_on_qemu_virtio_mmio_devices(tmp_path: Path, modern: bool) -> None:
    image = tmp_path / "disk.img"
    image.write_bytes(b"Q" * (4 << 20))
    devices = ["virtio-blk-device,drive=d0,serial=qemu-disk", "virtio-rng-device"]
    drive = ["-drive", f"if=none,id=d0,file={image},format=raw,cache=writethrough"]
    with qemu_machine(devices, modern=modern, extra=drive) as machine:
        transports = {t.device_id: t for t in machine.mmio_transports()}
        assert sorted(transports) == [2, 4], "the placeholder windows were not skipped"
        blk_transport, rng_transport = transports[2], transports[4]
        assert blk_transport.version == (2 if modern else 1)

        blk = BlkDriver(blk_transport)
        blk.initialize()
        assert blk.has(F.VIRTIO_F_VERSION_1) == modern
        assert blk_transport.read_status() & S.DRIVER_OK
        assert blk.capacity == (4 << 20) // 512
        assert blk.read(0, 4096) == b"Q" * 4096
        payload = hashlib.sha256(b"pyvirtio").digest() * 256  # 8 KiB
        for i in range(16):
            blk.write(64 + 16 * i, payload)
        blk.flush()
        for i in range(16):
            assert blk.read(64 + 16 * i, len(payload)) == payload
        assert blk.get_id() == "qemu-disk"

        rng = RngDriver(rng_transport)
        rng.initialize()
        chunks = [rng.read(64) for _ in range(8)]
        assert all(chunks) and len(set(chunks)) == len(chunks)

        # Completions came as interrupts on the windows' lines, each acknowledged.
        blk_bus, rng_bus = blk_transport.bus, rng_transport.bus
        assert isinstance(blk_bus, QtestMmioBus) and isinstance(rng_bus, QtestMmioBus)
        assert machine.client.raised.get(blk_bus.gsi, 0) >= 1
        assert machine.client.raised.get(rng_bus.gsi, 0) >= 1
        assert not machine.client.irq.get(blk_bus.gsi)
        blk.reset()
        rng.reset()
        assert blk_transport.read_status() == 0
        # QEMU's device models found nothing to complain about in our accesses.
        assert "virtio" not in machine.guest_error_text().lower(), machine.guest_error_text()
    data = image.read_bytes()
    for i in range(16):
        offset = (64 + 16 * i) * 512
        assert data[offset : offset + len(payload)] == payload


def test_qemu_reports_a_bad_access_in_its_guest_error_log() -> None:
    """The log the test above checks is not empty by accident: a wrong access shows in it."""
    with qemu_machine(["virtio-rng-device"]) as machine:
        (transport,) = machine.mmio_transports()
        bus = transport.bus
        assert isinstance(bus, QtestMmioBus)
        bus.read(0x050, 4)  # QueueNotify is write-only
        assert "write-only" in machine.guest_error_text()
