"""Benchmarks (never timed tests): `virtio bench ring`, `virtio bench blk`."""

from __future__ import annotations

import sys


def main(argv: list[str]) -> int:
    from virtio.devices.registry import device_types

    types = device_types()
    benches = {name: t for name, t in types.items() if t.bench is not None}
    if not argv or argv[0] in ("-h", "--help"):
        kinds = ",".join(
            [
                "ring",
                *benches,
                "backends",
                "latency",
                "guest",
                "transports",
                "pci-guest",
                "net-guests",
            ]
        )
        print(f"usage: virtio bench {{{kinds}}} [options]  (see `virtio bench ring --help`)")
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
    if kind == "transports":
        from virtio.bench.transports import transports_main

        return transports_main(rest)
    if kind == "pci-guest":
        from virtio.bench.transports import pci_guest_main

        return pci_guest_main(rest)
    if kind == "net-peers":
        from virtio.bench.netpeers import main as netpeers_main

        return netpeers_main(rest)
    if kind == "vsock-guest":
        from virtio.bench.vsockguest import main as vsockguest_main

        return vsockguest_main(rest)
    if kind == "dev-guests":
        from virtio.bench.devguests import main as devguests_main

        return devguests_main(rest)
    if kind == "net-guests":
        from virtio.bench.netguests import main as netguests_main

        return netguests_main(rest)
    if kind == "latency":
        from virtio.bench.latency import main as latency_main

        return latency_main(rest)
    if kind in types:
        # A device type's own load generator, found through the registry.
        bench = types[kind].bench_main()
        if bench is None:
            print(f"virtio bench: device type {kind!r} has no load generator", file=sys.stderr)
            return 2
        return bench(rest)
    print(
        f"virtio bench: unknown benchmark {kind!r} (ring, backends, latency, guest, transports, "
        "pci-guest, "
        f"or a device type: {', '.join(benches)})",
        file=sys.stderr,
    )
    return 2
