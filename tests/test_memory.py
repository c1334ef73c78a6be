"""Guest memory: bounds-checked views, scatter-gather, IOMMU translation, allocation."""

from __future__ import annotations

import os

import pytest
from hypothesis import given
from hypothesis import strategies as st

from virtio.errors import GuestMemoryError
from virtio.memory import Allocator, GuestMemory, PageTable, TranslatedMemory


def two_regions() -> GuestMemory:
    memory = GuestMemory()
    memory.add(0x1000, bytearray(0x1000))
    memory.add(0x2000, bytearray(0x1000))  # adjacent: a range may span both
    memory.add(0x10000, bytearray(0x100))
    return memory


def test_views_are_zero_copy() -> None:
    backing = bytearray(0x1000)
    memory = GuestMemory()
    memory.add(0x4000, backing)
    view = memory.view(0x4010, 4)
    view[:] = b"abcd"
    assert backing[0x10:0x14] == b"abcd"


def test_out_of_bounds_is_an_error_not_a_read() -> None:
    memory = two_regions()
    for addr, length in [(0, 1), (0xFFF, 2), (0x3000, 1), (0x100FF, 2), (1 << 63, 8)]:
        with pytest.raises(GuestMemoryError):
            memory.iovecs(addr, length)
    # A view must lie in one region even when the regions are adjacent.
    with pytest.raises(GuestMemoryError):
        memory.view(0x1FFF, 2)
    with pytest.raises(GuestMemoryError):
        memory.view(0x1000, -1)


def test_scatter_gather_across_regions() -> None:
    memory = two_regions()
    memory.write(0x1FFE, b"wxyz")
    assert memory.read(0x1FFE, 4) == b"wxyz"
    assert [v.nbytes for v in memory.iovecs(0x1FFE, 4)] == [2, 2]


def test_overlapping_and_empty_regions_are_refused() -> None:
    memory = two_regions()
    with pytest.raises(GuestMemoryError):
        memory.add(0x1800, bytearray(0x1000))
    with pytest.raises(GuestMemoryError):
        memory.add(0x8000, bytearray(0))
    with pytest.raises(GuestMemoryError):
        memory.add(0x8000, b"read-only")  # type: ignore[arg-type]


def test_remove_region() -> None:
    memory = two_regions()
    memory.view(0x10000, 4)
    memory.remove(0x10000)
    with pytest.raises(GuestMemoryError):
        memory.view(0x10000, 4)
    with pytest.raises(GuestMemoryError):
        memory.remove(0x10000)


def test_memfd_region_is_shared_memory() -> None:
    memory = GuestMemory()
    region, fd = memory.add_memfd(0, 1 << 16)
    try:
        memory.write(0x100, b"shared")
        assert os.pread(fd, 6, 0x100) == b"shared"
        assert region.size == 1 << 16
    finally:
        os.close(fd)


def test_iommu_translation() -> None:
    memory = GuestMemory()
    memory.add(0, bytearray(0x10000))
    table = PageTable()
    table.map(0x1_0000_0000, 0x3000, 0x2000)
    table.map(0x1_0000_2000, 0x8000, 0x1000)  # not contiguous in guest memory
    iova = TranslatedMemory(memory, table)
    iova.write(0x1_0000_0FFE, b"ab")
    assert memory.read(0x3FFE, 2) == b"ab"
    iova.write(0x1_0000_1FFF, b"cd")
    assert memory.read(0x4FFF, 1) == b"c" and memory.read(0x8000, 1) == b"d"
    with pytest.raises(GuestMemoryError):
        iova.view(0x1_0000_1FFF, 2)  # spans two guest ranges
    with pytest.raises(GuestMemoryError):
        iova.read(0x2_0000_0000, 1)  # not mapped
    table.unmap(0x1_0000_0000, 0x1000)
    with pytest.raises(GuestMemoryError):
        iova.read(0x1_0000_0000, 1)


@given(st.lists(st.tuples(st.integers(1, 300), st.sampled_from([1, 8, 16, 4096])), max_size=40))
def test_allocator_never_overlaps(requests: list[tuple[int, int]]) -> None:
    alloc = Allocator(0x1000, 1 << 20)
    live: list[tuple[int, int]] = []
    for i, (size, align) in enumerate(requests):
        addr = alloc.alloc(size, align)
        assert addr % align == 0 and addr >= 0x1000 and addr + size <= 0x1000 + (1 << 20)
        for other, n in live:
            assert addr + size <= other or other + n <= addr
        live.append((addr, size))
        if i % 3 == 2:
            alloc.free(live.pop(0)[0])
    for addr, _ in live:
        alloc.free(addr)
    assert alloc.bytes_free == 1 << 20
    assert alloc.alloc(1 << 20, 1) == 0x1000  # fully merged again
