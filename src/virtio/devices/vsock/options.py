"""virtio-vsock's `virtio serve vsock` options (the Unix-socket ones are vhost-device-vsock's).

virtio serve vsock --socket /tmp/vhost-vsock.sock --guest-cid 3 --uds-path /tmp/vm.vsock

A guest connecting to host port P reaches the Unix socket ``/tmp/vm.vsock_P``;
a host process connecting to ``/tmp/vm.vsock`` and writing ``CONNECT P\\n``
reaches the guest's port P.

virtio serve vsock --socket /tmp/vhost-vsock.sock --forward-tcp 5000=127.0.0.1:8080 \\
    --listen-tcp 2222=22

A guest connecting to host port 5000 reaches TCP 127.0.0.1:8080; a TCP client
connecting to 127.0.0.1:2222 reaches the guest's port 22. Ports with no TCP
rule go to the Unix sockets of ``--uds-path``, if given.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from virtio.core.device import VirtioDevice
from virtio.devices.registry import DeviceSettings
from virtio.devices.vsock.device import DEFAULT_BUF_ALLOC, VsockBackend, VsockDevice
from virtio.devices.vsock.tcp import TcpBackend, parse_forward, parse_listen
from virtio.devices.vsock.uds import UdsBackend


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--guest-cid", type=int, default=3, help="the guest's context ID (default 3; not 0-2)"
    )
    p.add_argument(
        "--uds-path",
        help="Unix socket host processes connect to (CONNECT <port>); a guest's "
        "connections to port P go to UDS_PATH_P (optional with TCP rules)",
    )
    p.add_argument(
        "--control",
        metavar="PATH",
        help="a Unix socket taking `reset` (a transport reset event) and `status` lines",
    )
    p.add_argument(
        "--forward-tcp",
        action="append",
        default=[],
        type=parse_forward,
        metavar="PORT=HOST:TCPPORT",
        help="a guest's stream connections to host port PORT go to TCP HOST:TCPPORT "
        "(repeatable; IPv6 in brackets)",
    )
    p.add_argument(
        "--listen-tcp",
        action="append",
        default=[],
        type=parse_listen,
        metavar="[HOST:]TCPPORT=PORT",
        help="TCP connections to HOST:TCPPORT (HOST defaults to 127.0.0.1) go to the "
        "guest's port PORT (repeatable)",
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


def backend(args: argparse.Namespace) -> VsockBackend:
    """The host side the options ask for; ValueError if they ask for none."""
    uds = UdsBackend(args.uds_path) if args.uds_path is not None else None
    if not args.forward_tcp and not args.listen_tcp:
        if uds is None:
            raise ValueError("give --uds-path, --forward-tcp or --listen-tcp")
        return uds
    return TcpBackend(args.forward_tcp, args.listen_tcp, fallback=uds)


def from_arguments(args: argparse.Namespace, settings: DeviceSettings) -> VirtioDevice:
    device = VsockDevice(
        backend(args),
        guest_cid=args.guest_cid,
        seqpacket=args.seqpacket,
        buf_alloc=args.buf_alloc,
        queue_max_size=settings.queue_max_size,
        ring=settings.ring,
    )
    if args.control:
        from virtio.devices.vsock.control import VsockControl

        VsockControl.attach(args.control, device)
    return device


def example(directory: Path, settings: DeviceSettings) -> VirtioDevice:
    return VsockDevice(
        UdsBackend(directory / "vsock.uds"),
        queue_max_size=settings.queue_max_size,
        ring=settings.ring,
    )
