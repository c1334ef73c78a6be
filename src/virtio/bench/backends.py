"""`virtio bench backends`: `virtio bench blk` against qemu-storage-daemon and `virtio serve blk`.

Both back-ends serve the same image; the pyvirtio driver and front-end load
each in turn with the same jobs, in one run, and the table gives both and
the ratio.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path

from virtio.bench.blk import JobSpec, LoadGenerator
from virtio.bench.peers import backends
from virtio.core.driver import DriverTransport
from virtio.devices.blk import BlkDriver
from virtio.vhost_user.frontend import connect_blk

JOBS = [
    ("4k randread QD1", JobSpec(rw="randread", bs=4096, iodepth=1)),
    ("4k randread QD32", JobSpec(rw="randread", bs=4096, iodepth=32)),
    ("1M seq read QD4", JobSpec(rw="read", bs=1 << 20, iodepth=4)),
]


Connect = Callable[[], AbstractContextManager[DriverTransport]]


def run_jobs(target: Path | Connect, runtime: float) -> dict[str, dict[str, float]]:
    """Every job of JOBS against a vhost-user socket, or a fresh transport from ``target()``."""
    connect: Connect = (lambda: connect_blk(str(target))) if isinstance(target, Path) else target
    out: dict[str, dict[str, float]] = {}
    for name, template in JOBS:
        with connect() as transport:
            driver = BlkDriver(transport)
            driver.initialize()
            spec = JobSpec(**{**template.__dict__, "runtime": runtime})
            result = LoadGenerator(driver, spec).run()
            driver.reset()
        summary = result.summary()
        lat = summary["lat_us"]
        assert isinstance(lat, dict)
        out[name] = {
            "iops": float(str(summary["iops"])),
            "mb_s": float(str(summary["bw_bytes_per_s"])) / 1e6,
            "p50_us": float(lat["p50"]),
            "errors": float(str(summary["errors"])),
        }
    return out


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="virtio bench backends", description=__doc__)
    parser.add_argument("--runtime", type=float, default=5.0, help="seconds per job")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    try:
        with backends(packed=True) as peers:
            theirs = run_jobs(peers.qsd_socket, args.runtime)
            ours = run_jobs(peers.pyvirtio_socket, args.runtime)
    except RuntimeError as err:
        print(f"virtio bench backends: {err}", file=sys.stderr)
        return 1
    rows = [
        {
            "job": name,
            "qsd_iops": round(theirs[name]["iops"]),
            "pyvirtio_iops": round(ours[name]["iops"]),
            "ratio": round(ours[name]["iops"] / theirs[name]["iops"], 3),
            "qsd_mb_s": round(theirs[name]["mb_s"], 1),
            "pyvirtio_mb_s": round(ours[name]["mb_s"], 1),
            "qsd_p50_us": theirs[name]["p50_us"],
            "pyvirtio_p50_us": ours[name]["p50_us"],
        }
        for name, _ in JOBS
    ]
    if args.json:
        print(json.dumps({"runtime_s": args.runtime, "rows": rows}))
        return 0
    print(
        "| job | qemu-storage-daemon IOPS | virtio serve blk IOPS | ratio | qsd MB/s | "
        "pyvirtio MB/s | qsd p50 us | pyvirtio p50 us |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(
            f"| {r['job']} | {r['qsd_iops']:,} | {r['pyvirtio_iops']:,} | {r['ratio']} | "
            f"{r['qsd_mb_s']} | {r['pyvirtio_mb_s']} | {r['qsd_p50_us']} | "
            f"{r['pyvirtio_p50_us']} |"
        )
    return 0
