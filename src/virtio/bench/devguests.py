"""`virtio bench dev-guests`: fio in real guests, pyvirtio's fs and scsi beside their C peers.

fs: one QEMU guest mounts two virtiofs file systems over the same host
directory, ``pyv`` served by ``virtio serve fs`` and ``cfs`` by QEMU's C
virtiofsd, and reads a 64 MiB file laid out on the host first. Both servers
run uncached (``--cache never`` / ``-o cache=none``) so every read crosses the
virtqueue instead of the guest's page cache. (A UML guest cannot be used:
virtio_uml reads the mount tag with VHOST_USER_GET_CONFIG, which virtiofsd
does not implement, so its mount fails.)

scsi: one guest (UML by default) gets ``virtio serve scsi`` as /dev/sda and
qemu-storage-daemon's vhost-user-blk export of the same image as /dev/vda.

pyvirtio is held to split rings like its peers. fio is the host's binary,
reached through the read-only share. The table shows both and the ratio
pyvirtio / C peer (above 1: pyvirtio is faster).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

from virtio.bench.guest import parse
from virtio.bench.peers import qsd_command, start_process, stop_process
from virtio.vm import AssetError, GuestAssets, VhostUserBlkDisk, VhostUserDevice, prepare, run_guest
from virtio.vm.runner import Vm

VIRTIOFSD = "/usr/lib/qemu/virtiofsd"
FS_ID = 26
SCSI_ID = 8
FS_FILE_MIB = 64
SCSI_IMAGE_MIB = 256
#: Mount tags and block devices, pyvirtio's first.
FS_TAGS = ("pyv", "cfs")
SCSI_DEVS = ("sda", "vda")


@dataclass(frozen=True)
class Job:
    """One fio job: its table name, rw mode, block size, queue depth."""

    name: str
    rw: str
    bs: str
    depth: int

    @property
    def metric(self) -> str:
        """What the table compares: IOPS for small blocks, MB/s for large ones."""
        return "MB/s" if self.bs.endswith("M") else "IOPS"


# Buffered reads on virtiofs (direct_io from cache=never): psync, one request at a time.
# The guest sends each 1M read as READs of at most the queue size less 4 pages (124 with
# QEMU's default 128; one READ of 256 pages, FUSE's max_pages, with 1024), one after
# another: direct_io reads of a synchronous call are not sent in parallel.
FS_JOBS = [Job("4k randread QD1", "randread", "4k", 1), Job("1M seq read", "read", "1M", 1)]
SCSI_JOBS = [
    Job("4k randread QD1", "randread", "4k", 1),
    Job("4k randread QD32", "randread", "4k", 32),
    Job("1M seq read QD4", "read", "1M", 4),
]


def fs_script(runtime: int) -> str:
    lines = ["set -e"]
    for tag in FS_TAGS:
        lines += [f"mkdir -p /tmp/{tag}", f"mount -t virtiofs {tag} /tmp/{tag}"]
        lines.append(f"test -s /tmp/{tag}/data || {{ echo 'no data on {tag}'; exit 3; }}")
    for job in FS_JOBS:
        for tag in FS_TAGS:
            lines.append("echo 3 > /proc/sys/vm/drop_caches")
            lines.append(f'echo "JOB {tag} {job.name}"')
            lines.append(
                f"hostrun /usr/bin/fio --name=bench --filename=/tmp/{tag}/data --direct=0 "
                f"--ioengine=psync --rw={job.rw} --bs={job.bs} --runtime={runtime} --time_based "
                f"--size={FS_FILE_MIB}M --output-format=json | tr -d '\\n'"
            )
            lines.append("echo")
    return "\n".join(lines) + "\n"


def scsi_script(runtime: int) -> str:
    wait = " && ".join(f"[ -b /dev/{d} ]" for d in SCSI_DEVS)
    lines = [
        "set -e",
        f"for i in $(seq 100); do {wait} && break; sleep 0.1; done",
        *(f"[ -b /dev/{d} ] || {{ echo 'no /dev/{d}'; exit 3; }}" for d in SCSI_DEVS),
    ]
    for job in SCSI_JOBS:
        for dev in SCSI_DEVS:
            lines.append(f'echo "JOB {dev} {job.name}"')
            lines.append(
                f"hostrun /usr/bin/fio --name=bench --filename=/dev/{dev} --direct=1 "
                f"--ioengine=libaio --rw={job.rw} --bs={job.bs} --iodepth={job.depth} "
                f"--runtime={runtime} --time_based --size=192M --output-format=json | tr -d '\\n'"
            )
            lines.append("echo")
    return "\n".join(lines) + "\n"


def _fill(path: Path, mib: int) -> None:
    """Real data, not a hole: both servers read the same bytes from the host's page cache."""
    with open(path, "wb") as f:
        for _ in range(mib):
            f.write(os.urandom(1 << 20))


def _serve(kind: str, sock: Path, args: list[str]) -> list[str]:
    return [sys.executable, "-m", "virtio.cli", "serve", kind, "--socket", str(sock), *args]


def _rows(
    device: str,
    jobs: list[Job],
    figures: dict[tuple[str, str], dict[str, float]],
    labels: tuple[str, str],
    peer: str,
) -> list[dict[str, object]]:
    rows: list[dict[str, object]] = []
    for job in jobs:
        ours, theirs = figures.get((labels[0], job.name)), figures.get((labels[1], job.name))
        if ours is None or theirs is None:
            raise RuntimeError(f"no fio result for {device} {job.name}")
        key = "bw" if job.metric == "MB/s" else "iops"
        scale = 1e6 if key == "bw" else 1.0
        a, b = ours[key] / scale, theirs[key] / scale
        rows.append(
            {
                "device": device,
                "job": job.name,
                "metric": job.metric,
                "pyvirtio": round(a, 1) if key == "bw" else round(a),
                "peer": peer,
                "peer_value": round(b, 1) if key == "bw" else round(b),
                "ratio": round(a / b, 3) if b else 0.0,
            }
        )
    return rows


def _run(
    script: str,
    vm: Vm,
    timeout: float,
    assets: GuestAssets,
    devices: list[VhostUserDevice],
    disks: tuple[VhostUserBlkDisk, ...] = (),
) -> str:
    result = run_guest(
        script,
        vm=vm,
        timeout=timeout,
        host_share=True,
        assets=assets,
        devices=devices,
        disks=disks,
    )
    if result.exit_code != 0:
        why = "timed out" if result.timed_out else f"exit {result.exit_code}"
        raise RuntimeError(f"guest {why}:\n{result.output[-3000:]}")
    return result.section()


def bench_fs(
    work: Path, runtime: int, assets: GuestAssets, threads: int, queue_size: int
) -> list[dict[str, object]]:
    if not os.access(VIRTIOFSD, os.X_OK):
        raise RuntimeError(f"{VIRTIOFSD} is not installed (qemu-system-common)")
    shared = work / "shared"
    shared.mkdir()
    _fill(shared / "data", FS_FILE_MIB)
    ours, theirs = work / "pyv-fs.sock", work / "c-fs.sock"
    with ExitStack() as stack:
        cmd = _serve(
            "fs", ours, ["--shared-dir", str(shared), "--tag", FS_TAGS[0], "--cache", "never"]
        )
        cmd += ["--no-packed", "--queue-size", str(max(queue_size, 256))]
        cmd += ["--thread-pool-size", str(threads)]
        stack.callback(stop_process, start_process(cmd, ours, work / "pyv.log"))
        peer = [
            VIRTIOFSD,
            f"--socket-path={theirs}",
            "-o",
            f"source={shared}",
            "-o",
            "cache=none",
            # chroot: no mount namespace to set up; the run is root on a scratch directory.
            "-o",
            "sandbox=chroot",
            f"--thread-pool-size={threads}",
        ]
        stack.callback(stop_process, start_process(peer, theirs, work / "virtiofsd.log"))
        section = _run(
            fs_script(runtime),
            "qemu",
            180 + 2 * len(FS_JOBS) * (runtime + 20),
            assets,
            devices=[
                VhostUserDevice(
                    str(s), FS_ID, "vhost-user-fs-pci", f",tag={tag},queue-size={queue_size}"
                )
                for s, tag in zip((ours, theirs), FS_TAGS, strict=True)
            ],
        )
    return _rows("fs", FS_JOBS, parse(section), FS_TAGS, "virtiofsd")


def bench_scsi(work: Path, runtime: int, assets: GuestAssets, vm: Vm) -> list[dict[str, object]]:
    if shutil.which("qemu-storage-daemon") is None:
        raise RuntimeError("qemu-storage-daemon is not installed (./dev setup)")
    image = work / "disk.img"
    _fill(image, SCSI_IMAGE_MIB)
    ours, theirs = work / "pyv-scsi.sock", work / "qsd.sock"
    with ExitStack() as stack:
        cmd = _serve("scsi", ours, ["--no-packed", str(image)])
        stack.callback(stop_process, start_process(cmd, ours, work / "pyv-scsi.log"))
        proc = start_process(qsd_command(image, theirs), theirs, work / "qsd.log")
        stack.callback(stop_process, proc)
        section = _run(
            scsi_script(runtime),
            vm,
            (120 if vm == "uml" else 240) + 2 * len(SCSI_JOBS) * (runtime + 15),
            assets,
            devices=[VhostUserDevice(str(ours), SCSI_ID, "vhost-user-scsi-pci")],
            disks=(VhostUserBlkDisk(str(theirs)),),
        )
    return _rows("scsi", SCSI_JOBS, parse(section), SCSI_DEVS, "qsd vhost-user-blk")


def table(rows: list[dict[str, object]]) -> str:
    out = ["| what | pyvirtio | C peer | ratio |", "| --- | ---: | ---: | ---: |"]
    for r in rows:
        what = f"{r['device']} {r['job']} ({r['metric']}; peer: {r['peer']})"
        out.append(f"| {what} | {r['pyvirtio']:,} | {r['peer_value']:,} | {r['ratio']} |")
    return "\n".join(out)


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="virtio bench dev-guests", description=__doc__)
    p.add_argument("--runtime", type=int, default=5, help="seconds per fio job (default 5)")
    p.add_argument("--only", choices=("fs", "scsi"), help="one device type only")
    p.add_argument("--scsi-vm", choices=("uml", "qemu"), default="uml")
    p.add_argument(
        "--virtiofsd-threads",
        type=int,
        default=2,
        help="--thread-pool-size of virtiofsd and of ours (default 2)",
    )
    p.add_argument(
        "--fs-queue-size",
        type=int,
        default=1024,
        choices=(128, 256, 512, 1024),
        help="vhost-user-fs-pci queue-size of both devices (default 1024, as QEMU's "
        "virtiofs instructions set it; QEMU's own default is 128)",
    )
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    if args.runtime < 1:
        p.error("--runtime must be at least 1")
    try:
        assets = prepare()
    except AssetError as err:
        print(f"virtio bench dev-guests: {err}", file=sys.stderr)
        return 1
    rows: list[dict[str, object]] = []
    try:
        with tempfile.TemporaryDirectory(prefix="pyvirtio-devguests-") as tmp:
            work = Path(tmp)
            if args.only in (None, "fs"):
                (work / "fs").mkdir()
                rows += bench_fs(
                    work / "fs", args.runtime, assets, args.virtiofsd_threads, args.fs_queue_size
                )
            if args.only in (None, "scsi"):
                (work / "scsi").mkdir()
                rows += bench_scsi(work / "scsi", args.runtime, assets, args.scsi_vm)
    except (RuntimeError, OSError, ValueError, KeyError) as err:
        print(f"virtio bench dev-guests: {err}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps({"runtime_s": args.runtime, "scsi_vm": args.scsi_vm, "rows": rows}))
        return 0
    print(
        f"fio in real guests, {args.runtime} s per job; fs: QEMU TCG guest, uncached virtiofs; "
        f"scsi: {args.scsi_vm.upper()} guest, one image for both"
    )
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
