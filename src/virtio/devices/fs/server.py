"""A FUSE server over a host directory: what virtio-fs requests do to files.

The guest never names a host path. Each inode the guest knows is an
``O_PATH`` file descriptor, opened relative to its parent's descriptor with
``O_NOFOLLOW``, one checked name component at a time (no ``/``, no ``.`` or
``..``, not empty): lookups cannot leave the shared directory and symlinks
are never followed by the server (a guest's symlink is data it reads back
with READLINK). Operations on an inode itself go through its descriptor or
its ``/proc/self/fd/N`` magic link, which names that inode and nothing else
(a magic link to a symlink is not followed further). Device nodes cannot be
created and only ``user.*`` extended attributes set (the spec's "Security
Considerations": both would mean something to the host).

File syscalls are made inline and may block: the server is simple and
serial. READ and WRITE also have a zero-copy form (:meth:`FuseServer.read_job`,
:meth:`FuseServer.write_job`): ``os.preadv``/``os.pwritev`` straight between
the file and the request's buffers. A read job touches only a file descriptor
and those buffers, so the device may run it on a worker thread. A request
that lies about its lengths, or names without a NUL, gets -EINVAL; an
OSError becomes its -errno; nothing a guest sends raises.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import stat
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

from virtio.devices.fileio import preadv_all, pwritev_all
from virtio.devices.fs import dax
from virtio.devices.fs import wire as W
from virtio.devices.fs.wire import Op, Order
from virtio.queue import scatter, view_slices

log = logging.getLogger("virtio.fs")

CacheMode = Literal["auto", "always", "never"]
_TIMEOUTS: dict[str, float] = {"never": 0.0, "auto": 1.0, "always": 86400.0}

MAX_WRITE = 1 << 20
MAX_PAGES = MAX_WRITE // 4096
#: The largest file offset preadv takes; READ/WRITE beyond it go through handle() (EINVAL).
_MAX_OFFSET = (1 << 63) - 1
#: fuse_in_header and fuse_read_in / fuse_write_in: what read_job/write_job parse.
IO_HEAD_SIZE = W.IN_HEADER_SIZE + W.size(W.READ_IN)
NAME_MAX = 255
XATTR_MAX = 1 << 16
U64 = (1 << 64) - 1

# open(2) flags a guest may pass on; the rest (O_CREAT, O_PATH, O_TMPFILE, ...) are dropped.
_OPEN_FLAGS = (
    os.O_ACCMODE
    | os.O_APPEND
    | os.O_TRUNC
    | os.O_NONBLOCK
    | os.O_DSYNC
    | os.O_SYNC
    | getattr(os, "O_NOATIME", 0)
)
_RENAME_NOREPLACE = 1
_RENAME_EXCHANGE = 2

#: The FUSE_INIT flags the server offers (taken only if the client offers them too).
OFFERED_FLAGS = (
    W.InitFlag.ASYNC_READ
    | W.InitFlag.ATOMIC_O_TRUNC
    | W.InitFlag.BIG_WRITES
    | W.InitFlag.AUTO_INVAL_DATA
    | W.InitFlag.DO_READDIRPLUS
    | W.InitFlag.READDIRPLUS_AUTO
    | W.InitFlag.PARALLEL_DIROPS
    | W.InitFlag.MAX_PAGES
)

_libc = ctypes.CDLL(None, use_errno=True)


def _check(ret: int) -> int:
    if ret < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return ret


class BadMessage(Exception):
    """A request whose lengths or strings do not hold together (answered -EINVAL)."""


class FuseErrno(Exception):
    def __init__(self, err: int) -> None:
        super().__init__(os.strerror(err))
        self.errno = err


@dataclass
class Inode:
    """A guest-visible inode: an O_PATH descriptor and the guest's lookup count."""

    nodeid: int
    fd: int
    dev: int
    ino: int
    nlookup: int = 0

    @property
    def proc(self) -> str:
        return f"/proc/self/fd/{self.fd}"


@dataclass
class DirHandle:
    fd: int
    #: (name, ino, d_type) of the directory as it was when listed from offset 0.
    entries: list[tuple[bytes, int, int]] = field(default_factory=list)


class Message:
    """A cursor over a request's body (the bytes after fuse_in_header)."""

    def __init__(self, order: Order, data: bytes) -> None:
        self.order = order
        self.data = data
        self.pos = 0

    def struct(self, layout: str) -> tuple[int, ...]:
        s = W.fmt(self.order, layout)
        if self.pos + s.size > len(self.data):
            raise BadMessage(f"request body too short for its structure ({len(self.data)} bytes)")
        values: tuple[int, ...] = s.unpack_from(self.data, self.pos)
        self.pos += s.size
        return values

    def cstring(self) -> bytes:
        end = self.data.find(b"\0", self.pos)
        if end < 0:
            raise BadMessage("string without a terminating NUL")
        value = self.data[self.pos : end]
        self.pos = end + 1
        return value

    def name(self) -> bytes:
        """One path component, checked: the server never resolves more than one."""
        value = self.cstring()
        if not value or b"/" in value or value in (b".", b".."):
            raise FuseErrno(errno.EINVAL)
        if len(value) > NAME_MAX:
            raise FuseErrno(errno.ENAMETOOLONG)
        return value

    def rest(self, n: int | None = None) -> bytes:
        left = len(self.data) - self.pos
        if n is None:
            n = left
        if n > left:
            raise BadMessage(f"request says {n} bytes follow, {left} do")
        value = self.data[self.pos : self.pos + n]
        self.pos += n
        return value


def _job_errno(err: Exception) -> int:
    """The -errno a READ/WRITE job answers for ``err``."""
    if isinstance(err, OSError):
        return -(err.errno or errno.EIO)
    log.error("zero-copy I/O failed: %r", err)  # a server bug must not take the device down
    return -errno.EIO


def _encode_dev(rdev: int) -> int:
    """A device number in the 32-bit encoding fuse_attr.rdev carries."""
    major, minor = os.major(rdev), os.minor(rdev)
    return ((minor & 0xFF) | (major & 0xFFF) << 8 | (minor & ~0xFF) << 12) & 0xFFFFFFFF


def _dtype(mode: int) -> int:
    return (mode >> 12) & 0xF


class FuseServer:
    """One FUSE session over ``root``; ``handle`` answers one request message."""

    def __init__(
        self,
        root: str | os.PathLike[str],
        *,
        cache: CacheMode = "auto",
        announce_submounts: bool = False,
        readonly: bool = False,
    ) -> None:
        if cache not in _TIMEOUTS:
            raise ValueError(f"cache mode {cache!r} is not auto, always or never")
        self.root = os.fspath(root)
        if not os.path.isdir("/proc/self/fd"):
            raise OSError(errno.ENOENT, "the FUSE server needs /proc/self/fd")
        self.cache = cache
        self.timeout = _TIMEOUTS[cache]
        self.announce_submounts = announce_submounts
        self.readonly = readonly
        self._root_fd = os.open(self.root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        self.order: Order = "<"
        self.initialized = False
        self.minor = 0
        self.flags = 0
        self.inodes: dict[int, Inode] = {}
        self._by_ino: dict[tuple[int, int], int] = {}
        self._files: dict[int, int] = {}
        self._dirs: dict[int, DirHandle] = {}
        self._next_id = 2
        #: The DAX window (set by the device that exposes it), or None.
        self.dax: dax.DaxWindow | None = None
        self.reset_session()

    # -- session ---------------------------------------------------------------

    def reset_session(self) -> None:
        """End the FUSE session: every inode but the root and every handle forgotten."""
        self._close_all()
        st = os.fstat(self._root_fd)
        root = Inode(W.ROOT_ID, os.dup(self._root_fd), st.st_dev, st.st_ino, nlookup=1)
        self.inodes = {W.ROOT_ID: root}
        self._by_ino = {(st.st_dev, st.st_ino): W.ROOT_ID}
        self.initialized = False
        if self.dax is not None:
            self.dax.clear()

    def _close_all(self) -> None:
        for node in self.inodes.values():
            os.close(node.fd)
        for fd in self._files.values():
            os.close(fd)
        for handle in self._dirs.values():
            os.close(handle.fd)
        self.inodes, self._files, self._dirs = {}, {}, {}
        self._by_ino = {}

    def close(self) -> None:
        self._close_all()
        os.close(self._root_fd)

    @property
    def open_handles(self) -> int:
        return len(self._files) + len(self._dirs)

    def detect_order(self, message: bytes) -> Order:
        """The byte order of a message: the session's, or the one its FUSE_INIT was written in."""
        if self.initialized or len(message) < 8:
            return self.order
        if int.from_bytes(message[4:8], "little") == Op.INIT:
            return "<"
        if int.from_bytes(message[4:8], "big") == Op.INIT:
            return ">"
        return self.order

    def opcode(self, message: bytes) -> int:
        """The opcode of a message at least a header long."""
        order = self.detect_order(message)
        return int(W.fmt(order, "I").unpack_from(message, 4)[0])

    # -- requests --------------------------------------------------------------

    def handle(self, message: bytes, room: int) -> bytes | None:
        """The reply (fuse_out_header and data, at most ``room`` bytes), or None for none."""
        order = self.detect_order(message)
        if len(message) < W.IN_HEADER_SIZE:
            raise BadMessage("message shorter than fuse_in_header")
        length, opcode, unique, nodeid, uid, gid, _pid, extlen, _ = W.fmt(
            order, W.IN_HEADER
        ).unpack_from(message)
        if opcode == Op.INTERRUPT:
            # Whatever it names was answered already or is a read under way, and
            # FUSE lets a server ignore such an interrupt.
            return None
        if opcode in W.NO_REPLY_OPS:
            if length == len(message) and self.initialized:
                try:
                    self._forget(Message(order, message[W.IN_HEADER_SIZE :]), opcode, nodeid)
                except (BadMessage, FuseErrno) as err:
                    log.info("dropping malformed FORGET: %s", err)
            return None
        if room < W.OUT_HEADER_SIZE:
            raise BadMessage(f"only {room} writable bytes: no room for a reply header")
        if length != len(message) or extlen:
            # The header's length must be the bytes the driver made readable.
            return self._reply(order, unique, -errno.EINVAL, b"", room)
        body = Message(order, message[W.IN_HEADER_SIZE :])
        if opcode != Op.INIT and not self.initialized:
            return self._reply(order, unique, -errno.EIO, b"", room)
        try:
            if opcode == Op.INIT:
                return self._reply(order, unique, *self._init(body), room)
            data = self._dispatch(opcode, nodeid, uid, gid, body, room - W.OUT_HEADER_SIZE)
        except BadMessage as err:
            log.info("%s: malformed request: %s", _opname(opcode), err)
            return self._reply(order, unique, -errno.EINVAL, b"", room)
        except FuseErrno as err:
            return self._reply(order, unique, -err.errno, b"", room)
        except OSError as err:
            return self._reply(order, unique, -(err.errno or errno.EIO), b"", room)
        except (ValueError, OverflowError) as err:
            log.info("%s: rejected: %s", _opname(opcode), err)
            return self._reply(order, unique, -errno.EINVAL, b"", room)
        except Exception as err:  # a server bug must not take the device down
            log.error("%s failed: %r", _opname(opcode), err)
            return self._reply(order, unique, -errno.EIO, b"", room)
        return self._reply(order, unique, 0, data, room)

    # -- zero-copy READ and WRITE ----------------------------------------------------

    def _io_request(
        self, head: bytes, length: int, opcode: int
    ) -> tuple[int, int, int, int] | None:
        """(unique, fd, offset, size) of a well-formed ``opcode`` request on an open file.

        ``head`` is the message's first IO_HEAD_SIZE bytes, ``length`` the whole
        message's. None for anything :meth:`handle` must answer (errors included).
        """
        if not self.initialized or len(head) < IO_HEAD_SIZE:
            return None
        order = self.order
        size_, op, unique, nodeid, _uid, _gid, _pid, extlen, _ = W.fmt(
            order, W.IN_HEADER
        ).unpack_from(head)
        if op != opcode or size_ != length or extlen or nodeid not in self.inodes:
            return None
        fh, offset, size, *_ = W.fmt(order, W.READ_IN).unpack_from(head, W.IN_HEADER_SIZE)
        fd = self._files.get(fh)
        if fd is None or offset > _MAX_OFFSET:
            return None
        return unique, fd, offset, size

    def read_job(
        self, message: bytes, reply: Sequence[memoryview], room: int
    ) -> Callable[[], int] | None:
        """A READ served straight into ``reply`` (``room`` writable bytes), or None.

        None unless ``message`` is a well-formed READ of an open file: the rest,
        errors included, goes through :meth:`handle`. The job returns the bytes
        written (fuse_out_header, then the data) and raises nothing; it touches
        only the file and ``reply``, so it may run on another thread.
        """
        if room < W.OUT_HEADER_SIZE:
            return None
        request = self._io_request(message, len(message), Op.READ)
        if request is None:
            return None
        unique, fd, offset, size = request
        head = view_slices(reply, 0, W.OUT_HEADER_SIZE)
        data = view_slices(reply, W.OUT_HEADER_SIZE, min(size, room - W.OUT_HEADER_SIZE, MAX_WRITE))
        out = W.fmt(self.order, W.OUT_HEADER)

        def job() -> int:
            try:
                got, error = preadv_all(fd, data, offset), 0
            except Exception as err:  # on a worker thread: an error reply, never a raise
                got, error = 0, _job_errno(err)
            scatter(head, out.pack(W.OUT_HEADER_SIZE + got, error, unique))
            return W.OUT_HEADER_SIZE + got

        return job

    def write_job(
        self,
        head: bytes,
        data: Sequence[memoryview],
        length: int,
        reply: Sequence[memoryview],
        room: int,
    ) -> Callable[[], int] | None:
        """A WRITE served straight from ``data`` (the bytes after ``head``), or None.

        ``head`` is the message's first IO_HEAD_SIZE bytes, ``length`` the
        whole message's; None as for :meth:`read_job`. The job returns the
        bytes written into ``reply`` (``room`` bytes) and raises nothing.
        """
        if room < W.OUT_HEADER_SIZE + W.size(W.WRITE_OUT) or self.readonly:
            return None
        if self.dax is not None and self.dax.mappings:
            return None  # handle() refits the window after a write
        request = self._io_request(head, length, Op.WRITE)
        if request is None or request[3] > length - IO_HEAD_SIZE:
            return None
        unique, fd, offset, size = request
        if size < length - IO_HEAD_SIZE:
            data = view_slices(data, 0, size)
        out = W.fmt(self.order, W.OUT_HEADER)
        write_out = W.fmt(self.order, W.WRITE_OUT)

        def job() -> int:
            try:
                done = pwritev_all(fd, data, offset)
            except Exception as err:
                scatter(reply, out.pack(W.OUT_HEADER_SIZE, _job_errno(err), unique))
                return W.OUT_HEADER_SIZE
            n = W.OUT_HEADER_SIZE + write_out.size
            scatter(reply, out.pack(n, 0, unique) + write_out.pack(done, 0))
            return n

        return job

    def _reply(self, order: Order, unique: int, error: int, data: bytes, room: int) -> bytes:
        if W.OUT_HEADER_SIZE + len(data) > room:
            error, data = -errno.EINVAL, b""  # the driver gave too little room for this reply
        return W.fmt(order, W.OUT_HEADER).pack(W.OUT_HEADER_SIZE + len(data), error, unique) + data

    def _init(self, body: Message) -> tuple[int, bytes]:
        major, minor, max_readahead, flags = body.struct(W.INIT_IN)
        order = body.order
        if major < W.KERNEL_VERSION or (major == W.KERNEL_VERSION and minor < W.MIN_MINOR):
            return -errno.EPROTO, b""
        if major > W.KERNEL_VERSION:
            # Tell a newer client our major version; it retries with that.
            return 0, W.fmt(order, "II").pack(W.KERNEL_VERSION, W.KERNEL_MINOR).ljust(
                W.INIT_OUT_COMPAT_5, b"\0"
            )
        # A new FUSE_INIT ends the session before it.
        self.reset_session()
        self.order = order
        self.minor = min(minor, W.KERNEL_MINOR)
        offered = OFFERED_FLAGS | (W.InitFlag.SUBMOUNTS if self.announce_submounts else 0)
        if self.dax is not None:
            offered |= W.InitFlag.MAP_ALIGNMENT
        self.flags = flags & offered
        self.initialized = True
        out = W.fmt(order, W.INIT_OUT).pack(
            W.KERNEL_VERSION,
            W.KERNEL_MINOR,
            min(max_readahead, MAX_WRITE),
            self.flags,
            16,  # max_background
            12,  # congestion_threshold
            MAX_WRITE,
            1,  # time_gran: nanoseconds
            MAX_PAGES,
            dax.MAP_ALIGNMENT if self.dax is not None else 0,
            0,  # flags2
            0,  # max_stack_depth
        )
        if minor < 23:
            out = out[: W.INIT_OUT_COMPAT_22]
        log.info("FUSE session 7.%d, flags %#x", self.minor, self.flags)
        return 0, out

    def _dispatch(
        self, opcode: int, nodeid: int, uid: int, gid: int, body: Message, room: int
    ) -> bytes:
        if opcode == Op.DESTROY:
            self.reset_session()
            return b""
        handler = _HANDLERS.get(opcode)
        if handler is None:
            raise FuseErrno(errno.ENOSYS)
        if self.readonly and opcode in _WRITING_OPS:
            raise FuseErrno(errno.EROFS)
        node = self._node(nodeid)
        try:
            return handler(self, node, body, room, uid, gid)
        finally:
            if self.dax is not None and self.dax.mappings and opcode in _RESIZING_OPS:
                self.dax.fit()  # a mapped file may have changed size

    # -- tables ------------------------------------------------------------------

    def _node(self, nodeid: int) -> Inode:
        node = self.inodes.get(nodeid)
        if node is None:
            raise FuseErrno(errno.ENOENT if nodeid else errno.EINVAL)
        return node

    def _file(self, fh: int) -> int:
        fd = self._files.get(fh)
        if fd is None:
            raise FuseErrno(errno.EBADF)
        return fd

    def _dir(self, fh: int) -> DirHandle:
        handle = self._dirs.get(fh)
        if handle is None:
            raise FuseErrno(errno.EBADF)
        return handle

    def _new_id(self) -> int:
        value = self._next_id
        self._next_id += 1
        return value

    def _lookup(self, parent: Inode, name: bytes) -> tuple[Inode, os.stat_result]:
        """Open one component below ``parent`` without following it; count the lookup."""
        if not stat.S_ISDIR(os.fstat(parent.fd).st_mode):
            raise FuseErrno(errno.ENOTDIR)
        fd = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=parent.fd)
        try:
            st = os.fstat(fd)
        except OSError:
            os.close(fd)
            raise
        known = self._by_ino.get((st.st_dev, st.st_ino))
        if known is not None:
            os.close(fd)
            node = self.inodes[known]
        else:
            node = Inode(self._new_id(), fd, st.st_dev, st.st_ino)
            self.inodes[node.nodeid] = node
            self._by_ino[(st.st_dev, st.st_ino)] = node.nodeid
        node.nlookup += 1
        return node, st

    def _forget_one(self, nodeid: int, nlookup: int) -> None:
        node = self.inodes.get(nodeid)
        if node is None or nodeid == W.ROOT_ID:
            return
        node.nlookup -= min(nlookup, node.nlookup)
        if node.nlookup == 0:
            del self.inodes[nodeid]
            self._by_ino.pop((node.dev, node.ino), None)
            os.close(node.fd)

    def _forget(self, body: Message, opcode: int, nodeid: int) -> None:
        if opcode == Op.FORGET:
            (nlookup,) = body.struct(W.FORGET_IN)
            self._forget_one(nodeid, nlookup)
            return
        count, _ = body.struct(W.BATCH_FORGET_IN)
        if count * W.size(W.FORGET_ONE) > len(body.data) - body.pos:
            raise BadMessage(f"BATCH_FORGET of {count} entries is longer than its message")
        for _ in range(count):
            one, nlookup = body.struct(W.FORGET_ONE)
            self._forget_one(one, nlookup)

    # -- replies -------------------------------------------------------------------

    def _attr(self, st: os.stat_result, node: Inode | None = None) -> tuple[int, ...]:
        a_s, a_ns = divmod(st.st_atime_ns, 10**9)
        m_s, m_ns = divmod(st.st_mtime_ns, 10**9)
        c_s, c_ns = divmod(st.st_ctime_ns, 10**9)
        flags = 0
        if self.announce_submounts and stat.S_ISDIR(st.st_mode) and st.st_dev != self._root_dev:
            flags |= W.ATTR_SUBMOUNT
        return (
            st.st_ino,
            st.st_size,
            st.st_blocks,
            a_s & U64,
            m_s & U64,
            c_s & U64,
            a_ns,
            m_ns,
            c_ns,
            st.st_mode,
            min(st.st_nlink, 0xFFFFFFFF),
            st.st_uid,
            st.st_gid,
            _encode_dev(st.st_rdev),
            st.st_blksize,
            flags,
        )

    @property
    def _root_dev(self) -> int:
        return self.inodes[W.ROOT_ID].dev

    def _valid(self) -> tuple[int, int]:
        whole = int(self.timeout)
        return whole, int((self.timeout - whole) * 1e9)

    def _entry(self, node: Inode, st: os.stat_result) -> bytes:
        sec, nsec = self._valid()
        return W.fmt(self.order, W.ENTRY_OUT).pack(
            node.nodeid, 0, sec, sec, nsec, nsec, *self._attr(st, node)
        )

    def _attr_out(self, st: os.stat_result) -> bytes:
        sec, nsec = self._valid()
        return W.fmt(self.order, W.ATTR_OUT).pack(sec, nsec, 0, *self._attr(st))

    def _open_flags(self) -> int:
        if self.cache == "never":
            return W.FOPEN_DIRECT_IO
        if self.cache == "always":
            return W.FOPEN_KEEP_CACHE
        return 0

    def _owned(self, parent: Inode, name: bytes, uid: int, gid: int) -> None:
        """Give a new entry to the requesting user, as the guest would expect."""
        if os.geteuid() == 0:
            os.chown(name, uid, gid, dir_fd=parent.fd, follow_symlinks=False)

    def _new_entry(self, parent: Inode, name: bytes, uid: int, gid: int) -> bytes:
        self._owned(parent, name, uid, gid)
        node, st = self._lookup(parent, name)
        return self._entry(node, st)

    # -- operations ----------------------------------------------------------------

    def op_lookup(self, node: Inode, body: Message, room: int, uid: int, gid: int) -> bytes:
        child, st = self._lookup(node, body.name())
        return self._entry(child, st)

    def op_getattr(self, node: Inode, body: Message, room: int, uid: int, gid: int) -> bytes:
        flags, _, fh = body.struct(W.GETATTR_IN)
        if flags & W.GETATTR_FH and fh in self._files:
            return self._attr_out(os.fstat(self._files[fh]))
        return self._attr_out(os.fstat(node.fd))

    def op_setattr(self, node: Inode, body: Message, room: int, uid: int, gid: int) -> bytes:
        (valid, _, fh, size, _lo, atime, mtime, _ct, atime_ns, mtime_ns, _cns, mode, _, s_uid,
         s_gid, _) = body.struct(W.SETATTR_IN)  # fmt: skip
        fd = self._file(fh) if valid & W.FATTR_FH else None
        target: int | str = fd if fd is not None else node.proc
        if valid & W.FATTR_MODE:
            os.chmod(target, stat.S_IMODE(mode))
        if valid & (W.FATTR_UID | W.FATTR_GID):
            os.chown(
                target,
                s_uid if valid & W.FATTR_UID else -1,
                s_gid if valid & W.FATTR_GID else -1,
            )
        if valid & W.FATTR_KILL_SUIDGID and not valid & W.FATTR_MODE:
            cur = os.fstat(node.fd).st_mode
            if cur & (stat.S_ISUID | stat.S_ISGID) and stat.S_ISREG(cur):
                os.chmod(target, stat.S_IMODE(cur) & ~(stat.S_ISUID | stat.S_ISGID))
        if valid & W.FATTR_SIZE:
            if fd is not None:
                os.ftruncate(fd, size)
            else:
                wfd = self._open(node, os.O_WRONLY)
                try:
                    os.ftruncate(wfd, size)
                finally:
                    os.close(wfd)
        if valid & (W.FATTR_ATIME | W.FATTR_MTIME):
            cur_st = os.fstat(node.fd)
            now = time.time_ns()
            a = cur_st.st_atime_ns
            m = cur_st.st_mtime_ns
            if valid & W.FATTR_ATIME:
                a = now if valid & W.FATTR_ATIME_NOW else atime * 10**9 + atime_ns
            if valid & W.FATTR_MTIME:
                m = now if valid & W.FATTR_MTIME_NOW else mtime * 10**9 + mtime_ns
            os.utime(target, ns=(a, m))
        return self._attr_out(os.fstat(node.fd))

    def op_readlink(self, node: Inode, body: Message, room: int, uid: int, gid: int) -> bytes:
        return os.fsencode(os.readlink(b"", dir_fd=node.fd))

    def op_symlink(self, node: Inode, body: Message, room: int, uid: int, gid: int) -> bytes:
        name = body.name()
        target = body.cstring()
        if not target:
            raise FuseErrno(errno.ENOENT)
        os.symlink(target, name, dir_fd=node.fd)
        return self._new_entry(node, name, uid, gid)

    def op_mknod(self, node: Inode, body: Message, room: int, uid: int, gid: int) -> bytes:
        mode, _rdev, _umask, _ = body.struct(W.MKNOD_IN)
        name = body.name()
        kind = stat.S_IFMT(mode)
        if kind in (stat.S_IFCHR, stat.S_IFBLK):
            raise FuseErrno(errno.EPERM)  # no device nodes from the guest
        if kind not in (stat.S_IFREG, stat.S_IFIFO, stat.S_IFSOCK, 0):
            raise FuseErrno(errno.EINVAL)
        os.mknod(name, (kind or stat.S_IFREG) | stat.S_IMODE(mode), 0, dir_fd=node.fd)
        return self._new_entry(node, name, uid, gid)

    def op_mkdir(self, node: Inode, body: Message, room: int, uid: int, gid: int) -> bytes:
        mode, _umask = body.struct(W.MKDIR_IN)
        name = body.name()
        os.mkdir(name, stat.S_IMODE(mode), dir_fd=node.fd)
        return self._new_entry(node, name, uid, gid)

    def op_unlink(self, node: Inode, body: Message, room: int, uid: int, gid: int) -> bytes:
        os.unlink(body.name(), dir_fd=node.fd)
        return b""

    def op_rmdir(self, node: Inode, body: Message, room: int, uid: int, gid: int) -> bytes:
        os.rmdir(body.name(), dir_fd=node.fd)
        return b""

    def op_rename(self, node: Inode, body: Message, room: int, uid: int, gid: int) -> bytes:
        (newdir,) = body.struct(W.RENAME_IN)
        return self._rename(node, newdir, 0, body)

    def op_rename2(self, node: Inode, body: Message, room: int, uid: int, gid: int) -> bytes:
        newdir, flags, _ = body.struct(W.RENAME2_IN)
        return self._rename(node, newdir, flags, body)

    def _rename(self, node: Inode, newdir: int, flags: int, body: Message) -> bytes:
        old, new = body.name(), body.name()
        dest = self._node(newdir)
        if flags & ~(_RENAME_NOREPLACE | _RENAME_EXCHANGE):
            raise FuseErrno(errno.EINVAL)
        if flags:
            _check(_libc.renameat2(node.fd, old, dest.fd, new, ctypes.c_uint(flags)))
        else:
            os.rename(old, new, src_dir_fd=node.fd, dst_dir_fd=dest.fd)
        return b""

    def op_link(self, node: Inode, body: Message, room: int, uid: int, gid: int) -> bytes:
        (old,) = body.struct(W.LINK_IN)
        source = self._node(old)
        name = body.name()
        if stat.S_ISDIR(os.fstat(source.fd).st_mode):
            raise FuseErrno(errno.EPERM)
        # The magic link names the inode itself; following it links that inode.
        os.link(source.proc, name, dst_dir_fd=node.fd, follow_symlinks=True)
        child, st = self._lookup(node, name)
        return self._entry(child, st)

    def _open(self, node: Inode, flags: int) -> int:
        st = os.fstat(node.fd)
        if stat.S_ISLNK(st.st_mode):
            raise FuseErrno(errno.ELOOP)
        extra = os.O_NONBLOCK if stat.S_ISFIFO(st.st_mode) else 0
        # Not O_NOFOLLOW: the magic link is itself a link. It names this inode, which
        # is no symlink (checked above; a magic link to a symlink gives ELOOP anyway).
        return os.open(node.proc, (flags & _OPEN_FLAGS) | extra | os.O_CLOEXEC)

    def op_open(self, node: Inode, body: Message, room: int, uid: int, gid: int) -> bytes:
        flags, _ = body.struct(W.OPEN_IN)
        if self.readonly and (flags & os.O_ACCMODE != os.O_RDONLY or flags & os.O_TRUNC):
            raise FuseErrno(errno.EROFS)
        if stat.S_ISDIR(os.fstat(node.fd).st_mode):
            raise FuseErrno(errno.EISDIR)
        fd = self._open(node, flags)
        fh = self._new_id()
        self._files[fh] = fd
        return W.fmt(self.order, W.OPEN_OUT).pack(fh, self._open_flags(), 0)

    def op_create(self, node: Inode, body: Message, room: int, uid: int, gid: int) -> bytes:
        flags, mode, _umask, _ = body.struct(W.CREATE_IN)
        name = body.name()
        open_flags = (flags & (_OPEN_FLAGS | os.O_EXCL)) | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
        fd = os.open(name, open_flags, stat.S_IMODE(mode), dir_fd=node.fd)
        try:
            entry = self._new_entry(node, name, uid, gid)
        except OSError:
            os.close(fd)
            raise
        fh = self._new_id()
        self._files[fh] = fd
        return entry + W.fmt(self.order, W.OPEN_OUT).pack(fh, self._open_flags(), 0)

    def op_read(self, node: Inode, body: Message, room: int, uid: int, gid: int) -> bytes:
        fh, offset, size, _rf, _lo, _f, _ = body.struct(W.READ_IN)
        fd = self._file(fh)
        return os.pread(fd, min(size, room, MAX_WRITE), offset)

    def op_write(self, node: Inode, body: Message, room: int, uid: int, gid: int) -> bytes:
        fh, offset, size, _wf, _lo, _f, _ = body.struct(W.WRITE_IN)
        data = body.rest(size)
        fd = self._file(fh)
        done = os.pwrite(fd, data, offset)
        return W.fmt(self.order, W.WRITE_OUT).pack(done, 0)

    def op_statfs(self, node: Inode, body: Message, room: int, uid: int, gid: int) -> bytes:
        sv = os.statvfs(node.fd)
        return W.fmt(self.order, W.STATFS_OUT).pack(
            sv.f_blocks, sv.f_bfree, sv.f_bavail, sv.f_files, sv.f_ffree,
            sv.f_bsize, sv.f_namemax, sv.f_frsize, 0,
        )  # fmt: skip

    def op_release(self, node: Inode, body: Message, room: int, uid: int, gid: int) -> bytes:
        fh, *_ = body.struct(W.RELEASE_IN)
        fd = self._files.pop(fh, None)
        if fd is not None:
            os.close(fd)
        return b""

    def op_releasedir(self, node: Inode, body: Message, room: int, uid: int, gid: int) -> bytes:
        fh, *_ = body.struct(W.RELEASE_IN)
        handle = self._dirs.pop(fh, None)
        if handle is not None:
            os.close(handle.fd)
        return b""

    def op_flush(self, node: Inode, body: Message, room: int, uid: int, gid: int) -> bytes:
        fh, *_ = body.struct(W.FLUSH_IN)
        self._file(fh)
        return b""

    def op_fsync(self, node: Inode, body: Message, room: int, uid: int, gid: int) -> bytes:
        fh, flags, _ = body.struct(W.FSYNC_IN)
        fd = self._file(fh)
        (os.fdatasync if flags & W.FSYNC_FDATASYNC else os.fsync)(fd)
        return b""

    def op_fsyncdir(self, node: Inode, body: Message, room: int, uid: int, gid: int) -> bytes:
        fh, _flags, _ = body.struct(W.FSYNC_IN)
        os.fsync(self._dir(fh).fd)
        return b""

    def op_opendir(self, node: Inode, body: Message, room: int, uid: int, gid: int) -> bytes:
        body.struct(W.OPEN_IN)
        if not stat.S_ISDIR(os.fstat(node.fd).st_mode):
            raise FuseErrno(errno.ENOTDIR)
        fd = os.open(node.proc, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        fh = self._new_id()
        self._dirs[fh] = DirHandle(fd)
        return W.fmt(self.order, W.OPEN_OUT).pack(fh, 0, 0)

    def _listing(self, handle: DirHandle, offset: int) -> list[tuple[bytes, int, int]]:
        if offset == 0 or not handle.entries:
            st = os.fstat(handle.fd)
            up = st.st_ino
            if (st.st_dev, st.st_ino) != (self._root_dev, self.inodes[W.ROOT_ID].ino):
                up = os.stat("..", dir_fd=handle.fd, follow_symlinks=False).st_ino
            entries = [(b".", st.st_ino, stat.S_IFDIR >> 12), (b"..", up, stat.S_IFDIR >> 12)]
            with os.scandir(handle.fd) as it:
                for e in it:
                    est = e.stat(follow_symlinks=False)
                    entries.append((os.fsencode(e.name), e.inode(), _dtype(est.st_mode)))
            handle.entries = entries
        return handle.entries

    def op_readdir(self, node: Inode, body: Message, room: int, uid: int, gid: int) -> bytes:
        return self._readdir(node, body, room, plus=False)

    def op_readdirplus(self, node: Inode, body: Message, room: int, uid: int, gid: int) -> bytes:
        return self._readdir(node, body, room, plus=True)

    def _readdir(self, node: Inode, body: Message, room: int, *, plus: bool) -> bytes:
        fh, offset, size, *_ = body.struct(W.READ_IN)
        handle = self._dir(fh)
        entries = self._listing(handle, offset)
        limit = min(size, room)
        out = bytearray()
        blank = bytes(W.ENTRY_OUT_SIZE)
        for index in range(offset, len(entries)):
            name, ino, dtype = entries[index]
            rec = W.dirent(self.order, ino, index + 1, dtype, name)
            need = len(rec) + (W.ENTRY_OUT_SIZE if plus else 0)
            if len(out) + need > limit:
                break
            if plus:
                if name in (b".", b".."):
                    out += blank  # nodeid 0: the client makes no dentry for it
                else:
                    try:
                        child, st = self._lookup(node, name)
                    except OSError:
                        continue  # gone since the listing
                    out += self._entry(child, st)
                    rec = W.dirent(self.order, st.st_ino, index + 1, _dtype(st.st_mode), name)
            out += rec
        return bytes(out)

    def op_setxattr(self, node: Inode, body: Message, room: int, uid: int, gid: int) -> bytes:
        layout = W.SETXATTR_IN_EXT if self.flags & W.InitFlag.SETXATTR_EXT else W.SETXATTR_IN
        size, flags, *_ = body.struct(layout)
        name = self._xattr_name(body, writing=True)
        value = body.rest(size)
        os.setxattr(node.proc, name, value, flags & 3)
        return b""

    def op_getxattr(self, node: Inode, body: Message, room: int, uid: int, gid: int) -> bytes:
        size, _ = body.struct(W.GETXATTR_IN)
        name = self._xattr_name(body, writing=False)
        value = os.getxattr(node.proc, name)
        return self._sized(value, size)

    def op_listxattr(self, node: Inode, body: Message, room: int, uid: int, gid: int) -> bytes:
        size, _ = body.struct(W.GETXATTR_IN)
        names = b"".join(os.fsencode(n) + b"\0" for n in os.listxattr(node.proc))
        return self._sized(names, size)

    def _xattr_name(self, body: Message, *, writing: bool) -> bytes:
        name = body.cstring()
        if not name or len(name) > NAME_MAX:
            raise FuseErrno(errno.EINVAL)
        if writing and not name.startswith(b"user."):
            # trusted.*, security.* (file capabilities) and system.* mean something to
            # the host: a guest sets only the user namespace.
            raise FuseErrno(errno.EPERM)
        return name

    def _sized(self, value: bytes, size: int) -> bytes:
        if size == 0:
            return W.fmt(self.order, W.GETXATTR_OUT).pack(len(value), 0)
        if len(value) > size:
            raise FuseErrno(errno.ERANGE)
        return value

    def op_removexattr(self, node: Inode, body: Message, room: int, uid: int, gid: int) -> bytes:
        name = self._xattr_name(body, writing=True)
        os.removexattr(node.proc, name)
        return b""

    def op_access(self, node: Inode, body: Message, room: int, uid: int, gid: int) -> bytes:
        # The driver enforces permissions ("Security Considerations"); the inode exists.
        body.struct(W.ACCESS_IN)
        os.fstat(node.fd)
        return b""

    def op_fallocate(self, node: Inode, body: Message, room: int, uid: int, gid: int) -> bytes:
        fh, offset, length, mode, _ = body.struct(W.FALLOCATE_IN)
        fd = self._file(fh)
        _check(
            _libc.fallocate(
                ctypes.c_int(fd), ctypes.c_int(mode), ctypes.c_int64(offset), ctypes.c_int64(length)
            )
        )
        return b""

    def op_lseek(self, node: Inode, body: Message, room: int, uid: int, gid: int) -> bytes:
        fh, offset, whence, _ = body.struct(W.LSEEK_IN)
        if whence not in (os.SEEK_SET, os.SEEK_CUR, os.SEEK_END, os.SEEK_DATA, os.SEEK_HOLE):
            raise FuseErrno(errno.EINVAL)
        pos = os.lseek(self._file(fh), offset, whence)
        return W.fmt(self.order, W.LSEEK_OUT).pack(pos)

    def op_copy_file_range(
        self, node: Inode, body: Message, room: int, uid: int, gid: int
    ) -> bytes:
        fh_in, off_in, nodeid_out, fh_out, off_out, length, flags = body.struct(
            W.COPY_FILE_RANGE_IN
        )
        if flags:
            raise FuseErrno(errno.EINVAL)
        self._node(nodeid_out)
        done = os.copy_file_range(
            self._file(fh_in), self._file(fh_out), min(length, 0x7FFFF000), off_in, off_out
        )
        return W.fmt(self.order, W.WRITE_OUT).pack(done, 0)

    def op_syncfs(self, node: Inode, body: Message, room: int, uid: int, gid: int) -> bytes:
        os.sync()
        return b""

    def _window(self) -> dax.DaxWindow:
        if self.dax is None:
            raise FuseErrno(errno.ENOSYS)  # no DAX window: shared memory region 0 is absent
        return self.dax

    def op_setupmapping(self, node: Inode, body: Message, room: int, uid: int, gid: int) -> bytes:
        window = self._window()
        fh, foffset, length, flags, moffset = dax.parse_setupmapping(self.order, body.rest())
        if flags & ~(dax.FLAG_READ | dax.FLAG_WRITE):
            raise FuseErrno(errno.EINVAL)
        writable = bool(flags & dax.FLAG_WRITE)
        if writable and self.readonly:
            raise FuseErrno(errno.EROFS)
        if fh != dax.NO_FH:
            window.setup(self._file(fh), foffset, length, moffset, writable=writable)
            return b""
        # No handle (Linux maps by node id): open the inode for the mapping's access.
        fd = self._open(node, os.O_RDWR if writable else os.O_RDONLY)
        try:
            window.setup(fd, foffset, length, moffset, writable=writable)
        finally:
            os.close(fd)
        return b""

    def op_removemapping(self, node: Inode, body: Message, room: int, uid: int, gid: int) -> bytes:
        self._window().remove(dax.parse_removemapping(self.order, body.rest()))
        return b""


_Handler = Callable[[FuseServer, Inode, Message, int, int, int], bytes]

_HANDLERS: dict[int, _Handler] = {
    Op.LOOKUP: FuseServer.op_lookup,
    Op.GETATTR: FuseServer.op_getattr,
    Op.SETATTR: FuseServer.op_setattr,
    Op.READLINK: FuseServer.op_readlink,
    Op.SYMLINK: FuseServer.op_symlink,
    Op.MKNOD: FuseServer.op_mknod,
    Op.MKDIR: FuseServer.op_mkdir,
    Op.UNLINK: FuseServer.op_unlink,
    Op.RMDIR: FuseServer.op_rmdir,
    Op.RENAME: FuseServer.op_rename,
    Op.RENAME2: FuseServer.op_rename2,
    Op.LINK: FuseServer.op_link,
    Op.OPEN: FuseServer.op_open,
    Op.READ: FuseServer.op_read,
    Op.WRITE: FuseServer.op_write,
    Op.STATFS: FuseServer.op_statfs,
    Op.RELEASE: FuseServer.op_release,
    Op.FSYNC: FuseServer.op_fsync,
    Op.SETXATTR: FuseServer.op_setxattr,
    Op.GETXATTR: FuseServer.op_getxattr,
    Op.LISTXATTR: FuseServer.op_listxattr,
    Op.REMOVEXATTR: FuseServer.op_removexattr,
    Op.FLUSH: FuseServer.op_flush,
    Op.OPENDIR: FuseServer.op_opendir,
    Op.READDIR: FuseServer.op_readdir,
    Op.RELEASEDIR: FuseServer.op_releasedir,
    Op.FSYNCDIR: FuseServer.op_fsyncdir,
    Op.ACCESS: FuseServer.op_access,
    Op.CREATE: FuseServer.op_create,
    Op.FALLOCATE: FuseServer.op_fallocate,
    Op.READDIRPLUS: FuseServer.op_readdirplus,
    Op.LSEEK: FuseServer.op_lseek,
    Op.COPY_FILE_RANGE: FuseServer.op_copy_file_range,
    Op.SYNCFS: FuseServer.op_syncfs,
    Op.SETUPMAPPING: FuseServer.op_setupmapping,
    Op.REMOVEMAPPING: FuseServer.op_removemapping,
}

#: Requests that can change a file's size under a DAX mapping.
_RESIZING_OPS = frozenset(
    {Op.SETATTR, Op.OPEN, Op.CREATE, Op.WRITE, Op.FALLOCATE, Op.COPY_FILE_RANGE}
)

_WRITING_OPS = frozenset(
    {
        Op.SETATTR, Op.SYMLINK, Op.MKNOD, Op.MKDIR, Op.UNLINK, Op.RMDIR, Op.RENAME,
        Op.RENAME2, Op.LINK, Op.WRITE, Op.SETXATTR, Op.REMOVEXATTR, Op.CREATE,
        Op.FALLOCATE, Op.COPY_FILE_RANGE,
    }
)  # fmt: skip


def _opname(opcode: int) -> str:
    try:
        return Op(opcode).name
    except ValueError:
        return f"opcode {opcode}"
