"""Hostile peers: every malformed ring is reported with the rule it breaks.

Nothing here may crash with anything but RingError, hang, or touch memory
outside the guest.
"""

from __future__ import annotations

import mmap
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.queue.helpers import (
    BUF_BASE,
    make_pair,
    publish,
    put_desc,
    put_packed,
    put_packed_table,
    put_table,
    put_used,
)
from virtio.errors import RingError
from virtio.memory import GuestMemory
from virtio.queue import RingLayout, device_queue
from virtio.queue.common import (
    DESC_F_AVAIL,
    DESC_F_INDIRECT,
    DESC_F_NEXT,
    DESC_F_USED,
    DESC_F_WRITE,
)

N_DESC_TABLE = "drivernormative:Basic Facilities of a Virtio Device / Virtqueues / The Virtqueue Descriptor Table"
N_INDIRECT = (
    "drivernormative:Basic Facilities of a Virtio Device / Virtqueues / "
    "The Virtqueue Descriptor Table / Indirect Descriptors"
)
N_FRAMING = "drivernormative:Basic Facilities of a Virtio Device / Message Framing"
N_AVAIL = "drivernormative:Basic Facilities of a Virtio Device / Virtqueues / The Virtqueue Available Ring"
N_USED_DEV = (
    "devicenormative:Basic Facilities of a Virtio Device / Virtqueues / The Virtqueue Used Ring"
)
N_ALIGN = "drivernormative:Basic Facilities of a Virtio Device / Virtqueues"
N_PACKED_SG = "drivernormative:Basic Facilities of a Virtio Device / Packed Virtqueues / Scatter-Gather Support"
N_PACKED_INDIRECT = (
    "drivernormative:Basic Facilities of a Virtio Device / Packed Virtqueues / "
    "The Virtqueue Descriptor Table / Indirect Descriptors"
)
N_PACKED_DESC_DEV = (
    "devicenormative:Basic Facilities of a Virtio Device / Packed Virtqueues / "
    "The Virtqueue Descriptor Table"
)
B = BUF_BASE


@contextmanager
def expect(normative: str) -> Iterator[pytest.ExceptionInfo[RingError]]:
    """The block must raise RingError citing exactly ``normative``."""
    with pytest.raises(RingError) as err:
        yield err
    assert err.value.normative == normative, str(err.value)


# -- split ring, hostile driver ---------------------------------------------------


@pytest.mark.normative(N_DESC_TABLE)
def test_descriptor_loop() -> None:
    pair = make_pair(4)
    put_desc(pair, 0, B, 8, DESC_F_NEXT, 1)
    put_desc(pair, 1, B, 8, DESC_F_NEXT, 0)
    publish(pair, 0)
    with expect(N_DESC_TABLE):
        pair.device.pop_many()


@pytest.mark.normative(N_DESC_TABLE)
def test_next_outside_the_table() -> None:
    pair = make_pair(4)
    put_desc(pair, 0, B, 8, DESC_F_NEXT, 9)
    publish(pair, 0)
    with expect(N_DESC_TABLE):
        pair.device.pop_many()


@pytest.mark.normative(N_INDIRECT)
def test_indirect_loop_and_nested_and_next() -> None:
    pair = make_pair(4, indirect=True)
    table = B + 0x1000
    put_table(pair, table, [(B, 8, DESC_F_NEXT, 1), (B, 8, DESC_F_NEXT, 0)])
    put_desc(pair, 0, table, 32, DESC_F_INDIRECT)
    publish(pair, 0)
    with expect(N_DESC_TABLE):
        pair.device.pop_many()

    pair = make_pair(4, indirect=True)
    put_table(pair, table, [(table, 16, DESC_F_INDIRECT, 0)])
    put_desc(pair, 0, table, 16, DESC_F_INDIRECT)
    publish(pair, 0)
    with expect(N_INDIRECT):
        pair.device.pop_many()

    pair = make_pair(4, indirect=True)
    put_table(pair, table, [(B, 8, 0, 0)])
    put_desc(pair, 0, table, 16, DESC_F_INDIRECT | DESC_F_NEXT, 1)
    publish(pair, 0)
    with expect(N_INDIRECT):
        pair.device.pop_many()


@pytest.mark.normative(N_INDIRECT)
@pytest.mark.parametrize("length", [0, 15, 24])
def test_malformed_indirect_table_length(length: int) -> None:
    pair = make_pair(4, indirect=True)
    put_desc(pair, 0, B, length, DESC_F_INDIRECT)
    publish(pair, 0)
    with expect(N_INDIRECT):
        pair.device.pop_many()


@pytest.mark.normative(N_INDIRECT)
def test_indirect_without_the_feature() -> None:
    pair = make_pair(4, indirect=False)
    put_table(pair, B, [(B + 64, 8, 0, 0)])
    put_desc(pair, 0, B, 16, DESC_F_INDIRECT)
    publish(pair, 0)
    with expect(N_INDIRECT):
        pair.device.pop_many()


@pytest.mark.normative(
    "devicenormative:Basic Facilities of a Virtio Device / Virtqueues / The Virtqueue Descriptor Table / Indirect Descriptors"
)
def test_chained_descriptors_then_indirect_is_valid() -> None:
    """Zero or more chained descriptors followed by one indirect one is a valid layout."""
    pair = make_pair(4, indirect=True)
    table = B + 0x1000
    pair.memory.write(B, b"head")
    put_table(pair, table, [(B + 16, 4, DESC_F_WRITE, 0)])
    put_desc(pair, 0, B, 4, DESC_F_NEXT, 1)
    # The WRITE flag on the descriptor pointing at the table is ignored.
    put_desc(pair, 1, table, 16, DESC_F_INDIRECT | DESC_F_WRITE)
    publish(pair, 0)
    (chain,) = pair.device.pop_many()
    assert chain.read() == b"head" and chain.write_len == 4 and chain.read_len == 4


@pytest.mark.normative(N_FRAMING)
def test_readable_after_writable() -> None:
    pair = make_pair(4)
    put_desc(pair, 0, B, 8, DESC_F_WRITE | DESC_F_NEXT, 1)
    put_desc(pair, 1, B + 8, 8, 0)
    publish(pair, 0)
    with expect(N_FRAMING):
        pair.device.pop_many()


@pytest.mark.normative(N_DESC_TABLE)
@pytest.mark.parametrize(
    "addr,length", [(1 << 40, 8), (B, 1 << 30), ((1 << 64) - 4, 8), (0xFFFFFFFFFFFF0000, 0x20000)]
)
def test_buffer_outside_guest_memory(addr: int, length: int) -> None:
    pair = make_pair(4)
    put_desc(pair, 0, addr, length, 0)
    publish(pair, 0)
    with expect(N_DESC_TABLE):
        pair.device.pop_many()


@pytest.mark.normative(N_INDIRECT)
def test_indirect_table_outside_guest_memory() -> None:
    pair = make_pair(4, indirect=True)
    put_desc(pair, 0, 1 << 50, 32, DESC_F_INDIRECT)
    publish(pair, 0)
    with expect(N_INDIRECT):
        pair.device.pop_many()


@pytest.mark.normative(N_DESC_TABLE)
def test_chain_of_4_gib_or_more() -> None:
    """Two 2 GiB descriptors: the 32-bit total would overflow."""
    memory = GuestMemory()
    big = mmap.mmap(-1, (1 << 31) + 0x10000)  # sparse: never touched beyond the rings
    memory.add(0, big)
    layout = RingLayout.contiguous(0x1000, 4)
    device = device_queue(memory, layout)
    memory.write(
        layout.desc,
        b"".join(
            [
                (0x10000).to_bytes(8, "little")
                + (1 << 31).to_bytes(4, "little")
                + DESC_F_NEXT.to_bytes(2, "little")
                + (1).to_bytes(2, "little"),
                (0x10000).to_bytes(8, "little") + (1 << 31).to_bytes(4, "little") + bytes(4),
            ]
        ),
    )
    memory.write(layout.driver + 4, bytes(2))
    memory.write(layout.driver + 2, (1).to_bytes(2, "little"))
    with expect(N_DESC_TABLE):
        device.pop_many()


@pytest.mark.normative(N_AVAIL)
def test_available_idx_jumps_past_the_queue() -> None:
    pair = make_pair(4)
    put_desc(pair, 0, B, 8, 0)
    publish(pair, 0, idx=5)
    with expect(N_AVAIL):
        pair.device.pop_many()


@pytest.mark.normative(N_AVAIL)
def test_available_idx_decremented() -> None:
    pair = make_pair(4)
    put_desc(pair, 0, B, 8, 0)
    publish(pair, 0)
    assert len(pair.device.pop_many()) == 1
    publish(pair, idx=0xFFFF)  # one step back: 65535 entries "available"
    with expect(N_AVAIL):
        pair.device.pop_many()


@pytest.mark.normative(N_AVAIL)
def test_head_outside_the_table() -> None:
    pair = make_pair(4)
    publish(pair, 7)
    with expect(N_AVAIL):
        pair.device.pop_many()


@pytest.mark.normative(N_AVAIL)
def test_more_buffers_in_flight_than_the_queue_holds() -> None:
    pair = make_pair(4)
    for i in range(4):
        put_desc(pair, i, B + 16 * i, 8, 0)
    publish(pair, 0, 1, 2, 3)
    assert len(pair.device.pop_many()) == 4
    publish(pair, 0)  # a fifth while four are still in flight
    with expect(N_AVAIL):
        pair.device.pop_many()


@pytest.mark.normative(N_ALIGN)
def test_misaligned_ring_parts() -> None:
    memory = GuestMemory()
    memory.add(0, bytearray(0x10000))
    with expect(N_ALIGN):
        device_queue(memory, RingLayout(4, 0x1008, 0x2000, 0x3000))
    with expect(N_ALIGN):
        device_queue(memory, RingLayout(4, 0x1000, 0x2000, 0x3002))
    with expect(N_ALIGN):
        device_queue(memory, RingLayout(4, 0x1000, 0x2000, 1 << 40))


# -- split ring, hostile device ------------------------------------------------------


@pytest.mark.normative(N_USED_DEV)
def test_used_id_never_made_available() -> None:
    pair = make_pair(4)
    pair.driver.add([(B, 8)], [], "a")
    put_used(pair, 0, 3, 0, 1)
    with expect(N_USED_DEV):
        pair.driver.get_used()


@pytest.mark.normative(N_USED_DEV)
def test_used_len_larger_than_the_buffer() -> None:
    pair = make_pair(4)
    head = pair.driver.add([], [(B, 8)], "a")
    put_used(pair, 0, head, 9, 1)
    with expect(N_USED_DEV):
        pair.driver.get_used()


@pytest.mark.normative(N_USED_DEV)
def test_used_idx_beyond_outstanding() -> None:
    pair = make_pair(4)
    head = pair.driver.add([], [(B, 8)], "a")
    put_used(pair, 0, head, 8, 3)
    with expect(N_USED_DEV):
        pair.driver.get_used()


@pytest.mark.normative(N_USED_DEV)
def test_used_twice() -> None:
    pair = make_pair(4)
    head = pair.driver.add([], [(B, 8)], "a")
    pair.driver.add([], [(B + 8, 8)], "b")
    put_used(pair, 0, head, 8, 1)
    assert pair.driver.get_used() == [("a", 8)]
    put_used(pair, 1, head, 8, 2)  # the same id again
    with expect(N_USED_DEV):
        pair.driver.get_used()


# -- packed ring ---------------------------------------------------------------------------

AVAIL1 = DESC_F_AVAIL  # available in the first lap (wrap counter 1)


@pytest.mark.normative(N_PACKED_SG)
def test_packed_chain_not_fully_available() -> None:
    pair = make_pair(4, packed=True)
    put_packed(pair, 0, B, 8, 0, AVAIL1 | DESC_F_NEXT)
    # Slot 1 still holds zero flags: not available.
    with expect(N_PACKED_SG):
        pair.device.pop_many()


@pytest.mark.normative(N_PACKED_SG)
def test_packed_chain_longer_than_the_ring() -> None:
    pair = make_pair(4, packed=True)
    for pos in range(4):
        put_packed(pair, pos, B, 8, 0, AVAIL1 | DESC_F_NEXT)
    with expect(N_PACKED_SG) as err:
        pair.device.pop_many()
    assert "longer than the queue" in str(err.value)


@pytest.mark.normative(N_PACKED_INDIRECT)
def test_packed_indirect_rules() -> None:
    table = B + 0x1000
    pair = make_pair(4, packed=True, indirect=True)
    put_packed_table(pair, table, [(B, 8, 0, DESC_F_NEXT)])  # flags other than WRITE
    put_packed(pair, 0, table, 16, 0, AVAIL1 | DESC_F_INDIRECT)
    with expect(N_PACKED_INDIRECT):
        pair.device.pop_many()

    pair = make_pair(4, packed=True, indirect=True)
    put_packed(pair, 0, B, 8, 0, AVAIL1 | DESC_F_NEXT)
    put_packed(pair, 1, table, 16, 0, AVAIL1 | DESC_F_INDIRECT)  # inside a NEXT list
    with expect(N_PACKED_INDIRECT):
        pair.device.pop_many()

    pair = make_pair(4, packed=True, indirect=False)
    put_packed(pair, 0, table, 16, 0, AVAIL1 | DESC_F_INDIRECT)
    with expect(N_PACKED_INDIRECT):
        pair.device.pop_many()

    pair = make_pair(4, packed=True, indirect=True)
    put_packed(pair, 0, table, 20, 0, AVAIL1 | DESC_F_INDIRECT)
    with expect(N_PACKED_INDIRECT):
        pair.device.pop_many()


@pytest.mark.normative(N_PACKED_DESC_DEV)
def test_packed_buffer_outside_memory() -> None:
    pair = make_pair(4, packed=True)
    put_packed(pair, 0, 1 << 45, 8, 0, AVAIL1)
    with expect(N_PACKED_DESC_DEV):
        pair.device.pop_many()


@pytest.mark.normative(N_PACKED_DESC_DEV)
def test_packed_device_writes_unknown_id_or_long_len() -> None:
    pair = make_pair(4, packed=True)
    pair.driver.add([], [(B, 8)], "a")
    put_packed(pair, 0, 0, 0, 3, DESC_F_AVAIL | DESC_F_USED)
    with expect(N_PACKED_DESC_DEV):
        pair.driver.get_used()

    pair = make_pair(4, packed=True)
    buf_id = pair.driver.add([], [(B, 8)], "a")
    put_packed(pair, 0, 0, 64, buf_id, DESC_F_AVAIL | DESC_F_USED | DESC_F_WRITE)
    with expect(N_PACKED_DESC_DEV):
        pair.driver.get_used()


# -- fuzz: arbitrary ring contents ------------------------------------------------------------


def _check_views_inside(pair_memory: GuestMemory, chains: list[object]) -> None:
    region = pair_memory.regions[0]
    base = memoryview(region.view)
    for chain in chains:
        for view in (*chain.readable, *chain.writable):  # type: ignore[attr-defined]
            assert view.obj is base.obj  # a slice of guest memory, nothing else


@pytest.mark.normative(N_DESC_TABLE, N_INDIRECT, N_FRAMING, N_AVAIL, N_PACKED_SG)
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    packed=st.booleans(),
    indirect=st.booleans(),
    size=st.sampled_from([1, 2, 4, 8]),
    ring_bytes=st.binary(min_size=0, max_size=400),
    table_bytes=st.binary(min_size=0, max_size=128),
)
def test_arbitrary_ring_contents_never_crash(
    packed: bool, indirect: bool, size: int, ring_bytes: bytes, table_bytes: bytes
) -> None:
    pair = make_pair(size, packed=packed, indirect=indirect)
    # Scribble over the whole driver-written area and a would-be indirect table.
    start = pair.layout.desc
    end = pair.layout.driver + (4 if packed else 6 + 2 * size)
    pair.memory.write(
        start,
        (ring_bytes * ((end - start) // max(1, len(ring_bytes)) + 1))[: end - start]
        if ring_bytes
        else bytes(end - start),
    )
    pair.memory.write(B, table_bytes)
    for _ in range(3):
        try:
            chains = pair.device.pop_many()
        except RingError as err:
            assert err.normative
            return
        _check_views_inside(pair.memory, list(chains))
        for chain in chains:
            pair.device.push_many([(chain, 0)])
