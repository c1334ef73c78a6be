"""pyvirtio's drivers against QEMU's own virtio-mmio devices, through qtest.

QEMU runs a firmware that only halts; pyvirtio's virtio-mmio driver reads and
writes the device windows and guest RAM through qtest and sees the interrupt
lines, so QEMU's virtio-blk-device and virtio-rng-device (not written here)
check our driver side, in both the modern (version 2) and the legacy
(version 1) register layout.
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

import pytest

from virtio.devices.blk import BlkDriver
from virtio.devices.rng import RngDriver
from virtio.spec import features as F
from virtio.spec.status import DeviceStatus as S
from virtio.vm.qtest import QtestMmioBus, QtestPciBus, qemu_machine

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


N_DISCOVERY_DRV = (
    "drivernormative:Virtio Transport Options / Virtio Over PCI Bus / PCI Device Discovery"
)
N_CAPS_DRV = "drivernormative:Virtio Transport Options / Virtio Over PCI Bus / Virtio Structure PCI Capabilities"
N_LAYOUT_DRV = "drivernormative:Virtio Transport Options / Virtio Over PCI Bus / PCI Device Layout"
N_MSIX_DRV = (
    "drivernormative:Virtio Transport Options / Virtio Over PCI Bus / "
    "PCI-specific Initialization And Device Operation / Device Initialization / "
    "MSI-X Vector Configuration"
)
PCI_SHAPES = {
    # (QEMU device options, drive it through the legacy interface, MSI-X expected)
    "modern-msix": (",disable-legacy=on", False, True),
    "modern-intx": (",disable-legacy=on,vectors=0", False, False),
    "transitional-as-legacy-msix": ("", True, True),
    "transitional-as-legacy-intx": (",vectors=0", True, False),
    "legacy-only": (",disable-modern=on", False, True),
}


@pytest.mark.normative(N_DISCOVERY_DRV, N_CAPS_DRV, N_LAYOUT_DRV, N_MSIX_DRV, N_INIT_DRV)
@pytest.mark.normative(N_BLK_DRV_OP, N_ENTROPY_DRV)
@pytest.mark.parametrize("shape", list(PCI_SHAPES), ids=list(PCI_SHAPES))
def test_blk_and_rng_drivers_on_qemu_virtio_pci_devices(tmp_path: Path, shape: str) -> None:
    options, force_legacy, msix = PCI_SHAPES[shape]
    image = tmp_path / "disk.img"
    image.write_bytes(b"P" * (4 << 20))
    devices = [f"virtio-blk-pci,drive=d0{options}", f"virtio-rng-pci{options}"]
    drive = ["-drive", f"if=none,id=d0,file={image},format=raw,cache=writethrough"]
    with qemu_machine(devices, machine="q35", extra=drive) as machine:
        transports = {t.device_id: t for t in machine.pci_transports(force_legacy=force_legacy)}
        assert sorted(transports) == [2, 4]
        legacy = force_legacy or "disable-modern" in options
        blk_t, rng_t = transports[2], transports[4]
        for t, virtio_id in ((blk_t, 2), (rng_t, 4)):
            modern_id, transitional_id = 0x1040 + virtio_id, {2: 0x1001, 4: 0x1005}[virtio_id]
            assert t.pci_device_id == (
                modern_id if "disable-legacy" in options else transitional_id
            )
            assert t.legacy == legacy and (t.vectors > 0) == msix

        blk = BlkDriver(blk_t)
        blk.initialize()
        assert blk.has(F.VIRTIO_F_VERSION_1) != legacy
        payload = hashlib.sha256(shape.encode()).digest() * 128  # 4 KiB
        for i in range(8):
            blk.write(32 * i, payload)
        blk.flush()
        assert all(blk.read(32 * i, len(payload)) == payload for i in range(8))
        rng = RngDriver(rng_t)
        rng.initialize()
        assert len(rng.read(64)) == 64

        blk_bus, rng_bus = blk_t.bus, rng_t.bus
        assert isinstance(blk_bus, QtestPciBus) and isinstance(rng_bus, QtestPciBus)
        if msix:
            # MSI-X messages landed in guest RAM where the driver pointed them.
            assert blk_bus.messages >= 1 and rng_bus.messages >= 1
        else:
            # INTA#, through the ISR. A line may go up after the driver already found
            # its buffer in the ring: give QEMU a moment to tell.
            for bus in (blk_bus, rng_bus):
                deadline = time.monotonic() + 5
                while not machine.client.raised.get(bus.gsi) and time.monotonic() < deadline:
                    machine.client.wait_irq(bus.gsi, 0.05)
                assert machine.client.raised.get(bus.gsi, 0) >= 1, machine.client.raised
        blk.reset()
        rng.reset()
        assert "virtio" not in machine.guest_error_text().lower(), machine.guest_error_text()
    data = image.read_bytes()
    assert all(data[32 * i * 512 : 32 * i * 512 + len(payload)] == payload for i in range(8))
