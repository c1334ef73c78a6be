"""pyvirtio's console, scsi and balloon drivers against QEMU's own device models, via qtest.

No guest runs: each driver, through qtest and the shared guest RAM, is the
guest, and QEMU 7.2's virtio-serial-pci, virtio-scsi-pci and
virtio-balloon-pci (not written here) are the devices. The host side of each
is QEMU's too: chardev sockets this test connects to, a raw image file, and
QMP (``balloon``, ``qom-set``, ``qom-get``, ``query-balloon``).

What QEMU 7.2 does, as measured here: virtio-serial offers MULTIPORT and
EMERG_WRITE (not SIZE), answers DEVICE_READY with a DEVICE_ADD per port, then
CONSOLE_PORT, PORT_NAME (its name followed by a NUL, which the spec leaves
out) and PORT_OPEN for a connected chardev, and sends PORT_OPEN 0 / 1 as the
host end disconnects and reconnects; an emerg_wr byte goes to port 0's
chardev. virtio-scsi reports a WRITE's used length as response plus
data-out bytes (more than the buffer's writable bytes); a LOGICAL UNIT RESET
leaves a unit attention (29h) for the next command; a TMF for an absent LUN
answers INCORRECT_LUN, for an absent target BAD_TARGET. virtio-balloon
always offers STATS_VQ, punches a hole in the shared RAM file for each page
inflated (the page reads back as zeros), and shows statistics the driver
did not send as u64 all-ones.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.test_qtest_pmem_mem import Qmp
from virtio.devices.balloon import BalloonDriver
from virtio.devices.balloon import wire as BW
from virtio.devices.console import ConsoleDriver
from virtio.devices.console import wire as CW
from virtio.devices.scsi import ScsiDriver
from virtio.devices.scsi import wire as SW
from virtio.spec import features as F
from virtio.transport.pci import PciTransport
from virtio.vm.qtest import QemuMachine, qemu_machine

CONSOLE = "Device Types / Console Device"
N_CON_OP_DRV = f"drivernormative:{CONSOLE} / Device Operation"
N_CON_MULTI_DRV = f"drivernormative:{CONSOLE} / Device Operation / Multiport Device Operation"
BALLOON = "Device Types / Memory Balloon Device"
N_BAL_OP_DRV = f"drivernormative:{BALLOON} / Device Operation"
N_BAL_STATS_DRV = f"drivernormative:{BALLOON} / Device Operation / Memory Statistics"
N_BAL_FEAT_DRV = f"drivernormative:{BALLOON} / Feature bits"

MB = 1 << 20


@contextlib.contextmanager
def qemu_with_qmp(
    tmp_path: Path, devices: list[str], extra: list[str], memory_mb: int = 64
) -> Iterator[tuple[QemuMachine, Qmp]]:
    """A q35 qtest machine with a QMP socket this test speaks to."""
    qmp_path = tmp_path / "qmp.sock"
    extra = [*extra, "-qmp", f"unix:{qmp_path},server=on,wait=off"]
    with qemu_machine(devices, machine="q35", memory_mb=memory_mb, extra=extra) as m:
        qmp = Qmp(qmp_path)
        try:
            yield m, qmp
        finally:
            qmp.close()


def only(m: QemuMachine, device_id: int) -> PciTransport:
    [transport] = [t for t in m.pci_transports() if t.device_id == device_id]
    return transport


def no_guest_errors(m: QemuMachine) -> None:
    """QEMU's device models found nothing wrong in what our driver did."""
    assert "virtio" not in m.guest_error_text().lower(), m.guest_error_text()


# -- console ------------------------------------------------------------------------------


def connect(path: Path, timeout: float = 10.0) -> socket.socket:
    """Connect to a QEMU ``socket,server=on`` chardev (it listens once QEMU is up)."""
    deadline = time.monotonic() + timeout
    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(str(path))
            sock.settimeout(timeout)
            return sock
        except (FileNotFoundError, ConnectionRefusedError):
            sock.close()
            if time.monotonic() > deadline:
                raise
            time.sleep(0.02)


def recv_until(sock: socket.socket, marker: bytes) -> bytes:
    data = b""
    while marker not in data:
        chunk = sock.recv(4096)
        assert chunk, f"chardev closed after {data!r}"
        data += chunk
    return data


@pytest.mark.timeout(30)
@pytest.mark.normative(N_CON_OP_DRV, N_CON_MULTI_DRV)
def test_console_driver_on_qemu_virtio_serial_pci(tmp_path: Path) -> None:
    con_sock, port_sock = tmp_path / "con.sock", tmp_path / "p1.sock"
    extra = [
        "-chardev",
        f"socket,id=c0,path={con_sock},server=on,wait=off",
        "-chardev",
        f"socket,id=c1,path={port_sock},server=on,wait=off",
    ]
    devices = [
        "virtio-serial-pci,id=ser0,max_ports=4,disable-legacy=on",
        "virtconsole,chardev=c0,id=con0,nr=0",
        "virtserialport,chardev=c1,id=p1,nr=1,name=org.test.p1",
    ]
    with qemu_machine(devices, machine="q35", extra=extra) as m:
        con, host = connect(con_sock), connect(port_sock)
        try:
            driver = ConsoleDriver(only(m, 3))
            driver.initialize()
            # QEMU offers MULTIPORT (and EMERG_WRITE), not SIZE; max_nr_ports is max_ports.
            assert driver.multiport and not driver.has(CW.F_SIZE)
            assert driver.max_ports == 4 and driver.size is None

            def ready() -> bool:
                p = driver.ports
                return (
                    {0, 1} <= set(p)
                    and p[0].console
                    and p[1].name is not None
                    and p[1].host_open
                    and p[0].host_open
                )

            assert driver.wait_for(ready, 10), driver.controls_seen
            assert sorted(driver.ports) == [0, 1] and driver.bad_controls == 0
            # QEMU 7.2 ends the name with a NUL (the spec says without one): not part of it.
            [named] = [c for c in driver.controls_seen if c.event == CW.PORT_NAME]
            assert named.id == 1 and named.extra == b"org.test.p1\0"
            assert driver.ports[1].name == "org.test.p1"
            assert driver.ports[0].name is None
            seen = [(c.id, c.event) for c in driver.controls_seen]
            assert (0, CW.DEVICE_ADD) in seen and (1, CW.DEVICE_ADD) in seen
            assert (0, CW.CONSOLE_PORT) in seen and (1, CW.CONSOLE_PORT) not in seen
            assert not driver.ports[1].console

            # The console port: bytes both ways over chardev c0. QEMU passes host input
            # only to a port the guest opened: the driver's answer to CONSOLE_PORT did.
            driver.write(b"console says hi\n", port=0)
            assert recv_until(con, b"\n") == b"console says hi\n"
            con.sendall(b"typed on the console\n")
            assert driver.read_until(b"\n", port=0) == b"typed on the console\n"
            # VIRTIO_CONSOLE_F_EMERG_WRITE: QEMU puts each emerg_wr byte on port 0's chardev.
            assert driver.has(CW.F_EMERG_WRITE)
            driver.emergency_write(b"SOS\n")
            assert recv_until(con, b"\n") == b"SOS\n"

            # The named port: QEMU drops what the host sends until the guest opens it.
            driver.open_port(1)
            payload = bytes(range(256)) * 40 + b"\n"  # 10 KiB: three transmit buffers
            driver.write(payload, port=1)
            assert recv_until(host, payload[-16:]) == payload
            host.sendall(b"from the host side\n")
            assert driver.read_until(b"\n", port=1) == b"from the host side\n"
            assert driver.ports[0].received == b""  # nothing crossed over to the console

            # The host closes its end: PORT_OPEN 0; it connects again: PORT_OPEN 1.
            host.close()
            assert driver.wait_for(lambda: not driver.ports[1].host_open, 10)
            host = connect(port_sock)
            assert driver.wait_for(lambda: driver.ports[1].host_open, 10)
            host.sendall(b"again\n")
            assert driver.read_until(b"\n", port=1) == b"again\n"
            assert driver.bad_controls == 0
            driver.reset()
            no_guest_errors(m)
        finally:
            con.close()
            host.close()


# -- scsi ---------------------------------------------------------------------------------


def scsi_machine(tmp_path: Path, image: Path) -> contextlib.AbstractContextManager[QemuMachine]:
    extra = [
        "-drive",
        f"if=none,id=d0,file={image},format=raw,cache=writethrough",
        "-drive",
        f"if=none,id=d1,file={tmp_path / 'small.img'},format=raw",
    ]
    devices = [
        "virtio-scsi-pci,id=scsi0,disable-legacy=on",
        "scsi-hd,drive=d0,bus=scsi0.0,scsi-id=0,lun=0,serial=pyvirtio0",
        "scsi-hd,drive=d1,bus=scsi0.0,scsi-id=0,lun=2",
    ]
    (tmp_path / "small.img").write_bytes(bytes(MB))
    return qemu_machine(devices, machine="q35", extra=extra)


def clear_unit_attention(driver: ScsiDriver, lun: int) -> list[tuple[int, int]]:
    """TEST UNIT READY until GOOD; the (sense key, asc) of each check condition before."""
    seen: list[tuple[int, int]] = []
    for _ in range(4):
        result = driver.command(lun, bytes(6))
        assert result.response == SW.S_OK
        if result.status == 0:
            return seen
        assert result.status == 0x02  # CHECK CONDITION
        seen.append((result.sense_key(), result.asc()))
    raise AssertionError(f"LUN {lun} never became ready: {seen}")


@pytest.mark.timeout(30)
def test_scsi_driver_on_qemu_virtio_scsi_pci_and_scsi_hd(tmp_path: Path) -> None:
    image = tmp_path / "disk.img"
    image.write_bytes(b"S" * (4 * MB))
    with scsi_machine(tmp_path, image) as m:
        driver = ScsiDriver(only(m, 8))
        driver.initialize()
        # QEMU's defaults: one request queue, 96-byte sense, 32-byte CDBs.
        assert (driver.num_request_queues, driver.sense_size, driver.cdb_size) == (1, 96, 32)
        assert driver.max_target == 255 and driver.max_lun == 16383
        assert driver.has(F.VIRTIO_SCSI_F_HOTPLUG) and driver.has(F.VIRTIO_SCSI_F_CHANGE)
        driver.start_events()

        inquiry = driver.inquiry(0)
        assert inquiry[0] & 0x1F == 0  # a direct-access block device
        assert inquiry[8:16] == b"QEMU    " and inquiry[16:32].rstrip() == b"QEMU HARDDISK"
        serial = driver.inquiry(0, page=0x80)
        assert serial[1] == 0x80 and serial[4 : 4 + serial[3]] == b"pyvirtio0"
        clear_unit_attention(driver, 0)
        assert driver.read_capacity(0) == (4 * MB // 512, 512)
        assert driver.report_luns(0) == [0, 2]

        # WRITE (16), then READ (16): the bytes are in the image file on the host.
        payload = bytes(range(256)) * 16  # 4 KiB, 8 blocks
        driver.write(0, 100, payload)
        driver.synchronize_cache(0)
        with open(image, "rb") as f:
            f.seek(100 * 512)
            assert f.read(len(payload)) == payload
            f.seek(99 * 512)
            assert f.read(512) == b"S" * 512  # and nothing around them
        assert driver.read(0, 100, 8) == payload
        assert driver.read(0, 0, 1) == b"S" * 512

        # A READ past the end: CHECK CONDITION, ILLEGAL REQUEST / LBA OUT OF RANGE.
        beyond = driver.command(0, struct.pack(">BBQIBB", 0x88, 0, 8192, 1, 0, 0), data_in_len=512)
        assert beyond.response == SW.S_OK and beyond.status == 0x02
        assert (beyond.sense_key(), beyond.asc()) == (0x5, 0x21)
        # An empty target: the virtio response is BAD_TARGET, not a SCSI status.
        missing = driver.command(0, bytes(6), target=5)
        assert missing.response == SW.S_BAD_TARGET

        # Task management: a LUN reset completes; a wrong LUN or target is reported.
        assert driver.tmf(SW.T_TMF_LOGICAL_UNIT_RESET, 0) == SW.S_FUNCTION_COMPLETE
        assert driver.tmf(SW.T_TMF_ABORT_TASK, 0, tag=77) == SW.S_FUNCTION_COMPLETE
        assert driver.tmf(SW.T_TMF_LOGICAL_UNIT_RESET, 3) == SW.S_INCORRECT_LUN
        bad = SW.encode_lun(0, 9)
        assert driver.tmf(SW.T_TMF_LOGICAL_UNIT_RESET, raw_lun=bad) == SW.S_BAD_TARGET
        # After the reset the LUN reports it with a unit attention (power on / reset).
        attentions = clear_unit_attention(driver, 0)
        assert attentions and attentions[0][0] == 0x6 and attentions[0][1] == 0x29
        assert driver.read(0, 100, 8) == payload
        assert driver.poll_events() == []
        driver.reset()
        no_guest_errors(m)


# -- balloon ------------------------------------------------------------------------------


def follow_target(driver: BalloonDriver, pages: int, timeout: float = 10.0) -> None:
    """Serve the device (config change interrupts included) until the balloon holds ``pages``."""
    assert driver.transport.wait_until(
        lambda: driver.service() >= 0 and len(driver.ballooned) == pages, timeout
    ), (driver.target, len(driver.ballooned))


@pytest.mark.timeout(30)
@pytest.mark.normative(N_BAL_OP_DRV, N_BAL_FEAT_DRV)
def test_balloon_driver_follows_a_qmp_balloon_target(tmp_path: Path) -> None:
    devices = ["virtio-balloon-pci,id=bal0,disable-legacy=on"]
    with qemu_with_qmp(tmp_path, devices, []) as (m, qmp):
        driver = BalloonDriver(only(m, 5))
        driver.initialize()
        # QEMU 7.2 offers PAGE_POISON (page-poison=on by default) and not MUST_TELL_HOST:
        # a driver that writes no poison value to deflated pages declines it.
        assert driver.device_features >> BW.PAGE_POISON & 1 and not driver.has(BW.PAGE_POISON)
        assert not driver.device_features >> BW.MUST_TELL_HOST & 1
        assert driver.has(BW.STATS_VQ) and not driver.has(BW.FREE_PAGE_HINT)
        assert driver.target == 0 and driver.follow() == 0
        assert qmp.execute("query-balloon") == {"actual": 64 * MB}

        # Pages the driver will give first, filled: QEMU discards what is ballooned
        # (a hole punched in the shared RAM file), so they read back as zeros.
        alloc, memory = m.allocator, m.memory
        marked = [alloc.alloc(BW.PAGE_SIZE, BW.PAGE_SIZE) for _ in range(64)]
        for addr in marked:
            memory.write(addr, b"\xab" * BW.PAGE_SIZE)
        for addr in marked:
            alloc.free(addr)

        qmp.execute("balloon", value=60 * MB)  # 4 MiB into the balloon: 1024 pages
        follow_target(driver, 1024)
        assert driver.target == 1024
        assert qmp.execute("query-balloon") == {"actual": 60 * MB}
        assert set(marked) <= set(driver.ballooned)
        assert all(memory.read(addr, BW.PAGE_SIZE) == bytes(BW.PAGE_SIZE) for addr in marked)

        qmp.execute("balloon", value=62 * MB)  # half of it back
        follow_target(driver, 512)
        assert qmp.execute("query-balloon") == {"actual": 62 * MB}
        qmp.execute("balloon", value=64 * MB)
        follow_target(driver, 0)
        assert qmp.execute("query-balloon") == {"actual": 64 * MB}
        # Deflated pages are the driver's again: usable memory.
        memory.write(marked[0], b"back")
        assert memory.read(marked[0], 4) == b"back"
        assert driver.broken is None
        driver.reset()
        no_guest_errors(m)


@pytest.mark.timeout(30)
@pytest.mark.normative(N_BAL_STATS_DRV)
def test_balloon_driver_answers_qemu_statistics_polling(tmp_path: Path) -> None:
    devices = ["virtio-balloon-pci,id=bal0,disable-legacy=on"]
    sent: list[dict[int, int]] = []

    def stats() -> dict[int, int]:
        # The same tags every time; minor_faults counts the buffers sent.
        sent.append({BW.S_MEMTOT: 64 * MB, BW.S_MEMFREE: 40 * MB, 3: len(sent) + 1, 7: 1234})
        return sent[-1]

    with qemu_with_qmp(tmp_path, devices, []) as (m, qmp):
        path = "/machine/peripheral/bal0"
        driver = BalloonDriver(only(m, 5), stats=stats)
        driver.initialize()
        assert driver.has(BW.STATS_VQ) and driver.stats_sent == 1
        assert qmp.execute("qom-get", path=path, property="guest-stats-polling-interval") == 0
        qmp.execute("qom-set", path=path, property="guest-stats-polling-interval", value=1)
        # Each poll returns the buffer the driver left; the driver sends a fresh one.
        for _ in range(2):
            assert driver.wait_stats_request(5)
        assert driver.stats_sent == len(sent) >= 3
        deadline = time.monotonic() + 5
        while True:
            got = qmp.execute("qom-get", path=path, property="guest-stats")
            assert isinstance(got, dict)
            values = got["stats"]
            if values["stat-minor-faults"] == len(sent):
                break  # QEMU took the last buffer sent
            assert time.monotonic() < deadline, (got, len(sent))
            time.sleep(0.05)
        assert got["last-update"] > 0
        assert values["stat-total-memory"] == 64 * MB and values["stat-free-memory"] == 40 * MB
        assert values["stat-disk-caches"] == 1234
        # What the driver did not report QEMU shows as (u64) -1.
        unset = (1 << 64) - 1
        assert values["stat-swap-in"] == unset and values["stat-available-memory"] == unset
        assert driver.broken is None
        driver.reset()
        no_guest_errors(m)
