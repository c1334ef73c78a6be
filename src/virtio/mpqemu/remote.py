"""A remote PCI function for QEMU's proxy: the mpqemu messages mapped onto a PciFunction.

Sans-IO: :meth:`RemoteSession.handle` takes a decoded message and returns
the reply to send (or None), mapping memory through a :class:`MemoryHost`
the adapter provides. The guest sees only this side's configuration space,
so BAR sizing, the capability list and the command register are the
function's; BAR accesses arrive with the absolute guest address (or port),
which the function resolves against the bases the guest programmed.

Notifications are not served while the access is answered: the vCPU that
wrote the notify register waits for the reply, so the session queues them
and the adapter serves them right after replying (what QEMU's ioeventfd
does for its own devices).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Protocol

from virtio.memory import Buffer, GuestMemory
from virtio.mpqemu.wire import (
    BarAccess,
    Command,
    MemorySection,
    Message,
    MpqemuError,
    decode_bar,
    decode_config,
    decode_sysmem,
    encode_ret,
)
from virtio.transport.pci import PciFunction

log = logging.getLogger("virtio.mpqemu")

ALL_ONES = (1 << 64) - 1
CONFIG_SPACE = 256  # a conventional PCI function's


class MemoryHost(Protocol):
    """The adapter's window on the OS: map and close the memfds QEMU sends."""

    def map(self, fd: int, size: int, offset: int) -> Buffer: ...

    def unmap(self, buffer: Buffer) -> None: ...

    def file_identity(self, fd: int) -> tuple[int, int]:
        """What names the file behind ``fd`` (device, inode): a resend of the same RAM."""

    def close(self, fd: int) -> None: ...


@dataclass(frozen=True)
class _Mapped:
    gpa: int
    size: int
    offset: int
    file: tuple[int, int]


class RemoteSession:
    """One proxy connection's view of ``function``: its guest RAM and its accesses."""

    def __init__(self, function: PciFunction, host: MemoryHost) -> None:
        self.function = function
        self.host = host
        self.memory = GuestMemory()
        self._layout: tuple[_Mapped, ...] = ()
        # Rings keep views of the mappings they were set up in: a remapped section's
        # old mapping stays alive (it is the same shared RAM) until the device resets.
        self._retired: list[Buffer] = []
        self._mapped: list[Buffer] = []
        self._said_unshared = False
        self.pending: list[tuple[int, int | None]] = []
        self.accesses = 0
        self.notifications = 0
        function.notify = self._queue_notification
        function.registers.attach_memory(self.memory)

    # -- messages ----------------------------------------------------------------------

    def handle(self, msg: Message) -> bytes | None:
        """The reply to ``msg`` (None: the command has none). Raises MpqemuError."""
        cmd = msg.cmd
        if cmd == Command.SYNC_SYSMEM:
            self._sync_memory(msg)
            return None
        # Every other command carries no fds; any that came are not ours to keep.
        for fd in msg.fds:
            self.host.close(fd)
        if cmd == Command.SET_IRQFD:
            # The interrupt and resample eventfds are only wired to the guest under
            # KVM (irqfd); interrupts go through `virtio qemu` instead.
            return None
        if cmd == Command.PCI_CFGREAD:
            access = decode_config(msg)
            self.accesses += 1
            if not self._config_ok(access.addr, access.length, "read"):
                return encode_ret(ALL_ONES)
            value = self.function.config_read(access.addr, access.length)
            return encode_ret(value & ((1 << 8 * access.length) - 1))
        if cmd == Command.PCI_CFGWRITE:
            access = decode_config(msg)
            self.accesses += 1
            if self._config_ok(access.addr, access.length, "write"):
                self.function.config_write(access.addr, access.length, access.value)
            return encode_ret(0)
        if cmd in (Command.BAR_READ, Command.BAR_WRITE):
            return self._bar(decode_bar(msg), write=cmd == Command.BAR_WRITE)
        if cmd == Command.DEVICE_RESET:
            log.info("the VM reset the PCI function")
            self.pending.clear()
            self.function.reset()
            self._drop_retired()
            return encode_ret(0)
        raise MpqemuError(f"{msg.name()} is not a command QEMU's proxy sends")

    def _config_ok(self, addr: int, length: int, what: str) -> bool:
        if length not in (1, 2, 4) or not 0 <= addr <= CONFIG_SPACE - length:
            log.warning("configuration %s of %d bytes at %#x ignored", what, length, addr)
            return False
        return True

    def _bar(self, access: BarAccess, *, write: bool) -> bytes:
        self.accesses += 1
        size = access.size
        where = self.function.locate(access.addr, io=not access.memory)
        if size not in (1, 2, 4, 8) or where is None:
            space = "memory" if access.memory else "I/O"
            log.warning(
                "%d-byte %s access at %s %#x outside the function's BARs",
                size,
                "write" if write else "read",
                space,
                access.addr,
            )
            return encode_ret(0 if write else ALL_ONES)
        bar, offset = where
        if write:
            self.function.bar_write(bar, offset, size, access.value)
            return encode_ret(0)
        return encode_ret(self.function.bar_read(bar, offset, size))

    # -- notifications -------------------------------------------------------------------

    def _queue_notification(self, value: int, queue: int | None) -> None:
        self.notifications += 1
        self.pending.append((value, queue))

    def serve_notifications(self, *, rearm: bool = True) -> int:
        """Serve the notifications the last accesses carried (after replying to them).

        ``rearm=False`` leaves notifications off: the host goes on polling the rings.
        Returns the chains served.
        """
        served = 0
        while self.pending:
            value, queue = self.pending.pop(0)
            served += self.function.serve_notification(value, queue, rearm=rearm)
        return served

    def _running(self) -> list[int]:
        regs = self.function.registers
        return [i for i in range(regs.num_queues) if regs.device_queue(i) is not None]

    def poll(self) -> int:
        """Serve every running ring without a notification (notifications stay off)."""
        regs = self.function.registers
        return sum(regs.poll_queue(i) for i in self._running())

    def rearm(self) -> int:
        """Stop polling: notifications back on (serving what came in the meantime)."""
        regs = self.function.registers
        return sum(regs.rearm_queue(i) for i in self._running())

    # -- guest memory ----------------------------------------------------------------------

    def _sync_memory(self, msg: Message) -> None:
        try:
            sections = decode_sysmem(msg)
        except MpqemuError:
            for fd in msg.fds:
                self.host.close(fd)
            raise
        if not sections and not self._said_unshared:
            self._said_unshared = True
            log.error(
                "QEMU shares no guest RAM with this device (it needs "
                "-object memory-backend-memfd,...,share=on as the machine's memory-backend)"
            )
        try:
            layout = tuple(
                _Mapped(s.gpa, s.size, s.offset, self.host.file_identity(s.fd)) for s in sections
            )
            if layout == self._layout:
                return  # QEMU re-sends the map on every topology change: mostly the same RAM
            self._remap(sections, layout)
        finally:
            for fd in msg.fds:
                self.host.close(fd)

    def _remap(self, sections: list[MemorySection], layout: tuple[_Mapped, ...]) -> None:
        mapped = [(s, self.host.map(s.fd, s.size, s.offset)) for s in sections]
        self._forget_memory()
        for section, buffer in mapped:
            self.memory.add(section.gpa, buffer, name=f"ram@{section.gpa:#x}")
            self._mapped.append(buffer)
        self._layout = layout
        log.debug("guest RAM: %s", ", ".join(f"{s.gpa:#x}+{s.size:#x}" for s in sections))

    def _drop_retired(self) -> None:
        for buffer in self._retired:
            self.host.unmap(buffer)
        self._retired.clear()

    def close(self) -> None:
        """The connection ended: reset the device, forget its memory."""
        self.pending.clear()
        self.function.reset()
        self._forget_memory()
        self._layout = ()
        self._drop_retired()

    def _forget_memory(self) -> None:
        for region in self.memory.regions:
            self.memory.remove(region.gpa)
        self._retired.extend(self._mapped)
        self._mapped.clear()
