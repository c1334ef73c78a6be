"""`virtio serve fs` options (virtiofsd's names where it has them) and its registry entry.

``--shared-dir DIR`` (required), ``--tag TAG`` (the config tag; virtiofsd has
none, QEMU sets it), ``--cache auto|always|never``, ``--sandbox none`` (the
only mode: the server confines the guest by descriptor-relative lookups, not
by a namespace), ``--announce-submounts``, ``--readonly``,
``--num-request-queues N``, ``--notification`` (offer VIRTIO_FS_F_NOTIFICATION),
``--cache-size SIZE`` (a DAX window of SIZE bytes as shared memory region 0;
QEMU's vhost-user-fs device named it so; 0, the default, for none).
"""

from __future__ import annotations

import argparse
import os
import resource
from pathlib import Path

from virtio.core.device import VirtioDevice
from virtio.devices.fs.dax import PAGE, DaxWindow
from virtio.devices.fs.device import DEFAULT_NOTIFY_BUF_SIZE, FsDevice, encode_tag
from virtio.devices.fs.server import FuseServer
from virtio.devices.registry import DeviceSettings
from virtio.sizes import parse_size


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--shared-dir", required=True, help="host directory the guest sees")
    p.add_argument("--tag", default="pyvirtio", help="mount tag (config space, up to 36 bytes)")
    p.add_argument(
        "--cache",
        choices=("auto", "always", "never"),
        default="auto",
        help="guest caching: never (direct I/O, no attribute cache), auto (1 s), always",
    )
    p.add_argument(
        "--sandbox", choices=("none",), default="none", help="only 'none' (no namespace sandbox)"
    )
    p.add_argument(
        "--announce-submounts",
        action="store_true",
        help="mark directories on other file systems as submounts",
    )
    p.add_argument("--readonly", action="store_true", help="refuse every change (EROFS)")
    p.add_argument("--num-request-queues", type=int, default=1, help="request virtqueues")
    p.add_argument(
        "--notification",
        action="store_true",
        help="offer VIRTIO_FS_F_NOTIFICATION (a notification queue)",
    )
    p.add_argument(
        "--thread-pool-size",
        type=int,
        default=2,
        metavar="N",
        help="worker threads for large READs queued together (virtiofsd's name; 0: inline)",
    )
    p.add_argument(
        "--cache-size",
        type=parse_size,
        default=0,
        metavar="SIZE",
        help="DAX window of SIZE bytes (e.g. 1G; a multiple of 2M for Linux guests), 0 for none",
    )


def from_arguments(args: argparse.Namespace, settings: DeviceSettings) -> VirtioDevice:
    if not os.path.isdir(args.shared_dir):
        raise ValueError(f"--shared-dir {args.shared_dir}: not a directory")
    if args.num_request_queues < 1:
        raise ValueError("--num-request-queues must be at least 1")
    encode_tag(args.tag)
    if not 0 <= args.thread_pool_size <= 64:
        raise ValueError("--thread-pool-size must be 0..64")
    if args.cache_size % PAGE:
        raise ValueError(f"--cache-size {args.cache_size} is not a multiple of {PAGE}")
    # Every inode the guest knows holds a descriptor: allow as many as the host lets us.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    server = FuseServer(
        args.shared_dir,
        cache=args.cache,
        announce_submounts=args.announce_submounts,
        readonly=args.readonly,
    )
    window = DaxWindow(args.cache_size) if args.cache_size else None
    return FsDevice(
        server,
        tag=args.tag,
        num_request_queues=args.num_request_queues,
        notification=args.notification,
        workers=args.thread_pool_size,
        notify_buf_size=DEFAULT_NOTIFY_BUF_SIZE,
        queue_max_size=settings.queue_max_size,
        ring=settings.ring,
        dax=window,
    )


def num_queues(args: argparse.Namespace) -> int:
    return 1 + int(args.notification) + int(args.num_request_queues)


def example(directory: Path, settings: DeviceSettings) -> VirtioDevice:
    shared = directory / "fs-shared"
    shared.mkdir(exist_ok=True)
    return FsDevice(FuseServer(shared), queue_max_size=settings.queue_max_size, ring=settings.ring)
