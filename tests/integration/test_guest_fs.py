"""A real Linux guest's virtiofs driver against `virtio serve fs`.

User-Mode Linux attaches the device by its id (``virtio_uml.device=SOCK:26``);
the guest mounts the tag, runs a file workload and tries to escape the shared
directory; the host checks the directory afterwards.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.integration.conftest import ServeProcess
from virtio.devices.fs import FsDriver, FuseError
from virtio.devices.fs.device import N_CFG_DEV, N_HIPRIO_DEV, N_HIPRIO_DRV
from virtio.devices.fs.wire import ROOT_ID as ROOT
from virtio.spec.device_ids import DeviceId
from virtio.vhost_user.frontend import VhostUserFrontend
from virtio.vm import GuestAssets, VhostUserDevice, run_guest

pytestmark = pytest.mark.guest

TIMEOUT = {"uml": 90.0, "qemu": 240.0}
N_SPLIT_USED = (
    "devicenormative:Basic Facilities of a Virtio Device / Virtqueues / The Virtqueue Used Ring"
)

WORKLOAD = """
set -e
mkdir -p /tmp/mnt  # the guest root is read-only
mount -t virtiofs hostfs /tmp/mnt
echo "MOUNTED $(grep virtiofs /proc/mounts | cut -d' ' -f1)"
echo hello-from-guest > /tmp/mnt/hello.txt
test "$(cat /tmp/mnt/hello.txt)" = hello-from-guest
mkdir /tmp/mnt/dir
mv /tmp/mnt/hello.txt /tmp/mnt/dir/renamed.txt
ln /tmp/mnt/dir/renamed.txt /tmp/mnt/hard
ln -s dir/renamed.txt /tmp/mnt/soft
test "$(cat /tmp/mnt/soft)" = hello-from-guest
echo "LINKS $(stat -c %h /tmp/mnt/hard) $(readlink /tmp/mnt/soft)"
dd if=/dev/urandom of=/tmp/big bs=1M count=8 2>/dev/null
cp /tmp/big /tmp/mnt/big
sync
echo 3 > /proc/sys/vm/drop_caches
echo "BIG $(md5sum < /tmp/mnt/big | cut -d' ' -f1) $(md5sum < /tmp/big | cut -d' ' -f1)"
mkdir /tmp/mnt/many
i=0
while [ $i -lt 200 ]; do echo "n$i" > /tmp/mnt/many/f$i; i=$((i + 1)); done
echo "MANY $(ls /tmp/mnt/many | wc -l)"
rm /tmp/mnt/many/f1 /tmp/mnt/many/f2
# busybox has no setfattr: the host's Python makes the system calls in the guest.
PYTHONHOME=/host/usr hostrun /usr/bin/python3 -c "
import os
p = '/tmp/mnt/dir/renamed.txt'
os.setxattr(p, 'user.color', b'blue')
os.setxattr(p, 'user.gone', b'x')
os.removexattr(p, 'user.gone')
print('XATTR', os.getxattr(p, 'user.color').decode(), ','.join(sorted(os.listxattr(p))))
"
truncate -s 3 /tmp/mnt/hard 2>/dev/null || dd if=/dev/null of=/tmp/mnt/hard bs=1 seek=3 2>/dev/null
echo "TRUNC $(stat -c %s /tmp/mnt/dir/renamed.txt)"
chmod 600 /tmp/mnt/dir/renamed.txt
echo "DF $(df /tmp/mnt | tail -1 | wc -w)"
# Escape attempts: none of them may reach the host's own files.
ln -s / /tmp/mnt/esc
echo "ESC $(cat /tmp/mnt/esc{outside} 2>/dev/null || echo blocked)"
echo "DOTDOT $(cat /tmp/mnt/../outside 2>/dev/null || echo blocked)"
ln -s ../outside /tmp/mnt/up
echo "UP $(cat /tmp/mnt/up 2>/dev/null || echo blocked)"
echo pwned > /tmp/mnt/up 2>/dev/null || true
mknod /tmp/mnt/null c 1 3 2>/dev/null && echo "MKNOD made" || echo "MKNOD refused"
rmdir /tmp/mnt/dir 2>/dev/null || echo "RMDIR notempty"
ls -la /tmp/mnt > /dev/null
umount /tmp/mnt
echo UNMOUNTED
"""


def _result_lines(text: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for line in text.splitlines():
        key, _, rest = line.strip().partition(" ")
        if key.isupper():
            out[key] = rest
    return out


@pytest.mark.normative(N_CFG_DEV, N_HIPRIO_DEV, N_SPLIT_USED)
@pytest.mark.parametrize("vm", ["uml", "qemu"])
def test_guest_file_workload(guest_assets: GuestAssets, tmp_path: Path, vm: str) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    outside = tmp_path / "outside"
    # Each escape below names this file as a server that follows links would see it.
    outside.write_text("host-secret\n")
    server = ServeProcess(
        image=None,
        socket=tmp_path / "fs.sock",
        args=["--shared-dir", str(shared), "--tag", "hostfs"],
        log=tmp_path / "serve.log",
        kind="fs",
    )
    server.start()
    try:
        result = run_guest(
            WORKLOAD.replace("{outside}", str(outside)),
            vm=vm,  # type: ignore[arg-type]
            devices=[
                VhostUserDevice(
                    str(server.socket),
                    DeviceId.FS,
                    qemu_device="vhost-user-fs-pci",
                    qemu_options=",tag=hostfs",
                )
            ],
            timeout=TIMEOUT[vm],
            host_share=True,
            assets=guest_assets,
        )
    finally:
        server.stop()
    log = server.log_text()
    assert not result.timed_out, f"guest timed out:\n{result.output[-3000:]}\n{log}"
    assert result.exit_code == 0, f"guest script failed:\n{result.output[-3000:]}\n{log}"
    got = _result_lines(result.section())
    assert got["MOUNTED"] == "hostfs"
    assert got["LINKS"] == "2 dir/renamed.txt"
    big_guest, big_orig = got["BIG"].split()
    assert big_guest == big_orig == hashlib.md5((shared / "big").read_bytes()).hexdigest()
    assert (shared / "big").stat().st_size == 8 << 20
    assert got["MANY"] == "200"
    assert sorted(os.listdir(shared / "many")) == sorted(
        f"f{i}" for i in range(200) if i not in (1, 2)
    )
    assert (shared / "many" / "f199").read_text() == "n199\n"
    assert got["XATTR"] == "blue user.color"
    assert os.getxattr(shared / "dir" / "renamed.txt", "user.color") == b"blue"
    assert os.listxattr(shared / "dir" / "renamed.txt") == ["user.color"]
    assert got["TRUNC"] == "3" and (shared / "dir" / "renamed.txt").read_bytes() == b"hel"
    assert (shared / "dir" / "renamed.txt").stat().st_mode & 0o777 == 0o600
    assert os.stat(shared / "hard").st_ino == os.stat(shared / "dir" / "renamed.txt").st_ino
    assert os.readlink(shared / "soft") == "dir/renamed.txt"
    # The escapes: the guest resolved its symlinks inside its own root, never the host's.
    assert got["ESC"] == "blocked" and got["DOTDOT"] == "blocked" and got["UP"] == "blocked"
    assert os.readlink(shared / "esc") == "/" and os.readlink(shared / "up") == "../outside"
    assert outside.read_text() == "host-secret\n"
    assert got["MKNOD"] == "refused" and not (shared / "null").exists()
    assert got["RMDIR"] == "notempty"
    assert "UNMOUNTED" in result.section()
    assert "Traceback" not in log


VIRTIOFSD = Path("/usr/lib/qemu/virtiofsd")


@pytest.mark.normative(N_HIPRIO_DRV)
def test_driver_against_c_virtiofsd(tmp_path: Path) -> None:
    """pyvirtio's FUSE client through its vhost-user front-end, against QEMU's virtiofsd."""
    shared = tmp_path / "shared"
    shared.mkdir()
    (shared / "from-host").write_text("host data\n")
    sock = tmp_path / "virtiofsd.sock"
    log = tmp_path / "virtiofsd.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [str(VIRTIOFSD), f"--socket-path={sock}", "-o", f"source={shared}",
             "-o", "sandbox=chroot", "-o", "xattr", "-o", "cache=none"],
            stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    try:
        deadline = time.monotonic() + 15
        while not sock.exists():
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)
        with VhostUserFrontend(str(sock), device_id=DeviceId.FS, num_queues=2) as frontend:
            driver = FsDriver(frontend, vmm_config=("virtiofsd", 1))
            driver.initialize()
            session = driver.init()
            assert session.major == 7 and session.max_write > 0
            entry = driver.lookup(ROOT, "from-host")
            fh = driver.open(entry.nodeid)
            assert driver.read(entry.nodeid, fh, 0, 100) == b"host data\n"
            driver.release_file(entry.nodeid, fh)
            new, fh = driver.create(ROOT, "from-pyvirtio", 0o644)
            assert driver.write(new.nodeid, fh, 0, b"written by pyvirtio") == 19
            driver.release_file(new.nodeid, fh)
            sub = driver.mkdir(ROOT, "dir")
            driver.rename(ROOT, "from-pyvirtio", sub.nodeid, "moved")
            driver.symlink(ROOT, "link", "dir/moved")
            names = {e.name for e in driver.listdir(ROOT)}
            assert names == {b"from-host", b"dir", b"link"}
            with pytest.raises(FuseError) as err:
                driver.lookup(ROOT, "missing")
            assert err.value.errno == errno.ENOENT
            driver.forget(entry.nodeid, 1)  # on hiprio, no reply
            assert driver.getattr(sub.nodeid).nlink == 2
            driver.reset()
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
    assert (shared / "dir" / "moved").read_text() == "written by pyvirtio"
    assert os.readlink(shared / "link") == "dir/moved"
