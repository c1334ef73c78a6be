"""Run a real Linux guest (QEMU or User-Mode Linux) with vhost-user disks.

The guest boots the cached assets, runs a shell script from the host, prints
``PYVIRTIO-EXIT <status>`` and powers off. Every run has a timeout; on
timeout the VM's whole process group is killed (QEMU waits forever on a dead
vhost-user back-end, so this is the only way out).
"""

from __future__ import annotations

import contextlib
import gzip
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from virtio.vm.assets import GuestAssets, prepare
from virtio.vm.cpio import CpioWriter

Vm = Literal["qemu", "uml"]
Transport = Literal["pci", "pci-transitional", "mmio"]
_EXIT = re.compile(r"PYVIRTIO-EXIT (\d+)")


@dataclass(frozen=True)
class VhostUserBlkDisk:
    """A vhost-user-blk device the guest gets, served at ``socket``."""

    socket: str
    num_queues: int = 1
    packed: bool = False
    reconnect: bool = False
    queue_size: int | None = None


@dataclass(frozen=True)
class VhostUserNic:
    """A virtio-net interface the guest gets, its device served at ``socket``."""

    socket: str
    queues: int = 1
    mac: str | None = None
    packed: bool = False
    reconnect: bool = False


@dataclass(frozen=True)
class VhostUserDevice:
    """Any vhost-user device the guest gets: QEMU's front-end for it, UML's device id."""

    socket: str
    device_id: int
    #: QEMU's front-end (``vhost-user-scsi-pci``, ...); None: UML only.
    qemu_device: str | None = None
    #: More ``-device`` properties for QEMU (``,num_queues=2``).
    qemu_options: str = ""


@dataclass
class GuestResult:
    output: str
    exit_code: int | None
    duration_s: float
    timed_out: bool
    command: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.exit_code == 0

    def section(self) -> str:
        """What the script printed (between the start and exit markers)."""
        start = self.output.find("PYVIRTIO-START")
        end = self.output.find("PYVIRTIO-EXIT")
        begin = start + len("PYVIRTIO-START") if start >= 0 else 0
        return self.output[begin : end if end >= 0 else None].strip()


def _accel() -> list[str]:
    # /dev/kvm on these machines is a software hypervisor that cannot boot Linux:
    # TCG unless the environment says a real KVM is there.
    if os.environ.get("PYVIRTIO_KVM") == "1":
        return ["-accel", "kvm", "-cpu", "host"]
    return ["-accel", "tcg"]


def _tsc_khz() -> int:
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("cpu MHz"):
                return int(float(line.split(":")[1]) * 1000)
    return 2_000_000


def qemu_command(
    assets: GuestAssets,
    disks: Sequence[VhostUserBlkDisk],
    *,
    initrd: Path,
    transport: Transport = "pci",
    memory_mb: int = 512,
    smp: int = 1,
    host_share: bool = False,
    kernel_args: Sequence[str] = (),
    nics: Sequence[VhostUserNic] = (),
    devices: Sequence[VhostUserDevice] = (),
) -> list[str]:
    mmio = transport == "mmio"
    append = " ".join(["console=ttyS0 rdinit=/init panic=-1 quiet loglevel=3", *kernel_args])
    if host_share:
        append += " pyvirtio.host9p"
    machine = "microvm,acpi=on" if mmio else "q35"
    if mmio:
        # Without these the microvm guest sometimes hangs calibrating its clock.
        append += f" tsc_early_khz={_tsc_khz()}"
    cmd = [
        "qemu-system-x86_64",
        *_accel(),
        "-M",
        f"{machine},memory-backend=mem",
        "-m",
        f"{memory_mb}M",
        "-smp",
        str(smp),
        # vhost-user needs guest memory the back-end can map: a shared memfd.
        "-object",
        f"memory-backend-memfd,id=mem,size={memory_mb}M,share=on",
        "-kernel",
        str(assets.kernel),
        "-initrd",
        str(initrd),
        "-append",
        append,
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
        "-no-reboot",
        "-serial",
        "stdio",
        "-monitor",
        "none",
    ]
    if mmio:
        cmd += ["-global", "virtio-mmio.force-legacy=false"]
    for i, disk in enumerate(disks):
        chardev = f"socket,id=vu{i},path={disk.socket}"
        if disk.reconnect:
            chardev += ",reconnect=1"
        device = "vhost-user-blk" if mmio else "vhost-user-blk-pci"
        opts = f"{device},chardev=vu{i},num-queues={disk.num_queues}"
        if disk.packed:
            opts += ",packed=on"
        if disk.queue_size:
            opts += f",queue-size={disk.queue_size}"
        if transport == "pci":
            opts += ",disable-legacy=on"
        elif transport == "pci-transitional":
            opts += ",disable-legacy=off,disable-modern=off"
        cmd += ["-chardev", chardev, "-device", opts]
    for i, nic in enumerate(nics):
        chardev = f"socket,id=vn{i},path={nic.socket}"
        if nic.reconnect:
            chardev += ",reconnect=1"
        netdev = f"vhost-user,id=net{i},chardev=vn{i}"
        device = "virtio-net-device" if mmio else "virtio-net-pci"
        opts = f"{device},netdev=net{i}"
        if nic.queues > 1:
            netdev += f",queues={nic.queues}"
            opts += ",mq=on"
        if not mmio:
            # Debian's QEMU 7.2 crashes in vhost_net_start with MSI-X vectors for a
            # vhost-user netdev: INTx only.
            opts += ",vectors=0"
            if transport == "pci":
                opts += ",disable-legacy=on"
        if nic.mac:
            opts += f",mac={nic.mac}"
        if nic.packed:
            opts += ",packed=on"
        cmd += ["-chardev", chardev, "-netdev", netdev, "-device", opts]
    for i, dev in enumerate(devices):
        if dev.qemu_device is None:
            raise ValueError(f"device id {dev.device_id} has no QEMU vhost-user front-end")
        cmd += [
            "-chardev",
            f"socket,id=vd{i},path={dev.socket}",
            "-device",
            f"{dev.qemu_device},chardev=vd{i}{dev.qemu_options}",
        ]
    if host_share:
        fs_device = "virtio-9p-device" if mmio else "virtio-9p-pci"
        cmd += [
            "-fsdev",
            "local,id=host,path=/,security_model=none,readonly=on",
            "-device",
            f"{fs_device},fsdev=host,mount_tag=host",
        ]
    return cmd


def uml_command(
    assets: GuestAssets,
    disks: Sequence[VhostUserBlkDisk],
    *,
    run_dir: Path,
    memory_mb: int = 256,
    host_share: bool = False,
    kernel_args: Sequence[str] = (),
    nics: Sequence[VhostUserNic] = (),
    devices: Sequence[VhostUserDevice] = (),
) -> list[str]:
    cmd = [
        str(assets.uml),
        f"mem={memory_mb}M",
        "rootfstype=hostfs",
        f"rootflags={assets.uml_root}",
        "init=/init",
        f"pyvirtio.hostfs={run_dir}",
        "con=null",
        "con0=fd:0,fd:1",
        "quiet",
        *kernel_args,
    ]
    if host_share:
        cmd.append("pyvirtio.hostroot=1")
    for disk in disks:
        cmd.append(f"virtio_uml.device={disk.socket}:2")
    for nic in nics:
        cmd.append(f"virtio_uml.device={nic.socket}:1")
    for dev in devices:
        cmd.append(f"virtio_uml.device={dev.socket}:{dev.device_id}")
    return cmd


def _script_initrd(base: Path, script: str, dest: Path) -> Path:
    """The cached initramfs plus a small archive holding this run's script."""
    writer = CpioWriter()
    writer.file("run/test.sh", script.encode(), 0o755)
    data = base.read_bytes()
    data += b"\0" * (-len(data) % 4)
    dest.write_bytes(data + gzip.compress(writer.getvalue()))
    return dest


def kill_group(proc: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=5)


def run_guest(
    script: str,
    *,
    vm: Vm,
    disks: Sequence[VhostUserBlkDisk] = (),
    timeout: float = 60.0,
    memory_mb: int | None = None,
    transport: Transport = "pci",
    host_share: bool = False,
    smp: int = 1,
    log_path: Path | None = None,
    assets: GuestAssets | None = None,
    kernel_args: Sequence[str] = (),
    launcher: Sequence[str] = (),
    nics: Sequence[VhostUserNic] = (),
    devices: Sequence[VhostUserDevice] = (),
) -> GuestResult:
    """Boot a guest, run ``script`` in it, return what happened.

    ``kernel_args`` go on the kernel command line; ``module.param=value`` ones
    also reach the virtio modules the guest loads (e.g. ``virtio_pci.force_legacy=1``).
    ``launcher`` runs QEMU's command through another (``virtio qemu --pci PATH --``).
    """
    assets = assets or prepare()
    with tempfile.TemporaryDirectory(prefix="pyvirtio-guest-") as tmp:
        run_dir = Path(tmp)
        if vm == "qemu":
            initrd = _script_initrd(assets.initrd, script, run_dir / "initrd.gz")
            cmd = qemu_command(
                assets,
                disks,
                initrd=initrd,
                transport=transport,
                memory_mb=memory_mb or 512,
                smp=smp,
                host_share=host_share,
                kernel_args=kernel_args,
                nics=nics,
                devices=devices,
            )
            cmd = [*launcher, *cmd]
        else:
            (run_dir / "test.sh").write_text(script)
            cmd = uml_command(
                assets,
                disks,
                run_dir=run_dir,
                memory_mb=memory_mb or 256,
                host_share=host_share,
                kernel_args=kernel_args,
                nics=nics,
                devices=devices,
            )
        out_path = run_dir / "console.log"
        env = dict(os.environ, TMPDIR=tmp)
        start = time.monotonic()
        with open(out_path, "wb") as out:
            proc = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=tmp,
                env=env,
                start_new_session=True,
            )
            timed_out = False
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                timed_out = True
            finally:
                kill_group(proc)
        duration = time.monotonic() - start
        output = out_path.read_text(errors="replace")
        if log_path is not None:
            log_path.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(out_path, log_path)
    match = _EXIT.search(output)
    return GuestResult(
        output=output,
        exit_code=int(match.group(1)) if match else None,
        duration_s=duration,
        timed_out=timed_out,
        command=cmd,
    )
