"""A FUSE client over virtio-fs: a driver that speaks FUSE to the device.

Each call builds one FUSE request, puts it on a request queue (FORGET and
BATCH_FORGET on hiprio), and checks the reply before believing it: the
out header's length must be what the device wrote, its unique the
request's, its error a negative errno or 0, the payload the size the
request expects. A failed request raises :class:`FuseError` (an OSError
carrying the errno).

The DAX window (shared memory region 0) is optional: :meth:`FsDriver.dax_window`
finds it through the transport (a PCI BAR, the virtio-mmio SHM registers, the
loopback's region) or says it is absent, and :meth:`FsDriver.pread` /
:meth:`FsDriver.pwrite` fall back to FUSE_READ/FUSE_WRITE then. The driver
keeps its own table of what it mapped and refuses to touch anything else.
"""

from __future__ import annotations

import errno
import itertools
import os
from collections.abc import Sequence
from dataclasses import dataclass

from virtio.core.driver import DriverTransport, Request, VirtioDriver
from virtio.core.shm import ShmWindow, find_window
from virtio.devices.fs import dax
from virtio.devices.fs import wire as W
from virtio.devices.fs.wire import Op, Order
from virtio.errors import NegotiationError, SpecViolation
from virtio.spec.device_ids import DeviceId
from virtio.spec.features import VIRTIO_FS_F_NOTIFICATION

FS = "Device Types / File System Device"
N_CFG_DEV = f"devicenormative:{FS} / Device configuration layout"
N_DAX_DRV = f"drivernormative:{FS} / Device Operation / Device Operation: DAX Window"

_DEFAULT_FLAGS = (
    W.InitFlag.ASYNC_READ
    | W.InitFlag.ATOMIC_O_TRUNC
    | W.InitFlag.BIG_WRITES
    | W.InitFlag.DO_READDIRPLUS
    | W.InitFlag.MAX_PAGES
    | W.InitFlag.PARALLEL_DIROPS
    | W.InitFlag.MAP_ALIGNMENT
)


class FuseError(OSError):
    """The device answered a FUSE request with an error."""


class BadReply(SpecViolation):
    """The device's reply does not hold together."""


class UnmappedAccess(SpecViolation):
    """An access to DAX window bytes this driver has not mapped (or not mapped writable)."""


@dataclass(frozen=True)
class Attr:
    ino: int
    size: int
    blocks: int
    atime_ns: int
    mtime_ns: int
    ctime_ns: int
    mode: int
    nlink: int
    uid: int
    gid: int
    rdev: int
    blksize: int
    flags: int

    @classmethod
    def unpack(cls, values: Sequence[int]) -> Attr:
        ino, size, blocks, a, m, c, ans, mns, cns, mode, nlink, uid, gid, rdev, blksize, flags = (
            values
        )
        return cls(
            ino, size, blocks, a * 10**9 + ans, m * 10**9 + mns, c * 10**9 + cns,
            mode, nlink, uid, gid, rdev, blksize, flags,
        )  # fmt: skip


@dataclass(frozen=True)
class Entry:
    nodeid: int
    generation: int
    entry_valid: float
    attr: Attr


@dataclass(frozen=True)
class InitReply:
    major: int
    minor: int
    max_readahead: int
    flags: int
    max_write: int
    max_pages: int
    map_alignment: int = 0


@dataclass(frozen=True)
class DirEntry:
    name: bytes
    ino: int
    type: int
    entry: Entry | None = None


class FsDriver(VirtioDriver):
    """virtio-fs driver: ``init()`` first, then the FUSE operations by node id."""

    device_id = DeviceId.FS

    def __init__(
        self,
        transport: DriverTransport,
        *,
        notification: bool = False,
        order: Order = "<",
        uid: int = 0,
        gid: int = 0,
        features: int | None = None,
        queue_size: int | None = None,
        vmm_config: tuple[str, int] | None = None,
    ) -> None:
        """``vmm_config`` (tag, num_request_queues): the configuration a VMM keeps for a
        back-end without a config space (virtiofsd leaves it to QEMU), used instead
        of reading the device's."""
        super().__init__(transport, features=features, queue_size=queue_size)
        self.vmm_config = vmm_config
        self.want_notification = notification
        self.order: Order = order
        self.uid, self.gid = uid, gid
        self.tag = ""
        self.num_request_queues = 0
        self.notify_buf_size = 0
        self.session: InitReply | None = None
        self._unique = itertools.count(1)
        self._notify_requests: list[Request] = []
        self._window: ShmWindow | None = None
        self._window_found = False
        self._mapped: dax.RangeMap[bool] = dax.RangeMap(lambda writable, _delta: writable)

    def supported_features(self) -> int:
        return 1 << VIRTIO_FS_F_NOTIFICATION if self.want_notification else 0

    def queues_wanted(self) -> int:
        self._read_config()
        return 1 + int(self.has(VIRTIO_FS_F_NOTIFICATION)) + 1  # hiprio, [notify], 1 request

    def _read_config(self) -> None:
        if self.vmm_config is not None:
            self.tag, self.num_request_queues = self.vmm_config
            return
        raw = self.read_config(0, 44 if self.has(VIRTIO_FS_F_NOTIFICATION) else 40)
        tag = raw[:36].split(b"\0", 1)[0]
        try:
            self.tag = tag.decode()
        except UnicodeDecodeError as err:
            raise NegotiationError(f"device tag is not UTF-8: {tag!r}") from err
        self.num_request_queues = int.from_bytes(raw[36:40], "little")
        if self.num_request_queues < 1:
            raise NegotiationError("device reports no request queues", N_CFG_DEV)
        if self.has(VIRTIO_FS_F_NOTIFICATION):
            self.notify_buf_size = int.from_bytes(raw[40:44], "little")
            if self.notify_buf_size < W.OUT_HEADER_SIZE:
                raise NegotiationError(
                    f"notify_buf_size {self.notify_buf_size} cannot hold a notification",
                    N_CFG_DEV,
                )

    def setup(self) -> None:
        self._unique = itertools.count(1)
        self.session = None
        self._mapped.cut(0, 1 << 64)

    @property
    def request_queue(self) -> int:
        return 2 if self.has(VIRTIO_FS_F_NOTIFICATION) else 1

    # -- the transport of FUSE messages ---------------------------------------------

    def _header(self, opcode: int, nodeid: int, body_len: int, unique: int) -> bytes:
        return W.fmt(self.order, W.IN_HEADER).pack(
            W.IN_HEADER_SIZE + body_len,
            opcode,
            unique,
            nodeid,
            self.uid,
            self.gid,
            os.getpid(),
            0,
            0,
        )

    def request(
        self, opcode: int, nodeid: int, body: bytes, reply_size: int, *, timeout: float = 30.0
    ) -> bytes:
        """Send one FUSE request; the reply's payload (at most ``reply_size`` bytes)."""
        unique = next(self._unique)
        message = self._header(opcode, nodeid, len(body), unique) + body
        if opcode in W.NO_REPLY_OPS:
            written, _ = self.call(0, [message], [], timeout)
            if written:
                raise BadReply(f"device wrote {written} bytes for a request with no reply")
            return b""
        queue = 0 if opcode in W.HIPRIO_OPS else self.request_queue
        room = W.OUT_HEADER_SIZE + reply_size
        written, data = self.call(queue, [message], [room], timeout)
        if not W.OUT_HEADER_SIZE <= written <= room:
            raise BadReply(f"device wrote {written} bytes for a reply of 16..{room}")
        length, error, got = W.fmt(self.order, W.OUT_HEADER).unpack_from(data)
        if length != written or got != unique:
            raise BadReply(
                f"reply header len {length} unique {got}: wrote {written}, sent {unique}"
            )
        if error:
            if not -4095 <= error < 0 or written != W.OUT_HEADER_SIZE:
                raise BadReply(f"reply error {error} with {written} bytes")
            raise FuseError(-error, f"{_opname(opcode)}: {os.strerror(-error)}")
        return data[W.OUT_HEADER_SIZE : written]

    def _exact(self, payload: bytes, layout: str, what: str) -> tuple[int, ...]:
        s = W.fmt(self.order, layout)
        if len(payload) != s.size:
            raise BadReply(f"{what} reply of {len(payload)} bytes, expected {s.size}")
        values: tuple[int, ...] = s.unpack(payload)
        return values

    def _pack(self, layout: str, *values: int) -> bytes:
        return W.fmt(self.order, layout).pack(*values)

    def _entry(self, payload: bytes, what: str) -> Entry:
        values = self._exact(payload, W.ENTRY_OUT, what)
        return self._entry_values(values)

    def _entry_values(self, values: Sequence[int]) -> Entry:
        nodeid, generation, ev, _av, evn, _avn, *attr = values
        return Entry(nodeid, generation, ev + evn / 1e9, Attr.unpack(attr))

    # -- session ------------------------------------------------------------------------

    def init(self, *, flags: int = _DEFAULT_FLAGS, max_readahead: int = 1 << 17) -> InitReply:
        body = self._pack(W.INIT_IN_EXT, W.KERNEL_VERSION, W.KERNEL_MINOR, max_readahead, flags, 0)
        payload = self.request(Op.INIT, 0, body, W.size(W.INIT_OUT))
        if len(payload) < W.INIT_OUT_COMPAT_22:
            raise BadReply(f"FUSE_INIT reply of {len(payload)} bytes")
        values = W.fmt(self.order, W.INIT_OUT).unpack(payload.ljust(W.size(W.INIT_OUT), b"\0"))
        major, minor, readahead, got_flags, _bg, _ct, max_write, _tg, max_pages, align, *_ = values
        if major != W.KERNEL_VERSION:
            raise BadReply(f"device speaks FUSE {major}.{minor}")
        if got_flags & ~flags:
            raise BadReply(f"device enabled FUSE_INIT flags not offered: {got_flags & ~flags:#x}")
        if not got_flags & W.InitFlag.MAP_ALIGNMENT:
            align = 0
        elif align > 63:
            raise BadReply(f"FUSE_INIT map_alignment {align}")
        self.session = InitReply(major, minor, readahead, got_flags, max_write, max_pages, align)
        self._mapped.cut(0, 1 << 64)  # a new session has no mappings
        return self.session

    def destroy(self) -> None:
        self.request(Op.DESTROY, 0, b"", 0)
        self.session = None

    # -- inodes --------------------------------------------------------------------------

    def lookup(self, parent: int, name: bytes | str) -> Entry:
        return self._entry(self.request(Op.LOOKUP, parent, _cstr(name), W.ENTRY_OUT_SIZE), "LOOKUP")

    def forget(self, nodeid: int, nlookup: int = 1) -> None:
        self.request(Op.FORGET, nodeid, self._pack(W.FORGET_IN, nlookup), 0)

    def batch_forget(self, items: Sequence[tuple[int, int]]) -> None:
        body = self._pack(W.BATCH_FORGET_IN, len(items), 0)
        body += b"".join(self._pack(W.FORGET_ONE, n, c) for n, c in items)
        self.request(Op.BATCH_FORGET, 0, body, 0)

    def getattr(self, nodeid: int, fh: int | None = None) -> Attr:
        body = self._pack(W.GETATTR_IN, W.GETATTR_FH if fh is not None else 0, 0, fh or 0)
        return self._attr_reply(self.request(Op.GETATTR, nodeid, body, W.ATTR_OUT_SIZE))

    def _attr_reply(self, payload: bytes) -> Attr:
        _valid, _nsec, _dummy, *attr = self._exact(payload, W.ATTR_OUT, "attr")
        return Attr.unpack(attr)

    def setattr(
        self,
        nodeid: int,
        *,
        mode: int | None = None,
        uid: int | None = None,
        gid: int | None = None,
        size: int | None = None,
        atime_ns: int | None = None,
        mtime_ns: int | None = None,
        fh: int | None = None,
    ) -> Attr:
        valid = 0
        for value, bit in (
            (mode, W.FATTR_MODE), (uid, W.FATTR_UID), (gid, W.FATTR_GID), (size, W.FATTR_SIZE),
            (atime_ns, W.FATTR_ATIME), (mtime_ns, W.FATTR_MTIME), (fh, W.FATTR_FH),
        ):  # fmt: skip
            if value is not None:
                valid |= bit
        a_s, a_ns = divmod(atime_ns or 0, 10**9)
        m_s, m_ns = divmod(mtime_ns or 0, 10**9)
        body = self._pack(
            W.SETATTR_IN, valid, 0, fh or 0, size or 0, 0, a_s, m_s, 0, a_ns, m_ns, 0,
            mode or 0, 0, uid or 0, gid or 0, 0,
        )  # fmt: skip
        return self._attr_reply(self.request(Op.SETATTR, nodeid, body, W.ATTR_OUT_SIZE))

    def mkdir(self, parent: int, name: bytes | str, mode: int = 0o755) -> Entry:
        body = self._pack(W.MKDIR_IN, mode, 0) + _cstr(name)
        return self._entry(self.request(Op.MKDIR, parent, body, W.ENTRY_OUT_SIZE), "MKDIR")

    def mknod(self, parent: int, name: bytes | str, mode: int, rdev: int = 0) -> Entry:
        body = self._pack(W.MKNOD_IN, mode, rdev, 0, 0) + _cstr(name)
        return self._entry(self.request(Op.MKNOD, parent, body, W.ENTRY_OUT_SIZE), "MKNOD")

    def symlink(self, parent: int, name: bytes | str, target: bytes | str) -> Entry:
        body = _cstr(name) + _cstr(target)
        return self._entry(self.request(Op.SYMLINK, parent, body, W.ENTRY_OUT_SIZE), "SYMLINK")

    def readlink(self, nodeid: int) -> bytes:
        return self.request(Op.READLINK, nodeid, b"", 4096)

    def link(self, nodeid: int, new_parent: int, name: bytes | str) -> Entry:
        body = self._pack(W.LINK_IN, nodeid) + _cstr(name)
        return self._entry(self.request(Op.LINK, new_parent, body, W.ENTRY_OUT_SIZE), "LINK")

    def unlink(self, parent: int, name: bytes | str) -> None:
        self.request(Op.UNLINK, parent, _cstr(name), 0)

    def rmdir(self, parent: int, name: bytes | str) -> None:
        self.request(Op.RMDIR, parent, _cstr(name), 0)

    def rename(
        self, parent: int, old: bytes | str, new_parent: int, new: bytes | str, flags: int = 0
    ) -> None:
        names = _cstr(old) + _cstr(new)
        if flags:
            self.request(
                Op.RENAME2, parent, self._pack(W.RENAME2_IN, new_parent, flags, 0) + names, 0
            )
        else:
            self.request(Op.RENAME, parent, self._pack(W.RENAME_IN, new_parent) + names, 0)

    def statfs(self, nodeid: int = W.ROOT_ID) -> tuple[int, ...]:
        """blocks, bfree, bavail, files, ffree, bsize, namelen, frsize, padding."""
        values = self._exact(self.request(Op.STATFS, nodeid, b"", 80), W.STATFS_OUT, "STATFS")
        return values

    # -- files --------------------------------------------------------------------------

    def _open_reply(self, payload: bytes) -> int:
        fh, _flags, _ = self._exact(payload, W.OPEN_OUT, "OPEN")
        return fh

    def open(self, nodeid: int, flags: int = os.O_RDONLY) -> int:
        return self._open_reply(self.request(Op.OPEN, nodeid, self._pack(W.OPEN_IN, flags, 0), 16))

    def create(
        self, parent: int, name: bytes | str, mode: int = 0o644, flags: int = os.O_RDWR
    ) -> tuple[Entry, int]:
        body = self._pack(W.CREATE_IN, flags, mode, 0, 0) + _cstr(name)
        payload = self.request(Op.CREATE, parent, body, W.ENTRY_OUT_SIZE + 16)
        if len(payload) != W.ENTRY_OUT_SIZE + 16:
            raise BadReply(f"CREATE reply of {len(payload)} bytes")
        entry = self._entry(payload[: W.ENTRY_OUT_SIZE], "CREATE")
        return entry, self._open_reply(payload[W.ENTRY_OUT_SIZE :])

    def read(self, nodeid: int, fh: int, offset: int, size: int) -> bytes:
        body = self._pack(W.READ_IN, fh, offset, size, 0, 0, 0, 0)
        return self.request(Op.READ, nodeid, body, size)

    def write(self, nodeid: int, fh: int, offset: int, data: bytes) -> int:
        body = self._pack(W.WRITE_IN, fh, offset, len(data), 0, 0, 0, 0) + data
        done, _ = self._exact(self.request(Op.WRITE, nodeid, body, 8), W.WRITE_OUT, "WRITE")
        if done > len(data):
            raise BadReply(f"device wrote {done} of {len(data)} bytes")
        return done

    def flush(self, nodeid: int, fh: int) -> None:
        self.request(Op.FLUSH, nodeid, self._pack(W.FLUSH_IN, fh, 0, 0, 0), 0)

    def fsync(self, nodeid: int, fh: int, datasync: bool = False) -> None:
        body = self._pack(W.FSYNC_IN, fh, W.FSYNC_FDATASYNC if datasync else 0, 0)
        self.request(Op.FSYNC, nodeid, body, 0)

    def release_file(self, nodeid: int, fh: int) -> None:
        """FUSE_RELEASE (``release`` is the core's: it frees a request's buffers)."""
        self.request(Op.RELEASE, nodeid, self._pack(W.RELEASE_IN, fh, 0, 0, 0), 0)

    def fallocate(self, nodeid: int, fh: int, offset: int, length: int, mode: int = 0) -> None:
        body = self._pack(W.FALLOCATE_IN, fh, offset, length, mode, 0)
        self.request(Op.FALLOCATE, nodeid, body, 0)

    def lseek(self, nodeid: int, fh: int, offset: int, whence: int) -> int:
        body = self._pack(W.LSEEK_IN, fh, offset, whence, 0)
        (pos,) = self._exact(self.request(Op.LSEEK, nodeid, body, 8), W.LSEEK_OUT, "LSEEK")
        return pos

    def copy_file_range(
        self, nodeid_in: int, fh_in: int, off_in: int, nodeid_out: int, fh_out: int,
        off_out: int, length: int,
    ) -> int:  # fmt: skip
        body = self._pack(
            W.COPY_FILE_RANGE_IN, fh_in, off_in, nodeid_out, fh_out, off_out, length, 0
        )
        payload = self.request(Op.COPY_FILE_RANGE, nodeid_in, body, 8)
        done, _ = self._exact(payload, W.WRITE_OUT, "COPY_FILE_RANGE")
        return done

    # -- directories --------------------------------------------------------------------

    def opendir(self, nodeid: int) -> int:
        return self._open_reply(self.request(Op.OPENDIR, nodeid, self._pack(W.OPEN_IN, 0, 0), 16))

    def releasedir(self, nodeid: int, fh: int) -> None:
        self.request(Op.RELEASEDIR, nodeid, self._pack(W.RELEASE_IN, fh, 0, 0, 0), 0)

    def readdir(
        self, nodeid: int, fh: int, offset: int = 0, size: int = 4096, *, plus: bool = False
    ) -> list[tuple[DirEntry, int]]:
        """One batch of entries from ``offset``: (entry, the offset after it)."""
        body = self._pack(W.READ_IN, fh, offset, size, 0, 0, 0, 0)
        payload = self.request(Op.READDIRPLUS if plus else Op.READDIR, nodeid, body, size)
        out: list[tuple[DirEntry, int]] = []
        pos = 0
        try:
            items = W.parse_dirents(self.order, payload, plus=plus)
        except ValueError as err:
            raise BadReply(str(err)) from err
        for name, ino, off, dtype in items:
            entry = None
            if plus:
                values = W.fmt(self.order, W.ENTRY_OUT).unpack_from(payload, pos)
                entry = self._entry_values(values) if values[0] else None
                pos = W.align8(pos + W.ENTRY_OUT_SIZE + W.DIRENT_SIZE + len(name))
            out.append((DirEntry(name, ino, dtype, entry), off))
        return out

    def listdir(self, nodeid: int = W.ROOT_ID, *, plus: bool = False) -> list[DirEntry]:
        """Every entry of a directory but ``.`` and ``..`` (OPENDIR, READDIR..., RELEASEDIR)."""
        fh = self.opendir(nodeid)
        entries: list[DirEntry] = []
        try:
            offset = 0
            while True:
                batch = self.readdir(nodeid, fh, offset, plus=plus)
                if not batch:
                    break
                for entry, off in batch:
                    if entry.name not in (b".", b".."):
                        entries.append(entry)
                    offset = off
        finally:
            self.releasedir(nodeid, fh)
        return entries

    def fsyncdir(self, nodeid: int, fh: int) -> None:
        self.request(Op.FSYNCDIR, nodeid, self._pack(W.FSYNC_IN, fh, 0, 0), 0)

    # -- extended attributes ---------------------------------------------------------

    def setxattr(self, nodeid: int, name: bytes | str, value: bytes, flags: int = 0) -> None:
        body = self._pack(W.SETXATTR_IN, len(value), flags) + _cstr(name) + value
        self.request(Op.SETXATTR, nodeid, body, 0)

    def getxattr(self, nodeid: int, name: bytes | str, size: int = 4096) -> bytes:
        body = self._pack(W.GETXATTR_IN, size, 0) + _cstr(name)
        return self.request(Op.GETXATTR, nodeid, body, max(size, 8))

    def listxattr(self, nodeid: int, size: int = 4096) -> list[bytes]:
        payload = self.request(Op.LISTXATTR, nodeid, self._pack(W.GETXATTR_IN, size, 0), size)
        if payload and not payload.endswith(b"\0"):
            raise BadReply("LISTXATTR reply is not a list of NUL-terminated names")
        return payload.split(b"\0")[:-1]

    def removexattr(self, nodeid: int, name: bytes | str) -> None:
        self.request(Op.REMOVEXATTR, nodeid, _cstr(name), 0)

    # -- the DAX window ----------------------------------------------------------------

    def dax_window(self) -> int | None:
        """The DAX window's size, or None when shared memory region 0 is absent."""
        if not self._window_found:
            self._window = find_window(self.transport, dax.SHMID_CACHE)
            self._window_found = True
        return None if self._window is None else self._window.length

    def _alignment(self) -> int:
        shift = self.session.map_alignment if self.session is not None else 0
        return max(1 << shift, 1)

    def setup_mapping(
        self,
        nodeid: int,
        fh: int | None,
        foffset: int,
        length: int,
        moffset: int,
        writable: bool = False,
    ) -> None:
        """FUSE_SETUPMAPPING: ``length`` bytes of the file at window offset ``moffset``.

        ``fh`` None maps by node id (fh = -1, as Linux does).
        """
        size = self.dax_window()
        if size is None:
            raise FuseError(errno.ENODEV, "no DAX window (shared memory region 0 is absent)")
        align = self._alignment()
        if length <= 0 or foffset % align or moffset % align or length % align:
            raise ValueError(f"mapping of {length:#x} at {moffset:#x} is not {align}-aligned")
        if moffset + length > size:
            raise ValueError(f"mapping of {length:#x} at {moffset:#x} ends past {size:#x}")
        flags = dax.FLAG_READ | (dax.FLAG_WRITE if writable else 0)
        body = self._pack(
            dax.SETUPMAPPING_IN, dax.NO_FH if fh is None else fh, foffset, length, flags, moffset
        )
        self._mapped.cut(moffset, moffset + length)  # what was there is gone, whatever the reply
        self.request(Op.SETUPMAPPING, nodeid, body, 0)
        self._mapped.put(moffset, moffset + length, writable)

    def remove_mapping(self, ranges: Sequence[tuple[int, int]], nodeid: int = W.ROOT_ID) -> None:
        """FUSE_REMOVEMAPPING of each (moffset, length)."""
        if not ranges:
            return
        body = self._pack(dax.REMOVEMAPPING_IN, len(ranges))
        body += b"".join(self._pack(dax.REMOVEMAPPING_ONE, m, n) for m, n in ranges)
        for moffset, length in ranges:
            self._mapped.cut(moffset, moffset + length)
        self.request(Op.REMOVEMAPPING, nodeid, body, 0)

    def _checked(self, moffset: int, size: int, *, write: bool) -> ShmWindow:
        if self.dax_window() is None or self._window is None:
            raise FuseError(errno.ENODEV, "no DAX window (shared memory region 0 is absent)")
        accept = (lambda w: w) if write else (lambda _w: True)
        if size < 0 or not self._mapped.covers(moffset, moffset + size, accept):
            # The driver MUST NOT access DAX window areas that have not been mapped.
            what = "mapped writable" if write else "mapped"
            raise UnmappedAccess(f"{size} bytes at {moffset:#x} are not all {what}", N_DAX_DRV)
        return self._window

    def dax_read(self, moffset: int, size: int) -> bytes:
        """Bytes of the window, all inside mappings."""
        return self._checked(moffset, size, write=False).read(moffset, size)

    def dax_write(self, moffset: int, data: bytes) -> None:
        """Store into the window, all inside writable mappings."""
        self._checked(moffset, len(data), write=True).write(moffset, data)

    def pread(self, nodeid: int, fh: int, offset: int, size: int) -> bytes:
        """File contents through the DAX window (mapped at offset 0 for the call), or FUSE_READ."""
        span = self._span(offset, size)
        if span is None:
            return self.read(nodeid, fh, offset, size)
        start, length = span
        size = max(0, min(size, self.getattr(nodeid, fh).size - offset))
        self.setup_mapping(nodeid, fh, start, length, 0)
        try:
            return self.dax_read(offset - start, size)
        finally:
            self.remove_mapping([(0, length)], nodeid)

    def pwrite(self, nodeid: int, fh: int, offset: int, data: bytes) -> int:
        """Store through a writable DAX mapping, or FUSE_WRITE (always for writes that
        extend the file: window pages past EOF are not the file's)."""
        span = self._span(offset, len(data))
        if span is None or offset + len(data) > self.getattr(nodeid, fh).size:
            return self.write(nodeid, fh, offset, data)
        start, length = span
        self.setup_mapping(nodeid, fh, start, length, 0, writable=True)
        try:
            self.dax_write(offset - start, data)
        finally:
            self.remove_mapping([(0, length)], nodeid)
        return len(data)

    def _span(self, offset: int, size: int) -> tuple[int, int] | None:
        """The aligned file range covering a transfer, if the window can hold it."""
        window = self.dax_window()
        if window is None or size <= 0:
            return None
        align = max(self._alignment(), dax.PAGE)
        start = offset - offset % align
        length = -(-(offset + size - start) // align) * align
        return (start, length) if length <= window else None

    # -- notifications -----------------------------------------------------------------

    def post_notify_buffers(self, count: int = 4) -> None:
        """Give the notification queue ``count`` buffers of notify_buf_size bytes."""
        if not self.has(VIRTIO_FS_F_NOTIFICATION):
            raise NegotiationError("VIRTIO_FS_F_NOTIFICATION was not negotiated")
        for _ in range(count):
            self._notify_requests.append(self.submit(1, [], [self.notify_buf_size]))
        self.kick(1)

    def wait_notification(self, timeout: float = 10.0) -> tuple[int, bytes]:
        """The next FUSE notify message: (notify code, payload); its buffer is reposted."""
        if not self._notify_requests:
            raise NegotiationError("no notification buffers posted")
        request = self._notify_requests.pop(0)
        self.wait(request, timeout)
        data = self.read_in(request)
        self.release(request)
        self.post_notify_buffers(1)
        if len(data) < W.OUT_HEADER_SIZE:
            raise BadReply(f"notification of {len(data)} bytes")
        length, code, unique = W.fmt(self.order, W.OUT_HEADER).unpack_from(data)
        if length != len(data) or unique != 0 or code <= 0:
            raise BadReply(f"notification header len {length} code {code} unique {unique}")
        return code, data[W.OUT_HEADER_SIZE :]


def _cstr(value: bytes | str) -> bytes:
    raw = os.fsencode(value)
    if b"\0" in raw:
        raise FuseError(errno.EINVAL, "name contains NUL")
    return raw + b"\0"


def _opname(opcode: int) -> str:
    try:
        return Op(opcode).name
    except ValueError:
        return f"opcode {opcode}"
