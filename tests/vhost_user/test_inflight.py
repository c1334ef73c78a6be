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
