"""virtio-mem's `virtio serve mem` options and its registry entry.

virtio serve mem --socket vm.sock --size 1G --block-size 2M --addr 0x140000000 --control ctl.sock

The region's memory is the guest's: the VMM maps ``--size`` bytes at
``--addr`` (the device only keeps which blocks are plugged), so ``--addr``
must be where that VMM put it.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from virtio.core.device import VirtioDevice
from virtio.devices.mem.device import MemDevice
from virtio.devices.registry import DeviceSettings
from virtio.sizes import parse_size


def _address(text: str) -> int:
    try:
        return int(text, 0)
    except ValueError:
        return parse_size(text)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--size", default="1G", help="region_size: the device-managed region (default 1G)"
    )
    p.add_argument("--block-size", default="2M", help="block_size, a power of two (default 2M)")
    p.add_argument(
        "--addr", default="0x100000000", help="guest-physical start of the region (default 4G)"
    )
    p.add_argument("--requested", default="0", help="initial requested_size (default 0)")
    p.add_argument(
        "--node-id", type=int, default=None, help="offer VIRTIO_MEM_F_ACPI_PXM with this node_id"
    )
    p.add_argument(
        "--unplugged-inaccessible",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="offer VIRTIO_MEM_F_UNPLUGGED_INACCESSIBLE (default on)",
    )
    p.add_argument(
        "--persistent-suspend",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="offer VIRTIO_MEM_F_PERSISTENT_SUSPEND (default off)",
    )
    p.add_argument(
        "--discard",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="give the memory of unplugged blocks back to the host (MADV_REMOVE on the "
        "back-end's shared mapping of the region; default off)",
    )
    p.add_argument(
        "--control", metavar="PATH", help="a Unix socket taking `set 64M` and `status` lines"
    )


def from_arguments(args: argparse.Namespace, settings: DeviceSettings) -> VirtioDevice:
    device = MemDevice(
        region_size=parse_size(args.size),
        block_size=parse_size(args.block_size),
        addr=_address(args.addr),
        requested_size=parse_size(args.requested),
        node_id=args.node_id,
        unplugged_inaccessible=args.unplugged_inaccessible,
        persistent_suspend=args.persistent_suspend,
        discard=args.discard,
        queue_max_size=min(settings.queue_max_size, 128),
        ring=settings.ring,
    )
    if args.control:
        from virtio.devices.mem.control import MemControl

        MemControl.attach(args.control, device)
    return device


def example(directory: Path, settings: DeviceSettings) -> VirtioDevice:
    return MemDevice(
        region_size=128 << 20,
        requested_size=32 << 20,
        queue_max_size=min(settings.queue_max_size, 128),
        ring=settings.ring,
    )
