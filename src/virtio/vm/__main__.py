"""`python -m virtio.vm prepare`: build the cached guest assets (used by ./dev setup)."""

from __future__ import annotations

import sys

from virtio.vm.assets import AssetError, prepare


def main(argv: list[str]) -> int:
    if argv[:1] != ["prepare"]:
        print("usage: python -m virtio.vm prepare", file=sys.stderr)
        return 2
    try:
        assets = prepare(lambda msg: print(f"guest: {msg}", flush=True))
    except AssetError as err:
        print(f"guest assets: {err}", file=sys.stderr)
        return 1
    print(f"guest assets ready: kernel {assets.kernel_version}, cache key {assets.key}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
