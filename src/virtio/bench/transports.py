"""`virtio bench transports`: the pyvirtio blk driver over a register-level transport and over vhost-user.

    virtio bench transports            # our driver: QEMU's virtio-blk-pci (qtest) vs qsd (vhost-user)
    virtio bench pci-guest             # Linux's driver: BAR accesses per request on our PCI function

``transports`` runs the same jobs as ``virtio bench backends`` with the same
driver against QEMU's own virtio-blk-pci, reached register by register
through qtest (every register access and every interrupt is a qtest round
trip), and against qemu-storage-daemon over vhost-user (rings only), in
one run, and reports the ratio.

``pci-guest`` boots a Linux guest three times against ``virtio serve blk
--transport pci`` (idle, fio 4 KiB QD1, fio 4 KiB QD32) and divides the
extra BAR and configuration accesses, notifications and interrupts the
server counted by the requests fio made: with event index the ratio is far
below one per request at QD32.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
from contextlib import AbstractContextManager, ExitStack
from pathlib import Path

from virtio.bench.backends import JOBS, run_jobs
from virtio.bench.blk import qemu_pci_transport
from virtio.bench.peers import qsd_command, start_process, stop_process
from virtio.core.driver import DriverTransport

_SUMMARY = re.compile(r"VM \d+: (\d+) register accesses, (\d+) notifications, (\d+) interrupts")


def _image(work: Path, name: str, size: int) -> Path:
    path = work / name
    with open(path, "wb") as f:
        f.truncate(size)
    return path


def transports_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="virtio bench transports", description=__doc__)
    parser.add_argument("--runtime", type=float, default=5.0, help="seconds per job")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    with ExitStack() as stack:
        work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="pyvirtio-bench-")))
        # Two images: QEMU and the daemon each lock theirs.
        qsd_image = _image(work, "qsd.img", 256 << 20)
        qemu_image = _image(work, "qemu.img", 256 << 20)
        sock = work / "qsd.sock"
        try:
            proc = start_process(qsd_command(qsd_image, sock), sock, work / "qsd.log")
        except RuntimeError as err:
            print(f"virtio bench transports: {err}", file=sys.stderr)
            return 1
        stack.callback(stop_process, proc)

        def qtest() -> AbstractContextManager[DriverTransport]:
            return qemu_pci_transport(str(qemu_image), 1)

        vhost_user = run_jobs(sock, args.runtime)
        registers = run_jobs(qtest, args.runtime)
    rows = [
        {
            "job": name,
            "vhost_user_qsd_iops": round(vhost_user[name]["iops"]),
            "qtest_virtio_blk_pci_iops": round(registers[name]["iops"]),
            "ratio": round(registers[name]["iops"] / vhost_user[name]["iops"], 3),
            "vhost_user_p50_us": vhost_user[name]["p50_us"],
            "qtest_p50_us": registers[name]["p50_us"],
        }
        for name, _ in JOBS
    ]
    if args.json:
        print(json.dumps({"runtime_s": args.runtime, "rows": rows}))
        return 0
    print(
        "| job | vhost-user → qsd IOPS | qtest → QEMU virtio-blk-pci IOPS | ratio | "
        "vhost-user p50 us | qtest p50 us |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(
            f"| {r['job']} | {r['vhost_user_qsd_iops']:,} | {r['qtest_virtio_blk_pci_iops']:,} | "
            f"{r['ratio']} | {r['vhost_user_p50_us']} | {r['qtest_p50_us']} |"
        )
    return 0


FIO = (
    "hostrun /usr/bin/fio --name=bench --filename=/dev/vda --direct=1 --ioengine=libaio "
    "--rw=randread --bs=4k --iodepth={qd} --iodepth_batch_submit={batch} "
    "--iodepth_batch_complete_max={batch} --number_ios={ios} --output-format=terse "
    "| cut -d';' -f6-8 | sed 's/^/FIO /'"
)


#: (iodepth, fio's submit/complete batch): one request per system call, then batches.
JOBS_QD = [(1, 1), (32, 1), (32, 16)]


def _guest_run(server_sock: Path, script: str) -> str:
    from virtio.vm import run_guest

    launcher = [sys.executable, "-m", "virtio.cli", "qemu", "--pci", str(server_sock), "--"]
    result = run_guest(script, vm="qemu", timeout=300, host_share=True, launcher=launcher)
    if result.exit_code != 0:
        raise RuntimeError(f"the guest failed:\n{result.output[-2000:]}")
    return result.section()


def _counts(log: Path, sessions: int) -> tuple[int, int, int]:
    found = _SUMMARY.findall(log.read_text())
    if len(found) < sessions:
        raise RuntimeError(f"the server logged {len(found)} sessions, not {sessions}")
    accesses, notifications, interrupts = (int(v) for v in found[sessions - 1])
    return accesses, notifications, interrupts


def pci_guest_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="virtio bench pci-guest", description=__doc__)
    parser.add_argument("--ios", type=int, default=4000, help="requests per fio job")
    parser.add_argument(
        "--poll-us", type=float, default=None, help="the server's --poll-us (default: its own)"
    )
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    with ExitStack() as stack:
        work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="pyvirtio-bench-")))
        image = _image(work, "disk.img", 256 << 20)
        sock, log = work / "blk.sock", work / "serve.log"
        serve = [sys.executable, "-m", "virtio.cli", "serve", "blk", "--transport", "pci"]
        if args.poll_us is not None:
            serve += ["--poll-us", str(args.poll_us)]
        proc = start_process([*serve, "--socket", str(sock), str(image)], sock, log)
        stack.callback(stop_process, proc)
        try:
            _guest_run(sock, "true")
            idle = _counts(log, 1)
            rows = []
            for n, (qd, batch) in enumerate(JOBS_QD, start=2):
                out = _guest_run(sock, FIO.format(qd=qd, batch=batch, ios=args.ios))
                kb, _bw, iops = next(
                    line.split()[1] for line in out.splitlines() if line.startswith("FIO ")
                ).split(";")
                requests = int(kb) // 4
                counts = _counts(log, n)
                extra = [c - i for c, i in zip(counts, idle, strict=True)]
                rows.append(
                    {
                        "job": f"4k randread QD{qd}"
                        + (f", batches of {batch}" if batch > 1 else ""),
                        "requests": requests,
                        "guest_iops": int(float(iops)),
                        "accesses_per_request": round(extra[0] / requests, 3),
                        "notifications_per_request": round(extra[1] / requests, 3),
                        "interrupts_per_request": round(extra[2] / requests, 3),
                    }
                )
        except (RuntimeError, StopIteration, ValueError) as err:
            print(f"virtio bench pci-guest: {err}", file=sys.stderr)
            return 1
    if args.json:
        print(
            json.dumps(
                {
                    "idle_boot": dict(
                        zip(("accesses", "notifications", "interrupts"), idle, strict=True)
                    ),
                    "rows": rows,
                }
            )
        )
        return 0
    print(f"an idle boot: {idle[0]} accesses, {idle[1]} notifications, {idle[2]} interrupts")
    print(
        "| job | requests | guest IOPS | accesses/request | notifications/request | interrupts/request |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(
            f"| {r['job']} | {r['requests']} | {r['guest_iops']:,} | {r['accesses_per_request']} | "
            f"{r['notifications_per_request']} | {r['interrupts_per_request']} |"
        )
    return 0
