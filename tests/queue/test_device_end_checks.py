"""The device end checks its own caller: a device model's mistake never reaches the ring."""

from __future__ import annotations

import pytest

from virtio.errors import DeviceModelError
from virtio.queue.mock import BUF_BASE, RingPair, ring_pair

N_IN_ORDER_DEV = "devicenormative:Reserved Feature Bits"
N_USED_DEV = (
    "devicenormative:Basic Facilities of a Virtio Device / Virtqueues / The Virtqueue Used Ring"
)
N_PACKED_DESC_DEV = (
    "devicenormative:Basic Facilities of a Virtio Device / Packed Virtqueues / "
    "The Virtqueue Descriptor Table"
)


def ring_snapshot(pair: RingPair) -> bytes:
    """What the driver can see of the used side.

    A packed ring hands each used descriptor back as it is written, so all of
    it; a split ring publishes nothing beyond its used idx (entries past it
    may hold anything).
    """
    layout = pair.layout
    if layout.packed:
        return pair.memory.read(layout.desc, 16 * layout.size)
    return pair.memory.read(layout.device, 4)


def three_popped(pair: RingPair) -> list:  # type: ignore[type-arg]
    for i in range(3):
        pair.driver.add([], [(BUF_BASE + 64 * i, 16)], i)
    chains = pair.device.pop_many()
    assert [c.write_len for c in chains] == [16, 16, 16]
    return chains


@pytest.mark.normative(N_IN_ORDER_DEV)
@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
def test_in_order_device_pushing_out_of_order_is_refused(packed: bool) -> None:
    pair = ring_pair(8, packed=packed, in_order=True)
    chains = three_popped(pair)
    before = ring_snapshot(pair)
    with pytest.raises(DeviceModelError, match="out of order") as err:
        pair.device.push_many([(chains[1], 4)])
    assert N_IN_ORDER_DEV in str(err.value)
    with pytest.raises(DeviceModelError, match="out of order"):
        pair.device.push_many([(chains[0], 4), (chains[2], 4)])
    assert ring_snapshot(pair) == before, "a refused push wrote to the ring"
    assert pair.driver.get_used() == []
    # In order, the same buffers go through.
    pair.device.push_many([(chains[0], 4), (chains[1], 4)])
    pair.device.push_many([(chains[2], 4)])
    assert sorted(t for t, _ in pair.driver.get_used()) == [0, 1, 2]  # type: ignore[type-var]


@pytest.mark.normative(N_USED_DEV, N_PACKED_DESC_DEV)
@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
def test_written_length_beyond_the_writable_bytes_is_refused(packed: bool) -> None:
    pair = ring_pair(8, packed=packed)
    chains = three_popped(pair)
    before = ring_snapshot(pair)
    with pytest.raises(DeviceModelError, match="17 bytes written") as err:
        pair.device.push_many([(chains[0], 4), (chains[1], 17)])
    assert N_USED_DEV in str(err.value)
    if not packed:
        # The refused element was never stored, not even beyond the used idx.
        elems = pair.memory.read(pair.layout.device + 4, 8 * pair.layout.size)
        lengths = [int.from_bytes(elems[i + 4 : i + 8], "little") for i in range(0, len(elems), 8)]
        assert 17 not in lengths
    with pytest.raises(DeviceModelError):
        pair.device.push_many([(chains[2], -1)])
    assert ring_snapshot(pair) == before
    assert pair.driver.get_used() == []
    pair.device.push_many([(c, 16) for c in chains])
    assert sorted(n for _, n in pair.driver.get_used()) == [16, 16, 16]


@pytest.mark.normative(N_USED_DEV)
@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
def test_a_buffer_pushed_twice_is_refused(packed: bool) -> None:
    pair = ring_pair(8, packed=packed)
    chains = three_popped(pair)
    pair.device.push_many([(chains[0], 1)])
    before = ring_snapshot(pair)
    with pytest.raises(DeviceModelError, match="not in flight"):
        pair.device.push_many([(chains[1], 1), (chains[0], 1)])
    assert ring_snapshot(pair) == before
    assert pair.driver.get_used() == [(0, 1)]
