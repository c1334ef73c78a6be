"""virtio-fs DAX window: FUSE_SETUPMAPPING/REMOVEMAPPING over real mmaps, three transports."""

from __future__ import annotations

import argparse
import errno
import os
import struct
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from virtio.core.driver import DriverTransport
from virtio.devices.fs import FsDevice, FsDriver, FuseError, FuseServer
from virtio.devices.fs import dax as D
from virtio.devices.fs import options as O
from virtio.devices.fs import wire as W
from virtio.devices.fs.driver import UnmappedAccess
from virtio.devices.fs.wire import Op
from virtio.devices.registry import DeviceSettings
from virtio.memory import Allocator, GuestMemory
from virtio.spec.status import DeviceStatus as S
from virtio.transport.loopback import Loopback
from virtio.transport.mmio import LocalMmioBus, MmioDevice, MmioTransport
from virtio.transport.pci import pci_loopback

FS = "Device Types / File System Device"
N_DAX_DEV = f"devicenormative:{FS} / Device Operation / Device Operation: DAX Window"
N_DAX_DRV = f"drivernormative:{FS} / Device Operation / Device Operation: DAX Window"

ROOT = W.ROOT_ID
P = D.PAGE
WINDOW = 1 << 20
SHM_BASE = 0x1000_0000  # above the 64 MiB of guest RAM
TRANSPORTS = ["loopback", "pci", "mmio"]

Bring = Callable[[FsDevice], Iterator[DriverTransport]]


@pytest.fixture
def shared(tmp_path: Path) -> Path:
    d = tmp_path / "shared"
    d.mkdir()
    return d


def _transport(kind: str, device: FsDevice) -> Iterator[DriverTransport]:
    """The driver's transport to ``device``; the VMM's part (placing the window) done."""
    if kind == "loopback":
        with Loopback(device) as lb:
            yield lb
    elif kind == "pci":
        yield pci_loopback(device)
    else:
        memory = GuestMemory()
        memory.add(0, bytearray(64 << 20), name="guest-ram")
        if device.dax is not None:
            memory.add(SHM_BASE, device.dax.memory, name="dax-window")
        device.attach_memory(memory)
        window = MmioDevice(device, shm_base={D.SHMID_CACHE: SHM_BASE})
        yield MmioTransport(LocalMmioBus(window), memory, Allocator(0x1000, (64 << 20) - 0x1000))


def _driver(kind: str, device: FsDevice) -> Iterator[FsDriver]:
    try:
        for transport in _transport(kind, device):
            driver = FsDriver(transport)
            driver.initialize()
            driver.init()
            yield driver
            assert not device.status & S.DEVICE_NEEDS_RESET
    finally:
        device.close()


@pytest.fixture(params=TRANSPORTS)
def fs(request: pytest.FixtureRequest, shared: Path) -> Iterator[tuple[FsDriver, FsDevice]]:
    device = FsDevice(FuseServer(shared), dax=D.DaxWindow(WINDOW))
    for driver in _driver(request.param, device):
        yield driver, device


@pytest.fixture
def lfs(shared: Path) -> Iterator[tuple[FsDriver, FsDevice]]:
    """Over the loopback only (for checks that do not depend on the transport)."""
    device = FsDevice(FuseServer(shared), dax=D.DaxWindow(WINDOW))
    for driver in _driver("loopback", device):
        yield driver, device


def _file(driver: FsDriver, name: str, data: bytes, flags: int = os.O_RDWR) -> tuple[int, int]:
    entry, fh = driver.create(ROOT, name)
    if data:
        assert driver.write(entry.nodeid, fh, 0, data) == len(data)
    if flags != os.O_RDWR:
        driver.release_file(entry.nodeid, fh)
        fh = driver.open(entry.nodeid, flags)
    return entry.nodeid, fh


def _errno(driver: FsDriver, opcode: int, body: bytes, nodeid: int = ROOT) -> int:
    """Send a raw request; the errno it failed with (0 for success)."""
    try:
        driver.request(opcode, nodeid, body, 0)
    except FuseError as err:
        assert err.errno
        return err.errno
    return 0


def _setup_body(fh: int, foffset: int, length: int, flags: int, moffset: int) -> bytes:
    return struct.pack("<QQQQQ", fh, foffset, length, flags, moffset)


def _remove_body(count: int, *ranges: tuple[int, int]) -> bytes:
    return struct.pack("<I", count) + b"".join(struct.pack("<QQ", m, n) for m, n in ranges)


CONTENT = bytes(range(256)) * (3 * P // 256) + b"tail"  # three pages and four bytes


@pytest.mark.normative(N_DAX_DEV, N_DAX_DRV)
def test_a_mapped_file_reads_through_the_window(
    fs: tuple[FsDriver, FsDevice], shared: Path
) -> None:
    driver, device = fs
    [region] = device.shared_memory_regions()
    assert (region.id, region.length) == (0, WINDOW)  # the DAX window is region 0
    assert driver.dax_window() == WINDOW
    assert driver.session is not None and driver.session.map_alignment == 12
    nodeid, fh = _file(driver, "f", CONTENT, os.O_RDONLY)
    driver.setup_mapping(nodeid, fh, 0, 4 * P, 8 * P)
    assert driver.dax_read(8 * P, len(CONTENT)) == CONTENT
    # Within the mapping past EOF: zeros, never a fault.
    assert driver.dax_read(8 * P + len(CONTENT), 4 * P - len(CONTENT)) == bytes(
        4 * P - len(CONTENT)
    )
    # A mapping from a file offset.
    driver.setup_mapping(nodeid, fh, P, P, 0)
    assert driver.dax_read(0, P) == CONTENT[P : 2 * P]
    # The driver MAY use FUSE_READ at the same time; the device MUST serve it.
    assert driver.read(nodeid, fh, 0, len(CONTENT)) == CONTENT


@pytest.mark.normative(N_DAX_DEV)
def test_a_writable_mapping_changes_the_file(fs: tuple[FsDriver, FsDevice], shared: Path) -> None:
    driver, _device = fs
    nodeid, fh = _file(driver, "w", CONTENT)
    driver.setup_mapping(nodeid, fh, 0, 4 * P, 4 * P, writable=True)
    driver.dax_write(4 * P + 10, b"through the window")
    on_host = (shared / "w").read_bytes()
    assert on_host[10:28] == b"through the window" and len(on_host) == len(CONTENT)
    # FUSE_READ and FUSE_WRITE MUST keep working while the range is mapped.
    assert driver.read(nodeid, fh, 10, 18) == b"through the window"
    assert driver.write(nodeid, fh, 2 * P, b"by FUSE_WRITE") == 13
    assert driver.dax_read(6 * P, 13) == b"by FUSE_WRITE"
    driver.fsync(nodeid, fh)
    assert (shared / "w").read_bytes()[2 * P : 2 * P + 13] == b"by FUSE_WRITE"


@pytest.mark.normative(N_DAX_DEV)
def test_overlapping_mappings_are_allowed(lfs: tuple[FsDriver, FsDevice], shared: Path) -> None:
    driver, device = lfs
    assert device.dax is not None
    a, fa = _file(driver, "a", b"A" * 4 * P, os.O_RDONLY)
    b, fb = _file(driver, "b", b"B" * 4 * P, os.O_RDONLY)
    driver.setup_mapping(a, fa, 0, 4 * P, 0)
    driver.setup_mapping(b, fb, 0, P, P)  # partial: splits a's mapping in two
    assert list(device.dax) == [(0, P, 0), (P, P, 0), (2 * P, 2 * P, 2 * P)]
    assert driver.dax_read(0, 4 * P) == b"A" * P + b"B" * P + b"A" * 2 * P
    driver.setup_mapping(b, fb, 2 * P, P, P)  # perfect overlap: replaced
    driver.setup_mapping(b, fb, 0, 2 * P, 3 * P)  # partial, over the end of a's piece
    assert list(device.dax) == [(0, P, 0), (P, P, 2 * P), (2 * P, P, 2 * P), (3 * P, 2 * P, 0)]
    assert driver.dax_read(0, 5 * P) == b"A" * P + b"B" * P + b"A" * P + b"B" * 2 * P
    driver.setup_mapping(a, fa, 0, 8 * P, 0)  # covers everything before it
    assert list(device.dax) == [(0, 8 * P, 0)]
    assert driver.dax_read(0, 4 * P) == b"A" * 4 * P


@pytest.mark.normative(N_DAX_DEV)
def test_mappings_beyond_the_end_are_rejected(fs: tuple[FsDriver, FsDevice]) -> None:
    driver, device = fs
    assert device.dax is not None
    nodeid, fh = _file(driver, "f", CONTENT, os.O_RDONLY)
    driver.setup_mapping(nodeid, fh, 0, P, WINDOW - P)  # the last page: fine
    read = D.FLAG_READ
    for moffset, length in (
        (WINDOW - P, 2 * P),
        (WINDOW, P),
        (WINDOW - P, (1 << 64) - P),  # wraps around in 64 bits
        ((1 << 64) - P, P),
    ):
        body = _setup_body(fh, 0, length, read, moffset)
        assert _errno(driver, Op.SETUPMAPPING, body, nodeid) == errno.EINVAL
        assert _errno(driver, Op.REMOVEMAPPING, _remove_body(1, (moffset, length))) == errno.EINVAL
    with pytest.raises(ValueError, match="past"):
        driver.setup_mapping(nodeid, fh, 0, 2 * P, WINDOW - P)  # the driver checks first
    assert list(device.dax) == [(WINDOW - P, P, 0)]  # nothing lost
    assert driver.dax_read(WINDOW - P, P) == CONTENT[:P]


@pytest.mark.normative(N_DAX_DRV)
def test_the_driver_refuses_unmapped_areas(fs: tuple[FsDriver, FsDevice]) -> None:
    driver, _device = fs
    nodeid, fh = _file(driver, "f", CONTENT, os.O_RDONLY)
    transport = driver.transport
    bus = getattr(transport, "bus", None)
    assert driver.dax_window() == WINDOW  # found (registers read) before counting
    before = getattr(bus, "accesses", 0)
    with pytest.raises(UnmappedAccess) as caught:
        driver.dax_read(0, 1)
    assert caught.value.normative == N_DAX_DRV
    assert getattr(bus, "accesses", 0) == before  # refused without touching the window
    driver.setup_mapping(nodeid, fh, 0, 3 * P, 0)
    driver.remove_mapping([(P, P)], nodeid)  # a hole in the middle
    assert driver.dax_read(0, P) == CONTENT[:P]
    assert driver.dax_read(2 * P, P) == CONTENT[2 * P : 3 * P]
    for moffset, size in ((P, 1), (P - 1, 2), (0, 3 * P), (3 * P, 1), (WINDOW, 1)):
        with pytest.raises(UnmappedAccess):
            driver.dax_read(moffset, size)
    with pytest.raises(UnmappedAccess, match="writable"):
        driver.dax_write(0, b"x")  # a read-only mapping
    with pytest.raises(UnmappedAccess):
        driver.dax_read(0, -1)
    driver.setup_mapping(nodeid, fh, 0, P, P)  # fill the hole again
    assert driver.dax_read(0, 3 * P) == CONTENT[:P] * 2 + CONTENT[2 * P : 3 * P]


@pytest.mark.normative(N_DAX_DEV)
def test_removemapping_puts_anonymous_memory_back(
    lfs: tuple[FsDriver, FsDevice], shared: Path
) -> None:
    driver, device = lfs
    assert device.dax is not None
    nodeid, fh = _file(driver, "f", CONTENT)
    driver.setup_mapping(nodeid, fh, 0, 4 * P, 0, writable=True)
    driver.setup_mapping(nodeid, fh, 0, P, 8 * P)
    driver.remove_mapping([(P, P), (8 * P, P)], nodeid)
    assert list(device.dax) == [(0, P, 0), (2 * P, 2 * P, 2 * P)]
    assert bytes(device.dax.memory[P : 2 * P]) == bytes(P)  # not the file any more
    device.dax.memory[P : P + 5] = b"stray"  # the device's own view: anonymous memory
    assert (shared / "f").read_bytes() == CONTENT  # the file is untouched
    driver.remove_mapping([(0, WINDOW)], nodeid)  # unmapped ranges may be removed too
    assert device.dax.mappings == 0
    assert bytes(device.dax.memory[0:P]) == bytes(P)
    assert not device.dax._files  # the window holds no file open once nothing is mapped


@pytest.mark.normative(N_DAX_DRV)
@pytest.mark.parametrize("kind", TRANSPORTS)
def test_an_absent_window_falls_back_to_read_and_write(shared: Path, kind: str) -> None:
    device = FsDevice(FuseServer(shared))
    assert device.shared_memory_regions() == ()
    for driver in _driver(kind, device):
        assert driver.dax_window() is None
        assert driver.session is not None and driver.session.map_alignment == 0
        assert not driver.session.flags & W.InitFlag.MAP_ALIGNMENT
        nodeid, fh = _file(driver, "f", CONTENT)
        assert driver.pread(nodeid, fh, 5, 100) == CONTENT[5:105]
        assert driver.pwrite(nodeid, fh, 7, b"fallback") == 8
        assert (shared / "f").read_bytes()[7:15] == b"fallback"
        with pytest.raises(FuseError) as caught:
            driver.setup_mapping(nodeid, fh, 0, P, 0)
        assert caught.value.errno == errno.ENODEV
        body = _setup_body(fh, 0, P, D.FLAG_READ, 0)
        assert _errno(driver, Op.SETUPMAPPING, body, nodeid) == errno.ENOSYS
        assert _errno(driver, Op.REMOVEMAPPING, _remove_body(1, (0, P))) == errno.ENOSYS


def test_pread_and_pwrite_use_the_window(fs: tuple[FsDriver, FsDevice], shared: Path) -> None:
    driver, device = fs
    assert device.dax is not None
    nodeid, fh = _file(driver, "f", CONTENT)
    assert driver.pread(nodeid, fh, P - 3, P + 10) == CONTENT[P - 3 : 2 * P + 7]
    assert driver.pread(nodeid, fh, len(CONTENT) - 2, 100) == b"il"  # short at EOF, as READ
    assert driver.pwrite(nodeid, fh, P + 1, b"dax store") == 9
    assert (shared / "f").read_bytes()[P + 1 : P + 10] == b"dax store"
    assert driver.pwrite(nodeid, fh, len(CONTENT), b"grows") == 5  # extends: FUSE_WRITE
    assert (shared / "f").read_bytes() == CONTENT[: P + 1] + b"dax store" + CONTENT[
        P + 10 :
    ] + b"grows"
    assert device.dax.mappings == 0  # each call removed its mapping


def test_hostile_mapping_requests(lfs: tuple[FsDriver, FsDevice], shared: Path) -> None:
    driver, device = lfs
    assert device.dax is not None
    nodeid, ro = _file(driver, "f", CONTENT, os.O_RDONLY)
    wo = driver.open(nodeid, os.O_WRONLY)
    rw = driver.open(nodeid, os.O_RDWR)
    driver.setup_mapping(nodeid, ro, 0, P, 0)
    good = list(device.dax)
    read, write = D.FLAG_READ, D.FLAG_READ | D.FLAG_WRITE
    cases = {
        "misaligned moffset": (_setup_body(ro, 0, P, read, P + 1), errno.EINVAL),
        "misaligned length": (_setup_body(ro, 0, P + 8, read, P), errno.EINVAL),
        "misaligned foffset": (_setup_body(ro, 512, P, read, P), errno.EINVAL),
        "empty": (_setup_body(ro, 0, 0, read, P), errno.EINVAL),
        "huge foffset": (_setup_body(ro, (1 << 64) - P, P, read, P), errno.EINVAL),
        "unknown flags": (_setup_body(ro, 0, P, 1 << 7, P), errno.EINVAL),
        "write on a read-only handle": (_setup_body(ro, 0, P, write, P), errno.EACCES),
        "a write-only handle": (_setup_body(wo, 0, P, read, P), errno.EACCES),
        "unknown handle": (_setup_body(12345, 0, P, read, P), errno.EBADF),
        "short body": (_setup_body(ro, 0, P, read, P)[:32], errno.EINVAL),
        "long body": (_setup_body(ro, 0, P, read, P) + b"\0" * 8, errno.EINVAL),
    }
    for what, (body, want) in cases.items():
        assert _errno(driver, Op.SETUPMAPPING, body, nodeid) == want, what
    root_dir = _setup_body(D.NO_FH, 0, P, read, P)
    assert _errno(driver, Op.SETUPMAPPING, root_dir, ROOT) == errno.ENODEV  # not a file
    removals = {
        "count larger than the entries": _remove_body(3, (0, P), (P, P)),
        "count smaller than the entries": _remove_body(1, (0, P), (P, P)),
        "count of zero": _remove_body(0),
        "count of 2**32-1": _remove_body(0xFFFFFFFF, (0, P)),
        "no count": b"\0\0",
        "misaligned entry": _remove_body(2, (0, P), (P + 1, P)),
        "entry past the end": _remove_body(2, (0, P), (WINDOW, P)),
        "empty entry": _remove_body(1, (0, 0)),
    }
    for what, body in removals.items():
        assert _errno(driver, Op.REMOVEMAPPING, body) == errno.EINVAL, what
    assert list(device.dax) == good  # a rejected request changed nothing, even in part
    assert driver.dax_read(0, P) == CONTENT[:P]
    # A writable mapping needs a read-write handle; then it works.
    assert _errno(driver, Op.SETUPMAPPING, _setup_body(rw, 0, P, write, P), nodeid) == 0


def test_mapping_by_node_id_and_a_readonly_server(shared: Path) -> None:
    (shared / "f").write_bytes(CONTENT)
    device = FsDevice(FuseServer(shared, readonly=True), dax=D.DaxWindow(WINDOW))
    for driver in _driver("loopback", device):
        nodeid = driver.lookup(ROOT, "f").nodeid
        driver.setup_mapping(nodeid, None, 0, 4 * P, 0)  # fh -1, as Linux sends
        assert driver.dax_read(0, len(CONTENT)) == CONTENT
        with pytest.raises(FuseError) as caught:
            driver.setup_mapping(nodeid, None, 0, P, 0, writable=True)
        assert caught.value.errno == errno.EROFS


def test_a_file_shrunk_under_its_mapping_reads_zeros(
    lfs: tuple[FsDriver, FsDevice], shared: Path
) -> None:
    driver, device = lfs
    assert device.dax is not None
    nodeid, fh = _file(driver, "f", CONTENT)
    driver.setup_mapping(nodeid, fh, 0, 4 * P, 0, writable=True)
    driver.setattr(nodeid, size=10, fh=fh)
    # Shared file pages past EOF would raise SIGBUS: the device made them anonymous.
    assert driver.dax_read(0, 4 * P) == CONTENT[:10] + bytes(4 * P - 10)
    assert device.dax.memory[3 * P] == 0  # the device's own view too (a BAR read)
    driver.write(nodeid, fh, 2 * P, b"grown again")
    assert driver.dax_read(2 * P, 11) == b"grown again"
    driver.dax_write(2 * P, b"G")
    assert (shared / "f").read_bytes()[2 * P : 2 * P + 11] == b"Grown again"
    fh2 = driver.open(nodeid, os.O_RDWR | os.O_TRUNC)
    assert driver.dax_read(0, 4 * P) == bytes(4 * P)
    driver.release_file(nodeid, fh2)


def test_a_new_session_or_reset_removes_every_mapping(lfs: tuple[FsDriver, FsDevice]) -> None:
    driver, device = lfs
    assert device.dax is not None
    nodeid, fh = _file(driver, "f", CONTENT, os.O_RDONLY)
    driver.setup_mapping(nodeid, fh, 0, P, 0)
    driver.init()  # FUSE_INIT again: a new session
    assert device.dax.mappings == 0
    with pytest.raises(UnmappedAccess):
        driver.dax_read(0, 1)
    nodeid, fh = _file(driver, "g", CONTENT, os.O_RDONLY)
    driver.setup_mapping(nodeid, fh, 0, P, 0)
    driver.reset()
    assert device.dax.mappings == 0 and bytes(device.dax.memory[:P]) == bytes(P)
    driver.initialize()
    driver.init()


def test_running_out_of_mappings(shared: Path) -> None:
    device = FsDevice(FuseServer(shared), dax=D.DaxWindow(WINDOW, max_mappings=3))
    for driver in _driver("loopback", device):
        nodeid, fh = _file(driver, "f", CONTENT, os.O_RDONLY)
        for k in range(3):
            driver.setup_mapping(nodeid, fh, 0, P, 2 * k * P)
        with pytest.raises(FuseError) as caught:
            driver.setup_mapping(nodeid, fh, 0, P, 7 * P)
        assert caught.value.errno == errno.ENOMEM
        driver.setup_mapping(nodeid, fh, 0, P, 2 * P)  # replaces one: no growth
        driver.remove_mapping([(0, P)], nodeid)
        driver.setup_mapping(nodeid, fh, 0, P, 7 * P)  # room again


def test_cache_size_option(shared: Path) -> None:
    parser = argparse.ArgumentParser()
    O.add_arguments(parser)
    base = ["--shared-dir", str(shared)]
    device = O.from_arguments(parser.parse_args([*base, "--cache-size", "2M"]), DeviceSettings())
    assert isinstance(device, FsDevice) and device.dax is not None
    assert [r.id for r in device.shared_memory_regions()] == [0]
    assert device.dax.size == 2 << 20 and "DAX window" in device.describe()
    device.close()
    device = O.from_arguments(parser.parse_args(base), DeviceSettings())
    assert isinstance(device, FsDevice) and device.dax is None
    device.close()
    with pytest.raises(ValueError, match="multiple"):
        O.from_arguments(parser.parse_args([*base, "--cache-size", "5000"]), DeviceSettings())
    with pytest.raises(SystemExit):
        parser.parse_args([*base, "--cache-size", "lots"])
    with pytest.raises(ValueError):
        D.DaxWindow(P + 1)
