"""virtio-pmem's `virtio serve pmem` options and its registry entry.

virtio serve pmem --socket pm.sock FILE --start 0x240000000
virtio serve pmem --socket pm.sock FILE            (shared memory region 0 only)

``--start`` is the guest-physical address where the VMM maps FILE: the
device only reports it. Over vhost-user that needs a VMM that maps the
region (QEMU 7.2 has no vhost-user pmem front-end); through QEMU's proxy
(``--transport pci``) no guest-physical range can be added, and the
region is reached only as shared memory region 0 (a BAR).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from virtio.core.device import VirtioDevice
from virtio.devices.pmem.device import PmemDevice
from virtio.devices.registry import DeviceSettings


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("file", help="the backing file (its size is the region's)")
    p.add_argument(
        "--start",
        type=lambda text: int(text, 0),
        default=None,
        help="guest-physical address of the region, where the VMM maps FILE "
        "(without it: only the shared memory region, which the driver must accept)",
    )
    p.add_argument(
        "--shmem-region",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="offer VIRTIO_PMEM_F_SHMEM_REGION (default on)",
    )


def from_arguments(args: argparse.Namespace, settings: DeviceSettings) -> VirtioDevice:
    return PmemDevice(
        args.file,
        start=args.start,
        shmem_region=args.shmem_region,
        queue_max_size=min(settings.queue_max_size, 64),
        ring=settings.ring,
    )


def example(directory: Path, settings: DeviceSettings) -> VirtioDevice:
    backing = directory / "pmem.img"
    with open(backing, "wb") as f:
        f.truncate(16 << 20)
    return PmemDevice(
        backing, start=1 << 33, queue_max_size=min(settings.queue_max_size, 64), ring=settings.ring
    )
