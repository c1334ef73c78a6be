"""`virtio probe`: what a QEMU virtio device offers, read through pyvirtio's own driver side."""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from virtio.probe.qemu import MACHINES, ProbeError, plan, qemu_binary, run
from virtio.probe.render import text

EPILOG = """\
examples:
  virtio probe --qemu 'virtio-net-pci,mq=on'
  virtio probe --machine microvm --qemu virtio-blk-device
  virtio probe --qemu virtio-blk-pci,disable-modern=on     (legacy-only: the legacy interface)
  virtio probe --legacy --qemu virtio-net-pci              (a transitional device, legacy side)
  virtio probe --qemu virtio-crypto-pci                    (a back-end is added automatically)
  virtio probe --qemu virtio-9p-pci,fsdev=f0,mount_tag=t --qemu-arg '-fsdev local,id=f0,path=/srv,security_model=none'
  virtio probe --json --qemu virtio-rng-pci

--qemu-arg is split like a shell line, and may be repeated: `--qemu-arg -object
--qemu-arg cryptodev-backend-builtin,id=c0` and `--qemu-arg '-object
cryptodev-backend-builtin,id=c0'` are the same.
"""


def _size(value: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    text_ = value.strip().upper().removesuffix("B").removesuffix("I")
    try:
        if text_ and text_[-1] in units:
            size = int(float(text_[:-1]) * units[text_[-1]])
        else:
            size = int(text_)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {value!r} (e.g. 64M)") from None
    if size < 512 or size % 512:
        raise argparse.ArgumentTypeError("the disk size is a multiple of 512 bytes")
    return size


def _positive(value: str) -> float:
    try:
        seconds = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {value!r}") from None
    if seconds <= 0:
        raise argparse.ArgumentTypeError("the timeout is more than 0 seconds")
    return seconds


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="virtio probe",
        description=(
            "Start QEMU (under qtest, nothing running in the guest) with one virtio device and "
            "show what it offers: transport, ids, features by name, the device configuration "
            "decoded field by field (by the spec's tables) and the queues' maximum sizes. "
            "Nothing is negotiated: the device is reset before and after."
        ),
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--qemu",
        required=True,
        metavar="DEVICE",
        help="the -device argument, e.g. 'virtio-net-pci,mq=on'",
    )
    p.add_argument(
        "--machine",
        choices=MACHINES,
        help="q35 or pc (PCI), microvm (virtio-mmio); default: by the device's bus",
    )
    p.add_argument(
        "--legacy",
        action="store_true",
        help="use the legacy interface: of a transitional PCI device, or virtio-mmio version 1",
    )
    p.add_argument(
        "--qemu-arg",
        action="append",
        default=[],
        metavar="ARG",
        help="extra QEMU arguments (repeatable; split like a shell line)",
    )
    p.add_argument(
        "--disk-size",
        type=_size,
        default=16 << 20,
        metavar="SIZE",
        help="size of the automatic image of a block device with no drive= (default 16M)",
    )
    p.add_argument(
        "--timeout",
        type=_positive,
        default=10.0,
        metavar="SECONDS",
        help="how long QEMU may take to start and to answer each access (default 10)",
    )
    p.add_argument("--json", action="store_true", help="one JSON object on stdout")
    return p


def _join_option_values(argv: Sequence[str]) -> list[str]:
    """``--qemu-arg -fsdev`` as ``--qemu-arg=-fsdev``: argparse takes "-fsdev" for an option."""
    out: list[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--qemu-arg" and i + 1 < len(argv):
            out.append(f"{arg}={argv[i + 1]}")
            i += 2
            continue
        out.append(arg)
        i += 1
    return out


def main(argv: Sequence[str]) -> int:
    args = parser().parse_args(_join_option_values(argv))
    try:
        qemu_args = [word for arg in args.qemu_arg for word in shlex.split(arg)]
    except ValueError as err:
        print(f"virtio probe: --qemu-arg: {err}", file=sys.stderr)
        return 2
    try:
        qemu = qemu_binary()
        with tempfile.TemporaryDirectory(prefix="pyvirtio-probe-") as tmp:
            chosen = plan(
                args.qemu,
                machine=args.machine,
                qemu_args=qemu_args,
                workdir=Path(tmp),
                disk_size=args.disk_size,
                qemu=qemu,
                timeout=args.timeout,
            )
            result, qemu_info = run(chosen, legacy=args.legacy, timeout=args.timeout)
    except ProbeError as err:
        print(f"virtio probe: {err}", file=sys.stderr)
        return err.code
    except OSError as err:
        print(f"virtio probe: {err}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps({**result.to_json(), "qemu": qemu_info}, indent=2))
    else:
        print(text(result, qemu_info))
    return 0
