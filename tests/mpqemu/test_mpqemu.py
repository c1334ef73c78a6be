"""QEMU's multi-process proxy, without QEMU: the wire, the remote session, the server.

A stand-in for QEMU's proxy (``ProxyBus``) speaks the mpqemu messages to a
real ``PciServer`` over its sockets, so pyvirtio's own virtio-pci driver can
drive the served function end to end; hostile peers check that nothing they
send takes the server down.
"""

from __future__ import annotations

import contextlib
import logging
import mmap
import os
import select
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from virtio.devices.blk import BlkDevice, BlkDriver
from virtio.devices.rng import RngDevice, RngDriver
from virtio.memory import Allocator, Buffer, GuestMemory
from virtio.mpqemu.control import (
    HELLO,
    ControlError,
    FunctionInfo,
    Intx,
    Msi,
    decode_event,
    encode_intx,
    encode_msi,
)
from virtio.mpqemu.remote import ALL_ONES, RemoteSession
from virtio.mpqemu.server import OsMemory, PciServer
from virtio.mpqemu.wire import (
    BAR_ACCESS,
    HEADER,
    PCI_CONF,
    RET,
    SYNC_SYSMEM,
    Command,
    Message,
    MpqemuError,
    encode,
    parse_header,
)
from virtio.spec.status import DeviceStatus as S
from virtio.transport.pci import (
    BAR_MODERN,
    CFG_BAR0,
    CFG_COMMAND,
    CMD_BUS_MASTER,
    CMD_IO,
    CMD_MEMORY,
    COMMON_OFF,
    PciFunction,
    PciTransport,
)

P = "Virtio Transport Options / Virtio Over PCI Bus / "
N_DISCOVERY_DEV = f"devicenormative:{P}PCI Device Discovery"
N_LAYOUT_DRV = f"drivernormative:{P}PCI Device Layout"
N_USED_NOTIFY_DEV = (
    f"devicenormative:{P}PCI-specific Initialization And Device Operation / "
    "Used Buffer Notifications"
)
N_BLK_DEV_OP = "devicenormative:Device Types / Block Device / Device Operation"
N_ENTROPY_DEV = "devicenormative:Device Types / Entropy Device / Device Operation"

RAM = 16 << 20
MEMORY_BASE, IO_BASE = 0xC000_0000, 0xC000


def sysmem(sections: list[tuple[int, int, int]]) -> bytes:
    gpas = [s[0] for s in sections] + [0] * (8 - len(sections))
    sizes = [s[1] for s in sections] + [0] * (8 - len(sections))
    offsets = [s[2] for s in sections] + [0] * (8 - len(sections))
    return SYNC_SYSMEM.pack(*gpas, *sizes, *offsets)


class ProxyBus:
    """What QEMU's x-pci-proxy-dev does, as a PciBus: mpqemu messages for every access."""

    def __init__(self, proxy: socket.socket, control: socket.socket, ram_fd: int) -> None:
        self.proxy = proxy
        self.control = control
        self.pending = b""
        self.level = False
        self.lines: list[bytes] = []
        socket.send_fds(proxy, [encode(Command.SYNC_SYSMEM, sysmem([(0, RAM, 0)]))], [ram_fd])
        self.bars: dict[int, tuple[int, bool]] = {}
        memory, io = MEMORY_BASE, IO_BASE
        for index in range(6):  # as firmware does: size, then place, each BAR
            reg = CFG_BAR0 + 4 * index
            self.config_write(reg, 4, 0xFFFFFFFF)
            mask = self.config_read(reg, 4)
            if not mask:
                continue
            is_io = bool(mask & 1)
            size = (~(mask & ~(3 if is_io else 0xF)) + 1) & 0xFFFFFFFF
            base = io if is_io else memory
            base = (base + size - 1) & ~(size - 1)
            self.config_write(reg, 4, base)
            self.bars[index] = (base, is_io)
            if is_io:
                io = base + size
            else:
                memory = base + size
        self.config_write(CFG_COMMAND, 2, CMD_IO | CMD_MEMORY | CMD_BUS_MASTER)

    def call(self, cmd: int, payload: bytes) -> int:
        self.proxy.sendall(encode(cmd, payload))
        header = self._recv(HEADER.size)
        got, size = parse_header(header)
        assert got == Command.RET
        return int(RET.unpack(self._recv(size))[0]) if size else 0

    def _recv(self, n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = self.proxy.recv(n - len(data))
            if not chunk:
                raise EOFError("the remote closed")
            data += chunk
        return data

    def config_read(self, offset: int, size: int) -> int:
        return self.call(Command.PCI_CFGREAD, PCI_CONF.pack(offset, 0, size))

    def config_write(self, offset: int, size: int, value: int) -> None:
        self.call(Command.PCI_CFGWRITE, PCI_CONF.pack(offset, value, size))

    def bar_read(self, bar: int, offset: int, size: int) -> int:
        base, io = self.bars[bar]
        return self.call(Command.BAR_READ, BAR_ACCESS.pack(base + offset, 0, size, not io))

    def bar_write(self, bar: int, offset: int, size: int, value: int) -> None:
        base, io = self.bars[bar]
        self.call(Command.BAR_WRITE, BAR_ACCESS.pack(base + offset, value, size, not io))

    def msix_message(self, vector: int) -> tuple[int, int]:
        return 0xFEE0_0000, 0x4000 | vector

    def wait_interrupt(self, timeout: float | None) -> list[int]:
        ready, _, _ = select.select([self.control], [], [], timeout)
        fired: list[int] = []
        if ready:
            self.pending += self.control.recv(4096)
            *lines, self.pending = self.pending.split(b"\n")
            self.lines += lines
            for line in lines:
                event = decode_event(line)
                if isinstance(event, Msi):
                    fired.append(event.data & 0xFFF)
                else:
                    self.level = event.level
        if self.level:
            fired.append(-1)
        return fired


@contextlib.contextmanager
def served(tmp_path: Path, device: BlkDevice | RngDevice, **options: object) -> Iterator[PciServer]:
    server = PciServer(tmp_path / "fn.sock", device, name="dev", **options)  # type: ignore[arg-type]
    server.bind()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.stop()
        thread.join(timeout=10)
        assert not thread.is_alive()


@contextlib.contextmanager
def attached(
    server: PciServer,
) -> Iterator[tuple[ProxyBus, GuestMemory, Allocator, FunctionInfo]]:
    """`virtio qemu`'s side of the hello, then the proxy's side of the function."""
    control = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    control.settimeout(10)
    control.connect(str(server.path))
    control.sendall(HELLO)
    line, fds, _flags, _addr = socket.recv_fds(control, 4096, 1)
    assert len(fds) == 1
    info = FunctionInfo.decode(line)
    proxy = socket.socket(fileno=fds[0])
    proxy.settimeout(10)
    ram_fd = os.memfd_create("guest-ram")
    os.ftruncate(ram_fd, RAM)
    ram = mmap.mmap(ram_fd, RAM)
    memory = GuestMemory()
    memory.add(0, ram, name="guest-ram")
    try:
        bus = ProxyBus(proxy, control, ram_fd)
        yield bus, memory, Allocator(0x10000, RAM - 0x10000), info
    finally:
        proxy.close()
        control.close()
        os.close(ram_fd)


# -- the wire ---------------------------------------------------------------------------------


def test_headers_are_16_bytes_and_payloads_bounded() -> None:
    assert HEADER.size == 16 and SYNC_SYSMEM.size == 192
    assert PCI_CONF.size == 12 and BAR_ACCESS.size == 24
    assert parse_header(encode(Command.PCI_CFGREAD, bytes(12))[:16]) == (3, 12)
    with pytest.raises(MpqemuError, match="payload of 4096 bytes"):
        parse_header(HEADER.pack(Command.BAR_READ, 0, 4096))


def test_control_events_round_trip_and_junk_is_refused() -> None:
    assert decode_event(encode_msi(0xFEE01004, 0x4025).rstrip()) == Msi(0xFEE01004, 0x4025)
    assert decode_event(encode_intx(True, 11)) == Intx(True, 11)
    for junk in (b"msi", b"msi 1", b"intx 2 11", b"intx 1 x", b"msi 0x1 0x100000000", b"\xff"):
        with pytest.raises(ControlError):
            decode_event(junk)


# -- the remote session, sans-IO ---------------------------------------------------------------


class Host(OsMemory):
    def __init__(self) -> None:
        super().__init__()
        self.closed: list[int] = []
        self.maps = 0

    def map(self, fd: int, size: int, offset: int) -> Buffer:
        self.maps += 1
        return super().map(fd, size, offset)

    def close(self, fd: int) -> None:
        self.closed.append(fd)
        super().close(fd)


def memfd(size: int = 2 << 20) -> int:
    fd = os.memfd_create("ram")
    os.ftruncate(fd, size)
    return fd


def ret(reply: bytes | None) -> int:
    assert reply is not None and parse_header(reply[:16]) == (Command.RET, 8)
    return int(RET.unpack(reply[16:])[0])


def session() -> tuple[RemoteSession, Host]:
    host = Host()
    return RemoteSession(PciFunction(RngDevice()), host), host


@pytest.mark.normative(N_DISCOVERY_DEV)
def test_configuration_reads_are_the_functions_and_masked_to_their_length() -> None:
    s, _host = session()
    read = Message(Command.PCI_CFGREAD, PCI_CONF.pack(0, 0, 4))
    assert ret(s.handle(read)) == 0x1044_1AF4  # vendor 0x1af4, modern rng 0x1040 + 4
    assert ret(s.handle(Message(Command.PCI_CFGREAD, PCI_CONF.pack(2, 0, 2)))) == 0x1044
    assert ret(s.handle(Message(Command.PCI_CFGREAD, PCI_CONF.pack(8, 0, 1)))) == 1  # revision
    # The 7th BAR slot QEMU probes (0x28) answers 0: no BAR there.
    assert ret(s.handle(Message(Command.PCI_CFGREAD, PCI_CONF.pack(0x28, 0, 4)))) == 0
    for bad in (PCI_CONF.pack(0x100, 0, 4), PCI_CONF.pack(0, 0, 3), PCI_CONF.pack(0xFE, 0, 4)):
        assert ret(s.handle(Message(Command.PCI_CFGREAD, bad))) == ALL_ONES


def test_bar_accesses_resolve_against_the_programmed_bases() -> None:
    s, _host = session()
    fn = s.function
    write = Command.PCI_CFGWRITE
    s.handle(Message(write, PCI_CONF.pack(CFG_BAR0 + 4 * BAR_MODERN, 0xFE00_0000, 4)))
    s.handle(Message(write, PCI_CONF.pack(CFG_COMMAND, CMD_MEMORY, 2)))
    status = BAR_ACCESS.pack(0xFE00_0000 + COMMON_OFF + 0x14, 0, 1, True)
    s.handle(Message(Command.BAR_WRITE, BAR_ACCESS.pack(0xFE00_0014, S.ACKNOWLEDGE, 1, True)))
    assert ret(s.handle(Message(Command.BAR_READ, status))) == S.ACKNOWLEDGE
    assert fn.registers.status == S.ACKNOWLEDGE
    # Outside every BAR, or an I/O access at a memory address: all ones, nothing touched.
    assert ret(s.handle(Message(Command.BAR_READ, BAR_ACCESS.pack(0xFD00_0000, 0, 4, True)))) == (
        ALL_ONES
    )
    assert ret(s.handle(Message(Command.BAR_READ, BAR_ACCESS.pack(0xFE00_0014, 0, 1, False)))) == (
        ALL_ONES
    )
    assert ret(s.handle(Message(Command.BAR_READ, BAR_ACCESS.pack(0xFE00_0014, 0, 3, True)))) == (
        ALL_ONES
    )
    # A reset clears the function: status, BAR bases, command.
    assert ret(s.handle(Message(Command.DEVICE_RESET))) == 0
    assert fn.registers.status == 0 and fn.command == 0
    assert ret(s.handle(Message(Command.BAR_READ, status))) == ALL_ONES


def test_memory_is_mapped_once_per_layout_and_every_fd_is_closed() -> None:
    s, host = session()
    fds = [memfd(), memfd()]
    layout = sysmem([(0, 0xA0000, 0), (0x100000, 0xF0000, 0x100000)])
    s.handle(Message(Command.SYNC_SYSMEM, layout, list(fds)))
    assert [(r.gpa, r.size) for r in s.memory.regions] == [(0, 0xA0000), (0x100000, 0xF0000)]
    assert host.maps == 2 and host.closed == fds
    # Other files behind the same layout: the RAM changed, so it is mapped again.
    again = [memfd(), memfd()]
    s.handle(Message(Command.SYNC_SYSMEM, layout, list(again)))
    assert host.maps == 4 and host.closed == fds + again


def test_a_resend_of_the_same_files_is_not_remapped() -> None:
    s, host = session()
    ram = memfd()
    layout = sysmem([(0, 1 << 20, 0)])
    s.handle(Message(Command.SYNC_SYSMEM, layout, [os.dup(ram)]))
    s.handle(Message(Command.SYNC_SYSMEM, layout, [os.dup(ram)]))
    assert host.maps == 1 and len(host.closed) == 2
    os.close(ram)


def test_bad_messages_are_errors_and_lose_no_fds(caplog: pytest.LogCaptureFixture) -> None:
    s, host = session()
    fds = [memfd()]
    with pytest.raises(MpqemuError, match="payload of 10 bytes"):
        s.handle(Message(Command.SYNC_SYSMEM, bytes(10), list(fds)))
    assert host.closed == fds
    with pytest.raises(MpqemuError, match="RET is not a command"):
        s.handle(Message(Command.RET, bytes(8)))
    with pytest.raises(MpqemuError, match="command 99"):
        s.handle(Message(99))
    with pytest.raises(MpqemuError, match="12 expected"):
        s.handle(Message(Command.PCI_CFGREAD, bytes(4)))
    # No RAM shared at all: said plainly.
    caplog.set_level(logging.ERROR, logger="virtio.mpqemu")
    s.handle(Message(Command.SYNC_SYSMEM, sysmem([])))
    assert "shares no guest RAM" in caplog.text


def test_notifications_wait_until_the_access_is_answered() -> None:
    s, _host = session()
    fn = s.function
    s.handle(Message(Command.PCI_CFGWRITE, PCI_CONF.pack(CFG_BAR0 + 16, 0xFE00_0000, 4)))
    served: list[tuple[int, int | None]] = []

    def serve(value: int, queue: int | None = None, *, rearm: bool = True) -> int:
        served.append((value, queue))
        return 0

    fn.serve_notification = serve  # type: ignore[method-assign]
    reply = s.handle(Message(Command.BAR_WRITE, BAR_ACCESS.pack(0xFE00_3000, 0, 2, True)))
    assert ret(reply) == 0 and served == [] and s.pending == [(0, 0)]
    s.serve_notifications()
    assert served == [(0, 0)] and not s.pending


# -- the server, with pyvirtio's own driver as the guest -----------------------------------------


@pytest.mark.normative(N_DISCOVERY_DEV, N_USED_NOTIFY_DEV, N_BLK_DEV_OP)
@pytest.mark.parametrize("transitional", [False, True], ids=["modern", "transitional"])
def test_our_driver_through_the_proxy_protocol_reads_and_writes(
    tmp_path: Path, transitional: bool
) -> None:
    image = tmp_path / "disk.img"
    image.write_bytes(b"\0" * (1 << 20))
    with served(tmp_path, BlkDevice(str(image)), transitional=transitional) as server:
        with attached(server) as (bus, memory, allocator, info):
            assert info.pci_id == ("1af4:1001" if transitional else "1af4:1042")
            assert info.msix_vectors == 2
            transport = PciTransport(bus, memory, allocator, force_legacy=transitional)
            driver = BlkDriver(transport)
            driver.initialize()
            driver.write(8, b"proxied!" * 512)
            assert driver.read(8, 4096) == b"proxied!" * 512
            assert any(line.startswith(b"msi ") for line in bus.lines)
        # The VM went away: the function reset and the data reached the image.
        deadline = time.monotonic() + 5
        while server.function.registers.status and time.monotonic() < deadline:
            time.sleep(0.01)
        assert server.function.registers.status == 0
    assert image.read_bytes()[8 * 512 : 8 * 512 + 4096] == b"proxied!" * 512


@pytest.mark.normative(N_USED_NOTIFY_DEV, N_ENTROPY_DEV)
def test_intx_travels_as_level_lines(tmp_path: Path) -> None:
    with (
        served(tmp_path, RngDevice(), transitional=True) as server,
        attached(server) as (bus, memory, allocator, _info),
    ):
        bus.config_write(0x3C, 1, 11)  # firmware's Interrupt Line
        transport = PciTransport(bus, memory, allocator, force_legacy=True, use_msix=False)
        rng = RngDriver(transport)
        rng.initialize()
        assert len(rng.read(64)) == 64
        # The driver may find the used buffer before it handles the interrupt: the
        # line goes down when it does (reading the ISR), on the server's thread.
        deadline = time.monotonic() + 5
        while not (b"intx 1 11" in bus.lines and b"intx 0 11" in bus.lines):
            assert time.monotonic() < deadline, bus.lines
            transport.wait_interrupt(0.05)


@pytest.mark.normative(N_LAYOUT_DRV)
def test_hostile_peers_end_their_session_and_the_server_goes_on(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="virtio")
    with served(tmp_path, RngDevice()) as server:
        # Not `virtio qemu`: closed.
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(str(server.path))
            s.sendall(b"GET / HTTP/1.0\n")
            assert s.recv(100) == b""
        # A proxy that sends junk; one that sends a header and stops; one with an
        # oversized payload; one that writes a forbidden width.
        for junk in (
            HEADER.pack(42, 0, 0),
            HEADER.pack(Command.BAR_READ, 0, 1 << 40),
            HEADER.pack(Command.PCI_CFGREAD, 0, 12)[:10],
        ):
            with attached(server) as (bus, _m, _a, _i):
                bus.proxy.sendall(junk)
                if len(junk) < 16:
                    bus.proxy.shutdown(socket.SHUT_WR)
                assert bus.proxy.recv(100) == b""  # the server closed this VM's socket
        with attached(server) as (bus, _m, _a, _i):
            bus.bar_write(BAR_MODERN, COMMON_OFF + 0x14, 2, S.ACKNOWLEDGE)  # 16-bit status
            reason = server.function.device.needs_reset_reason
            assert reason is not None and N_LAYOUT_DRV in reason
            assert bus.bar_read(BAR_MODERN, COMMON_OFF + 0x14, 1) & S.DEVICE_NEEDS_RESET
        # And a well-behaved VM is served after all of that.
        with attached(server) as (bus, memory, allocator, _i):
            rng = RngDriver(PciTransport(bus, memory, allocator))
            rng.initialize()
            assert len(rng.read(32)) == 32
    assert "is not a command QEMU's proxy sends" in caplog.text
    assert "payload of" in caplog.text
    assert "not `virtio qemu`" in caplog.text
