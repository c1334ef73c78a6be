"""Guest assets: a Debian kernel and initramfs for QEMU, a hostfs root for UML.

Everything comes from Debian packages: the kernel is ``linux-image-amd64``
resolved to its versioned package, fetched with ``apt-get download`` and
unpacked with ``dpkg -x``; busybox comes from ``busybox-static``; User-Mode
Linux and its modules from ``user-mode-linux``. The result is cached in
``$PYVIRTIO_CACHE`` (default ``~/.cache/pyvirtio``) under a key made of the
package versions and this module's guest init script, so a second run only
checks versions.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import json
import os
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from virtio.vm.cpio import CpioWriter

Progress = Callable[[str], None]


# The device drivers both guests load (net, console, balloon, vsock, scsi with sd,
# virtiofs), in dependency order. t10-pi needs crc64-rocksoft in both kernels and,
# in Debian's, crc-t10dif too (UML has that one built in): inserted before it there.
def _device_modules(*, crc_t10dif: bool) -> list[str]:
    crc = ["crct10dif_common", "crct10dif_generic", "crc-t10dif"] if crc_t10dif else []
    return [
        "failover",
        "net_failover",
        "virtio_net",
        "virtio_console",
        "virtio_balloon",
        "vsock",
        "vmw_vsock_virtio_transport_common",
        "vmw_vsock_virtio_transport",
        "scsi_common",
        "scsi_mod",
        *crc,
        "crc64",
        "crc64_rocksoft_generic",
        "crc64-rocksoft",
        "t10-pi",
        "sd_mod",
        "virtio_scsi",
        "fuse",
        "virtiofs",
    ]


# Modules for the QEMU guest, in an order that satisfies their dependencies
# (checked against each module's own "depends=" when the initramfs is built).
QEMU_MODULES = [
    "virtio_ring",
    "virtio",
    "virtio_pci_modern_dev",
    "virtio_pci_legacy_dev",
    "virtio_pci",
    "virtio_mmio",
    "virtio_blk",
    "virtio-rng",  # the file's name; the module is virtio_rng
    *_device_modules(crc_t10dif=True),
    "netfs",
    "fscache",
    "9pnet",
    "9pnet_virtio",
    "9p",
    "crc16",
    "mbcache",
    "jbd2",
    "crc32c_generic",
    "ext4",
]
UML_MODULES = ["virtio_blk", *_device_modules(crc_t10dif=False)]
UML_BINARY = "/usr/bin/linux.uml"
UML_MODULES_DIR = Path("/usr/lib/uml/modules")
BUSYBOX = Path("/bin/busybox")
APPLETS = [
    "sh",
    "ash",
    "mount",
    "umount",
    "insmod",
    "cat",
    "echo",
    "dd",
    "md5sum",
    "sha256sum",
    "sync",
    "poweroff",
    "halt",
    "reboot",
    "ls",
    "sleep",
    "hexdump",
    "od",
    "mkdir",
    "grep",
    "head",
    "tail",
    "cmp",
    "blockdev",
    "blkdiscard",
    "mke2fs",
    "mkfs.ext2",
    "chroot",
    "seq",
    "wc",
    "tr",
    "cut",
    "sed",
    "awk",
    "printf",
    "test",
    "[",
    "true",
    "false",
    "uname",
    "dmesg",
    "rm",
    "cp",
    "mv",
    "touch",
    "stat",
    "find",
    "xargs",
    "fsync",
    "truncate",
    "timeout",
    "date",
    "expr",
    "ip",
    "ifconfig",
    "ping",
    "nc",
    "udhcpc",
    "kill",
    "ps",
    "pidof",
    "nslookup",
    "wget",
    "arping",
    "route",
]

# The guest's /init: mount the basics, load virtio, run the host's script,
# report its status on the console, power off. Shared by QEMU and UML.
GUEST_INIT = """#!/bin/sh
export PATH=/bin:/sbin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev 2>/dev/null
mount -t tmpfs tmp /tmp
# Module parameters come from the kernel command line as module.param=value.
for m in $(cat /etc/pyvirtio-modules); do
  params=""
  for arg in $(cat /proc/cmdline); do
    case "$arg" in "$m".*=*) params="$params ${arg#"$m".}";; esac
  done
  insmod /lib/pyvirtio/$m.ko $params 2>/dev/null
done
for arg in $(cat /proc/cmdline); do
  case "$arg" in
    pyvirtio.hostfs=*) mkdir -p /run; mount -t hostfs none /run -o "${arg#pyvirtio.hostfs=}";;
    pyvirtio.host9p) mkdir -p /host; mount -t 9p -o trans=virtio,ro host /host;;
    pyvirtio.hostroot=*) mkdir -p /host; mount -t hostfs none /host -o /;;
  esac
done
echo PYVIRTIO-START
sh /run/test.sh
rc=$?
sync
echo "PYVIRTIO-EXIT $rc"
poweroff -f
"""


def cache_dir() -> Path:
    base = os.environ.get("PYVIRTIO_CACHE")
    return Path(base) if base else Path.home() / ".cache" / "pyvirtio"


@dataclass(frozen=True)
class GuestAssets:
    """What a guest run needs; all paths live in the cache."""

    kernel: Path  # bzImage for QEMU
    initrd: Path  # base initramfs (gzip cpio) for QEMU
    uml: Path  # the UML kernel binary
    uml_root: Path  # hostfs root directory for UML
    key: str
    kernel_version: str


class AssetError(RuntimeError):
    """The guest assets could not be prepared (missing package, no network...)."""


def _run(cmd: list[str], **kw: object) -> str:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, check=True, **kw)  # type: ignore[call-overload]
    except FileNotFoundError as err:
        raise AssetError(f"{cmd[0]} is not installed (run ./dev setup)") from err
    except subprocess.CalledProcessError as err:
        raise AssetError(f"{' '.join(cmd)} failed: {err.stderr.strip()}") from err
    return str(out.stdout)


def _package_version(name: str) -> str:
    out = _run(["dpkg-query", "-W", "-f=${Version}", name])
    if not out:
        raise AssetError(f"Debian package {name} is not installed (run ./dev setup)")
    return out


def kernel_package() -> tuple[str, str]:
    """The versioned kernel package behind the linux-image-amd64 meta-package."""
    out = _run(["apt-cache", "depends", "linux-image-amd64"])
    match = re.search(r"Depends:\s*(linux-image-[0-9][^\s]*-amd64)\b", out)
    if not match:
        raise AssetError("cannot resolve linux-image-amd64 (run apt-get update)")
    name = match.group(1)
    policy = _run(["apt-cache", "policy", name])
    version = re.search(r"Candidate:\s*(\S+)", policy)
    if not version or version.group(1) == "(none)":
        raise AssetError(f"no candidate version for {name}")
    return name, version.group(1)


def module_depends(path: Path) -> list[str]:
    """A kernel module's dependencies, read from its .modinfo strings."""
    match = re.search(rb"\0depends=([^\0]*)\0", path.read_bytes())
    if not match or not match.group(1):
        return []
    return match.group(1).decode().split(",")


def _fetch_kernel(dest: Path, name: str, progress: Progress) -> Path:
    tree = dest / "kernel"
    if tree.exists():
        return tree
    progress(f"downloading {name}")
    with tempfile.TemporaryDirectory(dir=dest) as tmp:
        _run(["apt-get", "download", name], cwd=tmp)
        debs = list(Path(tmp).glob("*.deb"))
        if len(debs) != 1:
            raise AssetError(f"apt-get download {name} gave {len(debs)} files")
        progress(f"unpacking {debs[0].name}")
        staging = Path(tmp) / "x"
        _run(["dpkg", "-x", str(debs[0]), str(staging)])
        staging.rename(tree)
    return tree


def _find_module(tree: Path, name: str) -> Path:
    found = list(tree.glob(f"lib/modules/*/kernel/**/{name}.ko"))
    if not found:
        raise AssetError(f"kernel module {name} not found in the kernel package")
    return found[0]


def _check_order(modules: list[tuple[str, Path]]) -> None:
    loaded: set[str] = set()
    for name, path in modules:
        for dep in module_depends(path):
            if dep not in loaded:
                raise AssetError(f"module {name} needs {dep} loaded first")
        loaded.add(name)


# Runs a host program (e.g. fio) from the read-only host share with the host's
# own loader and libraries, inside the guest's namespace: /dev is the guest's.
# (A chroot into the share would reach host device nodes; this never does.)
HOSTRUN = """#!/bin/sh
prog=$1
shift
libs=/host/usr/lib/x86_64-linux-gnu:/host/usr/lib/x86_64-linux-gnu/ceph
exec /host{loader} --library-path $libs "/host$prog" "$@"
"""


def hostrun_script() -> str:
    # Absolute symlinks on the host would point into the guest's own tree, so the
    # loader is named by its real path.
    return HOSTRUN.format(loader=os.path.realpath("/lib64/ld-linux-x86-64.so.2"))


def _busybox_tree(writer: CpioWriter) -> None:
    writer.host_file("bin/busybox", BUSYBOX, 0o755)
    writer.file("bin/hostrun", hostrun_script().encode(), 0o755)
    for applet in APPLETS:
        if applet != "busybox":
            writer.symlink(f"bin/{applet}", "busybox")
    writer.symlink("sbin", "bin")
    for d in ("proc", "sys", "dev", "tmp", "run", "host", "etc", "lib/pyvirtio"):
        writer.directory(d)
    writer.file("init", GUEST_INIT.encode(), 0o755)


def _build_initrd(tree: Path, out: Path) -> None:
    modules = [(m, _find_module(tree, m)) for m in QEMU_MODULES]
    _check_order(modules)
    writer = CpioWriter()
    _busybox_tree(writer)
    for name, path in modules:
        writer.host_file(f"lib/pyvirtio/{name}.ko", path, 0o644)
    writer.file("etc/pyvirtio-modules", "\n".join(QEMU_MODULES).encode() + b"\n")
    out.write_bytes(gzip.compress(writer.getvalue(), compresslevel=6))


def _build_uml_root(root: Path, uml_version: str) -> None:
    if root.exists():
        shutil.rmtree(root)
    (root / "bin").mkdir(parents=True)
    shutil.copy2(BUSYBOX, root / "bin" / "busybox")
    for applet in APPLETS:
        (root / "bin" / applet).symlink_to("busybox")
    (root / "sbin").symlink_to("bin")
    for d in ("proc", "sys", "dev", "tmp", "run", "host", "etc", "lib/pyvirtio"):
        (root / d).mkdir(parents=True, exist_ok=True)
    modules_dir = UML_MODULES_DIR / uml_version
    for name in UML_MODULES:
        found = list(modules_dir.glob(f"kernel/**/{name}.ko"))
        if not found:
            raise AssetError(f"UML module {name} not found under {modules_dir}")
        shutil.copy2(found[0], root / "lib" / "pyvirtio" / f"{name}.ko")
    (root / "etc" / "pyvirtio-modules").write_text("\n".join(UML_MODULES) + "\n")
    for name, text in (("init", GUEST_INIT), ("bin/hostrun", hostrun_script())):
        path = root / name
        path.write_text(text)
        path.chmod(0o755)


def _unused_for(path: Path, seconds: float) -> bool:
    try:
        return time.time() - path.stat().st_mtime > seconds
    except OSError:
        return False


def prepare(progress: Progress | None = None) -> GuestAssets:
    """Build or reuse the cached guest assets."""
    say = progress or (lambda _msg: None)
    cache = cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    name, version = kernel_package()
    uml_versions = (
        sorted(p.name for p in UML_MODULES_DIR.iterdir()) if UML_MODULES_DIR.exists() else []
    )
    if not uml_versions or not Path(UML_BINARY).exists():
        raise AssetError("user-mode-linux is not installed (run ./dev setup)")
    facts = {
        "kernel": f"{name}={version}",
        "busybox": _package_version("busybox-static"),
        "uml": _package_version("user-mode-linux"),
        "uml_modules": uml_versions[-1],
        "init": hashlib.sha256((GUEST_INIT + hostrun_script()).encode()).hexdigest(),
        "modules": QEMU_MODULES + UML_MODULES,
        "applets": APPLETS,
    }
    key = hashlib.sha256(json.dumps(facts, sort_keys=True).encode()).hexdigest()[:16]
    dest = cache / f"guest-{key}"
    stamp = dest / "ready.json"
    if not stamp.exists():
        dest.mkdir(parents=True, exist_ok=True)
        tree = _fetch_kernel(dest, name, say)
        say("building the initramfs")
        _build_initrd(tree, dest / "initrd.gz")
        say("building the User-Mode Linux root")
        _build_uml_root(dest / "uml-root", uml_versions[-1])
        stamp.write_text(json.dumps(facts, indent=1))
        # Older caches are dead weight once a new key is built, but another
        # checkout (a CI clone, a second work tree) may be using one right now:
        # only those unused for a day go.
        for old in cache.glob("guest-*"):
            if old != dest and _unused_for(old, 24 * 3600):
                shutil.rmtree(old, ignore_errors=True)
    with contextlib.suppress(OSError):
        os.utime(dest)  # in use: keeps other checkouts from pruning it
    kernels = sorted((dest / "kernel" / "boot").glob("vmlinuz-*"))
    if not kernels:
        raise AssetError(f"no kernel image in {dest}")
    return GuestAssets(
        kernel=kernels[-1],
        initrd=dest / "initrd.gz",
        uml=Path(UML_BINARY),
        uml_root=dest / "uml-root",
        key=key,
        kernel_version=kernels[-1].name.removeprefix("vmlinuz-"),
    )
