"""`virtio demo`: serve a disk from pyvirtio and let a real Linux guest use it.

The demo starts pyvirtio's vhost-user-blk back-end on a scratch image, boots
a Debian-built Linux guest against it (User-Mode Linux by default, QEMU with
``--vm qemu``), and reports what the guest's own virtio_blk driver did: the
device it found, the features it negotiated, the data it wrote and read back
(checked on both sides), and the throughput it saw.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import sys
import threading
import time

from virtio.devices.blk import BlkDevice, BlkOptions
from virtio.spec import features as F
from virtio.spec.device_ids import DeviceId
from virtio.vhost_user.server import VhostUserServer
from virtio.vm import AssetError, VhostUserBlkDisk, cache_dir, prepare, run_guest

MIB = 1 << 20

GUEST_SCRIPT = """
set -e
now() {{ cut -d' ' -f1 /proc/uptime; }}
echo "device $(cat /sys/block/vda/size) sectors, $(ls /sys/block/vda/mq | wc -l) queue(s)"
echo "features $(cat /sys/bus/virtio/devices/*/features)"
echo "driver $(basename $(readlink /sys/bus/virtio/devices/*/driver))"
dd if=/dev/urandom of=/tmp/data bs=1M count={mib} 2>/dev/null
echo "wrote-sum $(md5sum /tmp/data | cut -d' ' -f1)"
t0=$(now)
dd if=/tmp/data of=/dev/vda bs=1M count={mib} conv=fsync 2>/dev/null
t1=$(now)
echo 3 > /proc/sys/vm/drop_caches
dd if=/dev/vda of=/tmp/back bs=1M count={mib} iflag=direct 2>/dev/null
t2=$(now)
echo "write-seconds $(awk "BEGIN {{ print $t1 - $t0 }}")"
echo "read-seconds $(awk "BEGIN {{ print $t2 - $t1 }}")"
echo "read-sum $(md5sum /tmp/back | cut -d' ' -f1)"
"""


class Reporter:
    """Progress and results, with rich when it is installed, plain text otherwise."""

    def __init__(self) -> None:
        try:
            from rich.console import Console

            self.console: object | None = Console()
        except ImportError:
            self.console = None

    def step(self, text: str) -> None:
        if self.console is not None:
            self.console.print(f"[bold cyan]==>[/] {text}")  # type: ignore[attr-defined]
        else:
            print(f"==> {text}", flush=True)

    def table(self, title: str, rows: list[tuple[str, str]]) -> None:
        if self.console is not None:
            from rich.table import Table

            table = Table(title=title, show_header=False)
            table.add_column(style="bold")
            table.add_column()
            for key, value in rows:
                table.add_row(key, value)
            self.console.print(table)  # type: ignore[attr-defined]
            return
        print(title)
        width = max(len(k) for k, _ in rows)
        for key, value in rows:
            print(f"  {key:<{width}}  {value}")


def _rate(mib: int, seconds: str | None) -> str:
    try:
        value = float(seconds or "")
    except ValueError:
        return "?"
    # /proc/uptime counts hundredths: below that the guest cannot tell.
    return f"{mib / max(value, 0.01):,.1f} MiB/s ({value:.2f} s, guest clock)"


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="virtio demo", description=__doc__)
    parser.add_argument("--vm", choices=("uml", "qemu"), default="uml")
    parser.add_argument("--size-mib", type=int, default=16, help="data the guest writes")
    parser.add_argument("--timeout", type=float, default=180.0)
    args = parser.parse_args(argv)
    if not 1 <= args.size_mib <= 128:
        parser.error("--size-mib must be 1..128")
    logging.getLogger("virtio").setLevel(logging.WARNING)
    out = Reporter()
    out.step(f"preparing the guest (cache: {cache_dir()})")
    try:
        assets = prepare(out.step)
    except AssetError as err:
        print(f"virtio demo: {err}", file=sys.stderr)
        return 1
    work = cache_dir() / "demo"
    work.mkdir(parents=True, exist_ok=True)
    image = work / "disk.img"
    with open(image, "wb") as f:
        f.truncate(256 * MIB)
    socket_path = work / "vblk.sock"
    device = BlkDevice(image, BlkOptions(num_queues=2, serial="pyvirtio-demo"))
    server = VhostUserServer(socket_path, device)
    server.bind()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    out.step(f"pyvirtio serves {image} over vhost-user at {socket_path}")
    out.step(f"booting a Linux {assets.kernel_version} guest under {args.vm.upper()}")
    started = time.monotonic()
    try:
        result = run_guest(
            GUEST_SCRIPT.format(mib=args.size_mib),
            vm=args.vm,
            disks=[VhostUserBlkDisk(str(socket_path), num_queues=2, packed=args.vm == "qemu")],
            timeout=args.timeout,
            smp=2 if args.vm == "qemu" else 1,
            assets=assets,
        )
    finally:
        server.stop()
        thread.join(timeout=5)
        device.close()
    elapsed = time.monotonic() - started
    lines = result.section().splitlines()
    if result.exit_code != 0:
        print(result.output[-4000:], file=sys.stderr)
        print("virtio demo: the guest did not finish its run (see above)", file=sys.stderr)
        return 1
    facts = {line.split(" ", 1)[0]: line.split(" ", 1)[1] for line in lines if " " in line}
    bits_text = facts.get("features", "")
    bits = sum(1 << i for i, c in enumerate(bits_text) if c == "1")
    names = F.describe(DeviceId.BLOCK, bits)
    host_sum = hashlib.md5(image.read_bytes()[: args.size_mib * MIB]).hexdigest()
    wrote, read = facts.get("wrote-sum"), facts.get("read-sum")
    verified = wrote == read == host_sum
    out.table(
        "What the guest's virtio_blk driver did",
        [
            ("device found", f"/dev/vda: {facts.get('device', '?')}"),
            ("guest driver", facts.get("driver", "?")),
            ("negotiated features", ", ".join(names)),
            ("data", f"{args.size_mib} MiB written and read back"),
            ("checksums (guest write / guest read / host image)", f"{wrote} / {read} / {host_sum}"),
            ("verified", "yes" if verified else "NO"),
            (
                "write throughput (guest dd, fsync)",
                _rate(args.size_mib, facts.get("write-seconds")),
            ),
            ("read throughput (guest dd, direct)", _rate(args.size_mib, facts.get("read-seconds"))),
            ("requests served by pyvirtio", ", ".join(f"{k} {v}" for k, v in device.stats.items())),
            ("guest run (boot, work, power-off)", f"{elapsed:.1f} s"),
        ],
    )
    return 0 if verified else 1
