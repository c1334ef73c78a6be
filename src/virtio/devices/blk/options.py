"""virtio-blk's `virtio serve blk` options and its registry entry."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from virtio.core.device import VirtioDevice
from virtio.devices.blk.device import BlkDevice, BlkOptions
from virtio.devices.registry import DeviceSettings


def _block_size(text: str) -> int:
    try:
        value = int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if value < 512 or value & (value - 1):
        raise argparse.ArgumentTypeError(f"{value} is not a power of 2 of at least 512")
    return value


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("image", help="disk image file (or block device)")
    p.add_argument("--read-only", action="store_true", help="offer VIRTIO_BLK_F_RO")
    p.add_argument("--num-queues", type=int, default=1, help="request queues (default 1)")
    p.add_argument("--serial", default="pyvirtio", help="what GET_ID returns (20 bytes max)")
    p.add_argument("--discard", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--write-zeroes", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--logical-block-size", type=_block_size, default=512)
    p.add_argument("--physical-block-size", type=_block_size, default=4096)
    p.add_argument(
        "--workers",
        type=int,
        default=2,
        help="threads for transfers over --inline-max bytes (0: serve everything inline)",
    )
    p.add_argument("--inline-max", type=int, default=64 << 10, help="largest inline transfer")


def from_arguments(args: argparse.Namespace, settings: DeviceSettings) -> VirtioDevice:
    if not 1 <= args.num_queues <= 64:
        raise ValueError("--num-queues must be 1..64")
    if len(args.serial.encode()) > 20:
        raise ValueError("--serial is at most 20 bytes")
    if args.physical_block_size < args.logical_block_size:
        raise ValueError("--physical-block-size is smaller than --logical-block-size")
    if not 0 <= args.workers <= 64:
        raise ValueError("--workers must be 0..64")
    if not os.path.exists(args.image):
        raise ValueError(f"no such image: {args.image}")
    options = BlkOptions(
        read_only=args.read_only,
        serial=args.serial,
        num_queues=args.num_queues,
        logical_block_size=args.logical_block_size,
        physical_block_size=args.physical_block_size,
        discard=args.discard,
        write_zeroes=args.write_zeroes,
        # Linux may build chains of seg_max + 2 descriptors; keep them inside a ring.
        seg_max=max(1, min(254, settings.queue_max_size - 2)),
        workers=args.workers,
        inline_max=args.inline_max,
    )
    return BlkDevice(
        args.image, options, queue_max_size=settings.queue_max_size, ring=settings.ring
    )


def example(directory: Path, settings: DeviceSettings) -> VirtioDevice:
    image = directory / "blk-example.img"
    with open(image, "wb") as f:
        f.truncate(8 << 20)
    return BlkDevice(image, queue_max_size=settings.queue_max_size, ring=settings.ring)
