"""Linux guests under QEMU TCG on device types QEMU 7.2 has no vhost-user front-end for.

`virtio serve console|balloon --transport pci` serve modern PCI functions and
`virtio qemu --pci ...` attaches them to the guest, so Linux's virtio_pci
drives our transport and virtio_console / virtio_balloon drive the devices:
the console carries data both ways on port 0 (/dev/hvc0) and port 1
(/dev/vport0p1); the balloon inflates to a target set through its control
socket and the guest's memory follows. SCSI goes through QEMU's own
vhost-user-scsi-pci front-end instead, and the guest's dd data reaches the
image.
"""

from __future__ import annotations

import hashlib
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.integration.conftest import ServeProcess
from virtio.control import request
from virtio.vm import GuestAssets, GuestResult, VhostUserDevice, run_guest

pytestmark = pytest.mark.guest

CONSOLE = "Device Types / Console Device"
N_CONSOLE_MULTI_DEV = f"devicenormative:{CONSOLE} / Device Operation / Multiport Device Operation"
BALLOON = "Device Types / Memory Balloon Device"
N_BALLOON_OP_DEV = f"devicenormative:{BALLOON} / Device Operation"
SCSI = "Device Types / SCSI Host Device"
N_SCSI_REQ_DEV = f"devicenormative:{SCSI} / Device Operation / Device Operation: Request Queues"

TIMEOUT = 85.0
MIB = 1 << 20

# The guest's view of our PCI functions: device id, revision, driver.
PCI_LIST = """
for d in /sys/bus/pci/devices/*; do
  [ "$(cat $d/vendor)" = 0x1af4 ] || continue
  echo "PCI $(cat $d/device) $(cat $d/revision) $(basename $(readlink $d/driver))"
done
"""


def pci_launcher(*sockets: Path) -> list[str]:
    launcher = [sys.executable, "-m", "virtio.cli", "qemu"]
    for sock in sockets:
        launcher += ["--pci", str(sock)]
    return [*launcher, "--"]


@contextmanager
def serving(kind: str, sock: Path, log: Path, *args: str) -> Iterator[ServeProcess]:
    server = ServeProcess(None, sock, list(args), log, kind=kind)
    server.start()
    try:
        yield server
    finally:
        server.stop()


def check_guest(result: GuestResult, server: ServeProcess, extra: str = "") -> str:
    """The script's output, once the guest finished it cleanly and the server was fine."""
    log = server.log_text()
    context = f"{result.output[-4000:]}\n{extra}\nserve log:\n{log[-3000:]}"
    assert not result.timed_out, f"guest timed out:\n{context}"
    assert result.exit_code == 0, f"guest script failed:\n{context}"
    assert "Traceback" not in log and "DEVICE_NEEDS_RESET" not in log, context
    return result.section()


def pci_functions(out: str) -> dict[str, list[str]]:
    return {f[1]: f[2:] for f in (line.split() for line in out.splitlines()) if f[:1] == ["PCI"]}


# ---------------------------------------------------------------- console

# Each port is opened once for reading and writing: Linux drops a port's
# unread input when it closes it, and hvc looks for input only while open.
CONSOLE_SCRIPT = (
    PCI_LIST
    + """
echo "PORTS $(ls /sys/class/virtio-ports | tr '\\n' ' ')"
for f in /sys/class/virtio-ports/*; do
  [ -f $f/name ] && echo "NAME ${f##*/} $(cat $f/name)"
done
p1=$(ls /dev/vport*p1)
exec 3<>$p1
echo "to port one" >&3
echo "P1 $(busybox timeout 20 head -n 1 <&3)"
exec 4<>/dev/hvc0
busybox stty raw -echo <&4
echo "console READY0" >&4
echo "P0 $(busybox timeout 20 head -n 1 <&4)"
"""
)


def _answer(path: Path, wait_for: bytes, reply: bytes, got: dict[str, bytes]) -> None:
    """A host program on one port: wait for the guest's line, answer it, keep reading."""
    deadline = time.monotonic() + 10
    while not path.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    buf = b""
    try:
        with socket.socket(socket.AF_UNIX) as client:
            client.connect(str(path))
            client.settimeout(TIMEOUT)
            replied = False
            while data := client.recv(4096):
                buf += data
                if wait_for in buf and not replied:
                    client.sendall(reply)
                    replied = True
    except OSError:
        pass
    finally:
        got[path.name] = buf


@pytest.mark.normative(N_CONSOLE_MULTI_DEV)
def test_qemu_console_ports_over_pyvirtio_pci(tmp_path: Path, guest_assets: GuestAssets) -> None:
    sock, base = tmp_path / "vc.sock", tmp_path / "con"
    got: dict[str, bytes] = {}
    with serving(
        "console", sock, tmp_path / "serve.log",
        "--transport", "pci", "--unix", str(base), "--ports", "2", "--name", "org.test.one",
    ) as server:  # fmt: skip
        clients = [
            threading.Thread(
                target=_answer, args=(Path(f"{base}.1"), b"to port one\n", b"reply-one\n", got)
            ),
            threading.Thread(
                target=_answer, args=(Path(f"{base}.0"), b"READY0", b"reply-console\n", got)
            ),
        ]
        for t in clients:
            t.start()
        result = run_guest(
            CONSOLE_SCRIPT,
            vm="qemu",
            timeout=TIMEOUT,
            assets=guest_assets,
            launcher=pci_launcher(sock),
        )
        # The server's stop closes the port sockets: the clients end.
    for t in clients:
        t.join(10)
    out = check_guest(result, server, f"host got: {got}")
    # A modern function (0x1040 + 3) on our transport, driven by virtio-pci.
    assert pci_functions(out)["0x1043"] == ["0x01", "virtio-pci"], out
    # The ports the device added (each once, below max_nr_ports), port 1 by its name.
    ports = [line.split()[1:] for line in out.splitlines() if line.startswith("PORTS ")]
    assert ports == [["vport0p0", "vport0p1"]] and "NAME vport0p1 org.test.one" in out, out
    # Guest -> host on both ports, and host -> guest.
    assert got["con.1"] == b"to port one\n", got
    assert b"console READY0\n" in got["con.0"], got
    assert "P1 reply-one" in out, out
    assert "P0 reply-console" in out, out


# ---------------------------------------------------------------- balloon

TARGET_MB = 64
PAGES = TARGET_MB << 8

# A QEMU guest has no hostfs: the host tells the guest each step through files
# it creates in a directory the guest reads over the read-only 9p share, and
# learns that the guest is ready by watching its serial output (a `tee` around
# the launcher). Without DEFLATE_ON_OOM the driver takes inflated pages out of
# MemTotal.
BALLOON_SCRIPT = (
    PCI_LIST
    + """
total() { awk '/^MemTotal:/ {print $2}' /proc/meminfo; }
wait_for() { for i in $(seq 300); do [ -e /host{dir}/$1 ] && return 0; sleep 0.1; done; return 1; }
echo "BEFORE $(total)"
echo "GUEST-READY"
wait_for inflated
echo "INFLATED $(total)"
echo "GUEST-SEEN"
wait_for deflated
echo "DEFLATED $(total)"
"""
)


def _status(ctl: Path) -> dict[str, int]:
    return {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", request(ctl, "status", timeout=5))}


def _set(ctl: Path, size: str) -> str:
    """`virtio balloon set SIZE --control CTL`, the user's command."""
    done = subprocess.run(
        [sys.executable, "-m", "virtio.cli", "balloon", "set", size, "--control", str(ctl)],
        capture_output=True,
        text=True,
        timeout=20,
    )
    return f"rc={done.returncode} {done.stdout.strip()} {done.stderr.strip()}"


def _drive(ctl: Path, marks: Path, console: Path, log: list[str], stop: threading.Event) -> None:
    """Inflate once the guest has its baseline, deflate once the guest saw it."""

    def wait_for(what: str, check: Callable[[], bool], timeout: float = 60) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not stop.is_set():
            if check():
                log.append(f"{what}: {_status(ctl)}")
                return True
            time.sleep(0.1)
        log.append(f"timed out waiting for {what}")
        return False

    def printed(line: str) -> Callable[[], bool]:
        # A whole line of the serial output (bytes: text mode would translate its CRLF).
        return lambda: console.exists() and f"\n{line}\r\n".encode() in console.read_bytes()

    if not wait_for("ready", printed("GUEST-READY")):
        return
    log.append(_set(ctl, f"{TARGET_MB}M"))
    if not wait_for("inflated", lambda: _status(ctl).get("actual") == PAGES):
        return
    (marks / "inflated").touch()
    if not wait_for("seen", printed("GUEST-SEEN")):
        return
    log.append(_set(ctl, "0"))
    if wait_for("deflated", lambda: _status(ctl).get("actual") == 0):
        (marks / "deflated").touch()


@pytest.mark.normative(N_BALLOON_OP_DEV)
def test_qemu_balloon_over_pyvirtio_pci_follows_the_target(
    tmp_path: Path, guest_assets: GuestAssets
) -> None:
    sock, ctl = tmp_path / "vb.sock", tmp_path / "ctl.sock"
    marks, console = tmp_path / "marks", tmp_path / "console.out"
    marks.mkdir()
    host_log: list[str] = []
    stop = threading.Event()
    # Linux kicks the statistics queue before DRIVER_OK: the device serves it then.
    with serving(
        "balloon", sock, tmp_path / "serve.log",
        "--transport", "pci", "--control", str(ctl), "--no-deflate-on-oom",
        "--stats-interval", "1",
    ) as server:  # fmt: skip
        driver = threading.Thread(
            target=_drive, args=(ctl, marks, console, host_log, stop), daemon=True
        )
        driver.start()
        # The serial output goes to run_guest's log and, through tee, to `console`.
        tee = ["sh", "-c", '"$@" 2>&1 | tee "$0"', str(console)]
        try:
            result = run_guest(
                BALLOON_SCRIPT.replace("{dir}", str(marks)),
                vm="qemu",
                timeout=TIMEOUT,
                memory_mb=256,
                host_share=True,
                assets=guest_assets,
                launcher=[*tee, *pci_launcher(sock)],
            )
        finally:
            stop.set()
            driver.join(20)
    out = check_guest(result, server, f"host: {host_log}")
    context = f"{out}\nhost: {host_log}"
    assert pci_functions(out)["0x1045"] == ["0x01", "virtio-pci"], context
    assert any(line.startswith("rc=0") and f"{PAGES} pages" in line for line in host_log), context
    mem = {f[0]: int(f[1]) for f in (line.split() for line in out.splitlines()) if len(f) == 2}
    # MemTotal (KiB) dropped by the balloon's size and came back.
    assert abs(mem["BEFORE"] - mem["INFLATED"] - (TARGET_MB << 10)) < 1024, context
    assert abs(mem["DEFLATED"] - mem["BEFORE"]) < 1024, context


# ---------------------------------------------------------------- scsi

PATTERN = "pyvirtio-scsi-over-qemu-"

SCSI_SCRIPT = f"""
set -e
for i in $(seq 200); do [ -b /dev/sda ] && break; sleep 0.1; done
d=/sys/class/scsi_disk/0:0:0:0/device
echo "DISK $(cat $d/vendor) $(cat /sys/block/sda/size)"
for i in 0 1 2 3; do
  echo "{PATTERN}$i" | dd of=/dev/sda bs=4096 seek=$((i * 7)) conv=sync,fsync 2>/dev/null
done
dd if=/dev/urandom of=/tmp/big bs=64k count=16 2>/dev/null
dd if=/tmp/big of=/dev/sda bs=64k seek=64 oflag=direct 2>/dev/null
sync
echo 3 > /proc/sys/vm/drop_caches
for i in 0 1 2 3; do
  got=$(dd if=/dev/sda bs=4096 skip=$((i * 7)) count=1 iflag=direct 2>/dev/null | head -c 25)
  test "$got" = "{PATTERN}$i"
done
echo "BIG $(md5sum < /tmp/big | cut -d' ' -f1) \
$(dd if=/dev/sda bs=64k skip=64 count=16 iflag=direct 2>/dev/null | md5sum | cut -d' ' -f1)"
"""


@pytest.mark.normative(N_SCSI_REQ_DEV)
def test_qemu_scsi_over_vhost_user_scsi_pci(tmp_path: Path, guest_assets: GuestAssets) -> None:
    image = tmp_path / "lun0.img"
    with open(image, "wb") as f:
        f.truncate(16 * MIB)
    sock = tmp_path / "scsi.sock"
    with serving("scsi", sock, tmp_path / "serve.log", str(image)) as server:
        result = run_guest(
            SCSI_SCRIPT,
            vm="qemu",
            timeout=TIMEOUT,
            assets=guest_assets,
            devices=[VhostUserDevice(str(sock), 8, qemu_device="vhost-user-scsi-pci")],
        )
    out = check_guest(result, server)
    disk = [line.split() for line in out.splitlines() if line.startswith("DISK ")]
    assert disk == [["DISK", "PYVIRTIO", str(16 * MIB // 512)]], out
    data = image.read_bytes()
    for i in range(4):
        assert data[i * 7 * 4096 :].startswith(f"{PATTERN}{i}".encode()), i
    (big,) = [line.split()[1:] for line in out.splitlines() if line.startswith("BIG ")]
    on_disk = hashlib.md5(data[64 * 65536 : 80 * 65536]).hexdigest()
    assert big == [on_disk, on_disk], (big, on_disk)
