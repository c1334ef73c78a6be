"""Byte order is a property of the ring: every shared word is stored in the ring's order."""

from __future__ import annotations

import pytest

from virtio.queue import SplitDeviceQueue, SplitDriverQueue
from virtio.queue.common import DESC_F_WRITE, RingLayout
from virtio.queue.mock import BUF_BASE, ring_pair

N_LEGACY_LAYOUT_DRV = "drivernormative:Basic Facilities of a Virtio Device / Virtqueues"
N_USED_DEV = (
    "devicenormative:Basic Facilities of a Virtio Device / Virtqueues / The Virtqueue Used Ring"
)
N_PACKED_DESC_DEV = (
    "devicenormative:Basic Facilities of a Virtio Device / Packed Virtqueues / "
    "The Virtqueue Descriptor Table"
)


def word(data: bytes, order: str) -> int:
    return int.from_bytes(data, order)  # type: ignore[arg-type]


@pytest.mark.normative(N_USED_DEV)
@pytest.mark.parametrize("order", ["little", "big"])
def test_split_ring_words_are_stored_in_the_ring_order(order: str) -> None:
    pair = ring_pair(8, event_idx=True, order=order)  # type: ignore[arg-type]
    memory, layout = pair.memory, pair.layout
    head = pair.driver.add([(BUF_BASE, 16)], [(BUF_BASE + 64, 32)], "t")
    # Descriptor: addr (8), len (4), flags (2), next (2), all in the ring's order.
    desc = memory.read(layout.desc + 16 * head, 16)
    assert word(desc[0:8], order) == BUF_BASE and word(desc[8:12], order) == 16
    nxt = word(desc[14:16], order)
    second = memory.read(layout.desc + 16 * nxt, 16)
    assert word(second[12:14], order) == DESC_F_WRITE and word(second[8:12], order) == 32
    # Available idx and entry.
    assert word(memory.read(layout.driver + 2, 2), order) == 1
    assert word(memory.read(layout.driver + 4, 2), order) == head
    (chain,) = pair.device.pop_many()
    assert chain.read_len == 16 and chain.write_len == 32
    assert pair.device.enable_notifications() is False
    assert word(memory.read(layout.device + 4 + 8 * 8, 2), order) == 1  # avail_event
    pair.device.push_many([(chain, 7)])
    assert word(memory.read(layout.device + 2, 2), order) == 1  # used idx
    assert word(memory.read(layout.device + 4, 4), order) == head  # used id
    assert word(memory.read(layout.device + 8, 4), order) == 7  # used len
    assert pair.driver.get_used() == [("t", 7)]


@pytest.mark.normative(N_PACKED_DESC_DEV)
@pytest.mark.parametrize("order", ["little", "big"])
def test_packed_ring_words_are_stored_in_the_ring_order(order: str) -> None:
    pair = ring_pair(4, packed=True, order=order)  # type: ignore[arg-type]
    memory, layout = pair.memory, pair.layout
    buf_id = pair.driver.add([], [(BUF_BASE, 32)], "t")
    desc = memory.read(layout.desc, 16)
    assert word(desc[0:8], order) == BUF_BASE and word(desc[8:12], order) == 32
    assert word(desc[12:14], order) == buf_id
    assert word(desc[14:16], order) == DESC_F_WRITE | 1 << 7  # WRITE | AVAIL
    (chain,) = pair.device.pop_many()
    pair.device.push_many([(chain, 5)])
    desc = memory.read(layout.desc, 16)
    assert word(desc[8:12], order) == 5
    assert word(desc[14:16], order) == DESC_F_WRITE | 1 << 7 | 1 << 15  # WRITE | AVAIL | USED
    assert pair.driver.get_used() == [("t", 5)]


@pytest.mark.normative(N_USED_DEV)
def test_a_device_end_of_the_wrong_order_sees_garbage_not_buffers() -> None:
    """The order is not guessed: a little-endian reader of a big-endian ring is refused."""
    from virtio.errors import RingError
    from virtio.queue import device_queue

    pair = ring_pair(8, order="big")
    pair.driver.add([], [(BUF_BASE, 8)], "t")
    wrong = device_queue(pair.memory, pair.layout, order="little")
    with pytest.raises(RingError) as err:
        wrong.pop_many()  # avail idx 1 reads as 256: beyond the queue size
    assert err.value.normative is not None and "Available Ring" in err.value.normative


@pytest.mark.normative(N_LEGACY_LAYOUT_DRV)
@pytest.mark.parametrize("size", [1, 8, 128, 256, 1024])
def test_legacy_layout_places_the_used_ring_on_the_queue_align_boundary(size: int) -> None:
    layout = RingLayout.legacy(0x10000, size)
    desc_len, avail_len, used_len = RingLayout.part_sizes(size, False)
    assert layout.desc == 0x10000
    assert layout.driver == 0x10000 + desc_len
    assert layout.device % 4096 == 0
    assert layout.driver + avail_len <= layout.device < layout.driver + avail_len + 4096
    # The spec's formula: ALIGN(16*qsz + 2*(3+qsz)) + ALIGN(2*3 + 8*qsz).
    assert RingLayout.legacy_bytes(size) == (
        -(-(16 * size + 2 * (3 + size)) // 4096) * 4096 + -(-(6 + 8 * size) // 4096) * 4096
    )
    assert layout.device + used_len <= layout.desc + RingLayout.legacy_bytes(size)
    with pytest.raises(ValueError, match="aligned"):
        RingLayout.legacy(0x10800, size)


@pytest.mark.normative(N_LEGACY_LAYOUT_DRV, N_USED_DEV)
def test_legacy_big_endian_ring_round_trip() -> None:
    pair = ring_pair(16, order="big", legacy=True, event_idx=True, indirect=True)
    driver, device = pair.driver, pair.device
    assert isinstance(driver, SplitDriverQueue) and isinstance(device, SplitDeviceQueue)
    for i in range(40):
        driver.add([(pair.buffer(bytes([i]) * 4), 4)], [(BUF_BASE + 0x10000, 8)], i)
        (chain,) = device.pop_many()
        assert chain.read() == bytes([i]) * 4
        device.push_many([(chain, chain.write(b"ok"))])
        assert driver.get_used() == [(i, 2)]
