"""virtio-vsock's `virtio serve vsock` options (vhost-device-vsock's names).

virtio serve vsock --socket /tmp/vhost-vsock.sock --guest-cid 3 --uds-path /tmp/vm.vsock

A guest connecting to host port P reaches the Unix socket ``/tmp/vm.vsock_P``;
a host process connecting to ``/tmp/vm.vsock`` and writing ``CONNECT P\\n``
reaches the guest's port P.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from virtio.core.device import VirtioDevice
from virtio.devices.registry import DeviceSettings
from virtio.devices.vsock.device import DEFAULT_BUF_ALLOC, VsockDevice
from virtio.devices.vsock.uds import UdsBackend


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--guest-cid", type=int, default=3, help="the guest's context ID (default 3; not 0-2)"
    )
    p.add_argument(
        "--uds-path",
        required=True,
        help="Unix socket host processes connect to (CONNECT <port>); a guest's "
        "connections to port P go to UDS_PATH_P",
    )
    p.add_argument(
        "--seqpacket",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="offer VIRTIO_VSOCK_F_SEQPACKET (default on)",
    )
    p.add_argument(
        "--buf-alloc",
        type=int,
        default=DEFAULT_BUF_ALLOC,
        help=f"receive buffer per connection the guest is told of (default {DEFAULT_BUF_ALLOC})",
    )


def from_arguments(args: argparse.Namespace, settings: DeviceSettings) -> VirtioDevice:
    return VsockDevice(
        UdsBackend(args.uds_path),
        guest_cid=args.guest_cid,
        seqpacket=args.seqpacket,
        buf_alloc=args.buf_alloc,
        queue_max_size=settings.queue_max_size,
        ring=settings.ring,
    )


def example(directory: Path, settings: DeviceSettings) -> VirtioDevice:
    return VsockDevice(
        UdsBackend(directory / "vsock.uds"),
        queue_max_size=settings.queue_max_size,
        ring=settings.ring,
    )
