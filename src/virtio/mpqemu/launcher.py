"""`virtio qemu`: run the user's QEMU with pyvirtio PCI functions attached.

    virtio serve blk --transport pci --socket /tmp/vblk.sock disk.img &
    virtio qemu --pci /tmp/vblk.sock -- qemu-system-x86_64 -M q35,memory-backend=mem \\
        -object memory-backend-memfd,id=mem,size=512M,share=on -m 512M ...

For each ``--pci`` socket it fetches the server's proxy socket and adds
``-device x-pci-proxy-dev,fd=N,addr=S`` to the command; it adds a qtest
socket (in a private directory: it gives full control of the VM) and relays
the functions' interrupts through it: an MSI-X message becomes the 4-byte
write to the APIC window it stands for, INTx the I/O APIC input of the slot's
pin. The rest of the command line is the user's, unchanged; ``virtio qemu``
exits with QEMU's status.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType

from virtio.mpqemu.control import (
    HELLO,
    MAX_LINE,
    ControlError,
    FunctionInfo,
    Intx,
    Msi,
    decode_event,
)

log = logging.getLogger("virtio.qemu")

FIRST_SLOT = 0x10  # clear of the slots QEMU's machines fill by default
CONNECT_TIMEOUT = 5.0
QTEST_TIMEOUT = 30.0


class LaunchError(Exception):
    """Why the VM cannot start as asked (one line for the user)."""


# -- the user's command line ------------------------------------------------------------------


def _options(args: Sequence[str], *names: str) -> list[str]:
    """The values of every ``-name VALUE`` (or ``-name=VALUE``) in a QEMU command line."""
    values = []
    for i, arg in enumerate(args):
        for name in names:
            if arg in (name, "-" + name) and i + 1 < len(args):
                values.append(args[i + 1])
            elif arg.startswith((name + "=", "-" + name + "=")):
                values.append(arg.split("=", 1)[1])
    return values


def _props(value: str) -> tuple[str, dict[str, str]]:
    """QEMU's ``first,key=value,...``: the first bare word and the properties."""
    first, props = "", {}
    for i, part in enumerate(value.split(",")):
        key, eq, val = part.partition("=")
        if not eq and i == 0:
            first = key
        elif eq:
            props[key] = val
    return first, props


def shared_memory_error(args: Sequence[str]) -> str | None:
    """Why guest RAM would not be shared with the devices (None: it is)."""
    shared: set[str] = set()
    for value in _options(args, "-object"):
        kind, props = _props(value)
        kind = props.get("qom-type", kind)
        share = props.get("share", "on" if kind == "memory-backend-memfd" else "off")
        backend = kind in ("memory-backend-memfd", "memory-backend-file")
        if backend and share in ("on", "yes", "true") and "id" in props:
            shared.add(props["id"])
    used = [p.get("memory-backend") for _, p in map(_props, _options(args, "-M", "-machine"))]
    used += [p.get("memdev") for _, p in map(_props, _options(args, "-numa"))]
    backends = [u for u in used if u]
    if not backends:
        return (
            "the guest's RAM is not shared: give the machine a shared memory backend, e.g. "
            "-object memory-backend-memfd,id=mem,size=512M,share=on -M q35,memory-backend=mem"
        )
    unshared = [b for b in backends if b not in shared]
    if unshared:
        return (
            f"memory backend {unshared[0]!r} is not a shared memory-backend-memfd or "
            "memory-backend-file (share=on): the devices could not reach guest RAM"
        )
    return None


def machine_type(args: Sequence[str]) -> str:
    """The machine's type as given (``-M q35,...``); QEMU's default for x86 is pc."""
    for value in reversed(_options(args, "-M", "-machine")):
        first, props = _props(value)
        name = props.get("type", first)
        if name:
            return name
    return "pc"


def ioapic_path(machine: str) -> str | None:
    """Where the I/O APIC of ``machine`` is in QEMU's object tree (None: no INTx here)."""
    if "q35" in machine:
        return "/machine/q35/ioapic"
    if machine == "pc" or machine.startswith("pc-i440fx") or machine.startswith("pc-"):
        return "/machine/i440fx/ioapic"
    return None


def used_slots(args: Sequence[str]) -> set[int]:
    slots = set()
    for value in _options(args, "-device"):
        addr = _props(value)[1].get("addr")
        if addr:
            with contextlib.suppress(ValueError):
                slots.add(int(addr.split(".")[0], 16 if not addr.startswith("0x") else 0))
    return slots


def free_slots(args: Sequence[str], count: int) -> list[int]:
    taken = used_slots(args)
    slots = [s for s in range(FIRST_SLOT, 32) if s not in taken][:count]
    if len(slots) < count:
        raise LaunchError(f"no {count} free PCI slots from {FIRST_SLOT:#x} on bus 0")
    return slots


# -- the functions' servers --------------------------------------------------------------------


@dataclass
class Function:
    """One attached pyvirtio PCI function: its server's channel and where it sits."""

    path: str
    conn: socket.socket
    info: FunctionInfo
    proxy_fd: int
    slot: int = 0
    buffer: bytes = b""
    intx: bool = False


def attach(path: str) -> Function:
    """Say hello to a ``virtio serve --transport pci`` socket; get its proxy socket."""
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    conn.settimeout(CONNECT_TIMEOUT)
    try:
        conn.connect(path)
        conn.sendall(HELLO)
        line, fds, _flags, _addr = socket.recv_fds(conn, MAX_LINE, 1)
        while not line.endswith(b"\n") and line:
            more = conn.recv(MAX_LINE)
            if not more:
                break
            line += more
        if len(fds) != 1:
            for fd in fds:
                os.close(fd)
            raise LaunchError(f"{path}: the server sent no proxy socket (is it --transport pci?)")
        info = FunctionInfo.decode(line)
    except (OSError, ControlError) as err:
        conn.close()
        raise LaunchError(f"cannot attach {path}: {err}") from err
    except BaseException:
        conn.close()
        raise
    conn.settimeout(None)
    return Function(path, conn, info, fds[0])


# -- the interrupt relay -----------------------------------------------------------------------


@dataclass
class Relay:
    """Interrupts from the functions' servers into the VM, through qtest."""

    functions: list[Function]
    machine: str
    qtest: socket.socket | None = None
    backlog: list[bytes] = field(default_factory=list)
    levels: dict[int, set[int]] = field(default_factory=dict)  # GSI -> functions asserting it
    warned: set[str] = field(default_factory=set)
    injected: int = 0

    def event(self, index: int, event: Msi | Intx) -> None:
        if isinstance(event, Msi):
            self.send(f"writel {event.address:#x} {event.data:#x}\n".encode())
            return
        gsi = self.gsi(self.functions[index], event.line)
        path = ioapic_path(self.machine)
        if gsi is None or path is None:
            self.warn_once(
                "intx", f"INTx on machine {self.machine!r} is not routed (use MSI-X, q35 or pc)"
            )
            return
        asserting = self.levels.setdefault(gsi, set())
        before = bool(asserting)
        if event.level:
            asserting.add(index)
        else:
            asserting.discard(index)
        if bool(asserting) != before:
            self.send(f"set_irq_in {path} unnamed-gpio-in {gsi} {int(bool(asserting))}\n".encode())

    def gsi(self, function: Function, line: int) -> int | None:
        if "q35" in self.machine:
            # ICH9 routes slot S's INTA# to PIRQ E-H, which are GSI 20-23 in APIC mode.
            return 20 + function.slot % 4
        # i440fx: the IRQ firmware routed the pin to (Interrupt Line) is the GSI.
        if 1 <= line <= 15 and line != 2:
            return line
        self.warn_once(f"line{line}", f"{function.path}: INTx routed to IRQ {line}: not relayed")
        return None

    def warn_once(self, key: str, text: str) -> None:
        if key not in self.warned:
            self.warned.add(key)
            log.warning("%s", text)

    def send(self, command: bytes) -> None:
        self.injected += 1
        if self.qtest is None:
            self.backlog.append(command)
            return
        try:
            self.qtest.sendall(command)
        except OSError as err:
            self.warn_once("qtest", f"cannot reach QEMU's qtest socket: {err}")

    def connected(self, qtest: socket.socket) -> None:
        self.qtest = qtest
        backlog, self.backlog = self.backlog, []
        for command in backlog:
            qtest.sendall(command)


def run(paths: Sequence[str], qemu: Sequence[str]) -> int:
    error = shared_memory_error(qemu)
    if error is not None:
        raise LaunchError(error)
    if any(arg in ("-qtest", "--qtest") for arg in qemu):
        raise LaunchError("the command already has -qtest: virtio qemu needs it for interrupts")
    if shutil.which(qemu[0]) is None:
        raise LaunchError(f"{qemu[0]}: command not found")
    machine = machine_type(qemu)
    if "microvm" in machine or "isapc" in machine:
        raise LaunchError(f"machine {machine!r} has no PCI bus for --pci (use q35 or pc)")
    functions: list[Function] = []
    try:
        for path in paths:
            functions.append(attach(path))
        for function, slot in zip(functions, free_slots(qemu, len(functions)), strict=True):
            function.slot = slot
        with tempfile.TemporaryDirectory(prefix="pyvirtio-qemu-") as private:
            os.chmod(private, 0o700)  # the qtest socket gives full control of the VM
            return _run_qemu(functions, list(qemu), machine, Path(private) / "qtest.sock")
    finally:
        for function in functions:
            function.conn.close()
            with contextlib.suppress(OSError):
                os.close(function.proxy_fd)


def _run_qemu(functions: list[Function], qemu: list[str], machine: str, qtest_path: Path) -> int:
    command = list(qemu)
    command += ["-qtest", f"unix:{qtest_path},server=on,wait=off", "-qtest-log", "/dev/null"]
    for i, function in enumerate(functions):
        command += [
            "-device",
            f"x-pci-proxy-dev,id=pyvirtio{i},fd={function.proxy_fd},addr={function.slot:#x}",
        ]
        log.info(
            "%s: %s (PCI %s%s) in slot %#x",
            function.path,
            function.info.device,
            function.info.pci_id,
            ", transitional" if function.info.transitional else "",
            function.slot,
        )
    log.debug("running %s", " ".join(command))
    proc = subprocess.Popen(command, pass_fds=[f.proxy_fd for f in functions])
    for function in functions:
        os.close(function.proxy_fd)
        function.proxy_fd = -1

    def forward(signum: int, _frame: FrameType | None) -> None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signum)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    relay = Relay(functions, machine)
    try:
        _relay(proc, relay, qtest_path)
        status = proc.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    log.info("QEMU exited (%d); %d interrupts relayed", status, relay.injected)
    return status if status >= 0 else 128 - status


def _relay(proc: subprocess.Popen[bytes], relay: Relay, qtest_path: Path) -> None:
    """Relay interrupts until QEMU exits."""
    pidfd = os.pidfd_open(proc.pid)
    with selectors.DefaultSelector() as sel, contextlib.ExitStack() as stack:
        stack.callback(os.close, pidfd)
        sel.register(pidfd, selectors.EVENT_READ, "qemu")
        for index, function in enumerate(relay.functions):
            sel.register(function.conn, selectors.EVENT_READ, index)
        qtest: socket.socket | None = None
        started = time.monotonic()
        while True:
            if qtest is None:
                qtest = _try_qtest(qtest_path)
                if qtest is not None:
                    stack.callback(qtest.close)
                    relay.connected(qtest)
                    sel.register(qtest, selectors.EVENT_READ, "qtest")
                elif time.monotonic() - started > QTEST_TIMEOUT:
                    raise LaunchError("QEMU's qtest socket never appeared")
            timeout = 0.05 if qtest is None else None
            for key, _mask in sel.select(timeout):
                what = key.data
                if what == "qemu":
                    return
                if what == "qtest":
                    _drain_qtest(key.fileobj, relay)  # type: ignore[arg-type]
                    continue
                function = relay.functions[what]
                if not _read_events(relay, what):
                    sel.unregister(function.conn)
                    log.error("%s: the device server went away", function.path)


def _try_qtest(path: Path) -> socket.socket | None:
    if not path.exists():
        return None
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(str(path))
    except OSError:
        sock.close()
        return None
    return sock


def _drain_qtest(sock: socket.socket, relay: Relay) -> None:
    data = sock.recv(65536)
    for line in data.decode(errors="replace").splitlines():
        if line.startswith("FAIL") or line.startswith("ERR"):
            relay.warn_once("qtest-fail", f"qtest refused an interrupt: {line}")


def _read_events(relay: Relay, index: int) -> bool:
    function = relay.functions[index]
    try:
        data = function.conn.recv(65536)
    except OSError:
        return False
    if not data:
        return False
    function.buffer += data
    *lines, function.buffer = function.buffer.split(b"\n")
    if len(function.buffer) > MAX_LINE:
        function.buffer = b""
    for line in lines:
        try:
            relay.event(index, decode_event(line))
        except ControlError as err:
            relay.warn_once("bad-event", f"{function.path}: {err}")
    return True


# -- the command -------------------------------------------------------------------------------


def main(argv: list[str]) -> int:
    if "--" in argv:
        split = argv.index("--")
        ours, qemu = argv[:split], argv[split + 1 :]
    else:
        ours, qemu = argv, []
    parser = argparse.ArgumentParser(
        prog="virtio qemu",
        description="Run QEMU with pyvirtio PCI functions (virtio serve TYPE --transport pci).",
        usage="virtio qemu --pci PATH [--pci PATH ...] -- qemu-system-x86_64 ARGS...",
    )
    parser.add_argument(
        "--pci", action="append", required=True, metavar="PATH", help="a device server's socket"
    )
    args = parser.parse_args(ours)
    if not qemu:
        parser.error("give the QEMU command after --")
    try:
        return run(args.pci, qemu)
    except LaunchError as err:
        print(f"virtio qemu: {err}", file=sys.stderr)
        return 2
