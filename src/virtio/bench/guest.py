"""`virtio bench guest`: fio in a real guest, pyvirtio's back-end against qemu-storage-daemon.

One guest boots with two vhost-user-blk disks on the same image: /dev/vda is
served by ``virtio serve blk`` and /dev/vdb by ``qemu-storage-daemon``. fio
(the host's binary, reached through a read-only share) runs the same jobs on
each in turn; the table shows both and the ratio ours / theirs.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

from virtio.vm import AssetError, VhostUserBlkDisk, prepare, run_guest

JOBS = [
    ("4k randread QD1", "randread", "4k", 1),
    ("4k randread QD32", "randread", "4k", 32),
    ("4k randwrite QD32", "randwrite", "4k", 32),
    ("1M seq read", "read", "1M", 4),
]


def _wait_socket(path: Path, proc: subprocess.Popen[bytes], what: str) -> None:
    deadline = time.monotonic() + 15
    while not path.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"{what} did not start")
        time.sleep(0.05)


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
    if shutil.which("qemu-storage-daemon") is None:
        print("virtio bench guest: qemu-storage-daemon is not installed", file=sys.stderr)
        return 1
    try:
        assets = prepare()
    except AssetError as err:
        print(f"virtio bench guest: {err}", file=sys.stderr)
        return 1
    with ExitStack() as stack:
        work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="pyvirtio-bench-")))
        image = work / "disk.img"
        with open(image, "wb") as f:
            f.truncate(256 << 20)
        ours_sock, qsd_sock = work / "ours.sock", work / "qsd.sock"
        ours_log = stack.enter_context(open(work / "ours.log", "wb"))
        qsd_log = stack.enter_context(open(work / "qsd.log", "wb"))
        procs = [
            subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "virtio.cli",
                    "serve",
                    "blk",
                    "--socket",
                    str(ours_sock),
                    # Split rings, as qemu-storage-daemon has no packed ones: like for like.
                    "--no-packed",
                    str(image),
                ],
                stdout=subprocess.DEVNULL,
                stderr=ours_log,
                start_new_session=True,
            ),
            subprocess.Popen(
                [
                    "qemu-storage-daemon",
                    "--blockdev",
                    f"driver=file,node-name=file0,filename={image}",
                    "--blockdev",
                    "driver=raw,node-name=disk0,file=file0",
                    "--export",
                    "type=vhost-user-blk,id=exp0,addr.type=unix,"
                    f"addr.path={qsd_sock},node-name=disk0,writable=on,num-queues=1",
                ],
                stdout=subprocess.DEVNULL,
                stderr=qsd_log,
                start_new_session=True,
            ),
        ]
        try:
            _wait_socket(ours_sock, procs[0], "virtio serve blk")
            _wait_socket(qsd_sock, procs[1], "qemu-storage-daemon")
            result = run_guest(
                guest_script(args.runtime),
                vm=args.vm,
                disks=[VhostUserBlkDisk(str(ours_sock)), VhostUserBlkDisk(str(qsd_sock))],
                timeout=120 + 2 * len(JOBS) * (args.runtime + 5),
                host_share=True,
                assets=assets,
            )
        finally:
            for proc in procs:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGTERM)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=10)
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
