"""A real Linux guest's virtio_blk driver against pyvirtio's vhost-user back-end.

Each test boots a Debian kernel under QEMU (TCG) or User-Mode Linux, attaches
`virtio serve blk` over vhost-user, runs a shell script in the guest and
checks both what the guest saw and the image file on the host.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.integration.conftest import BlkServer
from virtio.vm import GuestAssets, GuestResult, VhostUserBlkDisk, run_guest

pytestmark = pytest.mark.guest

N_BLK_DEV_OP = "devicenormative:Device Types / Block Device / Device Operation"
N_BLK_DEV_INIT = "devicenormative:Device Types / Block Device / Device Initialization"
N_STATUS_DEV = "devicenormative:Basic Facilities of a Virtio Device / Device Status Field"
N_FEATURES_DEV = "devicenormative:Basic Facilities of a Virtio Device / Feature Bits"
N_SPLIT_USED = (
    "devicenormative:Basic Facilities of a Virtio Device / Virtqueues / The Virtqueue Used Ring"
)
N_PACKED_DEV = "devicenormative:Basic Facilities of a Virtio Device / Packed Virtqueues"
N_INDIRECT_DEV = (
    "devicenormative:Basic Facilities of a Virtio Device / Virtqueues / "
    "The Virtqueue Descriptor Table / Indirect Descriptors"
)

BOOT_TIMEOUT = 90.0
PATTERN = "pyvirtio-guest-pattern-"


def run(
    assets: GuestAssets,
    script: str,
    server: BlkServer,
    *,
    vm: str = "qemu",
    transport: str = "pci",
    num_queues: int = 1,
    packed: bool = False,
    host_share: bool = False,
    reconnect: bool = False,
    timeout: float = BOOT_TIMEOUT,
    smp: int = 1,
    kernel_args: tuple[str, ...] = (),
) -> GuestResult:
    disk = VhostUserBlkDisk(
        str(server.socket), num_queues=num_queues, packed=packed, reconnect=reconnect
    )
    result = run_guest(
        script,
        vm=vm,  # type: ignore[arg-type]
        disks=[disk],
        timeout=timeout,
        transport=transport,  # type: ignore[arg-type]
        host_share=host_share,
        smp=smp,
        assets=assets,
        kernel_args=kernel_args,
    )
    assert not result.timed_out, f"guest timed out:\n{result.output[-3000:]}\n{server.log_text()}"
    assert result.exit_code == 0, (
        f"guest script failed:\n{result.output[-3000:]}\n{server.log_text()}"
    )
    return result


WRITE_READ = f"""
set -e
test -b /dev/vda
for i in 0 1 2 3 4 5 6 7; do
  echo "{PATTERN}$i" | dd of=/dev/vda bs=4096 seek=$((i * 3)) conv=sync 2>/dev/null
done
sync
echo 3 > /proc/sys/vm/drop_caches
for i in 0 1 2 3 4 5 6 7; do
  got=$(dd if=/dev/vda bs=4096 skip=$((i * 3)) count=1 2>/dev/null | head -c 24)
  test "$got" = "{PATTERN}$i"
done
echo "features $(cat /sys/bus/virtio/devices/*/features)"
echo "queues $(ls /sys/block/vda/mq | wc -l)"
"""


def check_image(image: Path) -> None:
    data = image.read_bytes()
    for i in range(8):
        block = data[i * 3 * 4096 : i * 3 * 4096 + 24]
        assert block == f"{PATTERN}{i}".encode().ljust(24, b"\n")[:24] or block.startswith(
            f"{PATTERN}{i}".encode()
        )


def feature_bits(result: GuestResult) -> str:
    for line in result.section().splitlines():
        if line.startswith("features "):
            return line.split()[1]
    raise AssertionError(f"no features line in:\n{result.section()}")


@pytest.mark.normative(N_BLK_DEV_OP, N_SPLIT_USED, N_STATUS_DEV)
def test_uml_guest_writes_and_reads_back(
    guest_assets: GuestAssets, blk_server: Callable[..., BlkServer]
) -> None:
    server = blk_server()
    result = run(guest_assets, WRITE_READ, server, vm="uml")
    check_image(server.image)
    assert result.duration_s < BOOT_TIMEOUT


@pytest.mark.normative(N_BLK_DEV_OP, N_PACKED_DEV, N_FEATURES_DEV, N_INDIRECT_DEV)
def test_qemu_pci_multiqueue_packed(
    guest_assets: GuestAssets, blk_server: Callable[..., BlkServer]
) -> None:
    server = blk_server("--num-queues", "2")
    # Linux uses at most one queue per CPU: two CPUs for two queues.
    result = run(guest_assets, WRITE_READ, server, num_queues=2, packed=True, smp=2)
    check_image(server.image)
    bits = feature_bits(result)
    assert bits[34] == "1", "the Linux driver did not negotiate VIRTIO_F_RING_PACKED"
    assert bits[32] == "1"  # VIRTIO_F_VERSION_1
    assert "queues 2" in result.section()


@pytest.mark.normative(N_BLK_DEV_OP, N_SPLIT_USED)
def test_qemu_pci_split_ring_without_packed(
    guest_assets: GuestAssets, blk_server: Callable[..., BlkServer]
) -> None:
    server = blk_server("--no-packed")
    result = run(guest_assets, WRITE_READ, server)
    check_image(server.image)
    assert feature_bits(result)[34] == "0"
    assert feature_bits(result)[32] == "1"


@pytest.mark.normative(N_BLK_DEV_OP, N_SPLIT_USED)
def test_qemu_transitional_pci_through_the_legacy_interface(
    guest_assets: GuestAssets, blk_server: Callable[..., BlkServer]
) -> None:
    """Linux's virtio_pci forced onto the legacy I/O BAR: the back-end serves a legacy guest."""
    server = blk_server()
    script = WRITE_READ + "cat /sys/bus/pci/devices/*/device\n"
    result = run(
        guest_assets,
        script,
        server,
        transport="pci-transitional",
        kernel_args=("virtio_pci.force_legacy=1",),
    )
    check_image(server.image)
    bits = feature_bits(result)
    assert bits[32] == "0", "VIRTIO_F_VERSION_1 negotiated: the modern interface was used"
    assert bits[34] == "0"  # no packed rings without VERSION_1
    # A transitional virtio-blk function has PCI device id 0x1001.
    assert "0x1001" in result.section()
    assert "legacy interface" in server.log_text()


@pytest.mark.normative(N_BLK_DEV_OP)
def test_qemu_mmio_microvm(guest_assets: GuestAssets, blk_server: Callable[..., BlkServer]) -> None:
    server = blk_server()
    script = WRITE_READ + "readlink -f /sys/bus/virtio/devices/virtio0/../driver\n"
    result = run(guest_assets, script, server, transport="mmio")
    check_image(server.image)
    # The guest's virtio device hangs off a platform device driven by virtio-mmio, not PCI.
    assert "/bus/platform/drivers/virtio-mmio" in result.section()
    assert feature_bits(result)[32] == "1"  # MMIO version 2: the modern interface


@pytest.mark.normative(N_BLK_DEV_OP, N_BLK_DEV_INIT)
def test_flush_discard_and_write_zeroes(
    guest_assets: GuestAssets, blk_server: Callable[..., BlkServer]
) -> None:
    server = blk_server()
    image = server.image
    with open(image, "r+b") as f:
        f.write(b"\xab" * (1 << 20))
    script = """
set -e
test "$(cat /sys/block/vda/queue/write_zeroes_max_bytes)" -gt 0
test "$(cat /sys/block/vda/queue/discard_max_bytes)" -gt 0
cat /sys/block/vda/queue/write_cache
blkdiscard -o 0 -l 65536 /dev/vda
hostrun /usr/sbin/blkdiscard -z -o 262144 -l 65536 /dev/vda
echo flushed-data | dd of=/dev/vda bs=4096 seek=100 conv=sync,fsync 2>/dev/null
test "$(dd if=/dev/vda bs=4096 skip=64 count=16 iflag=direct 2>/dev/null | tr -d '\\000' | wc -c)" = 0
"""
    result = run(guest_assets, script, server, host_share=True)
    data = image.read_bytes()
    assert data[:65536] == bytes(65536), "discarded range still holds data"
    assert data[262144 : 262144 + 65536] == bytes(65536), "write-zeroes range is not zero"
    assert data[65536:262144] == b"\xab" * (262144 - 65536), "data outside the ranges changed"
    assert data[409600:409612] == b"flushed-data"
    assert "write back" in result.section()


@pytest.mark.normative(N_BLK_DEV_OP)
def test_read_only_device_refuses_writes(
    guest_assets: GuestAssets, blk_server: Callable[..., BlkServer]
) -> None:
    server = blk_server("--read-only")
    with open(server.image, "r+b") as f:
        f.write(b"original")
    before = hashlib.sha256(server.image.read_bytes()).hexdigest()
    script = """
test "$(cat /sys/block/vda/ro)" = 1
if echo overwrite | dd of=/dev/vda bs=4096 conv=sync,fsync 2>/dev/null; then exit 1; fi
test "$(dd if=/dev/vda bs=8 count=1 2>/dev/null)" = original
"""
    run(guest_assets, script, server, vm="uml")
    assert hashlib.sha256(server.image.read_bytes()).hexdigest() == before


@pytest.mark.normative(N_BLK_DEV_OP)
def test_guest_filesystem_round_trip(
    guest_assets: GuestAssets, blk_server: Callable[..., BlkServer]
) -> None:
    server = blk_server()
    script = """
set -e
mke2fs -q /dev/vda >/dev/null
mkdir -p /tmp/mnt
mount -t ext2 /dev/vda /tmp/mnt
seq 1 20000 > /tmp/mnt/numbers.txt
echo pyvirtio-file-marker > /tmp/mnt/marker.txt
sha=$(sha256sum /tmp/mnt/numbers.txt | cut -d' ' -f1)
umount /tmp/mnt
mount -t ext2 /dev/vda /tmp/mnt
test "$(sha256sum /tmp/mnt/numbers.txt | cut -d' ' -f1)" = "$sha"
cat /tmp/mnt/marker.txt
umount /tmp/mnt
"""
    result = run(guest_assets, script, server, vm="uml")
    assert "pyvirtio-file-marker" in result.section()
    assert b"pyvirtio-file-marker" in server.image.read_bytes()


@pytest.mark.normative(N_BLK_DEV_OP, N_SPLIT_USED, N_PACKED_DEV)
@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
def test_backend_killed_and_restarted_loses_no_acknowledged_write(
    guest_assets: GuestAssets, blk_server: Callable[..., BlkServer], packed: bool
) -> None:
    """SIGKILL the back-end mid-writes; QEMU reconnects to its successor; nothing is lost."""
    server = blk_server()
    blocks = 400
    script = f"""
set -e
i=0
while [ $i -lt {blocks} ]; do
  echo "block-$i" | dd of=/dev/vda bs=4096 seek=$i conv=sync oflag=direct 2>/dev/null
  i=$((i + 1))
done
i=0
while [ $i -lt {blocks} ]; do
  got=$(dd if=/dev/vda bs=4096 skip=$i count=1 iflag=direct 2>/dev/null | head -c 12 | tr -d '\\n\\000')
  test "$got" = "block-$i"
  i=$((i + 1))
done
echo all-blocks-verified
"""
    results: list[GuestResult] = []

    def guest() -> None:
        results.append(
            run_guest(
                script,
                vm="qemu",
                disks=[VhostUserBlkDisk(str(server.socket), reconnect=True, packed=packed)],
                timeout=150,
                assets=guest_assets,
            )
        )

    thread = threading.Thread(target=guest)
    thread.start()
    # Wait until the guest is writing, then kill the back-end without warning.
    deadline = time.monotonic() + 100
    while time.monotonic() < deadline:
        with open(server.image, "rb") as f:
            f.seek(20 * 4096)
            if f.read(6) == b"block-":
                break
        time.sleep(0.05)
    else:
        thread.join()
        pytest.fail(f"the guest never wrote: {results[0].output[-2000:] if results else ''}")
    server.kill()
    time.sleep(0.5)
    server.start()
    thread.join()
    result = results[0]
    assert not result.timed_out, result.output[-3000:] + server.log_text()
    assert result.exit_code == 0, result.output[-3000:] + server.log_text()
    assert "all-blocks-verified" in result.section()
    data = server.image.read_bytes()
    for i in range(blocks):
        assert data[i * 4096 : i * 4096 + len(f"block-{i}")] == f"block-{i}".encode()
    assert server.log_text().count("front-end connected") >= 2


@pytest.mark.normative(N_PACKED_DEV, N_INDIRECT_DEV, N_BLK_DEV_OP)
@pytest.mark.parametrize("vm", ["uml", "qemu"])
def test_fio_at_queue_depth_32_on_packed_rings(
    guest_assets: GuestAssets, blk_server: Callable[..., BlkServer], vm: str
) -> None:
    """Many requests in flight with indirect descriptors on a packed ring.

    UML's driver once saw a used descriptor half-written here ("id 0 is not a
    head"): used ids, lengths and flags must each be one store.
    """
    server = blk_server()
    script = """
set -e
hostrun /usr/bin/fio --name=qd32 --filename=/dev/vda --direct=1 --ioengine=libaio \
  --rw=randrw --bs=4k --iodepth=32 --runtime=3 --time_based --size=48M \
  --verify=crc32c --verify_fatal=1 --output-format=terse > /tmp/fio.out
cut -d';' -f1-8 /tmp/fio.out
echo "features $(cat /sys/bus/virtio/devices/*/features)"
"""
    result = run(guest_assets, script, server, vm=vm, packed=True, host_share=True)
    assert "is not a head" not in result.output
    assert feature_bits(result)[34] == "1"
    assert feature_bits(result)[28] == "1"  # indirect descriptors in use
