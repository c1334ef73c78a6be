"""FUSE messages as virtio-fs carries them: opcodes, flags and structures.

The numbers are the Linux kernel's FUSE ABI (protocol 7.x). Every structure
is described without a byte order: a FUSE session's byte order is the one the
driver used for its FUSE_INIT request ("Device Operation: Request Queues"),
so :func:`fmt` builds the ``struct.Struct`` for ``"<"`` or ``">"`` on demand.
"""

from __future__ import annotations

import functools
import struct
from enum import IntEnum
from typing import Literal

Order = Literal["<", ">"]

KERNEL_VERSION = 7
#: The newest minor version whose messages this implementation lays out.
KERNEL_MINOR = 38
#: The oldest minor version the server accepts (virtio-fs needs 7.27 or newer in Linux).
MIN_MINOR = 13
ROOT_ID = 1


class Op(IntEnum):
    """FUSE opcodes (fuse_in_header.opcode)."""

    LOOKUP = 1
    FORGET = 2
    GETATTR = 3
    SETATTR = 4
    READLINK = 5
    SYMLINK = 6
    MKNOD = 8
    MKDIR = 9
    UNLINK = 10
    RMDIR = 11
    RENAME = 12
    LINK = 13
    OPEN = 14
    READ = 15
    WRITE = 16
    STATFS = 17
    RELEASE = 18
    FSYNC = 20
    SETXATTR = 21
    GETXATTR = 22
    LISTXATTR = 23
    REMOVEXATTR = 24
    FLUSH = 25
    INIT = 26
    OPENDIR = 27
    READDIR = 28
    RELEASEDIR = 29
    FSYNCDIR = 30
    GETLK = 31
    SETLK = 32
    SETLKW = 33
    ACCESS = 34
    CREATE = 35
    INTERRUPT = 36
    BMAP = 37
    DESTROY = 38
    IOCTL = 39
    POLL = 40
    NOTIFY_REPLY = 41
    BATCH_FORGET = 42
    FALLOCATE = 43
    READDIRPLUS = 44
    RENAME2 = 45
    LSEEK = 46
    COPY_FILE_RANGE = 47
    SETUPMAPPING = 48
    REMOVEMAPPING = 49
    SYNCFS = 50


#: Requests that go on the hiprio queue and get no reply (INTERRUPT is answered).
HIPRIO_OPS = frozenset({Op.INTERRUPT, Op.FORGET, Op.BATCH_FORGET})
NO_REPLY_OPS = frozenset({Op.FORGET, Op.BATCH_FORGET})


class InitFlag(IntEnum):
    """fuse_init_in/out.flags bits (the low 32; flags2 holds the rest)."""

    ASYNC_READ = 1 << 0
    POSIX_LOCKS = 1 << 1
    FILE_OPS = 1 << 2
    ATOMIC_O_TRUNC = 1 << 3
    EXPORT_SUPPORT = 1 << 4
    BIG_WRITES = 1 << 5
    DONT_MASK = 1 << 6
    SPLICE_WRITE = 1 << 7
    SPLICE_MOVE = 1 << 8
    SPLICE_READ = 1 << 9
    FLOCK_LOCKS = 1 << 10
    HAS_IOCTL_DIR = 1 << 11
    AUTO_INVAL_DATA = 1 << 12
    DO_READDIRPLUS = 1 << 13
    READDIRPLUS_AUTO = 1 << 14
    ASYNC_DIO = 1 << 15
    WRITEBACK_CACHE = 1 << 16
    NO_OPEN_SUPPORT = 1 << 17
    PARALLEL_DIROPS = 1 << 18
    HANDLE_KILLPRIV = 1 << 19
    POSIX_ACL = 1 << 20
    ABORT_ERROR = 1 << 21
    MAX_PAGES = 1 << 22
    CACHE_SYMLINKS = 1 << 23
    NO_OPENDIR_SUPPORT = 1 << 24
    EXPLICIT_INVAL_DATA = 1 << 25
    MAP_ALIGNMENT = 1 << 26
    SUBMOUNTS = 1 << 27
    HANDLE_KILLPRIV_V2 = 1 << 28
    SETXATTR_EXT = 1 << 29
    INIT_EXT = 1 << 30


# fuse_setattr_in.valid
FATTR_MODE = 1 << 0
FATTR_UID = 1 << 1
FATTR_GID = 1 << 2
FATTR_SIZE = 1 << 3
FATTR_ATIME = 1 << 4
FATTR_MTIME = 1 << 5
FATTR_FH = 1 << 6
FATTR_ATIME_NOW = 1 << 7
FATTR_MTIME_NOW = 1 << 8
FATTR_LOCKOWNER = 1 << 9
FATTR_CTIME = 1 << 10
FATTR_KILL_SUIDGID = 1 << 11

# fuse_open_out.open_flags
FOPEN_DIRECT_IO = 1 << 0
FOPEN_KEEP_CACHE = 1 << 1
FOPEN_NONSEEKABLE = 1 << 2
FOPEN_CACHE_DIR = 1 << 3

# fuse_getattr_in.getattr_flags
GETATTR_FH = 1 << 0
# fuse_fsync_in.fsync_flags
FSYNC_FDATASYNC = 1 << 0
# fuse_attr.flags
ATTR_SUBMOUNT = 1 << 0
# fuse_write_in.write_flags
WRITE_KILL_SUIDGID = 1 << 2

# struct formats, byte order left out
IN_HEADER = "IIQQIIIHH"  # len opcode unique nodeid uid gid pid total_extlen padding
OUT_HEADER = "IiQ"  # len error unique
ATTR = "QQQQQQIIIIIIIIII"  # ino size blocks atime mtime ctime ns*3 mode nlink uid gid rdev blksize flags
ENTRY_OUT = "QQQQII" + ATTR  # nodeid generation entry_valid attr_valid (nsec x2), attr
ATTR_OUT = "QII" + ATTR  # attr_valid attr_valid_nsec dummy, attr
INIT_IN = "IIII"  # major minor max_readahead flags (flags2 + unused follow from 7.36)
INIT_IN_EXT = "IIIII44x"
INIT_OUT = "IIIIHHIIHHII24x"  # ... max_pages map_alignment flags2 max_stack_depth unused
FORGET_IN = "Q"
BATCH_FORGET_IN = "II"
FORGET_ONE = "QQ"
GETATTR_IN = "IIQ"
SETATTR_IN = "IIQQQQQQIIIIIIII"
OPEN_IN = "II"
OPEN_OUT = "QIi"
CREATE_IN = "IIII"  # flags mode umask open_flags
MKNOD_IN = "IIII"  # mode rdev umask padding
MKDIR_IN = "II"  # mode umask
RENAME_IN = "Q"
RENAME2_IN = "QII"
LINK_IN = "Q"
READ_IN = "QQIIQII"  # fh offset size read_flags lock_owner flags padding
WRITE_IN = "QQIIQII"
WRITE_OUT = "II"
RELEASE_IN = "QIIQ"
FLUSH_IN = "QIIQ"
FSYNC_IN = "QII"
STATFS_OUT = "QQQQQIIII24x"  # blocks bfree bavail files ffree bsize namelen frsize padding
SETXATTR_IN = "II"
SETXATTR_IN_EXT = "IIII"
GETXATTR_IN = "II"
GETXATTR_OUT = "II"
ACCESS_IN = "II"
INTERRUPT_IN = "Q"
FALLOCATE_IN = "QQQII"
LSEEK_IN = "QQII"
LSEEK_OUT = "Q"
COPY_FILE_RANGE_IN = "QQQQQQQ"
DIRENT = "QQII"  # ino off namelen type, then the name padded to 8 bytes

#: The size of fuse_init_out a client of each minor version expects.
INIT_OUT_COMPAT_22 = 24
INIT_OUT_COMPAT_5 = 8


@functools.cache
def fmt(order: Order, layout: str) -> struct.Struct:
    """The ``struct.Struct`` of a layout in a session's byte order."""
    return struct.Struct(order + layout)


def size(layout: str) -> int:
    return fmt("<", layout).size


IN_HEADER_SIZE = size(IN_HEADER)  # 40
OUT_HEADER_SIZE = size(OUT_HEADER)  # 16
ENTRY_OUT_SIZE = size(ENTRY_OUT)  # 128
ATTR_OUT_SIZE = size(ATTR_OUT)  # 104
DIRENT_SIZE = size(DIRENT)  # 24


def align8(n: int) -> int:
    return (n + 7) & ~7


def dirent(order: Order, ino: int, off: int, dtype: int, name: bytes) -> bytes:
    """One fuse_dirent, padded to 8 bytes."""
    raw = fmt(order, DIRENT).pack(ino, off, len(name), dtype) + name
    return raw.ljust(align8(len(raw)), b"\0")


def parse_dirents(order: Order, data: bytes, *, plus: bool) -> list[tuple[bytes, int, int, int]]:
    """(name, ino, off, type) of each fuse_dirent (or direntplus) in a READDIR reply."""
    out: list[tuple[bytes, int, int, int]] = []
    pos = 0
    head = ENTRY_OUT_SIZE if plus else 0
    while pos + head + DIRENT_SIZE <= len(data):
        ino, off, namelen, dtype = fmt(order, DIRENT).unpack_from(data, pos + head)
        start = pos + head + DIRENT_SIZE
        if namelen == 0 or start + namelen > len(data):
            raise ValueError("malformed directory entry in READDIR reply")
        out.append((data[start : start + namelen], ino, off, dtype))
        pos = align8(start + namelen)
    if pos != len(data):
        raise ValueError("READDIR reply ends inside an entry")
    return out
