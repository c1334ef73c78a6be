"""Deferred completion: a device keeps chains and completes them later, batched."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from virtio.core.device import DEFERRED, RingOptions, VirtioDevice
from virtio.core.driver import Request, VirtioDriver
from virtio.devices.blk import BlkDevice, BlkDriver, BlkOptions
from virtio.devices.rng import RngDevice, RngDriver
from virtio.queue import Chain, ChainWriter
from virtio.spec import features as F
from virtio.spec.status import DeviceStatus as S
from virtio.transport.loopback import Loopback

N_IN_ORDER_DEV = "devicenormative:Reserved Feature Bits"
N_USED_SUPP_DEV = (
    "devicenormative:Basic Facilities of a Virtio Device / Virtqueues / "
    "Used Buffer Notification Suppression"
)
N_QRESET_DEV = (
    "devicenormative:Basic Facilities of a Virtio Device / Virtqueues / Virtqueue Reset / "
    "Virtqueue Reset"
)
N_STATUS_DEV = "devicenormative:Basic Facilities of a Virtio Device / Device Status Field"
N_INIT_DRV = "drivernormative:General Initialization And Device Operation / Device Initialization"
N_BLK_DEV_OP = "devicenormative:Device Types / Block Device / Device Operation"
N_ENTROPY_DEV = "devicenormative:Device Types / Entropy Device / Device Operation"


class Keeper(VirtioDevice):
    """Keeps every chain; the test completes them when and in the order it likes."""

    device_id = 4  # looks like an entropy device to the driver core

    def __init__(self, ring: RingOptions | None = None, *, immediate_every: int = 0) -> None:
        self.kept: list[Chain] = []
        self.calls = 0
        self.immediate_every = immediate_every
        super().__init__(num_queues=1, ring=ring)

    def handle_chain(self, queue_index: int, chain: Chain) -> int | None:
        self.calls += 1
        if self.immediate_every and self.calls % self.immediate_every == 0:
            return ChainWriter(chain).write(b"now!")
        self.kept.append(chain)
        return DEFERRED

    def finish(self, chains: list[Chain]) -> None:
        items = []
        for chain in chains:
            items.append((chain, ChainWriter(chain).write(f"c{chain.head:02d}".encode())))
        self.complete_many(0, items)


class Driver(VirtioDriver):
    device_id = 4


def submit(driver: Driver, n: int) -> list[Request]:
    requests = [driver.submit(0, [], [4], token=i) for i in range(n)]
    driver.kick(0)
    return requests


@pytest.mark.normative(N_USED_SUPP_DEV)
def test_out_of_order_completion_in_one_batch_with_one_notification() -> None:
    device = Keeper(RingOptions(event_idx=False))
    with Loopback(device) as lb:
        driver = Driver(lb)
        driver.initialize()
        submit(driver, 6)
        assert len(device.kept) == 6 and device.deferred_count == 6
        assert driver.poll() == []  # nothing used yet
        interrupts = lb.interrupts
        kept = device.kept
        device.finish([kept[4], kept[1], kept[5]])
        assert lb.interrupts == interrupts + 1  # one decision for the batch
        done = [e.request.token for e in driver.poll() if hasattr(e, "request")]
        assert done == [4, 1, 5]  # the order the device completed them in
        device.finish([kept[0], kept[2], kept[3]])
        done = [e.request.token for e in driver.poll() if hasattr(e, "request")]
        assert done == [0, 2, 3]
        assert device.deferred_count == 0


@pytest.mark.normative(N_IN_ORDER_DEV)
@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
def test_in_order_holds_early_completions_back(packed: bool) -> None:
    device = Keeper(RingOptions(in_order=True, packed=packed), immediate_every=3)
    with Loopback(device) as lb:
        driver = Driver(lb)
        driver.initialize()
        assert driver.has(F.VIRTIO_F_IN_ORDER)
        submit(driver, 6)  # chains 3 and 6 complete at once, the rest are kept
        assert driver.poll() == []  # the 3rd finished first, but waits for the 1st and 2nd
        kept = device.kept  # the 1st, 2nd, 4th, 5th
        device.finish([kept[1]])
        assert driver.poll() == []
        device.finish([kept[0]])
        tokens = [e.request.token for e in driver.poll() if hasattr(e, "request")]
        assert tokens == [0, 1, 2]
        device.finish([kept[3], kept[2]])
        tokens = [e.request.token for e in driver.poll() if hasattr(e, "request")]
        assert tokens == [3, 4, 5]


@pytest.mark.normative(N_QRESET_DEV)
def test_completions_after_a_queue_reset_are_dropped() -> None:
    device = Keeper()
    with Loopback(device) as lb:
        driver = Driver(lb)
        driver.initialize()
        submit(driver, 2)
        stale = list(device.kept)
        driver.reset_queue(0)
        assert device.deferred_count == 0
        device.kept.clear()
        submit(driver, 1)
        device.finish(stale)  # belongs to the ring that was reset: dropped
        assert driver.poll() == []
        device.finish(device.kept)
        tokens = [e.request.token for e in driver.poll() if hasattr(e, "request")]
        assert tokens == [0]


class FailsSecond(VirtioDevice):
    device_id = 4

    def __init__(self) -> None:
        self.handled: list[int] = []
        super().__init__(num_queues=1)

    def handle_chain(self, queue_index: int, chain: Chain) -> int | None:
        self.handled.append(chain.head)
        if len(self.handled) == 2:
            self.fail("the second request is broken")
            return 0
        return ChainWriter(chain).write(b"ok")


@pytest.mark.normative(N_STATUS_DEV)
def test_a_batch_stops_at_the_chain_that_failed_the_device() -> None:
    device = FailsSecond()
    with Loopback(device) as lb:
        driver = Driver(lb)
        driver.initialize()
        submit(driver, 4)
        assert len(device.handled) == 2, "chains after the failure were served"
        assert lb.read_status() & S.DEVICE_NEEDS_RESET
        events = driver.poll()
        assert not [e for e in events if hasattr(e, "request")]  # nothing pushed after failing
        assert [type(e).__name__ for e in events] == ["NeedsReset"]


class TwoRoles(VirtioDevice):
    """Queue 1 exists only with a feature (like net's control queue)."""

    device_id = 4

    def __init__(self) -> None:
        super().__init__(num_queues=2)

    def device_features(self) -> int:
        return 1 << 0

    def queues_for_features(self, features: int) -> int:
        return 2 if features & 1 else 1

    def handle_chain(self, queue_index: int, chain: Chain) -> int | None:
        return 0


@pytest.mark.normative(N_INIT_DRV)
def test_the_number_of_queues_follows_the_features() -> None:
    class Small(Driver):
        def supported_features(self) -> int:
            return 0  # does not take bit 0: one queue

        def queues_wanted(self) -> int:
            return 2

    device = TwoRoles()
    with Loopback(device) as lb:
        driver = Small(lb)
        with pytest.raises(Exception, match="queue 1 is not available"):
            driver.initialize()

    class Full(Small):
        def supported_features(self) -> int:
            return 1

    device = TwoRoles()
    with Loopback(device) as lb:
        driver = Full(lb)
        driver.initialize()
        assert len(device.active_queues()) == 2 and device.live


@pytest.mark.normative(N_ENTROPY_DEV)
@pytest.mark.parametrize("threaded", [False, True], ids=["sync", "threaded"])
def test_rate_limited_rng_waits_for_its_timer(threaded: bool) -> None:
    device = RngDevice(max_bytes=64, period=0.2)
    with Loopback(device, threaded=threaded) as lb:
        driver = RngDriver(lb)
        driver.initialize()
        start = time.monotonic()
        first = driver.read(64)
        assert len(first) == 64
        second = driver.read(32, timeout=5)  # the budget is spent: wait for the refill
        assert len(second) == 32
        assert time.monotonic() - start >= 0.15
        assert device.deferred_count == 0


@pytest.mark.normative(N_BLK_DEV_OP)
@pytest.mark.parametrize("threaded", [False, True], ids=["sync", "threaded"])
def test_large_blk_transfers_run_on_worker_threads(tmp_path: Path, threaded: bool) -> None:
    image = tmp_path / "d.img"
    image.write_bytes(bytes(8 << 20))
    device = BlkDevice(image, BlkOptions(workers=2, inline_max=4096))
    try:
        with Loopback(device, threaded=threaded) as lb:
            driver = BlkDriver(lb)
            driver.initialize()
            payload = os.urandom(1 << 20)
            requests = [driver.submit_write(i * 2048, payload) for i in range(3)]
            driver.kick(0)
            for request in requests:
                driver.wait(request, 10)
                assert driver.finish(request, "write") == b""
            # Both workers took one; with both busy, the ring's thread copied the third.
            assert device.stats["deferred"] == 2 and device.stats["write"] == 3
            assert driver.read(2048, 1 << 20) == payload
            assert device.stats["deferred"] == 3
            driver.write(0, b"s" * 512)  # small: served inline
            assert device.stats["deferred"] == 3
    finally:
        device.close()
    data = image.read_bytes()
    assert data[:512] == b"s" * 512
    assert all(data[i << 20 : (i + 1) << 20] == payload for i in range(1, 3))
