"""Wire structure layouts, as the spec's "Structure Specifications" write them.

A :class:`Layout` is declared once per wire structure and compiled to a single
precompiled :class:`struct.Struct`, so packing and unpacking cost one C call.
Fields follow the spec's types: ``u8``..``u64`` (native byte order of the
guest, which pyvirtio takes to be little-endian), ``le16``..``le64``,
``be16``..``be64`` and byte arrays. There is never padding between fields.

Structures that a legacy interface uses in the guest's native byte order
(rings, configuration spaces, device headers) are declared once, as the
modern spec writes them, and :meth:`Layout.with_order` gives the same
structure compiled for the other byte order (cached: one precompiled
``struct.Struct`` per order).

Bit-fields subdivide an integer field and are listed from the least
significant bit up, exactly as the spec lists them::

    S = Layout("S", [("x", Bits(be16, [("A", 15), ("B", 1)])), ("y", be16)])
    S.pack(A=1, B=1, y=2) == (0x8001).to_bytes(2, "big") + (2).to_bytes(2, "big")

Hot paths that do not need names use ``layout.struct`` directly: its
``unpack_from`` gives the raw integer of every top-level field in order.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

ByteOrder = Literal["little", "big"]


@dataclass(frozen=True)
class Scalar:
    """An unsigned integer field of ``size`` bytes in ``order`` byte order."""

    name: str
    size: int
    order: ByteOrder
    code: str  # struct format character for this size

    @property
    def bits(self) -> int:
        return self.size * 8


u8 = Scalar("u8", 1, "little", "B")
u16 = Scalar("u16", 2, "little", "H")
u32 = Scalar("u32", 4, "little", "I")
u64 = Scalar("u64", 8, "little", "Q")
le16 = Scalar("le16", 2, "little", "H")
le32 = Scalar("le32", 4, "little", "I")
le64 = Scalar("le64", 8, "little", "Q")
be16 = Scalar("be16", 2, "big", "H")
be32 = Scalar("be32", 4, "big", "I")
be64 = Scalar("be64", 8, "big", "Q")


@dataclass(frozen=True)
class Bytes:
    """A fixed-size byte array field (``u8 name[size]``)."""

    size: int


@dataclass(frozen=True)
class Bits:
    """Bit-fields inside one integer field, least significant first."""

    base: Scalar
    parts: Sequence[tuple[str, int]]

    def __post_init__(self) -> None:
        total = sum(width for _, width in self.parts)
        if total > self.base.bits:
            raise ValueError(f"bit-fields need {total} bits, {self.base.name} has {self.base.bits}")
        for name, width in self.parts:
            if width <= 0:
                raise ValueError(f"bit-field {name} has width {width}")

    def compose(self, values: Mapping[str, int]) -> int:
        word = 0
        shift = 0
        for name, width in self.parts:
            value = values.get(name, 0)
            if not 0 <= value < (1 << width):
                raise ValueError(f"bit-field {name}={value} does not fit in {width} bits")
            word |= value << shift
            shift += width
        return word

    def split(self, word: int) -> dict[str, int]:
        out: dict[str, int] = {}
        shift = 0
        for name, width in self.parts:
            out[name] = (word >> shift) & ((1 << width) - 1)
            shift += width
        return out


FieldType = Scalar | Bytes | Bits


def _scalar_of(ftype: FieldType) -> Scalar | Bytes:
    return ftype.base if isinstance(ftype, Bits) else ftype


def _reorder(ftype: FieldType, order: ByteOrder) -> FieldType:
    if isinstance(ftype, Bits):
        base = _reorder(ftype.base, order)
        assert isinstance(base, Scalar)
        return Bits(base, ftype.parts)
    if isinstance(ftype, Scalar) and ftype.size > 1 and ftype.order != order:
        return Scalar(ftype.name, ftype.size, order, ftype.code)
    return ftype


def _swap(value: int, size: int) -> int:
    return int.from_bytes(value.to_bytes(size, "little"), "big")


class Layout:
    """A packed wire structure: named fields at fixed offsets, no padding."""

    def __init__(self, name: str, fields: Sequence[tuple[str, FieldType]]) -> None:
        self.name = name
        self.fields: tuple[tuple[str, FieldType], ...] = tuple(fields)
        orders: set[ByteOrder] = set()
        codes: list[str] = []
        self.offsets: dict[str, int] = {}
        offset = 0
        seen: set[str] = set()
        for field_name, ftype in self.fields:
            scalar = ftype.base if isinstance(ftype, Bits) else ftype
            names = (
                [field_name, *(p for p, _ in ftype.parts)]
                if isinstance(ftype, Bits)
                else [field_name]
            )
            for n in names:
                if n in seen:
                    raise ValueError(f"{name}: duplicate field {n}")
                seen.add(n)
            self.offsets[field_name] = offset
            if isinstance(scalar, Bytes):
                codes.append(f"{scalar.size}s")
                offset += scalar.size
            else:
                if scalar.size > 1:
                    orders.add(scalar.order)
                codes.append(scalar.code)
                offset += scalar.size
        # One byte order for the whole struct when the fields agree (the usual
        # case); a mixed structure is compiled little-endian and its big-endian
        # fields are swapped after the fact.
        self.order: ByteOrder = "big" if orders == {"big"} else "little"
        self._swaps: tuple[tuple[int, int], ...] = ()
        if len(orders) > 1:
            swaps = []
            for index, (_, ftype) in enumerate(self.fields):
                scalar = ftype.base if isinstance(ftype, Bits) else ftype
                if isinstance(scalar, Scalar) and scalar.order == "big" and scalar.size > 1:
                    swaps.append((index, scalar.size))
            self._swaps = tuple(swaps)
        prefix = ">" if self.order == "big" else "<"
        self.struct = struct.Struct(prefix + "".join(codes))
        self.size = self.struct.size
        assert self.size == offset
        self._by_order: dict[ByteOrder, Layout] = {}

    def __repr__(self) -> str:
        return f"Layout({self.name!r}, size={self.size})"

    def with_order(self, order: ByteOrder) -> Layout:
        """The same structure with every multi-byte integer field in ``order``.

        A legacy interface uses the guest's native byte order where the modern
        interface is little-endian; this is that structure, compiled once.
        """
        if all(
            not isinstance(s := _scalar_of(t), Scalar) or s.size == 1 or s.order == order
            for _, t in self.fields
        ):
            return self
        cached = self._by_order.get(order)
        if cached is None:
            cached = Layout(
                f"{self.name} ({order}-endian)",
                [(name, _reorder(ftype, order)) for name, ftype in self.fields],
            )
            self._by_order[order] = cached
        return cached

    # -- raw access: one integer (or bytes) per top-level field ----------------

    def unpack_raw(
        self, buf: bytes | bytearray | memoryview, offset: int = 0
    ) -> tuple[int | bytes, ...]:
        values = self.struct.unpack_from(buf, offset)
        if self._swaps:
            items = list(values)
            for index, size in self._swaps:
                items[index] = _swap(items[index], size)
            return tuple(items)
        return tuple(values)

    def pack_raw(self, *values: int | bytes) -> bytes:
        if self._swaps:
            items = list(values)
            for index, size in self._swaps:
                value = items[index]
                assert isinstance(value, int)
                items[index] = _swap(value, size)
            return self.struct.pack(*items)
        return self.struct.pack(*values)

    # -- named access ----------------------------------------------------------

    def unpack(
        self, buf: bytes | bytearray | memoryview, offset: int = 0
    ) -> dict[str, int | bytes]:
        """Decode into a dict of field names (bit-field parts by their own names)."""
        if len(buf) - offset < self.size:
            raise ValueError(
                f"{self.name}: need {self.size} bytes at {offset}, have {len(buf) - offset}"
            )
        out: dict[str, int | bytes] = {}
        for (field_name, ftype), value in zip(
            self.fields, self.unpack_raw(buf, offset), strict=True
        ):
            out[field_name] = value
            if isinstance(ftype, Bits):
                assert isinstance(value, int)
                out.update(ftype.split(value))
        return out

    def _raw_values(self, values: Mapping[str, int | bytes]) -> list[int | bytes]:
        known = set(self.offsets)
        for _, ftype in self.fields:
            if isinstance(ftype, Bits):
                known.update(p for p, _ in ftype.parts)
        unknown = set(values) - known
        if unknown:
            raise ValueError(f"{self.name}: unknown fields {sorted(unknown)}")
        raw: list[int | bytes] = []
        for field_name, ftype in self.fields:
            if isinstance(ftype, Bits):
                if field_name in values:
                    word = values[field_name]
                else:
                    parts = {p: v for p, _ in ftype.parts if isinstance(v := values.get(p, 0), int)}
                    word = ftype.compose(parts)
                raw.append(word)
            elif isinstance(ftype, Bytes):
                data = values.get(field_name, b"")
                if not isinstance(data, bytes | bytearray | memoryview):
                    raise ValueError(f"{self.name}.{field_name} is a byte array")
                if len(data) > ftype.size:
                    raise ValueError(f"{self.name}.{field_name}: {len(data)} bytes > {ftype.size}")
                raw.append(bytes(data).ljust(ftype.size, b"\0"))
            else:
                value = values.get(field_name, 0)
                if not isinstance(value, int) or not 0 <= value < (1 << ftype.bits):
                    raise ValueError(f"{self.name}.{field_name}={value!r} is not a {ftype.name}")
                raw.append(value)
        return raw

    def pack(self, **values: int | bytes) -> bytes:
        """Encode from field names; missing fields are zero."""
        return self.pack_raw(*self._raw_values(values))

    def pack_into(self, buf: bytearray | memoryview, offset: int, **values: int | bytes) -> None:
        buf[offset : offset + self.size] = self.pack(**values)

    def offset_of(self, field_name: str) -> int:
        return self.offsets[field_name]
