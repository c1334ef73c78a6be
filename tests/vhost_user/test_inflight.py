"""Inflight tracking survives a back-end restart: nothing taken is lost, nothing is doubled."""

from __future__ import annotations

import pytest

from tests.queue.helpers import BUF_BASE, make_pair
from virtio.queue import SplitDeviceQueue, device_queue
from virtio.vhost_user.inflight import InflightSplit, queue_region_size

N_USED_DEV = (
    "devicenormative:Basic Facilities of a Virtio Device / Virtqueues / The Virtqueue Used Ring"
)


@pytest.mark.normative(N_USED_DEV)
@pytest.mark.parametrize("crash_mid_batch", [False, True])
def test_restarted_backend_resubmits_in_flight_buffers(crash_mid_batch: bool) -> None:
    pair = make_pair(8)
    region = memoryview(bytearray(queue_region_size(8)))
    device = pair.device
    assert isinstance(device, SplitDeviceQueue)
    tracker = InflightSplit(region, 8)
    assert tracker.resume(device) == []
    for i in range(6):
        pair.driver.add([], [(BUF_BASE + 64 * i, 4)], i)
    chains = device.pop_many()
    assert len(chains) == 6
    # Complete two, out of order.
    device.push_many([(chains[3], 4), (chains[1], 4)])
    if crash_mid_batch:
        # The used idx moved but the process died before clearing the flags.
        tracker.completing([chains[4].head])
        used = device.used_idx + 1
        device.ring.used[4 + 8 * (device.used_idx % 8) : 12 + 8 * (device.used_idx % 8)] = chains[
            4
        ].head.to_bytes(4, "little") + (4).to_bytes(4, "little")
        device.ring.used[2:4] = used.to_bytes(2, "little")
    # The back-end dies: a new queue object over the same memory and record.
    fresh = device_queue(pair.memory, pair.layout)
    assert isinstance(fresh, SplitDeviceQueue)
    again = InflightSplit(region, 8).resume(fresh)
    expected = [c.head for c in chains if c not in (chains[1], chains[3])]
    if crash_mid_batch:
        expected.remove(chains[4].head)
    assert [c.head for c in again] == expected
    fresh.push_many([(c, 4) for c in again])
    tokens = sorted(int(str(t)) for t, _ in pair.driver.get_used())
    assert tokens == list(range(6))
    # New buffers continue after the ones already taken.
    pair.driver.add([], [(BUF_BASE, 4)], 99)
    (nxt,) = fresh.pop_many()
    fresh.push_many([(nxt, 4)])
    assert pair.driver.get_used() == [(99, 4)]


@pytest.mark.normative(
    "devicenormative:Basic Facilities of a Virtio Device / Packed Virtqueues",
    "devicenormative:Basic Facilities of a Virtio Device / Packed Virtqueues / Scatter-Gather Support",
)
@pytest.mark.parametrize("indirect", [False, True])
@pytest.mark.parametrize("crash_mid_batch", [False, True])
def test_packed_restart_resubmits_in_flight_buffers(indirect: bool, crash_mid_batch: bool) -> None:
    from virtio.queue import PackedDeviceQueue
    from virtio.vhost_user.inflight import InflightPacked, packed_region_size

    pair = make_pair(8, packed=True, indirect=indirect)
    region = memoryview(bytearray(packed_region_size(8)))
    device = pair.device
    assert isinstance(device, PackedDeviceQueue)
    assert InflightPacked(region, 8).resume(device) == []
    tracker = device.tracker
    # Go round the ring once so positions and wrap counters are not trivial.
    for i in range(5):
        pair.driver.add([], [(BUF_BASE, 4)], 100 + i)
        (chain,) = device.pop_many()
        device.push_many([(chain, 4)])
        pair.driver.get_used()
    chains = []
    for i in range(3):
        # Two segments each: a chain of two slots, or one indirect table.
        pair.driver.add([(BUF_BASE + 64 * i, 8)], [(BUF_BASE + 512 + 64 * i, 4)], i)
        chains.extend(device.pop_many())
    assert len(chains) == 3
    device.push_many([(chains[1], 4)])  # one completes, out of order
    if crash_mid_batch:
        # The next batch's record is updated, then the process dies before the ring is.
        assert tracker is not None
        tracker.completing([chains[2].head], device.next_used, device.used_wrap)
    fresh = device_queue(pair.memory, pair.layout, indirect=indirect)
    assert isinstance(fresh, PackedDeviceQueue)
    again = InflightPacked(region, 8).resume(fresh)
    assert [c.head for c in again] == [chains[0].head, chains[2].head]
    assert [c.read() for c in again] == [chains[0].read(), chains[2].read()]
    fresh.push_many([(c, 4) for c in again])
    done = sorted(int(str(t)) for t, _ in pair.driver.get_used())
    assert done == [0, 1, 2]
    pair.driver.add([], [(BUF_BASE, 4)], 99)
    (nxt,) = fresh.pop_many()
    fresh.push_many([(nxt, 4)])
    assert pair.driver.get_used() == [(99, 4)]


def test_packed_restart_after_the_ring_was_written_but_not_the_record() -> None:
    from virtio.queue import PackedDeviceQueue
    from virtio.vhost_user.inflight import InflightPacked, packed_region_size

    pair = make_pair(8, packed=True)
    region = memoryview(bytearray(packed_region_size(8)))
    device = pair.device
    assert isinstance(device, PackedDeviceQueue)
    tracker = InflightPacked(region, 8)
    tracker.resume(device)
    for i in range(2):
        pair.driver.add([(BUF_BASE + 64 * i, 8)], [(BUF_BASE + 512 + 64 * i, 4)], i)
    chains = device.pop_many()
    tracker.completed = lambda: None  # type: ignore[method-assign]  # dies before committing
    device.push_many([(chains[1], 4)])
    fresh = device_queue(pair.memory, pair.layout)
    assert isinstance(fresh, PackedDeviceQueue)
    again = InflightPacked(region, 8).resume(fresh)
    assert [c.head for c in again] == [chains[0].head]  # the used one is not served twice
    fresh.push_many([(c, 4) for c in again])
    assert sorted(int(str(t)) for t, _ in pair.driver.get_used()) == [0, 1]
