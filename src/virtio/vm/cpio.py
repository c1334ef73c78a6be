"""A writer for the "newc" cpio format the Linux kernel unpacks as an initramfs."""

from __future__ import annotations

import os
import stat
from pathlib import Path

_TRAILER = "TRAILER!!!"


class CpioWriter:
    """Collects files, directories and symlinks; ``getvalue()`` gives the archive."""

    def __init__(self) -> None:
        self._out = bytearray()
        self._ino = 1
        self._names: set[str] = set()

    def _entry(self, name: str, mode: int, data: bytes = b"", *, nlink: int = 1) -> None:
        name = name.lstrip("/")
        if name in self._names:
            return
        self._names.add(name)
        encoded = name.encode() + b"\0"
        fields = [
            self._ino,
            mode,
            0,
            0,
            nlink,
            0,
            len(data),
            0,
            0,
            0,
            0,
            len(encoded),
            0,
        ]
        self._ino += 1
        header = "070701" + "".join(f"{v:08x}" for v in fields)
        self._out += header.encode() + encoded
        self._pad()
        self._out += data
        self._pad()

    def _pad(self) -> None:
        self._out += b"\0" * (-len(self._out) % 4)

    def directory(self, name: str) -> None:
        parts = name.strip("/").split("/")
        for i in range(1, len(parts) + 1):
            self._entry("/".join(parts[:i]), stat.S_IFDIR | 0o755, nlink=2)

    def file(self, name: str, data: bytes, mode: int = 0o644) -> None:
        parent = os.path.dirname(name.strip("/"))
        if parent:
            self.directory(parent)
        self._entry(name, stat.S_IFREG | mode, data)

    def host_file(self, name: str, path: str | Path, mode: int | None = None) -> None:
        p = Path(path)
        self.file(name, p.read_bytes(), mode if mode is not None else p.stat().st_mode & 0o777)

    def symlink(self, name: str, target: str) -> None:
        parent = os.path.dirname(name.strip("/"))
        if parent:
            self.directory(parent)
        self._entry(name, stat.S_IFLNK | 0o777, target.encode())

    def getvalue(self) -> bytes:
        out = CpioWriter.__new__(CpioWriter)
        out._out = bytearray(self._out)
        out._ino = self._ino
        out._names = set()
        out._entry(_TRAILER, 0)
        return bytes(out._out)
