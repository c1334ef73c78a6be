"""virtio-scsi's `virtio serve scsi` options, and its hotplug control FIFO.

virtio serve scsi --socket scsi.sock disk0.img disk1.img     (LUN 0, LUN 1 on target 0)
virtio serve scsi --socket scsi.sock --control ctl.fifo disk0.img

Lines written to the ``--control`` FIFO change the LUNs while the guest
runs: ``add PATH`` (the lowest free LUN), ``remove LUN``, ``resize LUN``
(re-read the image size after the host grew or shrank it).
"""

from __future__ import annotations

import argparse
import logging
import os
import stat
from pathlib import Path

from virtio.core.device import VirtioDevice
from virtio.devices.registry import DeviceSettings
from virtio.devices.scsi.device import ScsiDevice

log = logging.getLogger("virtio.scsi")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("images", nargs="+", metavar="IMAGE", help="disk images: LUN 0, LUN 1, ...")
    p.add_argument("--read-only", action="store_true", help="every LUN is write-protected")
    p.add_argument("--num-queues", type=int, default=1, help="request queues (default 1)")
    p.add_argument(
        "--workers",
        type=int,
        default=2,
        help="threads for READ/WRITE transfers over 64 KiB (0: serve everything inline)",
    )
    p.add_argument(
        "--control",
        metavar="FIFO",
        help="a FIFO (created if missing) taking 'add PATH', 'remove LUN', 'resize LUN' lines",
    )
    for name in ("hotplug", "change", "inout", "t10-pi"):
        p.add_argument(f"--{name}", action=argparse.BooleanOptionalAction, default=True)


def num_queues(args: argparse.Namespace) -> int:
    return 2 + int(args.num_queues)


class ControlFifo:
    """Reads control lines from a FIFO in the device's event loop."""

    def __init__(self, device: ScsiDevice, path: str) -> None:
        if not os.path.exists(path):
            os.mkfifo(path, 0o600)
        elif not stat.S_ISFIFO(os.stat(path).st_mode):
            raise ValueError(f"--control {path} exists and is not a FIFO")
        self.device = device
        self.path = path
        self.fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        # Our own writer keeps the FIFO from reading end-of-file between writers.
        self._keep = os.open(path, os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        self._pending = b""
        device.events.watch(self.fd, self._readable)

    def _readable(self, now: float) -> None:
        try:
            data = os.read(self.fd, 4096)
        except BlockingIOError:
            return
        self._pending += data
        *lines, self._pending = self._pending.split(b"\n")
        for line in lines:
            self.run(line.decode(errors="replace").strip())

    def run(self, line: str) -> str:
        """Apply one control line; returns what happened (also logged)."""
        words = line.split(maxsplit=1)
        try:
            if len(words) == 2 and words[0] == "add":
                outcome = f"added LUN {self.device.add_lun(words[1])}: {words[1]}"
            elif len(words) == 2 and words[0] == "remove":
                self.device.remove_lun(int(words[1]))
                outcome = f"removed LUN {words[1]}"
            elif len(words) == 2 and words[0] == "resize":
                changed = self.device.refresh_lun(int(words[1]))
                outcome = f"LUN {words[1]} {'resized' if changed else 'unchanged'}"
            elif not words:
                return ""
            else:
                outcome = f"unknown control line {line!r} (add PATH | remove LUN | resize LUN)"
        except (ValueError, OSError) as err:
            outcome = f"control line {line!r} failed: {err}"
        log.info("%s", outcome)
        return outcome

    def close(self) -> None:
        self.device.events.unwatch(self.fd)
        os.close(self.fd)
        os.close(self._keep)


def from_arguments(args: argparse.Namespace, settings: DeviceSettings) -> VirtioDevice:
    if not 1 <= args.num_queues <= 64:
        raise ValueError("--num-queues must be 1..64")
    if not 0 <= args.workers <= 64:
        raise ValueError("--workers must be 0..64")
    if len(args.images) > 256:
        raise ValueError("at most 256 images on the command line")
    for image in args.images:
        if not os.path.exists(image):
            raise ValueError(f"no such image: {image}")
    device = ScsiDevice(
        args.images,
        read_only=args.read_only,
        num_queues=args.num_queues,
        hotplug=args.hotplug,
        change=args.change,
        inout=args.inout,
        t10_pi=args.t10_pi,
        queue_max_size=settings.queue_max_size,
        ring=settings.ring,
        workers=args.workers,
    )
    if args.control:
        device.control = ControlFifo(device, args.control)
    return device


def example(directory: Path, settings: DeviceSettings) -> VirtioDevice:
    image = directory / "scsi-example.img"
    with open(image, "wb") as f:
        f.truncate(8 << 20)
    return ScsiDevice([image], queue_max_size=settings.queue_max_size, ring=settings.ring)
