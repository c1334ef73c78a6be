"""A real Linux guest's virtio_scsi driver against `virtio serve scsi`.

User-Mode Linux boots with the device on a vhost-user socket; the guest's
SCSI midlayer scans target 0 (REPORT LUNS, INQUIRY and its VPD pages, READ
CAPACITY, MODE SENSE), sd attaches a disk per LUN, and the script writes
and reads /dev/sda with dd. The host checks what the guest saw and the
image files.
"""

from __future__ import annotations

import hashlib
import os
import threading
import time
from pathlib import Path

import pytest

from tests.integration.conftest import ServeProcess
from virtio.vm import GuestAssets, GuestResult, run_guest
from virtio.vm.runner import VhostUserDevice

pytestmark = pytest.mark.guest

SCSI = "Device Types / SCSI Host Device"
N_REQ_DEV = f"devicenormative:{SCSI} / Device Operation / Device Operation: Request Queues"
N_EVENT_DEV = f"devicenormative:{SCSI} / Device Operation / Device Operation: eventq"
N_INIT_DEV = f"devicenormative:{SCSI} / Device Initialization"
N_CONFIG_DEV = f"devicenormative:{SCSI} / Device configuration layout"

TIMEOUT = 90.0
MIB = 1 << 20
PATTERN = "pyvirtio-scsi-pattern-"


def serve(tmp_path: Path, *sizes: int, extra: tuple[str, ...] = ()) -> ServeProcess:
    paths = []
    for i, size in enumerate(sizes):
        path = tmp_path / f"lun{i}.img"
        with open(path, "wb") as f:
            f.truncate(size)
        paths.append(str(path))
    server = ServeProcess(
        image=None,
        socket=tmp_path / "scsi.sock",
        args=[*extra, *paths],
        log=tmp_path / "serve.log",
        kind="scsi",
    )
    server.start()
    return server


def run(
    assets: GuestAssets, script: str, server: ServeProcess, *, host_share: bool = False
) -> GuestResult:
    result = run_guest(
        script,
        vm="uml",
        devices=[VhostUserDevice(str(server.socket), 8)],
        timeout=TIMEOUT,
        host_share=host_share,
        assets=assets,
    )
    assert not result.timed_out, f"guest timed out:\n{result.output[-3000:]}\n{server.log_text()}"
    assert result.exit_code == 0, (
        f"guest script failed:\n{result.output[-4000:]}\n{server.log_text()}"
    )
    return result


WAIT_DISKS = """
for i in $(seq 100); do [ -b /dev/sda ] && [ -b /dev/sd{last} ] && break; sleep 0.1; done
"""

READ_WRITE = (
    "set -e\n"
    + WAIT_DISKS
    + f"""
ls /sys/class/scsi_disk
for d in /sys/class/scsi_disk/*; do
  echo "disk $(basename $d) $(cat $d/device/vendor) $(cat $d/device/model)"
done
echo "size-a $(cat /sys/block/sda/size) size-b $(cat /sys/block/sdb/size)"
echo "cache $(cat /sys/class/scsi_disk/0:0:0:0/cache_type)"
echo "provisioning $(cat /sys/class/scsi_disk/0:0:0:0/provisioning_mode)"
for i in 0 1 2 3 4 5 6 7; do
  echo "{PATTERN}$i" | dd of=/dev/sda bs=4096 seek=$((i * 5)) conv=sync,fsync 2>/dev/null
done
dd if=/dev/urandom of=/tmp/big bs=64k count=32 2>/dev/null
dd if=/tmp/big of=/dev/sdb bs=64k oflag=direct 2>/dev/null
sync
echo 3 > /proc/sys/vm/drop_caches
for i in 0 1 2 3 4 5 6 7; do
  got=$(dd if=/dev/sda bs=4096 skip=$((i * 5)) count=1 2>/dev/null | head -c 23)
  test "$got" = "{PATTERN}$i"
done
echo "big-guest $(md5sum < /tmp/big | cut -d' ' -f1)"
echo "big-read $(dd if=/dev/sdb bs=64k count=32 iflag=direct 2>/dev/null | md5sum | cut -d' ' -f1)"
"""
)


def lines(result: GuestResult, prefix: str) -> list[str]:
    return [line for line in result.section().splitlines() if line.startswith(prefix)]


@pytest.mark.normative(N_REQ_DEV, N_INIT_DEV, N_CONFIG_DEV)
def test_uml_guest_sees_luns_and_reads_writes(tmp_path: Path, guest_assets: GuestAssets) -> None:
    server = serve(tmp_path, 16 * MIB, 8 * MIB)
    try:
        result = run(guest_assets, READ_WRITE.replace("{last}", "b"), server)
    finally:
        server.stop()
    disks = lines(result, "disk ")
    assert [d.split()[1] for d in disks] == ["0:0:0:0", "0:0:0:1"], result.section()
    assert all("PYVIRTIO" in d for d in disks)
    assert lines(result, "size-a ") == [f"size-a {16 * MIB // 512} size-b {8 * MIB // 512}"]
    assert lines(result, "cache ") == ["cache write back"]
    (guest_md5,) = lines(result, "big-guest ")
    (read_md5,) = lines(result, "big-read ")
    assert guest_md5.split()[1] == read_md5.split()[1]
    data = (tmp_path / "lun0.img").read_bytes()
    for i in range(8):
        assert data[i * 5 * 4096 :].startswith(f"{PATTERN}{i}".encode())
    big = (tmp_path / "lun1.img").read_bytes()[: 2 * MIB]
    assert hashlib.md5(big).hexdigest() == guest_md5.split()[1]


FIO = """
set -e
for i in $(seq 100); do [ -b /dev/sda ] && break; sleep 0.1; done
hostrun /usr/bin/fio --name=verify --filename=/dev/sda --direct=1 --ioengine=libaio \\
  --rw=randrw --bs=4k --iodepth=16 --size=8M --verify=crc32c --verify_fatal=1 \\
  --do_verify=1 --output-format=terse > /tmp/fio.out
echo "fio $(cut -d';' -f1-5 /tmp/fio.out)"
hostrun /usr/sbin/blkdiscard -o 1048576 -l 1048576 /dev/sda
echo "discarded $(dd if=/dev/sda bs=64k skip=16 count=16 iflag=direct 2>/dev/null | tr -d '\\000' | wc -c)"
"""


@pytest.mark.normative(N_REQ_DEV)
def test_uml_guest_fio_verify_and_discard(tmp_path: Path, guest_assets: GuestAssets) -> None:
    server = serve(tmp_path, 16 * MIB)
    image = tmp_path / "lun0.img"
    try:
        result = run(guest_assets, FIO, server, host_share=True)
    finally:
        server.stop()
    (fio,) = lines(result, "fio ")
    assert fio.split(";")[4] == "0", fio  # fio's error field: verification passed
    assert lines(result, "discarded ") == ["discarded 0"]
    assert image.read_bytes()[MIB : 2 * MIB] == bytes(MIB)


# The guest asks the host for each step by writing "step N" at block 100 of
# /dev/sda; a host thread watching the image answers through the control FIFO.
HOTPLUG = """
set -e
for i in $(seq 100); do [ -b /dev/sda ] && break; sleep 0.1; done
step() {{ echo "step $1" | dd of=/dev/sda bs=512 seek=100 conv=sync oflag=direct 2>/dev/null; }}
echo "before $(ls /sys/class/scsi_disk | tr '\\n' ' ')"
step 1
for i in $(seq 150); do [ -b /dev/sdb ] && break; sleep 0.1; done
echo "added $(ls /sys/class/scsi_disk | tr '\\n' ' ')"
echo "{pattern}" | dd of=/dev/sdb bs=512 seek=3 conv=sync oflag=direct 2>/dev/null
step 2
for i in $(seq 150); do [ "$(cat /sys/block/sda/size)" = 49152 ] && break; sleep 0.1; done
echo "resized $(cat /sys/block/sda/size)"
step 3
for i in $(seq 150); do [ ! -e /sys/class/scsi_disk/0:0:0:1 ] && break; sleep 0.1; done
echo "removed $(ls /sys/class/scsi_disk | tr '\\n' ' ')"
"""


def answer_steps(image: Path, fifo: Path, extra: Path, stop: threading.Event) -> None:
    """Do what the guest asks for at block 100 of LUN 0, each step once."""
    lines_for = {1: f"add {extra}", 2: "resize 0", 3: "remove 1"}
    done: set[int] = set()
    while not stop.is_set() and len(done) < len(lines_for):
        with open(image, "rb") as f:
            f.seek(100 * 512)
            block = f.read(16)
        if block.startswith(b"step "):
            n = int(block[5:6])
            if n in lines_for and n not in done:
                done.add(n)
                if n == 2:
                    os.truncate(image, 24 * MIB)  # the host grows LUN 0, then says so
                with open(fifo, "w") as ctl:
                    ctl.write(lines_for[n] + "\n")
        time.sleep(0.05)


@pytest.mark.normative(N_EVENT_DEV)
def test_uml_guest_sees_hotplug_resize_and_unplug(
    tmp_path: Path, guest_assets: GuestAssets
) -> None:
    fifo = tmp_path / "control"
    extra = tmp_path / "extra.img"
    with open(extra, "wb") as f:
        f.truncate(4 * MIB)
    server = serve(tmp_path, 16 * MIB, extra=("--control", str(fifo)))
    stop = threading.Event()
    helper = threading.Thread(
        target=answer_steps, args=(tmp_path / "lun0.img", fifo, extra, stop), daemon=True
    )
    helper.start()
    try:
        result = run(guest_assets, HOTPLUG.format(pattern=PATTERN), server)
    finally:
        stop.set()
        helper.join(5)
        server.stop()
    seen = {line.split()[0]: line.split()[1:] for line in result.section().splitlines() if line}
    assert seen["before"] == ["0:0:0:0"]
    assert seen["added"] == ["0:0:0:0", "0:0:0:1"], server.log_text()
    assert seen["resized"] == ["49152"], server.log_text()
    assert seen["removed"] == ["0:0:0:0"], server.log_text()
    assert extra.read_bytes()[3 * 512 :].startswith(PATTERN.encode())
    assert "added LUN 1" in server.log_text() and "removed LUN 1" in server.log_text()
