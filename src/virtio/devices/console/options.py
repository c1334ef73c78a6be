"""virtio-console's `virtio serve console` options: the ports and their host side.

virtio serve console --socket vc.sock                    (port 0 on stdin/stdout)
virtio serve console --socket vc.sock --pty              (a pty per port; paths logged)
virtio serve console --socket vc.sock --unix /tmp/con --ports 2   (/tmp/con.0, /tmp/con.1)
virtio serve console --socket vc.sock --log guest.log    (port N >= 1 in guest.log.N)

``--ports N`` (N > 1) offers VIRTIO_CONSOLE_F_MULTIPORT with N ports; port 0
is the console, ports 1.. are generic ports named ``--name`` (in order) or
``portN``. With stdio, ports 1.. write to stdout too and take no input.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from virtio.core.device import VirtioDevice
from virtio.devices.console import wire as W
from virtio.devices.console.device import MAX_PORTS, ConsoleDevice
from virtio.devices.console.host import (
    LogHost,
    MemoryHost,
    PortHost,
    PtyHost,
    UnixHost,
    stdio_host,
)
from virtio.devices.registry import DeviceSettings

log = logging.getLogger("virtio.console")


def add_arguments(p: argparse.ArgumentParser) -> None:
    side = p.add_mutually_exclusive_group()
    side.add_argument("--pty", action="store_true", help="a new pty per port (paths printed)")
    side.add_argument(
        "--unix", metavar="PATH", help="a listening Unix socket per port: port N at PATH.N"
    )
    side.add_argument(
        "--log", metavar="FILE", help="append output to FILE (port N >= 1: FILE.N); no input"
    )
    p.add_argument(
        "--ports",
        type=int,
        default=1,
        help="number of ports; more than 1 offers VIRTIO_CONSOLE_F_MULTIPORT (default 1)",
    )
    p.add_argument(
        "--max-ports",
        type=int,
        default=None,
        help="max_nr_ports (room for hot-plugged ports; default --ports)",
    )
    p.add_argument(
        "--name",
        action="append",
        default=[],
        help="name of port 1, 2, ... in order (PORT_NAME; default portN)",
    )
    p.add_argument("--cols", type=int, default=80, help="console columns (default 80)")
    p.add_argument("--rows", type=int, default=24, help="console rows (default 24)")
    p.add_argument("--no-size", action="store_true", help="do not offer VIRTIO_CONSOLE_F_SIZE")
    p.add_argument(
        "--no-emerg-write", action="store_true", help="do not offer VIRTIO_CONSOLE_F_EMERG_WRITE"
    )


def num_queues(args: argparse.Namespace) -> int:
    ports = args.max_ports or args.ports
    return W.queue_count(ports, ports > 1)


def _hosts(args: argparse.Namespace) -> list[PortHost]:
    hosts: list[PortHost] = []
    try:
        for i in range(args.ports):
            if args.pty:
                pty = PtyHost()
                # The path is what a user needs: print it, not only log it.
                print(f"virtio serve console: port {i} on {pty.path}", flush=True)
                hosts.append(pty)
            elif args.unix:
                hosts.append(UnixHost(Path(f"{args.unix}.{i}")))
            elif args.log:
                hosts.append(LogHost(Path(args.log if i == 0 else f"{args.log}.{i}")))
            else:
                hosts.append(stdio_host(input_=i == 0))
    except OSError:
        for host in hosts:
            host.close()
        raise
    return hosts


def from_arguments(args: argparse.Namespace, settings: DeviceSettings) -> VirtioDevice:
    if not 1 <= args.ports <= 0x7FFF:
        raise ValueError("--ports must be 1..32767")
    max_ports = args.max_ports or args.ports
    if max_ports < args.ports or max_ports > MAX_PORTS:
        raise ValueError(f"--max-ports must be at least --ports and at most {MAX_PORTS}")
    if len(args.name) > args.ports - 1:
        raise ValueError(f"{len(args.name)} --name for {args.ports - 1} named ports")
    if not (0 <= args.cols <= 0xFFFF and 0 <= args.rows <= 0xFFFF):
        raise ValueError("--cols and --rows must be 0..65535")
    names: list[str | None] = [None]
    for i in range(1, args.ports):
        name = args.name[i - 1] if i - 1 < len(args.name) else f"port{i}"
        W.port_name(i, name)  # its length
        names.append(name)
    hosts = _hosts(args)
    size = None if args.no_size else (args.cols, args.rows)
    if size is not None and args.pty:
        size = hosts[0].size() or size
    try:
        return ConsoleDevice(
            hosts,
            max_ports=max_ports,
            names=names,
            size=size,
            emerg_write=not args.no_emerg_write,
            queue_max_size=settings.queue_max_size,
            ring=settings.ring,
        )
    except ValueError:
        for host in hosts:
            host.close()
        raise


def example(directory: Path, settings: DeviceSettings) -> VirtioDevice:
    return ConsoleDevice([MemoryHost()], queue_max_size=settings.queue_max_size, ring=settings.ring)
