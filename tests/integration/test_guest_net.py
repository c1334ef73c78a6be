"""Real Linux guests' virtio_net drivers against `virtio serve net`.

Two guests (User-Mode Linux or QEMU TCG) are joined by the built-in switch,
or one guest reaches the host end of a TAP inside a network namespace the
test makes itself. The guests configure addresses from TEST-NET-1
(192.0.2.0/24), ping, and move data by TCP with busybox ``nc``; the host
checks what arrived, the pcap file (read back by ``tshark``) and the
device's own counters.
"""

from __future__ import annotations

import contextlib
import re
import secrets
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.integration.conftest import ServeProcess
from virtio.vm import GuestAssets, GuestResult, VhostUserNic, run_guest

pytestmark = pytest.mark.guest

NET = "Device Types / Network Device"
N_TX_DEV = f"devicenormative:{NET} / Device Operation / Packet Transmission"
N_RXBUF_DEV = f"devicenormative:{NET} / Device Operation / Setting Up Receive Buffers"
N_RX_DEV = f"devicenormative:{NET} / Device Operation / Processing of Incoming Packets"
N_MQ_DEV = (
    f"devicenormative:{NET} / Device Operation / Control Virtqueue / "
    "Automatic receive steering in multiqueue mode"
)

MAC_A = "52:54:00:00:00:0a"
MAC_B = "52:54:00:00:00:0b"
TIMEOUT = {"uml": 60.0, "qemu": 120.0}
DATA_KB = 2048

SENDER = """
ip link set eth0 up
ip addr add {addr}/24 dev eth0
{setup}
for i in $(seq 60); do ping -c 1 -W 1 {peer} >/dev/null 2>&1 && break; done
ping -c 3 -W 2 {peer}; echo "PING-RC $?"
dd if=/dev/urandom of=/tmp/data bs=1k count={kb} 2>/dev/null
echo "SENT $(md5sum < /tmp/data | cut -d' ' -f1)"
for i in $(seq 40); do nc -w 10 {peer} 5000 < /tmp/data && break; sleep 0.5; done
echo "NC-RC $?"
ls /sys/class/net/eth0/queues
echo "MAC $(cat /sys/class/net/eth0/address)"
"""

RECEIVER = """
ip link set eth0 up
ip addr add {addr}/24 dev eth0
{setup}
timeout {wait} nc -l -p 5000 > /tmp/got
echo "GOT $(md5sum < /tmp/got | cut -d' ' -f1) $(wc -c < /tmp/got)"
sleep 2
"""


@dataclass
class NetServer(ServeProcess):
    """A `virtio serve net` process on one or more sockets."""

    sockets: tuple[Path, ...] = ()

    def counters(self) -> list[str]:
        return re.findall(r"virtio\.net INFO (.*)", self.log_text())


@contextlib.contextmanager
def net_server(
    tmp_path: Path, count: int, *extra: str, netns: str | None = None
) -> Iterator[NetServer]:
    sockets = tuple(tmp_path / f"n{i}.sock" for i in range(count))
    args = [a for s in sockets[1:] for a in ("--socket", str(s))]
    server = NetServer(
        image=None,
        socket=sockets[0],
        args=[*args, *extra],
        log=tmp_path / "serve.log",
        kind="net",
        sockets=sockets,
    )
    if netns is not None:
        server.prefix = ["ip", "netns", "exec", netns]
    server.start()
    deadline = time.monotonic() + 10
    while not all(s.exists() for s in sockets) and time.monotonic() < deadline:
        time.sleep(0.05)
    try:
        yield server
    finally:
        server.stop()


def guests(
    assets: GuestAssets,
    vm: str,
    plans: list[tuple[str, VhostUserNic | Path]],
    *,
    host_share: bool = False,
) -> list[GuestResult]:
    """Boot the guests at once (each in a thread); results in the order given.

    Each plan's NIC is a vhost-user one, or the socket of a PCI function that
    `virtio qemu --pci` attaches.
    """
    results: list[GuestResult | None] = [None] * len(plans)

    def boot(i: int, script: str, nic: VhostUserNic | Path) -> None:
        launcher: list[str] = []
        nics: list[VhostUserNic] = []
        if isinstance(nic, Path):
            launcher = [sys.executable, "-m", "virtio.cli", "qemu", "--pci", str(nic), "--"]
        else:
            nics = [nic]
        results[i] = run_guest(
            script,
            vm=vm,  # type: ignore[arg-type]
            nics=nics,
            timeout=TIMEOUT[vm],
            assets=assets,
            host_share=host_share,
            launcher=launcher,
        )

    threads = [
        threading.Thread(target=boot, args=(i, script, nic))
        for i, (script, nic) in enumerate(plans)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    out = [r for r in results if r is not None]
    assert len(out) == len(plans)
    return out


def check_transfer(sender: GuestResult, receiver: GuestResult, server: NetServer) -> None:
    logs = (
        f"{sender.output[-2500:]}\n---\n{receiver.output[-2500:]}\n---\n{server.log_text()[-3000:]}"
    )
    assert not sender.timed_out and not receiver.timed_out, logs
    assert "PING-RC 0" in sender.output and "3 packets received" in sender.output, logs
    sent = re.search(r"SENT ([0-9a-f]{32})", sender.output)
    got = re.search(r"GOT ([0-9a-f]{32}) +(\d+)", receiver.output)
    assert sent and got, logs
    assert got.group(1) == sent.group(1) and int(got.group(2)) == DATA_KB * 1024, logs


def tshark(*args: str) -> str:
    return subprocess.run(
        ["tshark", *args], capture_output=True, text=True, timeout=60, check=True
    ).stdout


@pytest.mark.normative(N_TX_DEV, N_RXBUF_DEV, N_RX_DEV)
def test_two_uml_guests_through_the_switch(guest_assets: GuestAssets, tmp_path: Path) -> None:
    pcap = tmp_path / "frames.pcap"
    with net_server(tmp_path, 2, "--switch", "--pcap", str(pcap)) as server:
        a, b = server.sockets
        sender, receiver = guests(
            guest_assets,
            "uml",
            [
                (
                    SENDER.format(addr="192.0.2.1", peer="192.0.2.2", kb=DATA_KB, setup=""),
                    VhostUserNic(str(a)),
                ),
                (RECEIVER.format(addr="192.0.2.2", wait=50, setup=""), VhostUserNic(str(b))),
            ],
        )
    check_transfer(sender, receiver, server)
    # The pcap file holds what crossed the switch: the pings both ways, the TCP stream.
    icmp = tshark("-r", str(pcap), "-Y", "icmp", "-T", "fields", "-e", "icmp.type").split()
    assert icmp.count("8") >= 3 and icmp.count("8") == icmp.count("0")
    tcp_bytes = tshark(
        "-r", str(pcap), "-Y", "tcp.dstport == 5000", "-T", "fields", "-e", "tcp.len"
    ).split()
    assert sum(int(n) for n in tcp_bytes if n) >= DATA_KB * 1024
    macs = set(tshark("-r", str(pcap), "-T", "fields", "-e", "eth.src").split())
    assert {"52:54:00:12:34:56", "52:54:00:12:34:57"} <= macs


N_CONFIG_DRV = f"drivernormative:{NET} / Device configuration layout"


@pytest.mark.normative(N_TX_DEV, N_RX_DEV, N_CONFIG_DRV)
def test_two_qemu_guests_on_pyvirtio_pci_functions(
    guest_assets: GuestAssets, tmp_path: Path
) -> None:
    """Linux's virtio_pci + virtio_net on our own PCI transport, one switch between."""
    with net_server(tmp_path, 2, "--switch", "--transport", "pci") as server:
        a, b = server.sockets
        sender, receiver = guests(
            guest_assets,
            "qemu",
            [
                (SENDER.format(addr="192.0.2.1", peer="192.0.2.2", kb=DATA_KB, setup=""), a),
                (RECEIVER.format(addr="192.0.2.2", wait=100, setup=""), b),
            ],
        )
    check_transfer(sender, receiver, server)
    # With VIRTIO_NET_F_MAC the NIC's address is the device's (here: ours, in config).
    assert "MAC 52:54:00:12:34:56" in sender.output, sender.output[-2000:]


# The host's ethtool, run in the guest from the read-only share: two queue pairs
# (the guest has one CPU, so Linux starts with one), and the offloads in force.
ETHTOOL = """
hostrun /usr/sbin/ethtool -L eth0 combined 2; echo "ETHTOOL-L $?"
hostrun /usr/sbin/ethtool -k eth0 | grep -E '^(tcp-segmentation-offload|tx-checksumming|rx-checksumming):'
"""


@pytest.mark.normative(N_TX_DEV, N_RX_DEV, N_MQ_DEV)
def test_two_qemu_guests_with_offloads_and_two_queue_pairs(
    guest_assets: GuestAssets, tmp_path: Path
) -> None:
    with net_server(tmp_path, 2, "--switch", "--queues", "2") as server:
        a, b = server.sockets
        sender, receiver = guests(
            guest_assets,
            "qemu",
            [
                (
                    SENDER.format(addr="192.0.2.1", peer="192.0.2.2", kb=DATA_KB, setup=ETHTOOL),
                    VhostUserNic(str(a), queues=2, mac=MAC_A),
                ),
                (
                    RECEIVER.format(addr="192.0.2.2", wait=100, setup=ETHTOOL),
                    VhostUserNic(str(b), queues=2, mac=MAC_B),
                ),
            ],
            host_share=True,
        )
    check_transfer(sender, receiver, server)
    for guest in (sender, receiver):
        # The driver set up both queue pairs (VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET, which
        # QEMU turns into SET_VRING_ENABLE of the second pair) and uses offloads.
        assert "ETHTOOL-L 0" in guest.output, guest.output[-2000:]
        assert "tcp-segmentation-offload: on" in guest.output, guest.output[-2000:]
        assert "tx-checksumming: on" in guest.output and "rx-checksumming: on" in guest.output
    assert re.search(r"rx-0\s+rx-1\s+tx-0\s+tx-1", sender.output), sender.output[-2000:]
    # TSO was used: the sender's device saw GSO frames, which the switch carried as
    # they were to the receiver's guest (GUEST_TSO4), so nothing was segmented here.
    lines = server.counters()
    sent = [int(m) for line in lines for m in re.findall(r"sent \d+ frames \((\d+) GSO", line)]
    got = [int(m) for line in lines for m in re.findall(r"received \d+ \((\d+) GSO", line)]
    assert sent and max(sent) > 0, lines
    assert got and max(got) > 0, lines


@contextlib.contextmanager
def namespace_with_tap(tap: str) -> Iterator[str]:
    """A network namespace of our own; the TAP the server makes there gets 192.0.2.1."""
    ns = f"pyv-net-{secrets.token_hex(3)}"
    subprocess.run(["ip", "netns", "add", ns], check=True, timeout=10)
    try:
        subprocess.run(["ip", "-n", ns, "link", "set", "lo", "up"], check=True, timeout=10)
        yield ns
    finally:
        subprocess.run(["ip", "netns", "del", ns], timeout=10, check=False)


def configure_tap(ns: str, tap: str) -> None:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        probe = subprocess.run(["ip", "-n", ns, "link", "show", tap], capture_output=True)
        if probe.returncode == 0:
            break
        time.sleep(0.1)
    subprocess.run(["ip", "-n", ns, "addr", "add", "192.0.2.1/24", "dev", tap], check=True)
    subprocess.run(["ip", "-n", ns, "link", "set", tap, "up"], check=True)


LISTENER = """
import hashlib, socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("192.0.2.1", 5000))
s.listen(1)
s.settimeout(90)
conn, _ = s.accept()
conn.settimeout(30)
h = hashlib.md5()
n = 0
while True:
    data = conn.recv(65536)
    if not data:
        break
    h.update(data)
    n += len(data)
print(h.hexdigest(), n, flush=True)
"""


@pytest.mark.normative(N_TX_DEV)
@pytest.mark.parametrize("vnet_hdr", [True, False], ids=["vnet-hdr", "segmented-here"])
def test_uml_guest_to_the_host_end_of_a_tap(
    guest_assets: GuestAssets, tmp_path: Path, vnet_hdr: bool
) -> None:
    tap = f"pyvt{secrets.token_hex(2)}"
    with namespace_with_tap(tap) as ns:
        flag = "--tap-vnet-hdr" if vnet_hdr else "--no-tap-vnet-hdr"
        with net_server(tmp_path, 1, "--tap", tap, flag, netns=ns) as server:
            configure_tap(ns, tap)
            capture = tmp_path / "tap.pcap"
            dump = subprocess.Popen(
                ["ip", "netns", "exec", ns, "tshark", "-q", "-i", tap, "-w", str(capture)],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            listener = subprocess.Popen(
                ["ip", "netns", "exec", ns, sys.executable, "-c", LISTENER],
                stdout=subprocess.PIPE,
                text=True,
            )
            try:
                (result,) = guests(
                    guest_assets,
                    "uml",
                    [
                        (
                            SENDER.format(addr="192.0.2.2", peer="192.0.2.1", kb=DATA_KB, setup=""),
                            VhostUserNic(str(server.socket)),
                        )
                    ],
                )
                out, _ = listener.communicate(timeout=60)
            finally:
                listener.kill()
                time.sleep(1)
                dump.terminate()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    dump.wait(timeout=10)
    assert "PING-RC 0" in result.output, result.output[-3000:] + server.log_text()
    sent = re.search(r"SENT ([0-9a-f]{32})", result.output)
    assert sent is not None, result.output[-3000:]
    digest, count = out.split()
    assert digest == sent.group(1) and int(count) == DATA_KB * 1024, server.log_text()
    # What the TAP saw: without the vnet header the device segmented the guest's
    # TSO stream itself, so every frame fits the MTU and every checksum is right.
    checks = ["-o", "ip.check_checksum:TRUE", "-o", "tcp.check_checksum:TRUE"]
    fields = tshark(
        "-r",
        str(capture),
        *checks,
        "-Y",
        "tcp.dstport == 5000",
        "-T",
        "fields",
        "-e",
        "frame.len",
        "-e",
        "tcp.checksum.status",
        "-e",
        "ip.checksum.status",
    )
    rows = [line.split("\t") for line in fields.splitlines() if line.strip()]
    assert rows
    if not vnet_hdr:
        assert max(int(r[0]) for r in rows) <= 1514
        assert all(r[1] == "1" and r[2] == "1" for r in rows), rows[:5]
        assert any(
            "segmented here" in line and not re.search(r"0 segmented here", line)
            for line in server.counters()
        ), server.counters()
