"""The `virtio` command: one entry point, a sub-command per job."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence

Handler = Callable[[list[str]], int]


def _spec_coverage(argv: list[str]) -> int:
    from virtio.spec.coverage import main

    return main(argv)


def _bench(argv: list[str]) -> int:
    from virtio.bench import main

    return main(argv)


def _serve(argv: list[str]) -> int:
    from virtio.serve import main

    return main(argv)


def _qemu(argv: list[str]) -> int:
    from virtio.mpqemu.launcher import main

    return main(argv)


def _demo(argv: list[str]) -> int:
    from virtio.demo import main

    return main(argv)


def _probe(argv: list[str]) -> int:
    from virtio.probe.cli import main

    return main(argv)


def _balloon(argv: list[str]) -> int:
    from virtio.devices.balloon.control import main

    return main(argv)


def _mem(argv: list[str]) -> int:
    from virtio.devices.mem.control import main

    return main(argv)


def _vsock(argv: list[str]) -> int:
    from virtio.devices.vsock.control import main

    return main(argv)


COMMANDS: dict[str, tuple[Handler, str]] = {
    "spec-coverage": (_spec_coverage, "normative blocks covered by the tests, per area"),
    "bench": (_bench, "benchmarks: `virtio bench ring`, `virtio bench blk`"),
    "serve": (_serve, "serve a device: `virtio serve blk` (vhost-user, or --transport pci)"),
    "qemu": (_qemu, "run QEMU with pyvirtio PCI functions: `virtio qemu --pci PATH -- qemu...`"),
    "demo": (_demo, "serve a disk and boot a real Linux guest against it"),
    "balloon": (_balloon, "a served balloon's target: `virtio balloon set 64M --control PATH`"),
    "mem": (_mem, "a served memory device's requested size: `virtio mem set 64M --control PATH`"),
    "vsock": (
        _vsock,
        "a served vsock device's transport reset: `virtio vsock reset --control PATH`",
    ),
    "probe": (_probe, "what a QEMU virtio device offers: `virtio probe --qemu virtio-net-pci`"),
}


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(
        prog="virtio",
        description="pyvirtio: the VIRTIO 1.4 standard in Python.",
        epilog="\n".join(f"  {name:<14} {text}" for name, (_, text) in COMMANDS.items()),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("command", choices=sorted(COMMANDS), metavar="COMMAND")
    parser.add_argument("args", nargs=argparse.REMAINDER)
    if not args:
        parser.print_help()
        return 2
    ns = parser.parse_args(args)
    logging.basicConfig(
        level=logging.DEBUG if ns.verbose else logging.INFO,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )
    handler, _ = COMMANDS[ns.command]
    try:
        return handler(ns.args)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    sys.exit(main())
