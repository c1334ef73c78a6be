"""`virtio qemu`: the command line it accepts and the interrupts it relays."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest

from virtio.mpqemu.control import FunctionInfo, Intx, Msi
from virtio.mpqemu.launcher import (
    FIRST_SLOT,
    Function,
    LaunchError,
    Relay,
    free_slots,
    machine_type,
    shared_memory_error,
)

SHARED = ["-object", "memory-backend-memfd,id=mem,size=512M", "-M", "q35,memory-backend=mem"]


def test_shared_guest_ram_is_required() -> None:
    assert shared_memory_error(SHARED) is None
    assert (
        shared_memory_error(
            [
                "-object",
                "memory-backend-file,id=m,mem-path=/dev/shm/x,share=on,size=1G",
                "-machine",
                "pc,memory-backend=m",
            ]
        )
        is None
    )
    assert shared_memory_error(["-m", "512M"]) is not None
    unshared = [
        "-object",
        "memory-backend-memfd,id=mem,share=off,size=1G",
        "-M",
        "q35,memory-backend=mem",
    ]
    assert "'mem' is not a shared" in (shared_memory_error(unshared) or "")
    private_file = [
        "-object",
        "memory-backend-file,id=m,mem-path=/tmp/x,size=1G",
        "-numa",
        "node,memdev=m",
    ]
    assert shared_memory_error(private_file) is not None


def test_the_machine_and_free_slots() -> None:
    assert machine_type(["-M", "q35,memory-backend=mem"]) == "q35"
    assert machine_type(["-machine", "type=pc-q35-7.2"]) == "pc-q35-7.2"
    assert machine_type(["-m", "1G"]) == "pc"
    assert free_slots(["-device", "virtio-net-pci,addr=0x10"], 2) == [
        FIRST_SLOT + 1,
        FIRST_SLOT + 2,
    ]
    with pytest.raises(LaunchError, match="free PCI slots"):
        free_slots([], 40)


def relay(machine: str, slots: list[int]) -> tuple[Relay, socket.socket]:
    ours, theirs = socket.socketpair()
    info = FunctionInfo("rng", "1af4:1005", True, 2)
    functions = [Function(f"/s{i}", ours, info, -1, slot) for i, slot in enumerate(slots)]
    r = Relay(functions, machine)
    r.connected(ours)
    return r, theirs


def sent(peer: socket.socket) -> list[str]:
    peer.settimeout(0.2)
    data = b""
    try:
        while chunk := peer.recv(4096):
            data += chunk
    except TimeoutError:
        pass
    return data.decode().splitlines()


def test_msix_messages_become_apic_writes_and_wait_for_qtest() -> None:
    ours, theirs = socket.socketpair()
    info = FunctionInfo("blk", "1af4:1042", False, 2)
    r = Relay([Function("/s", ours, info, -1, FIRST_SLOT)], "q35")
    r.event(0, Msi(0xFEE01004, 0x4025))  # before QEMU's qtest socket is up: kept
    assert sent(theirs) == []
    r.connected(ours)
    r.event(0, Msi(0xFEE00000, 0x4026))
    assert sent(theirs) == ["writel 0xfee01004 0x4025", "writel 0xfee00000 0x4026"]


def test_intx_levels_of_functions_sharing_a_gsi_are_ored() -> None:
    r, peer = relay("q35", [0x10, 0x14, 0x11])  # 0x10 and 0x14: both pin A on GSI 20
    r.event(0, Intx(True, 10))
    r.event(1, Intx(True, 10))
    r.event(0, Intx(False, 10))  # function 1 still asserts GSI 20
    r.event(2, Intx(True, 10))
    r.event(1, Intx(False, 10))
    path = "/machine/q35/ioapic unnamed-gpio-in"
    assert sent(peer) == [
        f"set_irq_in {path} 20 1",
        f"set_irq_in {path} 21 1",
        f"set_irq_in {path} 20 0",
    ]


def test_on_pc_intx_follows_the_line_firmware_routed(caplog: pytest.LogCaptureFixture) -> None:
    r, peer = relay("pc", [0x10])
    r.event(0, Intx(True, 11))
    r.event(0, Intx(False, 11))
    r.event(0, Intx(True, 0))  # never routed: not relayed (a bad pin would abort QEMU)
    path = "/machine/i440fx/ioapic unnamed-gpio-in"
    assert sent(peer) == [f"set_irq_in {path} 11 1", f"set_irq_in {path} 11 0"]
    assert "routed to IRQ 0: not relayed" in caplog.text


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "virtio.cli", "qemu", *args],
        capture_output=True,
        text=True,
        timeout=30,
    )


def test_the_command_refuses_what_cannot_work(tmp_path: Path) -> None:
    missing = run_cli("--pci", str(tmp_path / "none.sock"), "--", "qemu-system-x86_64", *SHARED)
    assert missing.returncode == 2 and "cannot attach" in missing.stderr
    unshared = run_cli("--pci", "x.sock", "--", "qemu-system-x86_64", "-m", "512M")
    assert unshared.returncode == 2 and "not shared" in unshared.stderr
    no_qemu = run_cli("--pci", "x.sock")
    assert no_qemu.returncode == 2 and "give the QEMU command after --" in no_qemu.stderr
    microvm = run_cli(
        "--pci",
        "x.sock",
        "--",
        "qemu-system-x86_64",
        "-object",
        "memory-backend-memfd,id=m,size=1G",
        "-M",
        "microvm,memory-backend=m",
    )
    assert microvm.returncode == 2 and "no PCI bus" in microvm.stderr
    for result in (missing, unshared, no_qemu, microvm):
        assert "Traceback" not in result.stderr
