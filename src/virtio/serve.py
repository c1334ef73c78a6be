"""`virtio serve blk`: serve a disk image to VMs over vhost-user.

    virtio serve blk --socket /tmp/vblk.sock disk.img

It prints the QEMU and User-Mode Linux options that attach a guest, keeps
serving when a VM disconnects (a new one, or the same one reconnecting, is
served next), and on SIGINT/SIGTERM flushes the image and removes the socket.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from types import FrameType

from virtio.core.device import RingOptions
from virtio.devices.blk import BlkDevice, BlkOptions
from virtio.vhost_user.server import VhostUserServer

log = logging.getLogger("virtio.serve")


def _size(text: str) -> int:
    try:
        value = int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if value < 512 or value & (value - 1):
        raise argparse.ArgumentTypeError(f"{value} is not a power of 2 of at least 512")
    return value


def attach_commands(socket_path: str, num_queues: int, packed: bool) -> tuple[str, str]:
    """QEMU options and a UML command line that attach a guest to the socket."""
    qemu = (
        "qemu-system-x86_64 -m 512M "
        "-object memory-backend-memfd,id=mem,size=512M,share=on -machine q35,memory-backend=mem "
        f"-chardev socket,id=vblk,path={socket_path},reconnect=1 "
        f"-device vhost-user-blk-pci,chardev=vblk,num-queues={num_queues}"
        f"{',packed=on' if packed else ''} ..."
    )
    uml = f"linux.uml mem=256M ... virtio_uml.device={socket_path}:2"
    return qemu, uml


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="virtio serve blk",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("image", help="disk image file (or block device)")
    p.add_argument("--socket", required=True, help="vhost-user socket path to listen on")
    p.add_argument("--read-only", action="store_true", help="offer VIRTIO_BLK_F_RO")
    p.add_argument("--num-queues", type=int, default=1, help="request queues (default 1)")
    p.add_argument("--queue-size", type=int, default=256, help="largest ring (default 256)")
    p.add_argument(
        "--packed",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="offer packed rings (default on)",
    )
    p.add_argument("--event-idx", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--indirect", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--serial", default="pyvirtio", help="what GET_ID returns (20 bytes max)")
    p.add_argument("--discard", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--write-zeroes", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--logical-block-size", type=_size, default=512)
    p.add_argument("--physical-block-size", type=_size, default=4096)
    return p


def main(argv: list[str]) -> int:
    if not argv or argv[0] != "blk":
        print("usage: virtio serve blk --socket PATH IMAGE [options]", file=sys.stderr)
        return 2
    parser = build_parser()
    args = parser.parse_args(argv[1:])
    if not 1 <= args.num_queues <= 64:
        parser.error("--num-queues must be 1..64")
    if not 1 <= args.queue_size <= 32768 or args.queue_size & (args.queue_size - 1):
        parser.error("--queue-size must be a power of 2 up to 32768")
    if len(args.serial.encode()) > 20:
        parser.error("--serial is at most 20 bytes")
    if args.physical_block_size < args.logical_block_size:
        parser.error("--physical-block-size is smaller than --logical-block-size")
    if not os.path.exists(args.image):
        parser.error(f"no such image: {args.image}")
    options = BlkOptions(
        read_only=args.read_only,
        serial=args.serial,
        num_queues=args.num_queues,
        logical_block_size=args.logical_block_size,
        physical_block_size=args.physical_block_size,
        discard=args.discard,
        write_zeroes=args.write_zeroes,
        # Linux may build chains of seg_max + 2 descriptors; keep them inside a ring.
        seg_max=max(1, min(254, args.queue_size - 2)),
    )
    ring = RingOptions(packed=args.packed, event_idx=args.event_idx, indirect=args.indirect)
    try:
        device = BlkDevice(args.image, options, queue_max_size=args.queue_size, ring=ring)
    except (OSError, ValueError) as err:
        print(f"virtio serve blk: {args.image}: {err}", file=sys.stderr)
        return 1
    server = VhostUserServer(args.socket, device)
    try:
        server.bind()
    except OSError as err:
        device.close()
        print(f"virtio serve blk: cannot listen on {args.socket}: {err}", file=sys.stderr)
        return 1

    def stop(signum: int, _frame: FrameType | None) -> None:
        log.info("%s: stopping", signal.Signals(signum).name)
        server.stop()

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    qemu, uml = attach_commands(args.socket, args.num_queues, args.packed)
    log.info(
        "serving %s (%d sectors%s) on %s",
        args.image,
        device.capacity,
        ", read-only" if args.read_only else "",
        args.socket,
    )
    log.info("attach QEMU with: %s", qemu)
    log.info("attach User-Mode Linux with: %s", uml)
    try:
        server.serve_forever()
    finally:
        device.flush_backend()
        device.close()
        log.info("stopped; image flushed, socket removed")
    return 0
