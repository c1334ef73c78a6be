"""A real Linux guest's virtio_console driver against `virtio serve console` (UML).

The guest writes to its console (/dev/hvc0) and to named ports
(/dev/vport0pN, named in /sys/class/virtio-ports/*/name), reads what the host
side sends, and reads its console size with ``busybox stty size``, before and
after the host resizes the pty the console is on. Each port the guest talks
to is opened once for reading and writing (``exec 3<>``): Linux drops a
port's unread input when it closes the port, and its hvc console looks for
input only while the tty is open.
"""

from __future__ import annotations

import fcntl
import os
import re
import socket
import struct
import termios
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.integration.conftest import ServeProcess
from virtio.vm import GuestAssets, run_guest
from virtio.vm.runner import VhostUserDevice

pytestmark = pytest.mark.guest

CONSOLE = "Device Types / Console Device"
N_OP_DRV = f"drivernormative:{CONSOLE} / Device Operation"
N_MULTI_DEV = f"devicenormative:{CONSOLE} / Device Operation / Multiport Device Operation"
N_MULTI_DRV = f"drivernormative:{CONSOLE} / Device Operation / Multiport Device Operation"
TIMEOUT = 60.0

PORTS_SCRIPT = """
for f in /sys/class/virtio-ports/*; do
  [ -f $f/name ] && echo "NAME ${f##*/} $(cat $f/name)"
done
echo "SIZE $(busybox stty size < /dev/hvc0)"
exec 3<>/dev/vport0p1
echo "to port one" >&3
echo "P1 $(busybox timeout 10 head -n 1 <&3)"
exec 4<>/dev/hvc0
busybox stty raw -echo <&4
echo "console READY0" >&4
echo "P0 $(busybox timeout 10 head -n 1 <&4)"
"""

RESIZE_SCRIPT = """
exec 3<>/dev/hvc0
busybox stty raw -echo <&3
echo "SIZE0 $(busybox stty size <&3 2>/dev/null)"
echo "READY" >&3
s=""
for i in $(seq 100); do
  s=$(busybox stty size <&3 2>/dev/null); [ -n "$s" ] && [ "$s" != "24 80" ] && break
  sleep 0.1
done
echo "SIZE1 $s"
echo "GOT $(busybox timeout 10 head -n 1 <&3)"
"""


@contextmanager
def console_server(tmp_path: Path, *args: str) -> Iterator[ServeProcess]:
    server = ServeProcess(
        None, tmp_path / "vc.sock", list(args), tmp_path / "serve.log", kind="console"
    )
    server.start()
    try:
        yield server
    finally:
        server.stop()


def _answer(sock_path: str, wait_for: bytes, reply: bytes, got: dict[str, bytes]) -> None:
    """A host program on one port: wait for the guest's line, answer it, keep reading."""
    deadline = time.monotonic() + 5
    while not os.path.exists(sock_path) and time.monotonic() < deadline:
        time.sleep(0.05)
    client = socket.socket(socket.AF_UNIX)
    client.connect(sock_path)
    client.settimeout(TIMEOUT)
    buf = b""
    replied = False
    try:
        while True:
            data = client.recv(4096)
            if not data:
                break
            buf += data
            if wait_for in buf and not replied:
                client.sendall(reply)
                replied = True
    except OSError:
        pass
    finally:
        got[sock_path] = buf
        client.close()


@pytest.mark.normative(N_OP_DRV, N_MULTI_DEV, N_MULTI_DRV)
def test_uml_console_and_named_ports(tmp_path: Path, guest_assets: GuestAssets) -> None:
    base = tmp_path / "con"
    got: dict[str, bytes] = {}
    with console_server(
        tmp_path, "--unix", str(base), "--ports", "3", "--name", "org.test.one",
        "--cols", "99", "--rows", "33",
    ) as server:  # fmt: skip
        clients = [
            threading.Thread(
                target=_answer, args=(f"{base}.1", b"to port one\n", b"reply-one\n", got)
            ),
            threading.Thread(
                target=_answer, args=(f"{base}.0", b"READY0", b"reply-console\n", got)
            ),
        ]
        for t in clients:
            t.start()
        result = run_guest(
            PORTS_SCRIPT,
            vm="uml",
            devices=[VhostUserDevice(str(server.socket), 3)],
            timeout=TIMEOUT,
            assets=guest_assets,
        )
    for t in clients:
        t.join(10)
    out = result.section()
    assert result.ok, result.output[-3000:]
    assert "NAME vport0p1 org.test.one" in out and "NAME vport0p2 port2" in out, out
    assert "SIZE 33 99" in out, out  # rows cols: the RESIZE message, in the spec's order
    assert "P1 reply-one" in out, out
    assert "P0 reply-console" in out, out
    assert got[f"{base}.1"] == b"to port one\n"
    assert b"console READY0\n" in got[f"{base}.0"]


@pytest.mark.normative(N_OP_DRV)
@pytest.mark.parametrize("ports", [1, 2])
def test_uml_console_on_a_pty_and_resize(
    tmp_path: Path, guest_assets: GuestAssets, ports: int
) -> None:
    with console_server(tmp_path, "--pty", "--ports", str(ports)) as server:
        deadline = time.monotonic() + 10
        match = None
        while match is None and time.monotonic() < deadline:
            match = re.search(r"port 0 on (/dev/pts/\d+)", server.log_text())
            time.sleep(0.05)
        assert match is not None, server.log_text()
        slave = os.open(match.group(1), os.O_RDWR | os.O_NOCTTY)
        seen = bytearray()

        def host_side() -> None:
            # Once the guest is ready: a new window size, then a line for the guest.
            end = time.monotonic() + TIMEOUT
            while b"READY" not in seen and time.monotonic() < end:
                try:
                    seen.extend(os.read(slave, 4096))
                except OSError:
                    return
            fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 37, 101, 0, 0))
            os.write(slave, b"host-line\n")

        thread = threading.Thread(target=host_side, daemon=True)
        thread.start()
        try:
            result = run_guest(
                RESIZE_SCRIPT,
                vm="uml",
                devices=[VhostUserDevice(str(server.socket), 3)],
                timeout=TIMEOUT,
                assets=guest_assets,
            )
        finally:
            thread.join(5)
            os.close(slave)
    out = result.section()
    assert result.ok, result.output[-3000:]
    assert b"READY" in seen
    if ports > 1:
        # The console's first size comes with CONSOLE_PORT (a RESIZE message); a
        # single-port Linux guest reads cols and rows only on a config change.
        assert "SIZE0 24 80" in out, out
    assert "SIZE1 37 101" in out, out  # through the config space (1 port) or RESIZE (2)
    assert "GOT host-line" in out, out
