"""virtio-rng's `virtio serve rng` options and its registry entry."""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from pathlib import Path

from virtio.core.device import VirtioDevice
from virtio.devices.registry import DeviceSettings
from virtio.devices.rng.device import RngDevice


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--source", default=None, help="file to read entropy from (default: the OS, os.urandom)"
    )
    p.add_argument(
        "--max-bytes",
        type=int,
        default=None,
        help="rate limit: bytes per --period (QEMU's max-bytes)",
    )
    p.add_argument("--period", type=float, default=1.0, help="rate limit period in seconds")


def _file_source(path: str) -> Callable[[int], bytes]:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)

    def read(n: int) -> bytes:
        data = os.read(fd, n)
        if not data:
            raise OSError(f"{path}: no more entropy (end of file)")
        return data

    return read


def from_arguments(args: argparse.Namespace, settings: DeviceSettings) -> VirtioDevice:
    if args.max_bytes is not None and args.max_bytes < 1:
        raise ValueError("--max-bytes must be at least 1")
    if args.period <= 0:
        raise ValueError("--period must be positive")
    source = _file_source(args.source) if args.source else os.urandom
    return RngDevice(
        source=source,
        max_bytes=args.max_bytes,
        period=args.period,
        queue_max_size=settings.queue_max_size,
        ring=settings.ring,
    )


def example(directory: Path, settings: DeviceSettings) -> VirtioDevice:
    return RngDevice(queue_max_size=settings.queue_max_size, ring=settings.ring)
