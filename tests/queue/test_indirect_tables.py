"""Indirect tables read in whole-table steps give what the one-descriptor walk gives.

The split ring's device end first tries a long indirect table (8 descriptors
or more) in whole-table steps and makes one view of descriptors that continue
each other; for any other table it walks one descriptor at a time. Whatever a
driver puts in the table, both must agree: the same bytes, lengths and order
of the chain, or the same error naming the same normative id.
"""

from __future__ import annotations

import os

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.queue.helpers import BUF_BASE, MEM_SIZE, make_pair
from virtio.errors import RingError
from virtio.queue import Chain, split
from virtio.queue.common import DESC_F_INDIRECT, DESC_F_NEXT, DESC_F_WRITE

N_INDIRECT_DEV = (
    "devicenormative:Basic Facilities of a Virtio Device / Virtqueues / "
    "The Virtqueue Descriptor Table / Indirect Descriptors"
)
N_FRAMING_DEV = "devicenormative:Basic Facilities of a Virtio Device / Message Framing"

TABLE = BUF_BASE
DATA = BUF_BASE + 0x10000
PAGE = 4096

Entry = tuple[int, int, int, int]


@st.composite
def tables(draw: st.DrawFn) -> tuple[list[Entry], list[tuple[int, int, int]]]:
    """An indirect table (mostly well formed, often contiguous) and direct descriptors before it."""
    n = draw(st.integers(1, 40))
    readable = draw(st.integers(0, n))
    addr = DATA + draw(st.integers(0, 64)) * PAGE
    entries: list[Entry] = []
    for i in range(n):
        length = draw(st.sampled_from([PAGE, PAGE, PAGE, 512, 0, 1, 3 * PAGE]))
        where = draw(st.sampled_from(["next"] * 6 + ["gap", "back"]))
        if draw(st.integers(0, 40)) == 0:
            where = "outside"
        if where == "gap":
            addr += PAGE
        elif where == "back":
            addr = DATA
        elif where == "outside":
            addr = MEM_SIZE - 16
        flags = (DESC_F_NEXT if i < n - 1 else 0) | (DESC_F_WRITE if i >= readable else 0)
        nxt = i + 1
        if draw(st.integers(0, 30)) == 0:  # now and then a driver's mistake
            mistake = draw(st.sampled_from(["flags", "next", "indirect", "readable"]))
            if mistake == "flags":
                flags ^= draw(st.sampled_from([DESC_F_NEXT, DESC_F_WRITE]))
            elif mistake == "next":
                nxt = draw(st.integers(0, n + 2))
            elif mistake == "indirect":
                flags |= DESC_F_INDIRECT
            else:
                flags &= ~DESC_F_WRITE
        entries.append((addr, length, flags, nxt))
        if where != "outside":
            addr += length
    direct = draw(
        st.lists(
            st.tuples(
                st.integers(0, 8).map(lambda k: DATA + 0x80000 + k * PAGE),
                st.sampled_from([16, PAGE]),
                st.sampled_from([0, DESC_F_WRITE]),
            ),
            max_size=2,
        )
    )
    return entries, direct


def pop(
    entries: list[Entry], direct: list[tuple[int, int, int]], whole: bool, noise: bytes
) -> object:
    """What the device end makes of the chain: (bytes read, bytes writable, lengths) or the error."""
    pair = make_pair(8, indirect=True)
    pair.memory.write(DATA, noise)  # every address holds its own bytes
    pair.put_table(TABLE, entries)
    for i, (addr, length, flags) in enumerate(direct):
        pair.put_desc(i, addr, length, flags | DESC_F_NEXT, i + 1)
    pair.put_desc(len(direct), TABLE, 16 * len(entries), DESC_F_INDIRECT)
    pair.publish(0)
    saved = split._WHOLE_TABLE_MIN
    split._WHOLE_TABLE_MIN = 1 if whole else 1 << 30
    try:
        (chain,) = pair.device.pop_many()
    except RingError as err:
        return ("error", err.normative)
    finally:
        split._WHOLE_TABLE_MIN = saved
    assert isinstance(chain, Chain)
    written = b"".join(bytes(v) for v in chain.writable)
    return (chain.read(), written, chain.read_len, chain.write_len, len(chain.readable) > 0)


@pytest.mark.normative(N_INDIRECT_DEV, N_FRAMING_DEV)
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(tables())
def test_whole_table_steps_agree_with_the_walk(
    table: tuple[list[Entry], list[tuple[int, int, int]]],
) -> None:
    entries, direct = table
    noise = os.urandom(0x100000)
    assert pop(entries, direct, True, noise) == pop(entries, direct, False, noise)


@pytest.mark.normative(N_INDIRECT_DEV)
def test_contiguous_descriptors_become_one_view() -> None:
    pair = make_pair(8, indirect=True)
    n = 64
    entries = [
        (DATA + i * PAGE, PAGE, (DESC_F_NEXT if i < n - 1 else 0) | (DESC_F_WRITE if i >= 2 else 0), i + 1)
        for i in range(n)
    ]  # fmt: skip
    pair.put_table(TABLE, entries)
    pair.put_desc(0, TABLE, 16 * n, DESC_F_INDIRECT)
    pair.publish(0)
    (chain,) = pair.device.pop_many()
    # Two readable pages, then 62 writable ones: one view each side, the lengths intact.
    assert [v.nbytes for v in chain.readable] == [2 * PAGE]
    assert [v.nbytes for v in chain.writable] == [(n - 2) * PAGE]
    assert (chain.read_len, chain.write_len) == (2 * PAGE, (n - 2) * PAGE)
