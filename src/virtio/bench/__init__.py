"""Benchmarks (never timed tests): `virtio bench ring`, `virtio bench blk`."""

from __future__ import annotations

import sys


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(
            "usage: virtio bench {ring,blk,backends,latency,guest} [options]  (see `virtio bench ring --help`)"
        )
        return 0 if argv else 2
    kind, rest = argv[0], argv[1:]
    if kind == "ring":
        from virtio.bench.ring import main as ring_main

        return ring_main(rest)
    if kind == "backends":
        from virtio.bench.backends import main as backends_main

        return backends_main(rest)
    if kind == "guest":
        from virtio.bench.guest import main as guest_main

        return guest_main(rest)
    if kind == "latency":
        from virtio.bench.latency import main as latency_main

        return latency_main(rest)
    if kind == "blk":
        from virtio.bench.blk import main as blk_main

        return blk_main(rest)
    print(
        f"virtio bench: unknown benchmark {kind!r} (ring, blk, backends, latency, guest)",
        file=sys.stderr,
    )
    return 2
