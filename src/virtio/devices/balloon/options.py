"""The balloon's `virtio serve balloon` options and its registry entry.

virtio serve balloon --socket vb.sock --control ctl.sock          (target set at run time)
virtio serve balloon --socket vb.sock --target 64M --stats-interval 2
"""

from __future__ import annotations

import argparse
from pathlib import Path

from virtio.core.device import VirtioDevice
from virtio.devices.balloon import wire as W
from virtio.devices.balloon.device import MAX_PAGES, BalloonDevice
from virtio.devices.guestpages import RELEASE_MODES
from virtio.devices.registry import DeviceSettings
from virtio.sizes import parse_size


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--control",
        metavar="PATH",
        help="a Unix socket taking `set 64M`, `status`, `stats`, `hint [stop|done]` lines",
    )
    p.add_argument("--target", default="0", help="initial balloon size (e.g. 64M; default 0)")
    p.add_argument(
        "--stats-interval",
        type=float,
        default=5.0,
        help="seconds between statistics requests (0: do not offer the stats queue)",
    )
    p.add_argument(
        "--release",
        choices=RELEASE_MODES,
        default="dontneed",
        help="what to do with inflated and reported pages in the back-end's mapping: "
        "madvise MADV_DONTNEED (default), MADV_REMOVE (frees the memory; the pages read "
        "as zeroes), or nothing",
    )
    p.add_argument(
        "--require-must-tell-host",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="refuse FEATURES_OK to a driver that declines VIRTIO_BALLOON_F_MUST_TELL_HOST "
        "(default: only with --release remove, which loses the pages' contents)",
    )
    for name, what in (
        ("must-tell-host", "VIRTIO_BALLOON_F_MUST_TELL_HOST"),
        ("deflate-on-oom", "VIRTIO_BALLOON_F_DEFLATE_ON_OOM"),
        ("free-page-hint", "VIRTIO_BALLOON_F_FREE_PAGE_HINT"),
        ("page-poison", "VIRTIO_BALLOON_F_PAGE_POISON"),
        ("page-reporting", "VIRTIO_BALLOON_F_PAGE_REPORTING"),
    ):
        p.add_argument(
            f"--{name}",
            action=argparse.BooleanOptionalAction,
            default=True,
            help=f"offer {what} (default on)",
        )


def from_arguments(args: argparse.Namespace, settings: DeviceSettings) -> VirtioDevice:
    pages = W.pages_for(parse_size(args.target))
    if pages > MAX_PAGES:
        raise ValueError(f"--target {args.target} is more than the balloon can hold")
    if args.stats_interval < 0:
        raise ValueError("--stats-interval must be 0 or more")
    device = BalloonDevice(
        target_pages=pages,
        must_tell_host=args.must_tell_host,
        stats_interval=args.stats_interval or None,
        deflate_on_oom=args.deflate_on_oom,
        free_page_hint=args.free_page_hint,
        page_poison=args.page_poison,
        page_reporting=args.page_reporting,
        release=args.release,
        require_must_tell_host=args.require_must_tell_host,
        queue_max_size=min(settings.queue_max_size, 128),
        ring=settings.ring,
    )
    if args.control:
        from virtio.devices.balloon.control import BalloonControl

        BalloonControl.attach(args.control, device)
    return device


def num_queues(args: argparse.Namespace) -> int:
    return 2 + sum(map(bool, (args.stats_interval > 0, args.free_page_hint, args.page_reporting)))


def example(directory: Path, settings: DeviceSettings) -> VirtioDevice:
    return BalloonDevice(queue_max_size=min(settings.queue_max_size, 128), ring=settings.ring)
