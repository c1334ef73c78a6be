"""`virtio serve TYPE`: serve a device model to VMs over vhost-user or as a PCI function.

    virtio serve blk --socket /tmp/vblk.sock disk.img
    virtio serve rng --socket /tmp/vrng.sock --max-bytes 1024 --period 1
    virtio serve blk --transport pci --socket /tmp/vblk.sock disk.img   (for `virtio qemu`)

Device types come from the registry (``virtio.devices.registry``): every
type has the common options below and its own. The command prints the QEMU
and User-Mode Linux options that attach a guest, keeps serving when a VM
disconnects (a new one, or the same one reconnecting, is served next), and
on SIGINT/SIGTERM flushes the device's backend and removes the socket.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from types import FrameType

from virtio.core.device import RingOptions, VirtioDevice
from virtio.devices.registry import DeviceSettings, DeviceType, device_types
from virtio.mpqemu.server import PciServer
from virtio.vhost_user.server import VhostUserServer

log = logging.getLogger("virtio.serve")

UML_DEVICE_ARG = "virtio_uml.device={socket}:{device_id}"
TRANSPORTS = ("vhost-user", "pci", "pci-transitional")


def attach_commands(
    kind: DeviceType,
    socket_path: str,
    num_queues: int,
    packed: bool,
    device: VirtioDevice | None = None,
) -> tuple[str, str]:
    """QEMU options and a UML command line that attach a guest to the socket."""
    qemu_device = kind.qemu_vhost_user_device or f"vhost-user-device-pci,virtio-id={kind.device_id}"
    queues = f",num-queues={num_queues}" if kind.name == "blk" else ""
    if kind.qemu_options is not None and device is not None:
        attach = kind.qemu_options(socket_path, device)
    else:
        attach = (
            f"-chardev socket,id=v{kind.name},path={socket_path},reconnect=1 "
            f"-device {qemu_device},chardev=v{kind.name}{queues}"
            f"{',packed=on' if packed else ''}"
        )
    qemu = (
        "qemu-system-x86_64 -m 512M "
        "-object memory-backend-memfd,id=mem,size=512M,share=on -machine q35,memory-backend=mem "
        f"{attach} ..."
    )
    uml = "linux.uml mem=256M ... " + UML_DEVICE_ARG.format(
        socket=socket_path, device_id=kind.device_id
    )
    return qemu, uml


def qemu_pci(socket_path: str) -> str:
    return (
        f"virtio qemu --pci {socket_path} -- qemu-system-x86_64 -m 512M "
        "-object memory-backend-memfd,id=mem,size=512M,share=on -M q35,memory-backend=mem ..."
    )


def build_parser(kind: DeviceType) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=f"virtio serve {kind.name}",
        description=f"Serve {kind.summary} over vhost-user or as a PCI function.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    if kind.devices_for_sockets is not None:
        p.add_argument(
            "--socket",
            required=True,
            action="append",
            help="socket path to listen on; repeat it to serve one device per socket",
        )
    else:
        p.add_argument("--socket", required=True, help="socket path to listen on")
    p.add_argument(
        "--transport",
        choices=TRANSPORTS,
        default="vhost-user",
        help="vhost-user (the default: QEMU or UML runs the transport), pci (a modern PCI "
        "function for `virtio qemu --pci`), pci-transitional (with the legacy I/O BAR)",
    )
    p.add_argument("--queue-size", type=int, default=256, help="largest ring (default 256)")
    p.add_argument(
        "--packed",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="offer packed rings (default on)",
    )
    p.add_argument("--event-idx", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--indirect", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument(
        "--poll-us",
        type=float,
        default=None,
        help="poll the rings this long after serving before waiting for a kick; adapts "
        "to the driver, 0 never polls (default 100; 1000 for pci, where a kick costs the "
        "guest a round trip of about half a millisecond)",
    )
    kind.add_arguments(p)
    return p


def usage() -> str:
    kinds = ", ".join(device_types())
    return f"usage: virtio serve TYPE --socket PATH [options]   (TYPE: {kinds})"


def main(argv: list[str]) -> int:
    types = device_types()
    if not argv or argv[0] not in types:
        if argv and argv[0] not in ("-h", "--help"):
            print(f"virtio serve: unknown device type {argv[0]!r}", file=sys.stderr)
        print(usage(), file=sys.stderr)
        return 2
    kind = types[argv[0]]
    parser = build_parser(kind)
    args = parser.parse_args(argv[1:])
    if not 1 <= args.queue_size <= 32768 or args.queue_size & (args.queue_size - 1):
        parser.error("--queue-size must be a power of 2 up to 32768")
    if args.poll_us is None:
        args.poll_us = 100.0 if args.transport == "vhost-user" else 1000.0
    if not 0 <= args.poll_us <= 10_000:
        parser.error("--poll-us must be 0..10000")
    settings = DeviceSettings(
        ring=RingOptions(packed=args.packed, event_idx=args.event_idx, indirect=args.indirect),
        queue_max_size=args.queue_size,
    )
    sockets: list[str] = args.socket if isinstance(args.socket, list) else [args.socket]
    if len(set(sockets)) != len(sockets):
        parser.error("each --socket must be a different path")
    try:
        if kind.devices_for_sockets is not None:
            devices = kind.devices_for_sockets(args, settings, len(sockets))
        else:
            devices = [kind.from_arguments(args, settings)]
    except ValueError as err:
        parser.error(str(err))
    except OSError as err:
        print(f"virtio serve {kind.name}: {err}", file=sys.stderr)
        return 1
    servers: list[VhostUserServer | PciServer] = []
    try:
        for path, device in zip(sockets, devices, strict=True):
            servers.append(_server(args, kind, path, device))
    except ValueError as err:  # e.g. a type with no transitional PCI id
        _close(devices)
        parser.error(str(err))
    for path, server in zip(sockets, servers, strict=True):
        try:
            server.bind()
        except OSError as err:
            for other in servers:
                other.close()
            _close(devices)
            print(f"virtio serve {kind.name}: cannot listen on {path}: {err}", file=sys.stderr)
            return 1

    def stop(signum: int, _frame: FrameType | None) -> None:
        log.info("%s: stopping", signal.Signals(signum).name)
        for server in servers:
            server.stop()

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    for path, device, server in zip(sockets, devices, servers, strict=True):
        log.info("serving %s (%s) on %s", kind.name, device.describe(), path)
        if isinstance(server, PciServer):
            log.info("a PCI function %s: attach QEMU with: %s", server.info.pci_id, qemu_pci(path))
        else:
            qemu, uml = attach_commands(kind, path, kind.num_queues(args), args.packed, device)
            log.info("attach QEMU with: %s", qemu)
            log.info("attach User-Mode Linux with: %s", uml)
    # One thread per further socket: each server has its own loop and device.
    threads = [
        threading.Thread(target=server.serve_forever, name=f"serve-{i}", daemon=True)
        for i, server in enumerate(servers[1:], start=1)
    ]
    for thread in threads:
        thread.start()
    try:
        servers[0].serve_forever()
    finally:
        for server in servers[1:]:
            server.stop()
        for thread in threads:
            thread.join(timeout=10)
        for device in devices:
            device.flush_backend()
        _close(devices)
        log.info("stopped; backend flushed, socket removed")
    return 0


def _server(
    args: argparse.Namespace, kind: DeviceType, path: str, device: VirtioDevice
) -> VhostUserServer | PciServer:
    if args.transport == "vhost-user":
        return VhostUserServer(path, device, poll_us=args.poll_us)
    return PciServer(
        path,
        device,
        name=kind.name,
        transitional=args.transport == "pci-transitional",
        poll_us=args.poll_us,
    )


def _close(devices: list[VirtioDevice]) -> None:
    for device in devices:
        device.close()
