"""virtio-fs: the device, its FUSE server over a host directory, and the driver."""

from __future__ import annotations

import errno
import os
import stat
import struct
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from virtio.core.driver import Request
from virtio.devices import fileio
from virtio.devices.fs import FsDevice, FsDriver, FuseError, FuseServer
from virtio.devices.fs import server as server_mod
from virtio.devices.fs import wire as W
from virtio.devices.fs.device import N_CFG_DEV, N_CFG_DRV, N_HIPRIO_DEV, N_HIPRIO_DRV, N_NOTIFY_DRV
from virtio.devices.fs.driver import BadReply
from virtio.devices.fs.server import Inode, Message
from virtio.devices.fs.wire import Op
from virtio.errors import DeviceNeedsReset
from virtio.spec.status import DeviceStatus as S
from virtio.transport.loopback import Loopback

ROOT = W.ROOT_ID


@pytest.fixture
def shared(tmp_path: Path) -> Path:
    d = tmp_path / "shared"
    d.mkdir()
    (tmp_path / "secret").write_text("outside")
    return d


@pytest.fixture
def fs(shared: Path) -> Iterator[tuple[FsDriver, FsDevice, Loopback]]:
    device = FsDevice(FuseServer(shared), tag="hostdir", num_request_queues=2)
    with Loopback(device) as lb:
        driver = FsDriver(lb)
        driver.initialize()
        driver.init()
        yield driver, device, lb
    device.close()


def raw_request(
    driver: FsDriver, queue: int, message: bytes, room: int = 4096
) -> tuple[int, bytes]:
    return driver.call(queue, [message], [room] if room else [])


def header(
    opcode: int, nodeid: int, body: bytes, unique: int = 99, length: int | None = None
) -> bytes:
    n = W.IN_HEADER_SIZE + len(body) if length is None else length
    return W.fmt("<", W.IN_HEADER).pack(n, opcode, unique, nodeid, 0, 0, 0, 0, 0) + body


def reply_error(data: bytes) -> int:
    return int(struct.unpack_from("<i", data, 4)[0])


@pytest.mark.normative(N_CFG_DEV)
def test_config_tag_and_queues(fs: tuple[FsDriver, FsDevice, Loopback]) -> None:
    driver, device, _lb = fs
    assert driver.tag == "hostdir"
    assert driver.num_request_queues == 2
    assert len(driver.queues) == 2  # hiprio and one request queue
    assert driver.session is not None and driver.session.major == 7
    assert driver.session.max_write >= 4096
    with pytest.raises(ValueError):
        FsDevice(FuseServer(device.server.root), num_request_queues=0)
    with pytest.raises(ValueError):
        FsDevice(FuseServer(device.server.root), tag="x" * 37)


@pytest.mark.normative(N_HIPRIO_DEV)
def test_file_workload(fs: tuple[FsDriver, FsDevice, Loopback], shared: Path) -> None:
    driver = fs[0]
    entry, fh = driver.create(ROOT, "hello.txt", 0o640)
    assert stat.S_ISREG(entry.attr.mode) and stat.S_IMODE(entry.attr.mode) == 0o640
    assert driver.write(entry.nodeid, fh, 0, b"hello world") == 11
    assert driver.read(entry.nodeid, fh, 6, 100) == b"world"
    driver.flush(entry.nodeid, fh)
    driver.fsync(entry.nodeid, fh)
    driver.release_file(entry.nodeid, fh)
    assert (shared / "hello.txt").read_bytes() == b"hello world"

    d = driver.mkdir(ROOT, "sub", 0o750)
    assert stat.S_ISDIR(d.attr.mode)
    driver.rename(ROOT, "hello.txt", d.nodeid, "moved.txt")
    assert (shared / "sub" / "moved.txt").exists() and not (shared / "hello.txt").exists()
    moved = driver.lookup(d.nodeid, "moved.txt")
    assert moved.nodeid == entry.nodeid  # the same inode keeps its node id
    link = driver.link(moved.nodeid, ROOT, "hard")
    assert link.attr.nlink == 2 and os.stat(shared / "hard").st_ino == moved.attr.ino
    sym = driver.symlink(ROOT, "sym", "sub/moved.txt")
    assert stat.S_ISLNK(sym.attr.mode) and driver.readlink(sym.nodeid) == b"sub/moved.txt"
    assert os.readlink(shared / "sym") == "sub/moved.txt"

    names = {e.name for e in driver.listdir(ROOT)}
    assert names == {b"sub", b"hard", b"sym"}
    plus = {e.name: e for e in driver.listdir(ROOT, plus=True)}
    assert plus[b"hard"].entry is not None and plus[b"hard"].entry.nodeid == entry.nodeid

    attr = driver.setattr(moved.nodeid, size=5, mode=0o600)
    assert attr.size == 5 and stat.S_IMODE(attr.mode) == 0o600
    assert (shared / "hard").read_bytes() == b"hello"
    attr = driver.setattr(moved.nodeid, atime_ns=10**9, mtime_ns=2 * 10**9 + 5)
    assert attr.mtime_ns == 2 * 10**9 + 5 and os.stat(shared / "hard").st_mtime_ns == attr.mtime_ns

    driver.setxattr(moved.nodeid, "user.color", b"blue")
    assert driver.getxattr(moved.nodeid, "user.color") == b"blue"
    assert b"user.color" in driver.listxattr(moved.nodeid)
    with pytest.raises(FuseError) as err:
        driver.getxattr(moved.nodeid, "user.color", size=2)
    assert err.value.errno == errno.ERANGE
    driver.removexattr(moved.nodeid, "user.color")
    with pytest.raises(FuseError):
        driver.getxattr(moved.nodeid, "user.color")

    fh = driver.open(moved.nodeid, os.O_RDWR)
    driver.fallocate(moved.nodeid, fh, 0, 8192)
    assert os.stat(shared / "hard").st_size == 8192
    assert driver.lseek(moved.nodeid, fh, 0, os.SEEK_END) == 8192
    out, ofh = driver.create(ROOT, "copy", 0o644)
    assert driver.copy_file_range(moved.nodeid, fh, 0, out.nodeid, ofh, 0, 5) == 5
    assert (shared / "copy").read_bytes() == b"hello"
    driver.release_file(moved.nodeid, fh)
    driver.release_file(out.nodeid, ofh)
    fifo = driver.mknod(ROOT, "pipe", stat.S_IFIFO | 0o600)
    assert stat.S_ISFIFO(fifo.attr.mode)
    assert driver.statfs()[5] > 0

    driver.unlink(ROOT, "sym")
    driver.unlink(ROOT, "hard")
    driver.unlink(d.nodeid, "moved.txt")
    driver.rmdir(ROOT, "sub")
    # FORGET goes on the hiprio queue and gets no reply.
    # Counts beyond the lookups made just drop the inode (READDIRPLUS looked some up too).
    driver.forget(d.nodeid, 100)
    driver.batch_forget([(moved.nodeid, 100), (sym.nodeid, 100)])
    assert d.nodeid not in fs[1].server.inodes and moved.nodeid not in fs[1].server.inodes
    assert sorted(os.listdir(shared)) == ["copy", "pipe"]


def test_rename2_flags(fs: tuple[FsDriver, FsDevice, Loopback], shared: Path) -> None:
    driver = fs[0]
    (shared / "a").write_text("A")
    (shared / "b").write_text("B")
    with pytest.raises(FuseError) as err:
        driver.rename(ROOT, "a", ROOT, "b", flags=1)  # RENAME_NOREPLACE
    assert err.value.errno == errno.EEXIST
    driver.rename(ROOT, "a", ROOT, "b", flags=2)  # RENAME_EXCHANGE
    assert (shared / "a").read_text() == "B" and (shared / "b").read_text() == "A"
    with pytest.raises(FuseError) as err:
        driver.rename(ROOT, "a", ROOT, "b", flags=4)  # RENAME_WHITEOUT is refused
    assert err.value.errno == errno.EINVAL


def test_large_file_and_many_files(fs: tuple[FsDriver, FsDevice, Loopback], shared: Path) -> None:
    driver = fs[0]
    blob = os.urandom(3 << 20)
    entry, fh = driver.create(ROOT, "big", 0o644)
    step = driver.session.max_write if driver.session else 4096
    for off in range(0, len(blob), step):
        assert driver.write(entry.nodeid, fh, off, blob[off : off + step]) == len(
            blob[off : off + step]
        )
    back = b"".join(
        driver.read(entry.nodeid, fh, off, 1 << 17) for off in range(0, len(blob), 1 << 17)
    )
    assert back == blob and (shared / "big").read_bytes() == blob
    driver.release_file(entry.nodeid, fh)
    for i in range(300):
        e, h = driver.create(ROOT, f"f{i:03}", 0o644)
        driver.release_file(e.nodeid, h)
    listing = driver.listdir(ROOT)
    assert len(listing) == 301 and len({e.name for e in listing}) == 301
    assert fs[1].server.open_handles == 0


@pytest.mark.parametrize("name", [b"..", b".", b"", b"a/b", b"../secret", b"x" * 256])
def test_names_that_escape_are_refused(
    fs: tuple[FsDriver, FsDevice, Loopback], name: bytes
) -> None:
    driver = fs[0]
    for call in (
        lambda: driver.lookup(ROOT, name),
        lambda: driver.mkdir(ROOT, name),
        lambda: driver.create(ROOT, name),
        lambda: driver.unlink(ROOT, name),
    ):
        with pytest.raises(FuseError) as err:
            call()
        assert err.value.errno in (errno.EINVAL, errno.ENAMETOOLONG)


def test_symlinks_are_never_followed(fs: tuple[FsDriver, FsDevice, Loopback], shared: Path) -> None:
    driver = fs[0]
    outside = shared.parent / "secret"
    os.symlink(str(outside), shared / "esc")
    os.symlink("/", shared / "rootlink")
    esc = driver.lookup(ROOT, "esc")
    assert stat.S_ISLNK(esc.attr.mode)
    for call in (
        lambda: driver.open(esc.nodeid, os.O_RDONLY),
        lambda: driver.open(esc.nodeid, os.O_WRONLY | os.O_TRUNC),
        lambda: driver.setattr(esc.nodeid, size=0),
        lambda: driver.setattr(esc.nodeid, mode=0o777),
        lambda: driver.lookup(driver.lookup(ROOT, "rootlink").nodeid, "etc"),
        lambda: driver.opendir(driver.lookup(ROOT, "rootlink").nodeid),
        lambda: driver.create(ROOT, "esc", 0o644, os.O_WRONLY),  # O_CREAT on a symlink
        lambda: driver.mkdir(esc.nodeid, "x"),
    ):
        with pytest.raises(FuseError):
            call()
    assert outside.read_text() == "outside" and stat.S_IMODE(outside.stat().st_mode) != 0o777
    # A hard link of the symlink is a link to the symlink, not to its target.
    driver.link(esc.nodeid, ROOT, "esc2")
    assert os.readlink(shared / "esc2") == str(outside)
    assert os.lstat(shared / "esc2").st_ino == esc.attr.ino


def test_device_nodes_are_refused(fs: tuple[FsDriver, FsDevice, Loopback], shared: Path) -> None:
    driver = fs[0]
    with pytest.raises(FuseError) as err:
        driver.mknod(ROOT, "null", stat.S_IFCHR | 0o666, os.makedev(1, 3))
    assert err.value.errno == errno.EPERM and not (shared / "null").exists()


def test_unknown_nodes_handles_and_opcodes(fs: tuple[FsDriver, FsDevice, Loopback]) -> None:
    driver = fs[0]
    with pytest.raises(FuseError) as err:
        driver.getattr(12345)
    assert err.value.errno == errno.ENOENT
    with pytest.raises(FuseError) as err:
        driver.read(ROOT, 777, 0, 10)
    assert err.value.errno == errno.EBADF
    for opcode in (Op.GETLK, Op.IOCTL, Op.SETUPMAPPING, 200, 0xFFFFFFFF):
        with pytest.raises(FuseError) as err:
            driver.request(opcode, ROOT, bytes(64), 64)
        assert err.value.errno == errno.ENOSYS


def test_requests_before_init_and_reinit(shared: Path) -> None:
    device = FsDevice(FuseServer(shared))
    with Loopback(device) as lb:
        driver = FsDriver(lb)
        driver.initialize()
        with pytest.raises(FuseError) as err:
            driver.getattr(ROOT)
        assert err.value.errno == errno.EIO
        driver.init()
        node = driver.mkdir(ROOT, "d").nodeid
        driver.init()  # a new FUSE_INIT ends the session: node ids are gone
        with pytest.raises(FuseError):
            driver.getattr(node)
        assert driver.getattr(ROOT).ino == os.stat(shared).st_ino
        driver.destroy()
        with pytest.raises(FuseError):
            driver.getattr(ROOT)
    device.close()


def test_big_endian_session(shared: Path) -> None:
    (shared / "f").write_text("data")
    device = FsDevice(FuseServer(shared))
    with Loopback(device) as lb:
        driver = FsDriver(lb, order=">")
        driver.initialize()
        driver.init()
        entry = driver.lookup(ROOT, "f")
        assert entry.attr.size == 4
        fh = driver.open(entry.nodeid)
        assert driver.read(entry.nodeid, fh, 0, 10) == b"data"
        assert device.server.order == ">"
    device.close()


def test_readonly_server(shared: Path) -> None:
    (shared / "f").write_text("data")
    device = FsDevice(FuseServer(shared, readonly=True))
    with Loopback(device) as lb:
        driver = FsDriver(lb)
        driver.initialize()
        driver.init()
        with pytest.raises(FuseError) as err:
            driver.mkdir(ROOT, "d")
        assert err.value.errno == errno.EROFS
        entry = driver.lookup(ROOT, "f")
        with pytest.raises(FuseError):
            driver.open(entry.nodeid, os.O_WRONLY)
        assert driver.read(entry.nodeid, driver.open(entry.nodeid), 0, 4) == b"data"
    device.close()


def test_cache_never_asks_for_direct_io(shared: Path) -> None:
    (shared / "f").write_text("x")
    device = FsDevice(FuseServer(shared, cache="never"))
    with Loopback(device) as lb:
        driver = FsDriver(lb)
        driver.initialize()
        driver.init()
        entry = driver.lookup(ROOT, "f")
        assert entry.entry_valid == 0
        payload = driver.request(Op.OPEN, entry.nodeid, W.fmt("<", W.OPEN_IN).pack(0, 0), 16)
        assert struct.unpack_from("<QI", payload)[1] & W.FOPEN_DIRECT_IO
    device.close()


# -- a hostile driver ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "length"),
    [
        (b"name-without-nul", None),  # LOOKUP name not terminated
        (b"x\0", W.IN_HEADER_SIZE + 100),  # len says more than the buffer holds
        (b"x\0", W.IN_HEADER_SIZE),  # len says less
        (b"x\0", 3),  # len shorter than the header itself
    ],
)
def test_lying_lengths_get_einval(
    fs: tuple[FsDriver, FsDevice, Loopback], body: bytes, length: int | None
) -> None:
    driver, _device, lb = fs
    written, data = raw_request(driver, 1, header(Op.LOOKUP, ROOT, body, length=length))
    assert written == W.OUT_HEADER_SIZE and reply_error(data) == -errno.EINVAL
    assert struct.unpack_from("<Q", data, 8)[0] == 99
    assert not lb.read_status() & S.DEVICE_NEEDS_RESET
    assert driver.getattr(ROOT).ino  # the device keeps serving


@pytest.mark.parametrize(
    ("opcode", "body"),
    [
        (Op.READ, bytes(10)),  # short fuse_read_in
        (Op.WRITE, W.fmt("<", W.WRITE_IN).pack(1, 0, 1000, 0, 0, 0, 0) + b"abc"),  # size lies
        (Op.SETXATTR, W.fmt("<", W.SETXATTR_IN).pack(100, 0) + b"user.a\0xy"),
        (Op.RENAME, W.fmt("<", W.RENAME_IN).pack(ROOT) + b"a\0b"),  # second name unterminated
        (Op.BATCH_FORGET, b""),
        (Op.INIT, bytes(8)),  # short fuse_init_in
    ],
)
def test_short_structs_get_einval(
    fs: tuple[FsDriver, FsDevice, Loopback], opcode: int, body: bytes
) -> None:
    driver, _, lb = fs
    queue = 0 if opcode == Op.BATCH_FORGET else 1
    if opcode == Op.BATCH_FORGET:
        # No reply is owed: the malformed forget is dropped, the device carries on.
        written, _ = raw_request(
            driver, queue, header(opcode, 0, W.fmt("<", "II").pack(1000, 0)), 0
        )
        assert written == 0
    else:
        written, data = raw_request(driver, queue, header(opcode, ROOT, body))
        assert reply_error(data) == -errno.EINVAL
    assert not lb.read_status() & S.DEVICE_NEEDS_RESET
    assert driver.getattr(ROOT).ino


def test_reply_room_too_small(fs: tuple[FsDriver, FsDevice, Loopback]) -> None:
    driver, _, lb = fs
    written, data = raw_request(driver, 1, header(Op.GETATTR, ROOT, bytes(16)), room=40)
    assert written == 16 and reply_error(data) == -errno.EINVAL
    # READ replies shrink to the room there is.
    e, fh = driver.create(ROOT, "f")
    driver.write(e.nodeid, fh, 0, b"0123456789")
    read = W.fmt("<", W.READ_IN).pack(fh, 0, 10, 0, 0, 0, 0)
    written, data = raw_request(driver, 1, header(Op.READ, e.nodeid, read), room=20)
    assert written == 20 and data[16:20] == b"0123"
    assert not lb.read_status() & S.DEVICE_NEEDS_RESET


def test_no_room_for_a_reply_header_needs_reset(fs: tuple[FsDriver, FsDevice, Loopback]) -> None:
    driver, _device, lb = fs
    driver.submit(1, [header(Op.GETATTR, ROOT, bytes(16))], [8])
    driver.kick(1)
    assert lb.read_status() & S.DEVICE_NEEDS_RESET


def test_chain_shorter_than_a_header_needs_reset(fs: tuple[FsDriver, FsDevice, Loopback]) -> None:
    driver, device, lb = fs
    driver.submit(1, [b"short"], [64])
    driver.kick(1)
    assert lb.read_status() & S.DEVICE_NEEDS_RESET
    assert device.needs_reset_reason is not None and "fuse_in_header" in device.needs_reset_reason


@pytest.mark.normative(N_HIPRIO_DRV, N_HIPRIO_DEV)
@pytest.mark.parametrize(("queue", "opcode"), [(0, Op.GETATTR), (1, Op.FORGET)])
def test_queue_roles_are_enforced(
    fs: tuple[FsDriver, FsDevice, Loopback], queue: int, opcode: int
) -> None:
    driver, device, lb = fs
    driver.submit(queue, [header(opcode, ROOT, bytes(16))], [256])
    driver.kick(queue)
    assert lb.read_status() & S.DEVICE_NEEDS_RESET
    assert device.needs_reset_reason is not None and N_HIPRIO_DRV in device.needs_reset_reason


@pytest.mark.normative(N_CFG_DRV)
def test_config_write_needs_reset(fs: tuple[FsDriver, FsDevice, Loopback]) -> None:
    _, device, lb = fs
    lb.write_config(0, b"evil")
    assert lb.read_status() & S.DEVICE_NEEDS_RESET
    assert device.needs_reset_reason is not None and N_CFG_DRV in device.needs_reset_reason


@pytest.mark.normative(N_NOTIFY_DRV, N_CFG_DEV)
def test_notification_queue(shared: Path) -> None:
    device = FsDevice(FuseServer(shared), notification=True, notify_buf_size=256)
    with Loopback(device) as lb:
        driver = FsDriver(lb, notification=True)
        driver.initialize()
        assert driver.notify_buf_size == 256 and len(driver.queues) == 3
        driver.init()
        assert driver.mkdir(ROOT, "d").nodeid  # requests move to queue 2
        device.send_notification(7, b"early")  # kept until a buffer arrives
        driver.post_notify_buffers(2)
        assert driver.wait_notification() == (7, b"early")
        device.send_notification(1, b"x" * 100)
        assert driver.wait_notification() == (1, b"x" * 100)
        with pytest.raises(ValueError):
            device.send_notification(1, bytes(300))
        # A buffer smaller than notify_buf_size breaks the driver's rule.
        driver.submit(1, [], [16])
        driver.kick(1)
        assert lb.read_status() & S.DEVICE_NEEDS_RESET
        assert device.needs_reset_reason is not None and N_NOTIFY_DRV in device.needs_reset_reason
    device.close()


def test_reset_ends_the_session(fs: tuple[FsDriver, FsDevice, Loopback]) -> None:
    driver, device, _ = fs
    driver.mkdir(ROOT, "d")
    _e, _fh = driver.create(ROOT, "f")
    assert device.server.open_handles == 1 and len(device.server.inodes) == 3
    driver.initialize()  # resets the device
    assert device.server.open_handles == 0 and list(device.server.inodes) == [ROOT]


# -- a hostile device ------------------------------------------------------------------


class LyingServer(FuseServer):
    """Answers with whatever ``self.forge`` makes of the honest reply."""

    forge: object = None

    def handle(self, message: bytes, room: int) -> bytes | None:
        reply = super().handle(message, room)
        if reply is None or self.forge is None:
            return reply
        assert callable(self.forge)
        forged: bytes = self.forge(reply)
        return forged


def _set(reply: bytes, offset: int, fmt: str, value: int) -> bytes:
    out = bytearray(reply)
    struct.pack_into(fmt, out, offset, value)
    return bytes(out)


@pytest.mark.parametrize(
    "forge",
    [
        lambda r: _set(r, 8, "<Q", 12345),  # wrong unique
        lambda r: _set(r, 0, "<I", 999),  # len does not match what was written
        lambda r: _set(r, 4, "<i", -99999),  # not an errno
        lambda r: _set(r, 4, "<i", 5),  # positive error
        lambda r: r[:20],  # payload cut short
        lambda r: b"",  # nothing at all
    ],
)
def test_driver_rejects_forged_replies(shared: Path, forge: object) -> None:
    server = LyingServer(shared)
    device = FsDevice(server)
    with Loopback(device) as lb:
        driver = FsDriver(lb)
        driver.initialize()
        driver.init()
        server.forge = forge
        with pytest.raises((BadReply, DeviceNeedsReset)):
            driver.getattr(ROOT)
    device.close()


def test_driver_rejects_a_device_without_request_queues(shared: Path) -> None:
    device = FsDevice(FuseServer(shared))
    struct.pack_into("<I", device.config, 36, 0)
    device.build_config = lambda: None  # type: ignore[method-assign]
    with Loopback(device) as lb:
        driver = FsDriver(lb)
        with pytest.raises(Exception, match="no request queues"):
            driver.initialize()
    device.close()


def test_only_user_xattrs_are_set(fs: tuple[FsDriver, FsDevice, Loopback], shared: Path) -> None:
    driver = fs[0]
    entry, _fh = driver.create(ROOT, "f")
    for name in ("security.capability", "trusted.x", "system.posix_acl_access"):
        with pytest.raises(FuseError) as err:
            driver.setxattr(entry.nodeid, name, b"\x01\x00\x00\x02")
        assert err.value.errno == errno.EPERM
    assert os.listxattr(shared / "f") == []


def test_interrupt_needs_no_reply(fs: tuple[FsDriver, FsDevice, Loopback]) -> None:
    driver, _, lb = fs
    written, _ = raw_request(driver, 0, header(Op.INTERRUPT, 0, struct.pack("<Q", 5)), room=0)
    assert written == 0 and not lb.read_status() & S.DEVICE_NEEDS_RESET


def test_hostile_node_ids_and_links(fs: tuple[FsDriver, FsDevice, Loopback], shared: Path) -> None:
    driver = fs[0]
    d = driver.mkdir(ROOT, "d")
    with pytest.raises(FuseError) as err:
        driver.link(d.nodeid, ROOT, "dirlink")  # no hard links to directories
    assert err.value.errno == errno.EPERM
    with pytest.raises(FuseError) as err:
        driver.lookup(0, "d")
    assert err.value.errno == errno.EINVAL
    with pytest.raises(FuseError) as err:
        driver.rename(ROOT, "d", 4242, "e")
    assert err.value.errno == errno.ENOENT
    entry, fh = driver.create(ROOT, "f")
    with pytest.raises(FuseError) as err:
        driver.lookup(entry.nodeid, "x")  # a file is no directory
    assert err.value.errno == errno.ENOTDIR
    with pytest.raises(FuseError) as err:
        driver.lseek(entry.nodeid, fh, 0, 77)
    assert err.value.errno == errno.EINVAL
    # READDIR with a buffer too small for one entry returns nothing, not a partial entry.
    dfh = driver.opendir(ROOT)
    assert driver.readdir(ROOT, dfh, 0, size=8) == []
    driver.releasedir(ROOT, dfh)
    assert sorted(os.listdir(shared)) == ["d", "f"]


def test_serve_options(tmp_path: Path) -> None:
    import argparse

    from virtio.devices.fs import DEVICE_TYPE
    from virtio.devices.registry import DeviceSettings

    parser = argparse.ArgumentParser()
    DEVICE_TYPE.add_arguments(parser)
    args = parser.parse_args(
        ["--shared-dir", str(tmp_path), "--tag", "t1", "--cache", "never", "--sandbox", "none",
         "--announce-submounts", "--num-request-queues", "3", "--notification",
         "--thread-pool-size", "3"]
    )  # fmt: skip
    device = DEVICE_TYPE.from_arguments(args, DeviceSettings())
    assert isinstance(device, FsDevice)
    assert device.config[:2] == b"t1" and struct.unpack_from("<II", device.config, 36) == (3, 4096)
    assert DEVICE_TYPE.num_queues(args) == 5 and len(device.queues) == 5
    assert device.server.cache == "never" and device.server.announce_submounts
    assert device.io is not None and device.io.count == 3
    device.close()
    with pytest.raises(SystemExit):
        parser.parse_args(["--shared-dir", str(tmp_path), "--sandbox", "namespace"])
    for bad in (["--tag", "x" * 40], ["--num-request-queues", "0"], ["--thread-pool-size", "-1"]):
        with pytest.raises(ValueError):
            DEVICE_TYPE.from_arguments(
                parser.parse_args(["--shared-dir", str(tmp_path), *bad]), DeviceSettings()
            )
    with pytest.raises(ValueError):
        DEVICE_TYPE.from_arguments(
            parser.parse_args(["--shared-dir", str(tmp_path / "nope")]), DeviceSettings()
        )


@pytest.mark.parametrize(
    "forge",
    [
        lambda r: r + W.fmt("<", W.DIRENT).pack(1, 1, 5000, 8),  # a name past the reply
        lambda r: r + W.fmt("<", W.DIRENT).pack(1, 1, 0, 8),  # an empty name
        lambda r: r + b"\0" * 3,  # trailing bytes inside no entry
    ],
)
def test_driver_rejects_forged_directory_listings(shared: Path, forge: object) -> None:
    server = LyingServer(shared)
    device = FsDevice(server)
    with Loopback(device) as lb:
        driver = FsDriver(lb)
        driver.initialize()
        driver.init()
        fh = driver.opendir(ROOT)

        def fix_len(reply: bytes) -> bytes:
            assert callable(forge)
            out: bytes = forge(reply)
            return _set(out, 0, "<I", len(out))

        server.forge = fix_len
        with pytest.raises(BadReply):
            driver.readdir(ROOT, fh, 0)
    device.close()


# -- zero-copy READ and WRITE, reads on worker threads --------------------------------------


def _read_in(fh: int, offset: int, size: int) -> bytes:
    return W.fmt("<", W.READ_IN).pack(fh, offset, size, 0, 0, 0, 0)


def _reply_len(data: bytes) -> int:
    return int(struct.unpack_from("<I", data, 0)[0])


def test_read_into_a_chain_split_over_many_descriptors(
    fs: tuple[FsDriver, FsDevice, Loopback], shared: Path
) -> None:
    driver, _, lb = fs
    blob = os.urandom(5000)
    (shared / "f").write_bytes(blob)
    entry = driver.lookup(ROOT, "f")
    fh = driver.open(entry.nodeid)
    # The reply header itself is split (5 + 11 bytes), the data over odd pieces.
    sizes = [5, 11, 1, 0, 7, 4000, 3, 1000]
    message = header(Op.READ, entry.nodeid, _read_in(fh, 100, 4800))
    written, data = driver.call(1, [message[:7], message[7:50], message[50:]], sizes)
    assert written == W.OUT_HEADER_SIZE + 4800 == _reply_len(data)
    assert reply_error(data) == 0 and struct.unpack_from("<Q", data, 8)[0] == 99
    assert data[16:written] == blob[100:4900]
    assert not lb.read_status() & S.DEVICE_NEEDS_RESET


def test_reads_and_writes_over_more_buffers_than_one_syscall_takes(tmp_path: Path) -> None:
    fd = os.open(tmp_path / "f", os.O_RDWR | os.O_CREAT)
    try:
        blob = os.urandom(fileio.IOV_MAX + 500)
        pieces = [memoryview(bytearray(1)) for _ in blob]
        for piece, byte in zip(pieces, blob, strict=True):
            piece[0] = byte
        assert fileio.pwritev_all(fd, pieces, 3) == len(blob)
        back = [memoryview(bytearray(1)) for _ in range(len(blob) + 10)]
        assert fileio.preadv_all(fd, back, 3) == len(blob)  # stops at end of file
        assert b"".join(bytes(v) for v in back[: len(blob)]) == blob
    finally:
        os.close(fd)


def test_short_reads_and_reads_at_eof(
    fs: tuple[FsDriver, FsDevice, Loopback], shared: Path
) -> None:
    driver, _, _ = fs
    (shared / "f").write_bytes(b"0123456789")
    entry = driver.lookup(ROOT, "f")
    fh = driver.open(entry.nodeid)
    assert driver.read(entry.nodeid, fh, 6, 4096) == b"6789"
    assert driver.read(entry.nodeid, fh, 10, 4096) == b""
    assert driver.read(entry.nodeid, fh, 1 << 40, 4096) == b""
    assert driver.read(entry.nodeid, fh, 0, 0) == b""
    # The reply's len says what was read, not the room the driver gave.
    written, data = raw_request(driver, 1, header(Op.READ, entry.nodeid, _read_in(fh, 8, 100)))
    assert written == 18 == _reply_len(data) and data[16:18] == b"89"


@pytest.mark.parametrize(
    ("offset", "size", "room", "want"),
    [
        (0, 0xFFFFFFFF, 64, 48),  # a huge size is cut to the room there is
        (0, 0xFFFFFFFF, 1 << 21, 1 << 20),  # and to max_read
        ((1 << 64) - 1, 10, 64, -errno.EINVAL),  # an offset no file has
        ((1 << 63) - 1, 10, 64, 0),  # the last offset there is: end of file
    ],
)
def test_hostile_read_lengths(
    fs: tuple[FsDriver, FsDevice, Loopback],
    shared: Path,
    offset: int,
    size: int,
    room: int,
    want: int,
) -> None:
    driver, _, lb = fs
    blob = os.urandom(3 << 20)
    (shared / "f").write_bytes(blob)
    entry = driver.lookup(ROOT, "f")
    fh = driver.open(entry.nodeid)
    message = header(Op.READ, entry.nodeid, _read_in(fh, offset, size))
    written, data = raw_request(driver, 1, message, room)
    if want < 0:
        assert written == 16 and reply_error(data) == want
    else:
        assert written == 16 + want == _reply_len(data) and data[16:written] == blob[:want]
    # Lying lengths and bad handles still get their error replies.
    for bad, err in [
        (header(Op.READ, entry.nodeid, _read_in(fh, 0, 4), length=200), errno.EINVAL),
        (header(Op.READ, entry.nodeid, _read_in(fh + 1000, 0, 4)), errno.EBADF),
        (header(Op.READ, 4242, _read_in(fh, 0, 4)), errno.ENOENT),
    ]:
        written, data = raw_request(driver, 1, bad)
        assert written == 16 and reply_error(data) == -err
    wfh = driver.open(entry.nodeid, os.O_WRONLY)
    written, data = raw_request(driver, 1, header(Op.READ, entry.nodeid, _read_in(wfh, 0, 4)))
    assert written == 16 and reply_error(data) == -errno.EBADF  # preadv's own error
    assert not lb.read_status() & S.DEVICE_NEEDS_RESET


def test_write_from_a_chain_split_over_many_descriptors(
    fs: tuple[FsDriver, FsDevice, Loopback], shared: Path
) -> None:
    driver, _, lb = fs
    entry, fh = driver.create(ROOT, "f")
    blob = os.urandom(3000)
    body = W.fmt("<", W.WRITE_IN).pack(fh, 10, len(blob), 0, 0, 0, 0)
    message = header(Op.WRITE, entry.nodeid, body + blob)
    pieces = [
        message[:30],
        message[30:85],
        *(message[i : i + 700] for i in range(85, len(message), 700)),
    ]
    written, data = driver.call(1, pieces, [3, 13, 8])
    assert written == 24 == _reply_len(data) and reply_error(data) == 0
    assert struct.unpack_from("<I", data, 16)[0] == len(blob)
    assert (shared / "f").read_bytes() == bytes(10) + blob
    # Data past fuse_write_in.size is not written.
    body = W.fmt("<", W.WRITE_IN).pack(fh, 0, 4, 0, 0, 0, 0)
    written, data = raw_request(driver, 1, header(Op.WRITE, entry.nodeid, body + b"abcdefgh"))
    assert struct.unpack_from("<I", data, 16)[0] == 4
    assert (shared / "f").read_bytes()[:12] == b"abcd" + bytes(6) + blob[:2]
    # A handle opened for reading: pwritev's EBADF comes back as the reply.
    rfh = driver.open(entry.nodeid)
    body = W.fmt("<", W.WRITE_IN).pack(rfh, 0, 3, 0, 0, 0, 0)
    written, data = raw_request(driver, 1, header(Op.WRITE, entry.nodeid, body + b"xyz"))
    assert written == 16 and reply_error(data) == -errno.EBADF
    assert not lb.read_status() & S.DEVICE_NEEDS_RESET


@pytest.fixture
def workers(shared: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[FsDriver, FsDevice]]:
    """A device with two read workers; ``device.log`` has READs and RELEASEs in order."""
    server = FuseServer(shared)
    log: list[str] = []
    real_read = fileio.preadv_all
    real_release = server_mod._HANDLERS[Op.RELEASE]

    def slow_preadv(fd: int, views: Sequence[memoryview], offset: int) -> int:
        # Widens the window a RELEASE would need to close the file under the read.
        time.sleep(0.05)
        got = real_read(fd, views, offset)
        log.append(f"read on {threading.current_thread().name}")
        return got

    def release(
        server: FuseServer, node: Inode, body: Message, room: int, uid: int, gid: int
    ) -> bytes:
        log.append("release")
        return real_release(server, node, body, room, uid, gid)

    monkeypatch.setitem(server_mod._HANDLERS, Op.RELEASE, release)
    monkeypatch.setattr(server_mod, "preadv_all", slow_preadv)
    device = FsDevice(server, workers=2, inline_max=4096)
    device.log = log  # type: ignore[attr-defined]
    with Loopback(device) as lb:
        driver = FsDriver(lb)
        driver.initialize()
        driver.init()
        yield driver, device
    device.close()


def _submit_read(driver: FsDriver, nodeid: int, fh: int, offset: int, unique: int) -> Request:
    message = header(Op.READ, nodeid, _read_in(fh, offset, 1 << 14), unique=unique)
    return driver.submit(1, [message], [16 + (1 << 14)])


def test_large_reads_run_on_workers_and_release_waits(
    workers: tuple[FsDriver, FsDevice], shared: Path
) -> None:
    driver, device = workers
    log: list[str] = device.log  # type: ignore[attr-defined]
    blob = os.urandom(1 << 16)
    (shared / "f").write_bytes(blob)
    entry = driver.lookup(ROOT, "f")
    fh = driver.open(entry.nodeid)
    # A lone read (the guest waiting for each one) is served inline.
    assert driver.read(entry.nodeid, fh, 0, 1 << 14) == blob[: 1 << 14]
    assert log == ["read on MainThread"]
    log.clear()
    # One batch: two reads for the workers, then the RELEASE of their file.
    reads = [_submit_read(driver, entry.nodeid, fh, i << 14, unique=i) for i in range(2)]
    release_in = W.fmt("<", W.RELEASE_IN).pack(fh, 0, 0, 0)
    release = driver.submit(1, [header(Op.RELEASE, entry.nodeid, release_in)], [16])
    driver.kick(1)
    for i, request in enumerate([*reads, release]):
        driver.wait(request)
        data = driver.read_in_full(request)
        assert reply_error(data) == 0  # not EBADF: the file was still open
        if request is not release:
            assert request.written == 16 + (1 << 14)
            assert data[16:] == blob[i << 14 : (i + 1) << 14]
        driver.release(request)
    assert sorted(log[:2]) == ["read on virtio-fs-io-0", "read on virtio-fs-io-1"]
    assert log[2:] == ["release"]
    assert device.server.open_handles == 0
    assert device.io is not None and device.io.outstanding == 0


def test_the_ring_thread_reads_when_every_worker_is_busy(
    workers: tuple[FsDriver, FsDevice], shared: Path
) -> None:
    driver, device = workers
    log: list[str] = device.log  # type: ignore[attr-defined]
    blob = os.urandom(1 << 16)
    (shared / "f").write_bytes(blob)
    entry = driver.lookup(ROOT, "f")
    fh = driver.open(entry.nodeid)
    reads = [_submit_read(driver, entry.nodeid, fh, i << 14, unique=i) for i in range(4)]
    driver.kick(1)
    for i, request in enumerate(reads):
        driver.wait(request)
        assert driver.read_in_full(request)[16:] == blob[i << 14 : (i + 1) << 14]
        driver.release(request)
    assert sorted(log) == [
        *["read on MainThread"] * 2,
        "read on virtio-fs-io-0",
        "read on virtio-fs-io-1",
    ]


def test_reset_waits_for_reads_on_workers(workers: tuple[FsDriver, FsDevice], shared: Path) -> None:
    driver, device = workers
    (shared / "f").write_bytes(os.urandom(1 << 16))
    entry = driver.lookup(ROOT, "f")
    fh = driver.open(entry.nodeid)
    for off in (0, 1 << 14, 2 << 14):
        driver.submit(1, [header(Op.READ, entry.nodeid, _read_in(fh, off, 1 << 14))], [1 << 15])
    driver.kick(1)
    driver.initialize()  # a reset while reads are under way
    assert device.io is not None and device.io.outstanding == 0
    assert device.server.open_handles == 0
    driver.init()
    assert driver.getattr(ROOT).ino
