"""Structure layouts: the spec's "Structure Specifications" rules."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from virtio.layout import Bits, Bytes, Layout, be16, be32, le16, le32, le64, u8


def test_spec_bitfield_example_round_trips() -> None:
    """`be16 { A:15; B:1 } x; be16 y;` stores B<<15|A big-endian, then y big-endian."""
    s = Layout("S", [("x", Bits(be16, [("A", 15), ("B", 1)])), ("y", be16)])
    assert s.size == 4
    packed = s.pack(A=0x1234, B=1, y=0xBEEF)
    assert packed == struct.pack(">HH", 1 << 15 | 0x1234, 0xBEEF)
    fields = s.unpack(packed)
    assert fields["A"] == 0x1234 and fields["B"] == 1 and fields["y"] == 0xBEEF
    assert fields["x"] == 0x9234


@given(a=st.integers(0, (1 << 15) - 1), b=st.integers(0, 1), y=st.integers(0, 0xFFFF))
def test_bitfields_round_trip(a: int, b: int, y: int) -> None:
    s = Layout("S", [("x", Bits(be16, [("A", 15), ("B", 1)])), ("y", be16)])
    out = s.unpack(s.pack(A=a, B=b, y=y))
    assert (out["A"], out["B"], out["y"]) == (a, b, y)


def test_no_padding_and_offsets() -> None:
    layout = Layout("t", [("a", u8), ("b", le64), ("c", le16), ("d", Bytes(3)), ("e", le32)])
    assert layout.size == 1 + 8 + 2 + 3 + 4
    assert [layout.offset_of(n) for n in "abcde"] == [0, 1, 9, 11, 14]


def test_mixed_byte_orders() -> None:
    layout = Layout("m", [("le", le32), ("be", be32), ("b", u8)])
    data = layout.pack(le=0x01020304, be=0x01020304, b=7)
    assert data == bytes([4, 3, 2, 1, 1, 2, 3, 4, 7])
    assert layout.unpack(data) == {"le": 0x01020304, "be": 0x01020304, "b": 7}
    assert layout.unpack_raw(data) == (0x01020304, 0x01020304, 7)


def test_values_that_do_not_fit_are_refused() -> None:
    layout = Layout("v", [("x", Bits(le16, [("lo", 4), ("hi", 12)])), ("n", u8), ("s", Bytes(2))])
    with pytest.raises(ValueError):
        layout.pack(lo=16)
    with pytest.raises(ValueError):
        layout.pack(n=256)
    with pytest.raises(ValueError):
        layout.pack(s=b"abc")
    with pytest.raises(ValueError):
        layout.pack(nope=1)
    with pytest.raises(ValueError):
        Layout("w", [("x", Bits(u8, [("a", 5), ("b", 4)]))])
    with pytest.raises(ValueError):
        Layout("dup", [("a", u8), ("a", u8)])
    with pytest.raises(ValueError):
        layout.unpack(b"\0")


def test_pack_into_and_unpack_at_offset() -> None:
    layout = Layout("p", [("a", le16), ("b", le16)])
    buf = bytearray(8)
    layout.pack_into(buf, 3, a=0x1122, b=0x3344)
    assert buf == bytearray([0, 0, 0, 0x22, 0x11, 0x44, 0x33, 0])
    assert layout.unpack(buf, 3) == {"a": 0x1122, "b": 0x3344}
