"""Device types and their drivers through the legacy interface, in both guest byte orders."""

from __future__ import annotations

from pathlib import Path

import pytest

from virtio.core.status import Interface
from virtio.devices.blk import BlkDevice, BlkDriver, BlkOptions
from virtio.devices.rng import RngDevice, RngDriver
from virtio.spec import features as F
from virtio.spec.status import DeviceStatus as S
from virtio.transport.loopback import Loopback

N_INIT_DRV = "drivernormative:General Initialization And Device Operation / Device Initialization"
N_LEGACY_LAYOUT_DRV = "drivernormative:Basic Facilities of a Virtio Device / Virtqueues"
N_BLK_DEV_OP = "devicenormative:Device Types / Block Device / Device Operation"
N_BLK_DRV_OP = "drivernormative:Device Types / Block Device / Device Operation"
N_ENTROPY_DEV = "devicenormative:Device Types / Entropy Device / Device Operation"
N_ENTROPY_DRV = "drivernormative:Device Types / Entropy Device / Device Operation"


@pytest.mark.normative(N_INIT_DRV, N_LEGACY_LAYOUT_DRV, N_BLK_DEV_OP, N_BLK_DRV_OP)
@pytest.mark.parametrize("order", ["little", "big"])
def test_blk_over_the_legacy_interface(tmp_path: Path, order: str) -> None:
    image = tmp_path / "d.img"
    image.write_bytes(bytes(2 << 20))
    device = BlkDevice(image, BlkOptions(num_queues=1))
    try:
        with Loopback(device, legacy=True, legacy_order=order) as lb:  # type: ignore[arg-type]
            driver = BlkDriver(lb)
            driver.initialize()
            # The legacy sequence: no FEATURES_OK, no VERSION_1, the guest's byte order.
            assert lb.read_status() == S.ACKNOWLEDGE | S.DRIVER | S.DRIVER_OK
            assert device.interface is Interface.LEGACY and device.byteorder == order
            assert not driver.has(F.VIRTIO_F_VERSION_1) and driver.has(F.VIRTIO_BLK_F_FLUSH)
            assert driver.capacity == 4096  # read in the guest's order
            raw = device.config[:8]
            assert int.from_bytes(raw, "little" if order == "little" else "big") == 4096
            ring = device.queues[0].ring
            assert ring is not None and ring.ring.order == order
            assert ring.ring.layout.device % 4096 == 0  # the legacy layout, by PFN
            driver.write(8, b"legacy-" * 512 + b"\0" * 512)
            driver.flush()
            assert driver.read(8, 4096)[:14] == b"legacy-legacy-"
            assert driver.get_id() == "pyvirtio"
    finally:
        device.close()
    assert image.read_bytes()[4096 : 4096 + 7] == b"legacy-"


@pytest.mark.normative(N_INIT_DRV, N_ENTROPY_DEV, N_ENTROPY_DRV)
@pytest.mark.parametrize("order", ["little", "big"])
@pytest.mark.parametrize("threaded", [False, True], ids=["sync", "threaded"])
def test_rng_over_the_legacy_interface(order: str, threaded: bool) -> None:
    with Loopback(RngDevice(), legacy=True, legacy_order=order, threaded=threaded) as lb:  # type: ignore[arg-type]
        driver = RngDriver(lb)
        driver.initialize()
        assert not driver.has(F.VIRTIO_F_VERSION_1)
        assert len(driver.read(64)) == 64


@pytest.mark.normative(N_INIT_DRV)
def test_legacy_offer_has_only_32_bits_and_no_modern_core_bits(tmp_path: Path) -> None:
    image = tmp_path / "d.img"
    image.write_bytes(bytes(1 << 20))
    device = BlkDevice(image, BlkOptions())
    try:
        with Loopback(device, legacy=True) as lb:
            offered = lb.read_device_features()
            assert offered < 1 << 32
            for bit in (F.VIRTIO_F_VERSION_1, F.VIRTIO_F_RING_PACKED, F.VIRTIO_F_RING_RESET):
                assert not offered >> bit & 1
            assert offered >> F.VIRTIO_F_INDIRECT_DESC & 1 and offered >> F.VIRTIO_F_EVENT_IDX & 1
    finally:
        device.close()
