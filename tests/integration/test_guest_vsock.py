"""A real Linux guest's vsock (virtio transport) against `virtio serve vsock`.

The guest is User-Mode Linux (``virtio_uml.device=SOCK:19``) or QEMU TCG
(``vhost-user-vsock-pci``, which reads ``guest_cid`` from the back-end).

The guest runs the host's ``socat`` (through ``hostrun``): it connects to
host port 5000 (the Unix socket ``UDS_PATH_5000`` here) and sends and
receives a file; it listens on port 6000, which the test reaches through
``UDS_PATH`` with ``CONNECT 6000``; and it exchanges seqpacket messages with
``UDS_PATH_7000``, a seqpacket Unix socket. Both ends compare MD5 sums.

The TCP test (UML) forwards without ``--uds-path``: the guest's port 5100
goes to a TCP server on 127.0.0.1 (``--forward-tcp``), port 5101 to a closed
TCP port (refused), and a TCP client reaches the guest's port 6100
(``--listen-tcp``).
"""

from __future__ import annotations

import contextlib
import hashlib
import re
import secrets
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.integration.conftest import ServeProcess
from virtio.vm import GuestAssets, VhostUserDevice, run_guest

pytestmark = pytest.mark.guest

VSOCK = "Device Types / Socket Device"
N_RXTX_DEV = f"devicenormative:{VSOCK} / Device Operation / Receive and Transmit"
N_CREDIT_DEV = f"devicenormative:{VSOCK} / Device Operation / Buffer Space Management"
N_FEAT_DEV = f"devicenormative:{VSOCK} / Feature bits"
TIMEOUT = 90.0
CID = 3


def _vm_addr(port: int, cid: int) -> str:
    """socat's generic address bytes of a ``sockaddr_vm`` after its family."""
    data = bytes(2) + port.to_bytes(4, "little") + cid.to_bytes(4, "little") + bytes(4)
    return "x" + data.hex()


SCRIPT = f"""
echo "FEATURES $(cat /sys/bus/virtio/devices/*/features)"
dd if=/dev/urandom of=/tmp/up bs=1k count=512 2>/dev/null
echo "UP $(md5sum < /tmp/up | cut -d' ' -f1)"
hostrun /usr/bin/socat -t 10 - VSOCK-CONNECT:2:5000 < /tmp/up > /tmp/down
echo "RC1 $?"
echo "DOWN $(md5sum < /tmp/down | cut -d' ' -f1) $(wc -c < /tmp/down)"
dd if=/dev/urandom of=/tmp/g2h bs=1k count=256 2>/dev/null
echo "G2H $(md5sum < /tmp/g2h | cut -d' ' -f1)"
echo LISTENING
hostrun /usr/bin/socat -t 10 VSOCK-LISTEN:6000 - < /tmp/g2h > /tmp/h2g
echo "RC2 $?"
echo "H2G $(md5sum < /tmp/h2g | cut -d' ' -f1) $(wc -c < /tmp/h2g)"
printf 'message-one' | hostrun /usr/bin/socat -v -t 10 - \\
  SOCKET-CONNECT:40:0:{_vm_addr(7000, 2)},socktype=5 > /tmp/seq 2> /tmp/seq.log
echo "RC3 $?"
echo "SEQ $(cat /tmp/seq)"
grep -o 'length=[0-9]*' /tmp/seq.log | sed 's/^/SEQLEN /'
"""


class Peer(threading.Thread):
    """A host program on one side of the test, failures kept for the test to raise."""

    def __init__(self, target: Callable[[], None]) -> None:
        super().__init__(daemon=True)
        self.body = target
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self.body()
        except BaseException as err:
            self.error = err


def _listener(path: str, kind: int) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, kind)
    s.bind(path)
    s.listen(1)
    s.settimeout(TIMEOUT)
    return s


def _recv_all(conn: socket.socket) -> bytes:
    chunks = []
    while chunk := conn.recv(1 << 16):
        chunks.append(chunk)
    return b"".join(chunks)


@contextlib.contextmanager
def vsock_server(tmp_path: Path) -> Iterator[tuple[ServeProcess, str]]:
    uds = str(tmp_path / "uds")
    server = ServeProcess(
        None,
        tmp_path / "vsock.sock",
        ["--guest-cid", str(CID), "--uds-path", uds],
        tmp_path / "serve.log",
        kind="vsock",
    )
    server.start()
    try:
        yield server, uds
    finally:
        server.stop()


def _md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


@pytest.mark.normative(N_RXTX_DEV, N_CREDIT_DEV, N_FEAT_DEV)
@pytest.mark.parametrize("vm", ["uml", "qemu"])
def test_guest_vsock_stream_and_seqpacket(
    tmp_path: Path, guest_assets: GuestAssets, vm: str
) -> None:
    down = secrets.token_bytes(384 << 10)
    h2g = secrets.token_bytes(320 << 10)
    seen: dict[str, object] = {}
    with vsock_server(tmp_path) as (server, uds):
        stream_l = _listener(f"{uds}_5000", socket.SOCK_STREAM)
        seq_l = _listener(f"{uds}_7000", socket.SOCK_SEQPACKET)

        def guest_connects() -> None:
            conn, _ = stream_l.accept()
            conn.settimeout(TIMEOUT)
            seen["up"] = _recv_all(conn)  # until the guest's SHUTDOWN
            conn.sendall(down)
            conn.close()

        def host_connects() -> None:
            deadline = time.monotonic() + TIMEOUT
            while time.monotonic() < deadline:
                c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                c.settimeout(TIMEOUT)
                try:
                    c.connect(uds)  # there once the guest's driver is up
                except OSError:
                    c.close()
                    time.sleep(0.2)
                    continue
                c.sendall(b"CONNECT 6000\n")
                line = b""
                while not line.endswith(b"\n") and (byte := c.recv(1)):
                    line += byte
                if line.startswith(b"OK "):
                    seen["ok"] = line
                    c.sendall(h2g)
                    c.shutdown(socket.SHUT_WR)
                    seen["g2h"] = _recv_all(c)
                    c.close()
                    return
                c.close()  # the guest is not listening yet (RST): try again
                time.sleep(0.2)
            raise TimeoutError("the guest never listened on port 6000")

        def seqpacket() -> None:
            conn, _ = seq_l.accept()
            conn.settimeout(TIMEOUT)
            messages = []
            while msg := conn.recv(1 << 16):
                messages.append(msg)
            seen["messages"] = messages
            conn.send(b"a" * 3000)
            conn.send(b"b" * 6000)  # more than one rx buffer: still one message
            time.sleep(0.5)
            conn.close()

        peers = [Peer(guest_connects), Peer(host_connects), Peer(seqpacket)]
        for p in peers:
            p.start()
        result = run_guest(
            SCRIPT,
            vm=vm,  # type: ignore[arg-type]
            devices=[VhostUserDevice(str(server.socket), 19, "vhost-user-vsock-pci")],
            timeout=TIMEOUT if vm == "uml" else 2 * TIMEOUT,
            host_share=True,
            assets=guest_assets,
        )
        for p in peers:
            p.join(10)
        for s in (stream_l, seq_l):
            s.close()
        log = server.log_text()
    out = result.section()
    context = f"{result.output[-3000:]}\n{log[-3000:]}"
    assert result.ok, context
    for p in peers:
        assert p.error is None, f"{p.error!r}\n{context}"
    values = dict(re.findall(r"^(UP|DOWN|G2H|H2G|SEQ|RC\d) (.*)$", out, re.M))
    assert values["RC1"] == "0" and values["RC2"] == "0" and values["RC3"] == "0", context
    # Stream, guest to host and back.
    up = seen["up"]
    assert isinstance(up, bytes) and _md5(up) == values["UP"], context
    assert values["DOWN"] == f"{_md5(down)} {len(down)}", context
    # Stream, host to guest (CONNECT 6000) and back.
    assert values["H2G"] == f"{_md5(h2g)} {len(h2g)}", context
    g2h = seen["g2h"]
    assert isinstance(g2h, bytes) and _md5(g2h) == values["G2H"], context
    ok = seen["ok"]
    assert isinstance(ok, bytes) and re.fullmatch(rb"OK \d+\n", ok)
    # Seqpacket: message boundaries both ways.
    assert seen["messages"] == [b"message-one"], context
    assert values["SEQ"] == "a" * 3000 + "b" * 6000, context
    lengths = re.findall(r"^SEQLEN length=(\d+)$", out, re.M)
    assert "3000" in lengths and "6000" in lengths, out


TCP_SCRIPT = """
dd if=/dev/urandom of=/tmp/up bs=1k count=512 2>/dev/null
echo "UP $(md5sum < /tmp/up | cut -d' ' -f1)"
hostrun /usr/bin/socat -t 10 - VSOCK-CONNECT:2:5100 < /tmp/up > /tmp/down
echo "RC1 $?"
echo "DOWN $(md5sum < /tmp/down | cut -d' ' -f1) $(wc -c < /tmp/down)"
hostrun /usr/bin/socat -t 5 /dev/null VSOCK-CONNECT:2:5101 2> /dev/null
echo "RC3 $?"
dd if=/dev/urandom of=/tmp/g2h bs=1k count=256 2>/dev/null
echo "G2H $(md5sum < /tmp/g2h | cut -d' ' -f1)"
hostrun /usr/bin/socat -t 10 VSOCK-LISTEN:6100 - < /tmp/g2h > /tmp/h2g
echo "RC2 $?"
echo "H2G $(md5sum < /tmp/h2g | cut -d' ' -f1) $(wc -c < /tmp/h2g)"
"""


@pytest.mark.normative(N_RXTX_DEV, N_CREDIT_DEV)
def test_guest_vsock_tcp_forwarding(tmp_path: Path, guest_assets: GuestAssets) -> None:
    """--forward-tcp and --listen-tcp with a UML guest's socat, no --uds-path."""
    down = secrets.token_bytes(384 << 10)
    h2g = secrets.token_bytes(320 << 10)
    seen: dict[str, bytes] = {}
    target = socket.create_server(("127.0.0.1", 0))
    target.settimeout(TIMEOUT)
    with socket.create_server(("127.0.0.1", 0)) as s:
        closed_port = s.getsockname()[1]  # nobody listens there: the guest gets an RST
    server = ServeProcess(
        None,
        tmp_path / "vsock.sock",
        [
            *("--guest-cid", str(CID)),
            *("--forward-tcp", f"5100=127.0.0.1:{target.getsockname()[1]}"),
            *("--forward-tcp", f"5101=127.0.0.1:{closed_port}"),
            *("--listen-tcp", "127.0.0.1:0=6100"),  # the port it picks is in the log
        ],
        tmp_path / "serve.log",
        kind="vsock",
    )
    log = server.log_text

    def guest_connects() -> None:
        conn, _ = target.accept()
        conn.settimeout(TIMEOUT)
        seen["up"] = _recv_all(conn)  # until the guest's SHUTDOWN
        conn.sendall(down)
        conn.close()

    def host_connects() -> None:
        deadline = time.monotonic() + TIMEOUT
        port = None
        while time.monotonic() < deadline:
            if port is None:
                found = re.search(r"listening on 127\.0\.0\.1:(\d+) for guest port 6100", log())
                port = int(found[1]) if found else None
                time.sleep(0.2)
                continue
            c = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)
            # The guest's socat sends first: end of file means the guest refused.
            first = c.recv(1 << 16)
            if first:
                c.sendall(h2g)
                c.shutdown(socket.SHUT_WR)
                seen["g2h"] = first + _recv_all(c)
                c.close()
                return
            c.close()  # the guest is not listening yet: try again
            time.sleep(0.2)
        raise TimeoutError("the guest never listened on port 6100")

    server.start()
    try:
        peers = [Peer(guest_connects), Peer(host_connects)]
        for p in peers:
            p.start()
        result = run_guest(
            TCP_SCRIPT,
            vm="uml",
            devices=[VhostUserDevice(str(server.socket), 19, "vhost-user-vsock-pci")],
            timeout=TIMEOUT,
            host_share=True,
            assets=guest_assets,
        )
        for p in peers:
            p.join(10)
    finally:
        target.close()
        server.stop()
    out = result.section()
    context = f"{result.output[-3000:]}\n{log()[-3000:]}"
    assert result.ok, context
    for p in peers:
        assert p.error is None, f"{p.error!r}\n{context}"
    values = dict(re.findall(r"^(UP|DOWN|G2H|H2G|RC\d) (.*)$", out, re.M))
    assert values["RC1"] == "0" and values["RC2"] == "0", context
    # Guest to TCP and back.
    assert _md5(seen["up"]) == values["UP"], context
    assert values["DOWN"] == f"{_md5(down)} {len(down)}", context
    # A refused TCP connect: the guest's connect fails.
    assert values["RC3"] != "0", context
    assert f"guest connection to port 5101 refused: 127.0.0.1:{closed_port}" in log(), context
    # TCP client to the guest's listener and back.
    assert values["H2G"] == f"{_md5(h2g)} {len(h2g)}", context
    assert _md5(seen["g2h"]) == values["G2H"], context
