"""A Linux guest maps files through virtio-fs's DAX window on pyvirtio's PCI transport.

QEMU 7.2's vhost-user-fs-pci has no DAX window, so `virtio serve fs
--transport pci --cache-size 8M` serves the whole PCI function (the window
is BAR 2, shared memory region 0) and `virtio qemu --pci` attaches it.
The guest mounts with `-o dax=always`: reads come straight out of the
window, and an in-place write lands in the host file through a writable
mapping; only a write that grows a file goes through FUSE_WRITE.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from tests.integration.test_guest_pci_devices import check_guest, pci_launcher, serving
from virtio.vm import GuestAssets, run_guest

pytestmark = pytest.mark.guest

FS = "Device Types / File System Device"
N_DAX_DEV = f"devicenormative:{FS} / Device Operation / Device Operation: DAX Window"

TEXT = b"hello through the DAX window\n" * 200

SCRIPT = """
mkdir -p /tmp/mnt
mount -t virtiofs hostfs /tmp/mnt -o dax=always
echo "MOUNT $(grep virtiofs /proc/mounts)"
dmesg | grep "Cache len" | sed 's/^.*Cache len: /CACHE /'
echo "READ $(head -c 28 /tmp/mnt/hello.txt)"
printf XYZ | dd of=/tmp/mnt/hello.txt bs=1 conv=notrunc 2>/dev/null
echo "grown by FUSE_WRITE" > /tmp/mnt/new.txt
sync
echo "MD5 $(md5sum < /tmp/mnt/hello.txt | cut -c1-32)"
umount /tmp/mnt
"""


@pytest.mark.normative(N_DAX_DEV)
def test_guest_reads_and_writes_through_the_dax_window(
    tmp_path: Path, guest_assets: GuestAssets
) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    (shared / "hello.txt").write_bytes(TEXT)
    sock = tmp_path / "fs.sock"
    args = ["--transport", "pci", "--shared-dir", str(shared), "--tag", "hostfs"]
    with serving("fs", sock, tmp_path / "serve.log", *args, "--cache-size", "8M") as server:
        result = run_guest(
            SCRIPT, vm="qemu", timeout=120, assets=guest_assets, launcher=pci_launcher(sock)
        )
    out = check_guest(result, server)
    lines = {line.split(" ", 1)[0]: line for line in out.splitlines()}
    assert "dax=always" in lines.get("MOUNT", ""), out
    assert lines.get("CACHE", "").startswith("CACHE 0x800000 "), out  # the 8 MiB window
    assert lines.get("READ") == "READ hello through the DAX window", out
    expected = b"XYZ" + TEXT[3:]
    assert (shared / "hello.txt").read_bytes() == expected
    assert lines.get("MD5") == f"MD5 {hashlib.md5(expected).hexdigest()}", out
    assert (shared / "new.txt").read_bytes() == b"grown by FUSE_WRITE\n"
