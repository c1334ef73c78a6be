"""QEMU's own virtio devices as real peers for pyvirtio's drivers, through qtest.

QEMU's qtest protocol (``-qtest unix:PATH``) lets another process read and
write the guest's physical address space and see interrupt lines
(``irq_intercept_in``). :func:`qemu_machine` starts a QEMU with a firmware
that only halts (so nothing in the guest touches the devices), guest RAM in
a shared file this process maps too (the rings and buffers pyvirtio's driver
builds are the guest's memory), and the devices asked for. On ``q35``, :class:`QtestPciBus` reaches a PCI function
(configuration space by port I/O, BARs it assigns itself, MSI-X messages
aimed at guest RAM it reads back, INTA# on GSI 20 + slot % 4). On ``microvm`` the
virtio-mmio windows sit at 0xfeb00000 + 0x200 * slot, their lines on GSI
5 + slot (``ioapic2=off``: 8 slots; measured with QEMU 7.2, the last device
added takes the highest slot); :class:`QtestMmioBus` is an
:class:`~virtio.transport.mmio.MmioBus` over one of them, so
:class:`~virtio.transport.mmio.MmioTransport` drives QEMU's
``virtio-blk-device`` or ``virtio-rng-device`` as it drives its own.

Every run is bounded: QEMU is killed (its whole process group) when the
context ends, and every qtest reply is awaited with a timeout.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import select
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from virtio.layout import ByteOrder
from virtio.memory import Allocator, GuestMemory
from virtio.transport.mmio import MAGIC, MmioTransport, NoDevice, Reg
from virtio.transport.pci import VENDOR, NotVirtio, PciTransport

MMIO_BASE = 0xFEB00000
MMIO_STRIDE = 0x200
MMIO_SLOTS = 8  # microvm with ioapic2=off
MMIO_GSI = 5  # microvm with ioapic2=off: slot N interrupts on GSI 5 + N


class QtestError(RuntimeError):
    """QEMU did not start, answered FAIL, or stopped answering."""


def halting_firmware(path: Path) -> Path:
    """64 KiB of ``hlt`` with ``cli; hlt; jmp .-3`` at the reset vector (0xFFF0)."""
    image = bytearray(b"\xf4") * 0x10000
    image[0xFFF0:0xFFF4] = b"\xfa\xf4\xeb\xfd"
    path.write_bytes(bytes(image))
    return path


class QtestClient:
    """The qtest text protocol: one command, one reply; ``IRQ`` lines come in between."""

    def __init__(
        self, path: str, timeout: float = 10.0, alive: Callable[[], bool] = lambda: True
    ) -> None:
        """Connect to QEMU's qtest socket at ``path``; ``alive()`` False: QEMU exited."""
        self.timeout = timeout
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.sock.connect(path)
                break
            except (FileNotFoundError, ConnectionRefusedError):
                if not alive() or time.monotonic() > deadline:
                    self.sock.close()
                    why = "QEMU exited" if not alive() else "no qtest socket"
                    raise QtestError(f"{why} (socket {path})") from None
                time.sleep(0.02)
        self._buffer = b""
        self.irq: dict[int, bool] = {}
        self.raised: dict[int, int] = {}  # how often each line went up

    def close(self) -> None:
        self.sock.close()

    def _line(self, timeout: float | None) -> str | None:
        """The next line, or None if none came within ``timeout``."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while b"\n" not in self._buffer:
            wait = None if deadline is None else max(0.0, deadline - time.monotonic())
            if not select.select([self.sock], [], [], wait)[0]:
                return None
            chunk = self.sock.recv(65536)
            if not chunk:
                raise QtestError("QEMU closed the qtest connection")
            self._buffer += chunk
        line, _, self._buffer = self._buffer.partition(b"\n")
        return line.decode()

    def _event(self, line: str) -> bool:
        """Take an asynchronous ``IRQ raise|lower N`` line; False if the line is a reply."""
        parts = line.split()
        if len(parts) == 3 and parts[0] == "IRQ":
            gsi, up = int(parts[2]), parts[1] == "raise"
            self.irq[gsi] = up
            if up:
                self.raised[gsi] = self.raised.get(gsi, 0) + 1
            return True
        return False

    def command(self, text: str) -> str:
        self.sock.sendall(text.encode() + b"\n")
        while True:
            line = self._line(self.timeout)
            if line is None:
                raise QtestError(f"no reply to {text!r} in {self.timeout}s")
            if self._event(line):
                continue
            if not line.startswith("OK"):
                raise QtestError(f"{text!r}: {line}")
            return line[2:].strip()

    def read(self, addr: int, size: int) -> int:
        verb = {1: "readb", 2: "readw", 4: "readl", 8: "readq"}[size]
        return int(self.command(f"{verb} {addr:#x}"), 16)

    def write(self, addr: int, size: int, value: int) -> None:
        verb = {1: "writeb", 2: "writew", 4: "writel", 8: "writeq"}[size]
        self.command(f"{verb} {addr:#x} {value:#x}")

    def read_io(self, port: int, size: int) -> int:
        verb = {1: "inb", 2: "inw", 4: "inl"}[size]
        return int(self.command(f"{verb} {port:#x}"), 16)

    def write_io(self, port: int, size: int, value: int) -> None:
        verb = {1: "outb", 2: "outw", 4: "outl"}[size]
        self.command(f"{verb} {port:#x} {value:#x}")

    def wait_irq(self, gsi: int, timeout: float | None) -> bool:
        """Until line ``gsi`` is raised (True) or ``timeout`` passes (False)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self.irq.get(gsi, False):
            wait = None if deadline is None else deadline - time.monotonic()
            if wait is not None and wait <= 0:
                return False
            line = self._line(wait)
            if line is None:
                return False
            if not self._event(line):
                raise QtestError(f"unexpected qtest line {line!r}")
        return True


PCI_CONFIG_ADDRESS, PCI_CONFIG_DATA = 0xCF8, 0xCFC
PCI_MEMORY_BASE = 0xC000_0000  # where this "firmware" puts memory BARs (q35's PCI hole)
PCI_IO_BASE = 0xC000
MSI_MAILBOX = 0x8000  # guest RAM the MSI-X messages are aimed at: this process reads them there
MSI_MARK = 0x5A5A0000


class QtestPciBus:
    """A PciBus onto one of QEMU's PCI functions (bus 0): port I/O for its
    configuration space, the guest's physical address space for its BARs.

    No firmware ran, so :meth:`assign` does a firmware's job: sizes the BARs and
    gives them addresses. MSI-X messages are aimed at guest RAM
    (``MSI_MAILBOX``), which this process maps: a message is a memory write, so
    reading the mailbox tells which vector fired. INTx is a line the qtest
    client sees (``irq_intercept_in``).
    """

    def __init__(self, client: QtestClient, memory: GuestMemory, slot: int, gsi: int) -> None:
        self.client = client
        self.memory = memory
        self.slot = slot
        self.gsi = gsi
        self.bars: dict[int, tuple[int, bool]] = {}  # index -> (base, io)
        self.accesses = 0
        self.messages = 0

    def _address(self, offset: int) -> int:
        return 0x8000_0000 | self.slot << 11 | (offset & 0xFC)

    def config_read(self, offset: int, size: int) -> int:
        self.accesses += 1
        self.client.write_io(PCI_CONFIG_ADDRESS, 4, self._address(offset))
        return self.client.read_io(PCI_CONFIG_DATA + (offset & 3), size)

    def config_write(self, offset: int, size: int, value: int) -> None:
        self.accesses += 1
        self.client.write_io(PCI_CONFIG_ADDRESS, 4, self._address(offset))
        self.client.write_io(PCI_CONFIG_DATA + (offset & 3), size, value)

    def assign(self, memory_base: int, io_base: int) -> tuple[int, int]:
        """Size and place every BAR; returns the next free memory and I/O addresses."""
        index = 0
        while index < 6:
            reg = 0x10 + 4 * index
            original = self.config_read(reg, 4)
            self.config_write(reg, 4, 0xFFFFFFFF)
            mask = self.config_read(reg, 4)
            if not mask:
                index += 1
                continue
            io = bool(original & 1)
            wide = not io and (original >> 1) & 3 == 2  # a 64-bit memory BAR
            size = (~(mask & (~3 if io else ~0xF)) + 1) & 0xFFFFFFFF
            if io:
                base = (io_base + size - 1) & ~(size - 1)
                io_base = base + size
            else:
                base = (memory_base + size - 1) & ~(size - 1)
                memory_base = base + size
            self.config_write(reg, 4, base)
            if wide:
                self.config_write(reg + 4, 4, 0)
            self.bars[index] = (base, io)
            index += 2 if wide else 1
        return memory_base, io_base

    def bar_read(self, bar: int, offset: int, size: int) -> int:
        self.accesses += 1
        base, io = self.bars[bar]
        if io:
            return self.client.read_io(base + offset, size)
        return self.client.read(base + offset, size)

    def bar_write(self, bar: int, offset: int, size: int, value: int) -> None:
        self.accesses += 1
        base, io = self.bars[bar]
        if io:
            self.client.write_io(base + offset, size, value)
        else:
            self.client.write(base + offset, size, value)

    def msix_message(self, vector: int) -> tuple[int, int]:
        return MSI_MAILBOX + 4 * vector, MSI_MARK | vector

    def _mailbox(self) -> list[int]:
        fired = []
        words = self.memory.view(MSI_MAILBOX, 4 * 64).cast("I")
        for vector in range(64):
            if words[vector] == MSI_MARK | vector:
                words[vector] = 0
                fired.append(vector)
        return fired

    def wait_interrupt(self, timeout: float | None) -> list[int]:
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            fired = self._mailbox()
            if self.client.irq.get(self.gsi):
                fired.append(-1)
            if fired:
                self.messages += len([v for v in fired if v >= 0])
                return fired
            if deadline is not None and time.monotonic() >= deadline:
                return []
            # An INTx edge comes over the socket; a message lands in RAM: look again soon.
            self.client.wait_irq(self.gsi, 0.0005)


class QtestMmioBus:
    """An MmioBus onto one of QEMU's virtio-mmio windows."""

    def __init__(self, client: QtestClient, base: int, gsi: int) -> None:
        self.client = client
        self.base = base
        self.gsi = gsi
        self.accesses = 0

    def read(self, offset: int, size: int) -> int:
        self.accesses += 1
        return self.client.read(self.base + offset, size)

    def write(self, offset: int, size: int, value: int) -> None:
        self.accesses += 1
        self.client.write(self.base + offset, size, value)

    def wait_interrupt(self, timeout: float | None) -> bool:
        return self.client.wait_irq(self.gsi, timeout)


@dataclass
class QemuMachine:
    """A running QEMU under qtest, its RAM mapped here."""

    client: QtestClient
    memory: GuestMemory
    allocator: Allocator
    process: subprocess.Popen[bytes]
    command: list[str] = field(default_factory=list)
    #: QEMU's own log of what the "guest" (our driver) did wrong (-d guest_errors).
    guest_errors: Path | None = None

    def guest_error_text(self) -> str:
        if self.guest_errors is None or not self.guest_errors.exists():
            return ""
        return self.guest_errors.read_text(errors="replace")

    def mmio_transports(self, *, legacy_order: ByteOrder = "little") -> list[MmioTransport]:
        """A transport for every virtio-mmio window holding a device (placeholders left alone)."""
        found = []
        for slot in range(MMIO_SLOTS):
            base = MMIO_BASE + MMIO_STRIDE * slot
            if self.client.read(base + Reg.MAGIC_VALUE, 4) != MAGIC:
                continue
            bus = QtestMmioBus(self.client, base, MMIO_GSI + slot)
            try:
                found.append(
                    MmioTransport(bus, self.memory, self.allocator, legacy_order=legacy_order)
                )
            except NoDevice:
                continue
        return found

    def pci_transports(self, **options: object) -> list[PciTransport]:
        """A transport for every virtio function on PCI bus 0, its BARs assigned first."""
        found = []
        memory_base, io_base = PCI_MEMORY_BASE, PCI_IO_BASE
        for slot in range(32):
            # Measured on QEMU 7.2's q35 with no firmware: slot S's INTA# is GSI 20 + S % 4.
            bus = QtestPciBus(self.client, self.memory, slot, 20 + slot % 4)
            if bus.config_read(0, 2) != VENDOR:
                continue
            memory_base, io_base = bus.assign(memory_base, io_base)
            try:
                found.append(PciTransport(bus, self.memory, self.allocator, **options))  # type: ignore[arg-type]
            except NotVirtio:
                continue
        return found


@contextlib.contextmanager
def qemu_machine(
    devices: Sequence[str],
    *,
    machine: str = "microvm",
    modern: bool = True,
    memory_mb: int = 64,
    extra: Sequence[str] = (),
    timeout: float = 10.0,
) -> Iterator[QemuMachine]:
    """QEMU with ``devices`` (``-device`` arguments) under qtest, and nothing running in it."""
    qemu = shutil.which("qemu-system-x86_64")
    if qemu is None:
        raise QtestError("qemu-system-x86_64 is not installed (./dev setup)")
    with tempfile.TemporaryDirectory(prefix="pyvirtio-qtest-") as tmp:
        work = Path(tmp)
        firmware = halting_firmware(work / "halt.bin")
        ram = work / "ram"
        with open(ram, "wb") as f:
            f.truncate(memory_mb << 20)
        sock = work / "qtest.sock"
        if machine == "microvm":
            opts = "microvm,x-option-roms=off,pit=off,pic=off,rtc=off,isa-serial=off,ioapic2=off,acpi=off"
        else:
            opts = machine
        cmd = [
            qemu,
            "-M",
            f"{opts},memory-backend=mem",
            "-accel",
            "tcg",
            "-bios",
            str(firmware),
            "-m",
            f"{memory_mb}M",
            "-object",
            f"memory-backend-file,id=mem,size={memory_mb}M,mem-path={ram},share=on",
            "-nodefaults",
            "-display",
            "none",
            "-monitor",
            "none",
            "-serial",
            "none",
            "-qtest",
            f"unix:{sock},server=on,wait=off",
            "-qtest-log",
            "/dev/null",
            # QEMU reports accesses its device models find wrong: our driver's mistakes.
            "-d",
            "guest_errors",
            "-D",
            str(work / "guest-errors.log"),
        ]
        if machine == "microvm" and modern:
            cmd += ["-global", "virtio-mmio.force-legacy=false"]
        for device in devices:
            cmd += ["-device", device]
        cmd += list(extra)
        log = work / "qemu.log"
        with open(log, "wb") as out:
            proc = subprocess.Popen(cmd, stdout=out, stderr=out, start_new_session=True)
        client: QtestClient | None = None
        try:
            try:
                client = QtestClient(str(sock), timeout, alive=lambda: proc.poll() is None)
            except QtestError as err:
                raise QtestError(f"{err}; QEMU said: {log.read_text(errors='replace')}") from err
            client.command("irq_intercept_in ioapic")
            fd = os.open(ram, os.O_RDWR)
            try:
                mapping = mmap.mmap(fd, memory_mb << 20, mmap.MAP_SHARED)
            finally:
                os.close(fd)
            memory = GuestMemory()
            memory.add(0, mapping, name="qemu-ram")
            # Above the first MiB: the BIOS area is ROM on a PC.
            allocator = Allocator(1 << 20, (memory_mb - 1) << 20)
            yield QemuMachine(client, memory, allocator, proc, cmd, work / "guest-errors.log")
        finally:
            if client is not None:
                client.close()
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
