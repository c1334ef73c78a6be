"""The normative blocks of the spec (data/normative.json), loaded on first use."""

from __future__ import annotations

import functools
from dataclasses import dataclass

from virtio.spec.data_files import normative_blocks


@dataclass(frozen=True)
class NormativeBlock:
    id: str
    kind: str  # "driver" or "device"
    title: str
    section_number: str
    area_group: str  # core, init, transport, device
    area: str
    must: int = 0  # how many MUST statements the block has
    must_not: int = 0  # how many MUST NOT statements

    @property
    def must_statements(self) -> int:
        """MUST and MUST NOT statements together."""
        return self.must + self.must_not


@functools.cache
def blocks() -> dict[str, NormativeBlock]:
    return {
        b["id"]: NormativeBlock(
            b["id"],
            b["kind"],
            b["title"],
            b["section_number"],
            b["area_group"],
            b["area"],
            must=int(b["keywords"]["MUST"]),
            must_not=int(b["keywords"]["MUST_NOT"]),
        )
        for b in normative_blocks()
    }


def is_known(block_id: str) -> bool:
    return block_id in blocks()
