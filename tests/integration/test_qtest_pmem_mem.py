"""pyvirtio's pmem and mem drivers against QEMU's own virtio-pmem-pci and virtio-mem-pci.

No guest runs: the drivers, through qtest and the shared guest RAM, are the
guest. Both devices put memory in guest-physical address space outside RAM,
so QEMU needs memory hotplug room: ``-m 256M,slots=2,maxmem=1G``. What QEMU
7.2 answers, as measured here: pmem sits at 4 GiB (the first address of the
hotplug area), offers no VIRTIO_PMEM_F_SHMEM_REGION, and answers a flush with
0 (and any other request type too: it does not read the type); virtio-mem's region follows, aligned to its block size, it offers
VIRTIO_MEM_F_ACPI_PXM (node 0) and not UNPLUGGED_INACCESSIBLE, and it answers
PLUG, UNPLUG, UNPLUG ALL and STATE with the response codes the spec names
(NACK for plugging beyond requested_size). A new requested size set through
QMP arrives as a configuration change interrupt.

The last two tests drive `virtio serve pmem` and `virtio serve mem` as real
processes through pyvirtio's vhost-user front-end (QEMU 7.2 has no
vhost-user front-end for either type): the flush is an fsync in another
process, and ``requested_size`` set on the control socket reaches the
driver as a configuration change message.
"""

from __future__ import annotations

import contextlib
import json
import mmap
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.conftest import ServeProcess
from virtio.control import request
from virtio.devices.mem import MemDriver
from virtio.devices.mem import wire as MW
from virtio.devices.pmem import PmemDriver
from virtio.devices.pmem import wire as PW
from virtio.spec.device_ids import DeviceId
from virtio.transport.pci import PciTransport
from virtio.vhost_user.frontend import VhostUserFrontend
from virtio.vm.qtest import QemuMachine, qemu_machine

MEM = "Device Types / Memory Device"
N_MEM_CFG_DRV = f"drivernormative:{MEM} / Device configuration layout"
N_MEM_INIT_DRV = f"drivernormative:{MEM} / Device Initialization"
N_MEM_OP_DRV = f"drivernormative:{MEM} / Device Operation"
N_MEM_PLUG_DRV = f"drivernormative:{MEM} / Device Operation / PLUG request"
N_MEM_UNPLUG_DRV = f"drivernormative:{MEM} / Device Operation / UNPLUG request"
N_MEM_ALL_DRV = f"drivernormative:{MEM} / Device Operation / UNPLUG ALL request"
N_MEM_STATE_DRV = f"drivernormative:{MEM} / Device Operation / STATE request"
N_PMEM_INIT_DRV = "drivernormative:Device Types / PMEM Device / Device Initialization"

MB = 1 << 20
PMEM_SIZE = 16 * MB
HOTPLUG = ["-m", "256M,slots=2,maxmem=1G"]


class Qmp:
    """Just enough QMP to set a property at run time."""

    def __init__(self, path: Path, timeout: float = 10.0) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.sock.connect(str(path))
                break
            except (FileNotFoundError, ConnectionRefusedError):
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        self.file = self.sock.makefile("rwb")
        self._next()  # the greeting
        self.execute("qmp_capabilities")

    def _next(self) -> dict[str, object]:
        while True:
            line = self.file.readline()
            if not line:
                raise ConnectionError("QMP closed")
            message: dict[str, object] = json.loads(line)
            if "event" not in message:
                return message

    def execute(self, command: str, **arguments: object) -> object:
        self.file.write(json.dumps({"execute": command, "arguments": arguments}).encode() + b"\n")
        self.file.flush()
        answer = self._next()
        if "error" in answer:
            raise RuntimeError(f"QMP {command}: {answer['error']}")
        return answer.get("return")

    def close(self) -> None:
        self.file.close()
        self.sock.close()


@contextlib.contextmanager
def machine(tmp_path: Path, device: str, objects: list[str]) -> Iterator[tuple[QemuMachine, Qmp]]:
    qmp_path = tmp_path / "qmp.sock"
    extra = [*HOTPLUG, "-qmp", f"unix:{qmp_path},server=on,wait=off"]
    for obj in objects:
        extra += ["-object", obj]
    with qemu_machine([device], machine="q35", memory_mb=256, extra=extra) as m:
        qmp = Qmp(qmp_path)
        try:
            yield m, qmp
        finally:
            qmp.close()


def only(m: QemuMachine, device_id: int) -> PciTransport:
    [transport] = [t for t in m.pci_transports() if t.device_id == device_id]
    return transport


class QtestMemory:
    """Guest-physical memory through qtest's read/write commands (for ranges outside RAM)."""

    def __init__(self, m: QemuMachine) -> None:
        self.client = m.client

    def read(self, addr: int, length: int) -> bytes:
        return b"".join(self.client.read(addr + i, 1).to_bytes(1, "little") for i in range(length))

    def write(self, addr: int, data: bytes | bytearray | memoryview) -> None:
        for i, byte in enumerate(bytes(data)):
            self.client.write(addr + i, 1, byte)

    def view(self, addr: int, length: int) -> memoryview:
        return memoryview(self.read(addr, length))

    def iovecs(self, addr: int, length: int) -> list[memoryview]:
        return [self.view(addr, length)]


@pytest.mark.normative(N_PMEM_INIT_DRV)
def test_pmem_driver_on_qemu_virtio_pmem_pci(tmp_path: Path) -> None:
    backing = tmp_path / "pmem.img"
    backing.write_bytes(b"P" * PMEM_SIZE)
    obj = f"memory-backend-file,id=pm0,share=on,mem-path={backing},size=16M"
    with machine(tmp_path, "virtio-pmem-pci,memdev=pm0,id=vpm0", [obj]) as (m, _qmp):
        driver = PmemDriver(only(m, 27))
        driver.initialize()
        assert not driver.device_features >> PW.F_SHMEM_REGION & 1  # QEMU 7.2 has no region
        start, size = driver.config()
        assert (start, size) == (1 << 32, PMEM_SIZE)  # the start of the hotplug area
        window = driver.window(QtestMemory(m))
        assert window.read(0, 4) == b"PPPP" and window.read(PMEM_SIZE - 2, 2) == b"PP"
        window.write(64, b"pyvirtio")
        assert driver.flush() == PW.RET_OK
        with open(backing, "rb") as f:
            f.seek(64)
            assert f.read(8) == b"pyvirtio"
        # And the other way: a host write to the file is what the guest reads at start.
        fd = os.open(backing, os.O_RDWR)
        try:
            with mmap.mmap(fd, PMEM_SIZE) as host:
                host[4096:4100] = b"host"
        finally:
            os.close(fd)
        assert window.read(4096, 4) == b"host"
        # QEMU 7.2 does not look at the type: any request is a flush, answered 0
        # (pyvirtio's device answers -1 to a type it does not know).
        assert driver.request(7) == PW.RET_OK
        assert driver.flush() == PW.RET_OK
        assert m.guest_error_text() == ""


@pytest.mark.normative(N_MEM_CFG_DRV, N_MEM_INIT_DRV, N_MEM_OP_DRV, N_MEM_PLUG_DRV)
@pytest.mark.normative(N_MEM_UNPLUG_DRV, N_MEM_ALL_DRV, N_MEM_STATE_DRV)
def test_mem_driver_on_qemu_virtio_mem_pci(tmp_path: Path) -> None:
    device = "virtio-mem-pci,memdev=vmem0,id=vm0,block-size=2M,requested-size=64M"
    with machine(tmp_path, device, ["memory-backend-ram,id=vmem0,size=512M"]) as (m, qmp):
        driver = MemDriver(only(m, 24))
        driver.initialize()
        c = driver.config()
        bs = c.block_size
        assert bs == 2 * MB and c.region_size == 512 * MB and c.requested_size == 64 * MB
        assert c.addr >= 1 << 32 and c.addr % bs == 0 and c.plugged_size == 0
        assert c.requested_size <= c.usable_region_size <= c.region_size
        assert driver.has(MW.F_ACPI_PXM) and driver.node_id == 0
        base = c.addr

        assert driver.state(base, 4) == (MW.RESP_ACK, MW.STATE_UNPLUGGED)
        assert driver.plug(base, 4) == MW.RESP_ACK
        assert driver.config().plugged_size == 8 * MB
        assert driver.state(base, 4) == (MW.RESP_ACK, MW.STATE_PLUGGED)
        assert driver.state(base, 8) == (MW.RESP_ACK, MW.STATE_MIXED)
        # The spec's ERROR cases, as QEMU answers them.
        assert driver.plug(base + 4096, 1) == MW.RESP_ERROR  # misaligned
        assert driver.plug(base + 8 * MB, 0) == MW.RESP_ERROR  # no blocks
        assert driver.plug(base, 1) == MW.RESP_ERROR  # already plugged
        assert driver.unplug(base + 8 * MB, 1) == MW.RESP_ERROR  # already unplugged
        beyond = base + c.usable_region_size
        assert driver.plug(beyond, 1) == MW.RESP_ERROR  # outside the usable region
        assert driver.state(beyond - bs, 2)[0] == MW.RESP_ERROR
        assert driver.state(base - bs, 1)[0] == MW.RESP_ERROR
        # Beyond the requested size: NACK.
        assert driver.plug(base + 8 * MB, 29) == MW.RESP_NACK
        assert driver.unplug(base + bs, 2) == MW.RESP_ACK
        assert driver.state(base, 4) == (MW.RESP_ACK, MW.STATE_MIXED)
        assert driver.config().plugged_size == 4 * MB

        # balance() reaches requested_size; QMP changes it: a config interrupt.
        assert driver.balance() == 30
        assert driver.config().plugged_size == 64 * MB
        changes = driver.config_changes
        qmp.execute(
            "qom-set", path="/machine/peripheral/vm0", property="requested-size", value=96 * MB
        )
        assert driver.transport.wait_until(lambda: driver.config_changes > changes, 10)
        assert driver.config().requested_size == 96 * MB
        assert driver.balance() == 16 and driver.config().plugged_size == 96 * MB

        assert driver.unplug_all() == MW.RESP_ACK
        assert driver.config().plugged_size == 0
        assert driver.state(base, 4) == (MW.RESP_ACK, MW.STATE_UNPLUGGED)
        assert m.guest_error_text() == ""


def _serve(tmp_path: Path, kind: str, args: list[str], image: Path | None = None) -> ServeProcess:
    server = ServeProcess(
        image=image,
        socket=tmp_path / f"{kind}.sock",
        args=args,
        log=tmp_path / "serve.log",
        kind=kind,
    )
    server.start()
    return server


@pytest.mark.normative(N_PMEM_INIT_DRV)
def test_pmem_driver_on_virtio_serve_pmem_over_vhost_user(tmp_path: Path) -> None:
    backing = tmp_path / "pmem.img"
    backing.write_bytes(b"\0" * PMEM_SIZE)
    server = _serve(tmp_path, "pmem", ["--start", "0x240000000"], backing)
    try:
        with VhostUserFrontend(str(server.socket), device_id=DeviceId.PMEM) as frontend:
            # Over vhost-user there is no shared memory region: take start and size.
            driver = PmemDriver(frontend, features=0)
            driver.initialize()
            assert driver.config() == (0x240000000, PMEM_SIZE)
            # The VMM's part, played here: the file mapped where start says.
            fd = os.open(backing, os.O_RDWR)
            try:
                with mmap.mmap(fd, PMEM_SIZE) as vmm:
                    frontend.guest.add(0x240000000, vmm, name="pmem")
                    driver.window().write(0, b"flushed by another process")
                    assert driver.flush() == PW.RET_OK
                    assert driver.request(3) == PW.RET_FAILURE
                    frontend.guest.remove(0x240000000)
            finally:
                os.close(fd)
        assert backing.read_bytes()[:26] == b"flushed by another process"
    finally:
        assert server.stop() == 0, server.log.read_text()


@pytest.mark.normative(N_MEM_CFG_DRV, N_MEM_OP_DRV, N_MEM_PLUG_DRV, N_MEM_STATE_DRV)
def test_mem_driver_on_virtio_serve_mem_over_vhost_user(tmp_path: Path) -> None:
    ctl = tmp_path / "ctl.sock"
    args = ["--size", "256M", "--block-size", "4M", "--addr", "0x140000000", "--control", str(ctl)]
    server = _serve(tmp_path, "mem", [*args, "--node-id", "2"])
    try:
        with VhostUserFrontend(str(server.socket), device_id=DeviceId.MEM) as frontend:
            driver = MemDriver(frontend)
            driver.initialize()
            c = driver.config()
            assert (c.block_size, c.addr, c.region_size) == (4 * MB, 0x140000000, 256 * MB)
            assert c.requested_size == 0 and driver.node_id == 2
            # Nothing requested yet: the usable region is empty, so even block 0 is outside.
            assert c.usable_region_size == 0
            assert driver.plug(c.addr, 1) == MW.RESP_ERROR
            changes = driver.config_changes
            assert request(ctl, "set 32M") == "ok requested 32.0M (8 blocks)"
            assert frontend.wait_until(lambda: driver.config_changes > changes, 10)
            assert driver.config().requested_size == 32 * MB
            assert driver.balance() == 8
            assert driver.state(c.addr, 8) == (MW.RESP_ACK, MW.STATE_PLUGGED)
            assert driver.plug(c.addr + 2 * MB, 1) == MW.RESP_ERROR  # misaligned
            assert "plugged=33554432" in request(ctl, "status")
            assert driver.unplug_all() == MW.RESP_ACK
            assert "plugged=0" in request(ctl, "status")
    finally:
        assert server.stop() == 0, server.log.read_text()
