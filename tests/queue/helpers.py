"""Shared set-up for ring tests: the public harness ``virtio.queue.mock``, as functions."""

from __future__ import annotations

from virtio.queue.mock import BUF_BASE, MEM_SIZE, RING_BASE, RingPair, ring_pair

Pair = RingPair
make_pair = ring_pair

__all__ = ["BUF_BASE", "MEM_SIZE", "RING_BASE", "Pair", "make_pair"]


def put_desc(pair: Pair, index: int, addr: int, length: int, flags: int, nxt: int = 0) -> None:
    pair.put_desc(index, addr, length, flags, nxt)


def put_table(pair: Pair, addr: int, entries: list[tuple[int, int, int, int]]) -> None:
    pair.put_table(addr, entries)


def publish(pair: Pair, *heads: int, idx: int | None = None) -> None:
    pair.publish(*heads, idx=idx)


def put_used(pair: Pair, slot: int, elem_id: int, length: int, idx: int) -> None:
    pair.put_used(slot, elem_id, length, idx)


def put_packed(pair: Pair, pos: int, addr: int, length: int, buf_id: int, flags: int) -> None:
    pair.put_packed(pos, addr, length, buf_id, flags)


def put_packed_table(pair: Pair, addr: int, entries: list[tuple[int, int, int, int]]) -> None:
    pair.put_packed_table(addr, entries)
