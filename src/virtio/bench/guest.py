"""`virtio bench guest`: fio in a real guest, pyvirtio's back-end against qemu-storage-daemon.

One guest boots with two vhost-user-blk disks on the same image: /dev/vda is
served by ``virtio serve blk`` and /dev/vdb by ``qemu-storage-daemon``. fio
(the host's binary, reached through a read-only share) runs the same jobs on
each in turn; the table shows both and the ratio ours / theirs.
"""

from __future__ import annotations

import argparse
import json
import sys

from virtio.bench.peers import backends
from virtio.vm import AssetError, VhostUserBlkDisk, prepare, run_guest

JOBS = [
    ("4k randread QD1", "randread", "4k", 1),
    ("4k randread QD32", "randread", "4k", 32),
    ("4k randwrite QD32", "randwrite", "4k", 32),
    ("1M seq read", "read", "1M", 4),
]


def guest_script(runtime: int) -> str:
    lines = ["set -e"]
    for name, rw, bs, depth in JOBS:
        for dev in ("vda", "vdb"):
            lines.append(f'echo "JOB {dev} {name}"')
            lines.append(
                f"hostrun /usr/bin/fio --name=bench --filename=/dev/{dev} --direct=1 "
                f"--ioengine=libaio --rw={rw} --bs={bs} --iodepth={depth} --runtime={runtime} "
                f"--time_based --size=192M --output-format=json | tr -d '\\n'"
            )
            lines.append("echo")
    return "\n".join(lines) + "\n"


def parse(output: str) -> dict[tuple[str, str], dict[str, float]]:
    results: dict[tuple[str, str], dict[str, float]] = {}
    lines = output.splitlines()
    for i, line in enumerate(lines):
        if not line.startswith("JOB ") or i + 1 >= len(lines):
            continue
        _, dev, name = line.split(" ", 2)
        text = lines[i + 1]
        start = text.find("{")
        if start < 0:
            continue
        job = json.loads(text[start:])["jobs"][0]
        side = job["write"] if job["write"]["io_bytes"] else job["read"]
        results[(dev, name)] = {"iops": float(side["iops"]), "bw": float(side["bw_bytes"])}
    return results


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="virtio bench guest", description=__doc__)
    parser.add_argument("--vm", choices=("uml", "qemu"), default="uml")
    parser.add_argument("--runtime", type=int, default=5, help="seconds per fio job")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    try:
        assets = prepare()
    except AssetError as err:
        print(f"virtio bench guest: {err}", file=sys.stderr)
        return 1
    try:
        with backends(packed=False) as peers:
            result = run_guest(
                guest_script(args.runtime),
                vm=args.vm,
                disks=[
                    VhostUserBlkDisk(str(peers.pyvirtio_socket)),
                    VhostUserBlkDisk(str(peers.qsd_socket)),
                ],
                timeout=120 + 2 * len(JOBS) * (args.runtime + 5),
                host_share=True,
                assets=assets,
            )
    except RuntimeError as err:
        print(f"virtio bench guest: {err}", file=sys.stderr)
        return 1
    if result.exit_code != 0:
        print(result.output[-3000:], file=sys.stderr)
        return 1
    figures = parse(result.section())
    rows = []
    for name, *_ in JOBS:
        ours, theirs = figures.get(("vda", name)), figures.get(("vdb", name))
        if ours is None or theirs is None:
            print(f"virtio bench guest: no result for {name}", file=sys.stderr)
            return 1
        rows.append(
            {
                "job": name,
                "pyvirtio_iops": round(ours["iops"]),
                "qsd_iops": round(theirs["iops"]),
                "pyvirtio_mb_s": round(ours["bw"] / 1e6, 1),
                "qsd_mb_s": round(theirs["bw"] / 1e6, 1),
                "ratio": round(ours["iops"] / theirs["iops"], 3) if theirs["iops"] else 0.0,
            }
        )
    if args.json:
        print(json.dumps({"vm": args.vm, "runtime_s": args.runtime, "rows": rows}))
        return 0
    print(f"fio in a {args.vm.upper()} guest, {args.runtime} s per job, same image")
    print(
        f"{'job':<20} {'pyvirtio IOPS':>14} {'qsd IOPS':>10} {'pyvirtio MB/s':>14} "
        f"{'qsd MB/s':>10} {'ratio':>7}"
    )
    for r in rows:
        print(
            f"{r['job']:<20} {r['pyvirtio_iops']:>14,} {r['qsd_iops']:>10,} "
            f"{r['pyvirtio_mb_s']:>14} {r['qsd_mb_s']:>10} {r['ratio']:>7}"
        )
    return 0
