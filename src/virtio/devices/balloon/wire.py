"""The traditional balloon's wire format: feature bits, config fields, PFN arrays, stats.

The config space is little-endian through every interface (legacy too);
statistics and free page hint command ids are in the guest's byte order
through a legacy interface and little-endian otherwise.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Mapping, Sequence

from virtio.layout import ByteOrder
from virtio.sizes import format_size
from virtio.spec import features as F

MUST_TELL_HOST = F.VIRTIO_BALLOON_F_MUST_TELL_HOST
STATS_VQ = F.VIRTIO_BALLOON_F_STATS_VQ
DEFLATE_ON_OOM = F.VIRTIO_BALLOON_F_DEFLATE_ON_OOM
FREE_PAGE_HINT = F.VIRTIO_BALLOON_F_FREE_PAGE_HINT
PAGE_POISON = F.VIRTIO_BALLOON_F_PAGE_POISON
PAGE_REPORTING = F.VIRTIO_BALLOON_F_PAGE_REPORTING

#: Balloon page frame numbers count 4 KiB pages, whatever the guest's page size.
PAGE_SIZE = 4096
PAGE_SHIFT = 12

# Config space offsets (struct virtio_balloon_config).
CONFIG_SIZE = 16
NUM_PAGES = 0
ACTUAL = 4
FREE_PAGE_HINT_CMD_ID = 8
POISON_VAL = 12

#: Reserved free page hint command ids.
CMD_ID_STOP = 0
CMD_ID_DONE = 1
CMD_ID_FIRST = 2

# Queue roles, in the order their queues come.
INFLATEQ = "inflateq"
DEFLATEQ = "deflateq"
STATSQ = "statsq"
FREE_PAGE_VQ = "free_page_vq"
REPORTING_VQ = "reporting_vq"

#: The optional queues and the feature that brings each.
OPTIONAL_QUEUES: tuple[tuple[str, int], ...] = (
    (STATSQ, STATS_VQ),
    (FREE_PAGE_VQ, FREE_PAGE_HINT),
    (REPORTING_VQ, PAGE_REPORTING),
)

# Statistics tags (struct virtio_balloon_stat).
STAT_NAMES: dict[int, str] = {
    0: "swap_in",
    1: "swap_out",
    2: "major_faults",
    3: "minor_faults",
    4: "free_memory",
    5: "total_memory",
    6: "available_memory",
    7: "disk_caches",
    8: "hugetlb_allocations",
    9: "hugetlb_failures",
}
S_MEMFREE = 4
S_MEMTOT = 5
S_AVAIL = 6
#: Tags whose value is an amount of memory in bytes (the rest are counts).
BYTE_STATS = frozenset({0, 1, 4, 5, 6, 7})
STAT_SIZE = 10


def queue_roles(features: int) -> list[str]:
    """The queues' roles, in index order, with these features negotiated.

    The optional queues that exist follow each other without gaps (what Linux
    drivers do; the same as the spec's numbering when every one exists).
    """
    roles = [INFLATEQ, DEFLATEQ]
    roles += [role for role, bit in OPTIONAL_QUEUES if features >> bit & 1]
    return roles


def _order(order: ByteOrder) -> str:
    return "<" if order == "little" else ">"


def pack_pfns(pfns: Iterable[int]) -> bytes:
    values = list(pfns)
    return struct.pack(f"<{len(values)}I", *values)


def unpack_pfns(data: bytes) -> tuple[int, ...]:
    """The PFNs in an inflate or deflate buffer (a whole number of le32)."""
    if len(data) % 4:
        raise ValueError(f"a PFN array of {len(data)} bytes is not a whole number of le32")
    return struct.unpack(f"<{len(data) // 4}I", data)


def pack_stats(stats: Mapping[int, int], order: ByteOrder = "little") -> bytes:
    fmt = _order(order) + "HQ"
    return b"".join(struct.pack(fmt, tag, value) for tag, value in stats.items())


def unpack_stats(data: bytes, order: ByteOrder = "little") -> tuple[dict[int, int], int]:
    """Known statistics by tag, and the count of trailing bytes that make no entry.

    Unknown tags are skipped (the device MUST ignore them); entries may come
    in any order.
    """
    fmt = _order(order) + "HQ"
    whole = len(data) - len(data) % STAT_SIZE
    stats: dict[int, int] = {}
    for tag, value in struct.iter_unpack(fmt, data[:whole]):
        if tag in STAT_NAMES:
            stats[tag] = value
    return stats, len(data) - whole


def pack_cmd_id(cmd_id: int, order: ByteOrder = "little") -> bytes:
    return struct.pack(_order(order) + "I", cmd_id)


def unpack_cmd_id(data: bytes, order: ByteOrder = "little") -> int:
    value: int = struct.unpack(_order(order) + "I", data)[0]
    return value


def format_stats(stats: Mapping[int, int]) -> str:
    """One line: ``free_memory=120.5M total_memory=250.0M ...``, by tag."""
    parts = []
    for tag in sorted(stats):
        value = stats[tag]
        shown = format_size(value) if tag in BYTE_STATS else str(value)
        parts.append(f"{STAT_NAMES[tag]}={shown}")
    return " ".join(parts) if parts else "(none)"


def pages_for(nbytes: int) -> int:
    """Balloon pages covering ``nbytes`` (rounded up), for num_pages."""
    return -(-nbytes // PAGE_SIZE)


def runs(pfns: Sequence[int]) -> list[tuple[int, int]]:
    """Sorted, distinct PFNs as (first, count) runs of consecutive pages."""
    out: list[tuple[int, int]] = []
    for pfn in sorted(set(pfns)):
        if out and out[-1][0] + out[-1][1] == pfn:
            out[-1] = (out[-1][0], out[-1][1] + 1)
        else:
            out.append((pfn, 1))
    return out
