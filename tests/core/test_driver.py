"""The driver core over the loopback transport: negotiation, config, failure handling."""

from __future__ import annotations

from pathlib import Path

import pytest

from virtio.core.device import RingOptions
from virtio.core.driver import VirtioDriver
from virtio.devices.blk import BlkDevice, BlkDriver, BlkOptions
from virtio.devices.rng import RngDevice, RngDriver
from virtio.errors import DeviceNeedsReset, NegotiationError
from virtio.queue import Chain
from virtio.spec import features as F
from virtio.spec.status import DeviceStatus as S
from virtio.transport.loopback import Loopback

N_INIT_DRV = "drivernormative:General Initialization And Device Operation / Device Initialization"
N_FEATURES_DRV = "drivernormative:Basic Facilities of a Virtio Device / Feature Bits"
N_CONFIG_DRV = "drivernormative:Basic Facilities of a Virtio Device / Device Configuration Space"
N_RESET_DRV = "drivernormative:Basic Facilities of a Virtio Device / Device Reset"
N_RESERVED_DRV = "drivernormative:Reserved Feature Bits"
N_STATUS_DRV = "drivernormative:Basic Facilities of a Virtio Device / Device Status Field"
N_ACCESS = "devicenormative:Reserved Feature Bits"


@pytest.mark.normative(N_INIT_DRV, N_RESET_DRV, N_RESERVED_DRV)
def test_initialize_negotiates_version_1_and_ring_features() -> None:
    with Loopback(RngDevice()) as lb:
        driver = RngDriver(lb)
        driver.initialize()
        for bit in (F.VIRTIO_F_VERSION_1, F.VIRTIO_F_RING_PACKED, F.VIRTIO_F_EVENT_IDX):
            assert driver.has(bit)
        assert lb.read_status() == S.ACKNOWLEDGE | S.DRIVER | S.FEATURES_OK | S.DRIVER_OK


@pytest.mark.normative(N_FEATURES_DRV)
def test_choose_features_respects_offer_and_requirements() -> None:
    class NetDriver(VirtioDriver):
        device_id = 1

        def supported_features(self) -> int:
            return 1 << F.VIRTIO_NET_F_MQ | 1 << F.VIRTIO_NET_F_CTRL_VQ | 1 << F.VIRTIO_NET_F_CSUM

    with Loopback(RngDevice()) as lb:
        driver = NetDriver(lb)
        v1 = 1 << F.VIRTIO_F_VERSION_1
        # MQ offered without CTRL_VQ: MQ is dropped; unknown bit 63 is never taken.
        chosen = driver.choose_features(v1 | 1 << F.VIRTIO_NET_F_MQ | 1 << 63)
        assert chosen == v1
        full = v1 | 1 << F.VIRTIO_NET_F_MQ | 1 << F.VIRTIO_NET_F_CTRL_VQ
        assert driver.choose_features(full) == full


class Refusing(RngDevice):
    def validate_features(self, features: int) -> str | None:
        return "refuses everything"


@pytest.mark.normative(N_INIT_DRV, N_STATUS_DRV)
def test_refused_features_fail_initialization() -> None:
    with Loopback(Refusing()) as lb:
        driver = RngDriver(lb)
        with pytest.raises(NegotiationError, match="FEATURES_OK"):
            driver.initialize()
        assert lb.read_status() & S.FAILED


class FlakyGeneration(Loopback):
    def __init__(self, *args: object, changes: int, **kw: object) -> None:
        super().__init__(*args, **kw)  # type: ignore[arg-type]
        self.changes = changes

    def config_generation(self) -> int:
        self.changes -= 1
        return max(self.changes, 0) * 7 + (self.changes > 0) * (self.changes % 2)


@pytest.mark.normative(N_CONFIG_DRV)
def test_config_reads_retry_while_the_generation_moves(tmp_path: Path) -> None:
    image = tmp_path / "d.img"
    image.write_bytes(bytes(1 << 20))
    device = BlkDevice(image, BlkOptions())
    try:
        lb = FlakyGeneration(device, changes=6)
        driver = BlkDriver(lb)
        assert int.from_bytes(driver.read_config(0, 8), "little") == 2048
        lb.changes = 10_000
        with pytest.raises(NegotiationError, match="generation"):
            driver.read_config(0, 8, retries=5)
        lb.close()
    finally:
        device.close()


class Breaking(RngDevice):
    def handle_chain(self, queue_index: int, chain: Chain) -> int:
        self.fail("simulated device error")
        return 0


@pytest.mark.normative(N_STATUS_DRV)
@pytest.mark.parametrize("threaded", [False, True])
def test_device_needs_reset_fails_pending_calls(threaded: bool) -> None:
    with Loopback(Breaking(), threaded=threaded) as lb:
        driver = RngDriver(lb)
        driver.initialize()
        with pytest.raises(DeviceNeedsReset):
            driver.read(16, timeout=10)
        assert lb.read_status() & S.DEVICE_NEEDS_RESET
        driver.initialize()  # a reset brings it back (and it breaks again on use)
        assert not lb.read_status() & S.DEVICE_NEEDS_RESET


@pytest.mark.normative(N_ACCESS, N_RESERVED_DRV)
def test_access_platform_through_an_iommu(tmp_path: Path) -> None:
    image = tmp_path / "d.img"
    image.write_bytes(bytes(1 << 20))
    device = BlkDevice(image, BlkOptions(), ring=RingOptions(access_platform=True))
    try:
        with Loopback(device, iommu_base=1 << 40) as lb:
            driver = BlkDriver(lb)
            driver.initialize()
            assert driver.has(F.VIRTIO_F_ACCESS_PLATFORM)
            driver.write(0, b"\x42" * 4096)
            assert driver.read(0, 4096) == b"\x42" * 4096
            # A buffer at an IOVA the IOMMU does not map: the device must not touch it.
            driver.queues[0].add([], [(1 << 50, 512)], "unmapped")
            driver.kick(0)
            assert lb.read_status() & S.DEVICE_NEEDS_RESET
            assert device.needs_reset_reason is not None
            assert "not mapped by the IOMMU" in device.needs_reset_reason
    finally:
        device.close()
    assert image.read_bytes()[:4096] == b"\x42" * 4096


N_SUSPEND_DRV = "drivernormative:General Initialization And Device Operation / Device Suspend"
N_REENABLE_DRV = (
    "drivernormative:Basic Facilities of a Virtio Device / Virtqueues / Virtqueue Reset / "
    "Virtqueue Re-enable"
)
N_REENABLE_DEV = (
    "devicenormative:Basic Facilities of a Virtio Device / Virtqueues / Virtqueue Reset / "
    "Virtqueue Re-enable"
)
N_CLEANUP_DRV = "drivernormative:General Initialization And Device Operation / Device Cleanup"
N_PACKED_ALIGN = "drivernormative:Basic Facilities of a Virtio Device / Packed Virtqueues"
N_SPLIT_ALIGN = "drivernormative:Basic Facilities of a Virtio Device / Virtqueues"


@pytest.mark.normative(N_SUSPEND_DRV)
def test_driver_suspends_verifies_and_resumes() -> None:
    with Loopback(RngDevice()) as lb:
        driver = RngDriver(lb)
        driver.initialize()
        driver.suspend()
        status = lb.read_status()
        assert status & S.SUSPEND and not status & S.DRIVER_OK
        with pytest.raises(NegotiationError, match="suspended"):
            driver.read(8)  # no new buffers while suspended
        driver.resume()
        assert len(driver.read(8)) == 8


N_QRESET_DRV = (
    "drivernormative:Basic Facilities of a Virtio Device / Virtqueues / Virtqueue Reset / "
    "Virtqueue Reset"
)


class SlowReset(Loopback):
    """A transport whose queue reset takes a few reads to complete."""

    polls = 0

    def queue_reset_done(self, index: int) -> bool:
        self.polls += 1
        return self.polls > 3 and super().queue_reset_done(index)


@pytest.mark.normative(N_QRESET_DRV)
def test_the_driver_waits_for_the_queue_reset_to_complete() -> None:
    slow = SlowReset(RngDevice())
    with slow as lb:
        driver = RngDriver(lb)
        driver.initialize()
        request = driver.submit(0, [], [8])
        assert driver.reset_queue(0) == [request]
        assert slow.polls == 4  # it read the reset state until the device showed it done
        assert len(driver.read(8)) == 8

    class NeverDone(Loopback):
        def queue_reset_done(self, index: int) -> bool:
            return False

    with NeverDone(RngDevice()) as lb:
        driver = RngDriver(lb)
        driver.initialize()
        request = driver.submit(0, [], [8])
        with pytest.raises(NegotiationError, match="did not reset"):
            driver.reset_queue(0, timeout=0.2)
        # The buffers stay with the device: it never showed the reset done.
        assert driver.queues[0].outstanding == 1 and driver.broken is not None


@pytest.mark.normative(N_REENABLE_DRV, N_REENABLE_DEV)
def test_queue_reset_and_re_enable_from_the_driver() -> None:
    with Loopback(RngDevice()) as lb:
        driver = RngDriver(lb)
        driver.initialize()
        assert driver.has(F.VIRTIO_F_RING_RESET)
        request = driver.submit(0, [], [8])  # made available, never kicked
        assert driver.reset_queue(0) == [request]
        assert lb.device.queues[0].ring is not None  # configured again, as at discovery
        assert len(driver.read(8)) == 8


@pytest.mark.normative(N_CLEANUP_DRV)
def test_exposed_buffers_are_taken_back_only_after_reset() -> None:
    with Loopback(RngDevice()) as lb:
        driver = RngDriver(lb)
        driver.initialize()
        driver.submit(0, [], [8])
        queue = driver.queues[0]
        assert queue.outstanding == 1
        driver.reset()  # the device is no longer live: now the buffers come back
        assert lb.read_status() == 0
        assert queue.outstanding == 0


@pytest.mark.normative(N_SPLIT_ALIGN, N_PACKED_ALIGN)
@pytest.mark.parametrize("packed", [False, True])
def test_driver_rings_are_aligned(packed: bool) -> None:
    from virtio.queue import RingLayout

    for base in (0x1000, 0x1001, 0x1003, 0x100F):
        layout = RingLayout.contiguous(base, 7 if packed else 8, packed)
        for addr, align in zip(
            (layout.desc, layout.driver, layout.device), RingLayout.alignments(packed), strict=True
        ):
            assert addr % align == 0
    # And the rings the driver really hands the device.
    ring = RingOptions(packed=packed)
    with Loopback(RngDevice(ring=ring, queue_max_size=64)) as lb:
        driver = RngDriver(lb, queue_size=7 if packed else 8)
        driver.initialize()
        assert driver.has(F.VIRTIO_F_RING_PACKED) == packed
        q = lb.device.queues[0]
        for addr, align in zip(
            (q.desc, q.driver, q.device), RingLayout.alignments(packed), strict=True
        ):
            assert addr % align == 0
