"""virtio-console: the device model and the driver, in process (register-level loopback)."""

from __future__ import annotations

import fcntl
import os
import socket
import struct
import termios
import time
from pathlib import Path

import pytest

from virtio.devices.console import ConsoleDevice, ConsoleDriver
from virtio.devices.console import wire as W
from virtio.devices.console.device import INPUT_LIMIT, MAX_PORTS
from virtio.devices.console.host import LogHost, MemoryHost, PtyHost, UnixHost
from virtio.errors import NegotiationError
from virtio.layout import ByteOrder
from virtio.spec.status import DeviceStatus as S
from virtio.transport.loopback import Loopback

CONSOLE = "Device Types / Console Device"
N_INIT_DEV = f"devicenormative:{CONSOLE} / Device Initialization"
N_OP_DRV = f"drivernormative:{CONSOLE} / Device Operation"
N_MULTI_DEV = f"devicenormative:{CONSOLE} / Device Operation / Multiport Device Operation"
N_MULTI_DRV = f"drivernormative:{CONSOLE} / Device Operation / Multiport Device Operation"


def multiport(n: int = 3, **kwargs: object) -> tuple[ConsoleDevice, list[MemoryHost]]:
    hosts = [MemoryHost() for _ in range(n)]
    names = [None] + [f"org.test.{i}" for i in range(1, n)]
    return ConsoleDevice(hosts, names=names, **kwargs), hosts  # type: ignore[arg-type]


@pytest.mark.parametrize("threaded", [False, True])
def test_single_port_both_ways(threaded: bool) -> None:
    host = MemoryHost()
    device = ConsoleDevice([host], size=(132, 43))
    with Loopback(device, threaded=threaded) as lb:
        driver = ConsoleDriver(lb)
        driver.initialize()
        assert not driver.multiport and lb.num_queues() == 2
        assert driver.size == (132, 43)
        driver.write(b"hello from the guest\n")
        assert host.output == b"hello from the guest\n"
        host.feed(b"typed on the host")
        assert driver.read_until(b"host") == b"typed on the host"


def test_input_before_the_driver_is_kept() -> None:
    host = MemoryHost()
    device = ConsoleDevice([host])
    host.feed(b"early ")
    with Loopback(device) as lb:
        driver = ConsoleDriver(lb)
        driver.initialize()
        host.feed(b"late")
        assert driver.read_until(b"late") == b"early late"


def test_long_input_spans_buffers_in_order() -> None:
    host = MemoryHost()
    device = ConsoleDevice([host])
    data = bytes(range(256)) * 200  # 51200 bytes: more than the 4 posted buffers hold
    with Loopback(device) as lb:
        driver = ConsoleDriver(lb)
        driver.initialize()
        host.feed(data)
        got = bytearray()
        deadline = time.monotonic() + 10
        while len(got) < len(data) and time.monotonic() < deadline:
            got += driver.read(timeout=2)
        assert bytes(got) == data


def test_input_past_the_limit_pauses_the_host_side() -> None:
    host = MemoryHost()
    device = ConsoleDevice([host])
    host.feed(b"x" * INPUT_LIMIT)  # no driver yet: nowhere to put it
    assert host._paused
    with Loopback(device) as lb:
        driver = ConsoleDriver(lb)
        driver.initialize()
        got = bytearray()
        while len(got) < INPUT_LIMIT:
            got += driver.read(timeout=2)
        assert got == b"x" * INPUT_LIMIT and not host._paused


def test_resize_reaches_the_driver_through_config() -> None:
    device = ConsoleDevice([MemoryHost()])
    with Loopback(device) as lb:
        driver = ConsoleDriver(lb)
        driver.initialize()
        assert driver.size == (80, 24)
        changes = driver.config_changes
        device.resize(100, 30)
        assert driver.wait_for(lambda: driver.size == (100, 30), 2)
        assert driver.config_changes == changes + 1


def test_no_size_feature() -> None:
    device = ConsoleDevice([MemoryHost()], size=None)
    with Loopback(device) as lb:
        driver = ConsoleDriver(lb)
        driver.initialize()
        assert not driver.has(W.F_SIZE) and driver.size is None
        device.resize(10, 10)  # nothing to tell
        assert lb.read_config(0, 4) == bytes(4)


@pytest.mark.normative(N_INIT_DEV)
def test_emergency_write_on_an_unconfigured_device() -> None:
    host = MemoryHost()
    device = ConsoleDevice([host])
    with Loopback(device) as lb:
        # Status 0: nothing negotiated, no queues.
        assert lb.read_status() == 0
        lb.write_config(W.CFG_EMERG_WR, (0x4100 | ord("!")).to_bytes(4, "little"))
        assert host.output == b"!" and lb.read_status() == 0
        driver = ConsoleDriver(lb)
        driver.initialize()
        driver.emergency_write(b"ok")
        assert host.output == b"!ok" and device.emergency == b"!ok"
        assert not lb.read_status() & S.DEVICE_NEEDS_RESET
        assert lb.read_config(W.CFG_EMERG_WR, 4) == bytes(4)


@pytest.mark.normative(N_INIT_DEV)
@pytest.mark.parametrize("order", ["little", "big"])
def test_partial_emergency_writes_never_fail_an_unconfigured_device(order: ByteOrder) -> None:
    # Only the lower byte is a character; the other bytes of emerg_wr are ignored.
    host = MemoryHost()
    device = ConsoleDevice([host])
    with Loopback(device, legacy=order == "big", legacy_order=order) as lb:
        low = W.CFG_EMERG_WR + (3 if order == "big" else 0)
        high = W.CFG_EMERG_WR + (0 if order == "big" else 3)
        lb.write_config(high, b"\x41")
        lb.write_config(W.CFG_EMERG_WR + 1, b"\x42\x43")
        assert host.output == b"" and lb.read_status() == 0
        lb.write_config(low, b"Z")
        assert host.output == b"Z" and device.emergency == b"Z"
        assert lb.read_status() == 0 and device.needs_reset_reason is None


def test_emergency_write_not_offered() -> None:
    device = ConsoleDevice([MemoryHost()], emerg_write=False)
    with Loopback(device) as lb:
        driver = ConsoleDriver(lb)
        driver.initialize()
        with pytest.raises(NegotiationError):
            driver.emergency_write(b"x")


@pytest.mark.normative(N_MULTI_DEV, N_MULTI_DRV)
@pytest.mark.parametrize("threaded", [False, True])
def test_multiport_ports_come_up(threaded: bool) -> None:
    device, hosts = multiport(3)
    with Loopback(device, threaded=threaded) as lb:
        driver = ConsoleDriver(lb)
        driver.initialize()
        assert driver.multiport and driver.max_ports == 3 and lb.num_queues() == 8
        assert driver.wait_for(lambda: len(driver.ports) == 3, 5)
        assert driver.wait_for(lambda: driver.ports[2].name == "org.test.2", 5)
        events = [(m.event, m.id) for m in driver.controls_seen]
        # DEVICE_ADD for every port, each port's messages only after its PORT_READY.
        assert events[:3] == [(W.DEVICE_ADD, 0), (W.DEVICE_ADD, 1), (W.DEVICE_ADD, 2)]
        assert (W.CONSOLE_PORT, 0) in events and (W.CONSOLE_PORT, 1) not in events
        p0, p1 = driver.ports[0], driver.ports[1]
        assert p0.console and p0.name is None and p0.size == (80, 24)
        assert p1.name == "org.test.1" and p1.host_open and not p1.console
        # The console port was answered with PORT_OPEN 1; the others are not open yet.
        assert device.ports[0].guest_open and not device.ports[1].guest_open
        assert all(device.ports[i].ready for i in range(3))
        driver.write(b"on port one", port=1)
        driver.write(b"console", port=0)
        assert hosts[1].output == b"on port one" and hosts[0].output == b"console"


def test_multiport_input_waits_for_the_guest_to_open() -> None:
    device, hosts = multiport(2)
    with Loopback(device) as lb:
        driver = ConsoleDriver(lb)
        driver.initialize()
        assert driver.wait_for(lambda: 1 in driver.ports and driver.ports[1].host_open, 5)
        hosts[1].feed(b"for port 1")
        driver.pump()
        assert driver.ports[1].received == b""  # port closed in the guest: held
        driver.open_port(1)
        assert driver.read_until(b"1", port=1) == b"for port 1"
        hosts[0].feed(b"console in")
        assert driver.read_until(b"in", port=0) == b"console in"


def test_host_side_connect_and_disconnect() -> None:
    hosts = [MemoryHost(), MemoryHost(connected=False)]
    device = ConsoleDevice(hosts)
    with Loopback(device) as lb:
        driver = ConsoleDriver(lb)
        driver.initialize()
        assert driver.wait_for(lambda: 1 in driver.ports and device.ports[1].ready, 5)
        driver.pump()
        assert not driver.ports[1].host_open
        hosts[1].set_connected(True)
        assert driver.wait_for(lambda: driver.ports[1].host_open, 5)
        hosts[1].set_connected(False)
        assert driver.wait_for(lambda: not driver.ports[1].host_open, 5)


def test_multiport_resize_sends_a_resize_message() -> None:
    device, _hosts = multiport(2)
    with Loopback(device) as lb:
        driver = ConsoleDriver(lb)
        driver.initialize()
        assert driver.wait_for(
            lambda: driver.ports.get(0) is not None and driver.ports[0].size == (80, 24), 5
        )
        device.resize(120, 50)
        assert driver.wait_for(lambda: driver.ports[0].size == (120, 50), 5)
        assert driver.size == (120, 50)  # and the config fields
        resize = [m for m in driver.controls_seen if m.event == W.RESIZE][-1]
        assert resize.extra == struct.pack("<HH", 120, 50)  # cols first, as the spec has it


@pytest.mark.normative(N_MULTI_DEV)
def test_hotplug_add_and_remove() -> None:
    device, _hosts = multiport(2, max_ports=4)
    with Loopback(device) as lb:
        driver = ConsoleDriver(lb)
        driver.initialize()
        assert driver.wait_for(lambda: len(driver.ports) == 2, 5)
        extra = MemoryHost()
        assert device.add_port(extra, name="hot") == 2
        assert driver.wait_for(lambda: 2 in driver.ports and driver.ports[2].name == "hot", 5)
        # The device never adds a port that exists or is past max_nr_ports.
        with pytest.raises(ValueError):
            device.add_port(MemoryHost(), port=1)
        with pytest.raises(ValueError):
            device.add_port(MemoryHost(), port=4)
        driver.write(b"hot data", port=2)
        assert extra.output == b"hot data"
        device.remove_port(2)
        assert driver.wait_for(lambda: 2 not in driver.ports, 5)
        # Nor removes one it has not added.
        with pytest.raises(ValueError):
            device.remove_port(2)
        with pytest.raises(ValueError):
            device.remove_port(3)
        # The id is free again.
        assert device.add_port(MemoryHost(), port=2) == 2
        assert driver.wait_for(lambda: 2 in driver.ports, 5)
        assert driver.bad_controls == 0


def test_reset_and_reinitialize_announces_again() -> None:
    device, hosts = multiport(2)
    with Loopback(device) as lb:
        driver = ConsoleDriver(lb)
        driver.initialize()
        assert driver.wait_for(lambda: len(driver.ports) == 2, 5)
        driver.initialize()
        assert driver.wait_for(lambda: len(driver.ports) == 2 and driver.ports[1].host_open, 5)
        driver.write(b"again", port=1)
        assert hosts[1].output == b"again"


def test_driver_without_multiport_on_a_multiport_device() -> None:
    device, hosts = multiport(3)
    with Loopback(device) as lb:
        driver = ConsoleDriver(lb, avoid_features=1 << W.F_MULTIPORT)
        driver.initialize()
        assert not driver.multiport and device.queue_count == 2
        driver.write(b"plain")
        hosts[0].feed(b"in")
        assert driver.read_until(b"in") == b"in"
        assert hosts[0].output == b"plain"


@pytest.mark.parametrize("order", ["little", "big"])
def test_legacy_interface(order: str) -> None:
    device, hosts = multiport(2)
    with Loopback(device, legacy=True, legacy_order=order) as lb:  # type: ignore[arg-type]
        driver = ConsoleDriver(lb)
        driver.initialize()
        assert driver.max_ports == 2 and driver.size == (80, 24)
        assert driver.wait_for(
            lambda: 1 in driver.ports and driver.ports[1].name == "org.test.1", 5
        )
        driver.write(b"legacy", port=1)
        assert hosts[1].output == b"legacy"
        driver.emergency_write(b"E")
        assert hosts[0].output.endswith(b"E")


# -- a driver that breaks the rules ----------------------------------------------------


@pytest.mark.normative(N_OP_DRV)
def test_writable_buffer_in_a_transmitq_needs_reset() -> None:
    device = ConsoleDevice([MemoryHost()])
    with Loopback(device) as lb:
        driver = ConsoleDriver(lb)
        driver.initialize()
        driver.submit(1, [b"out"], [16])
        driver.kick(1)
        assert lb.read_status() & S.DEVICE_NEEDS_RESET
        assert N_OP_DRV in (device.needs_reset_reason or "")


@pytest.mark.normative(N_OP_DRV)
def test_readable_buffer_in_a_receiveq_needs_reset() -> None:
    host = MemoryHost()
    device = ConsoleDevice([host])
    with Loopback(device) as lb:
        driver = ConsoleDriver(lb)
        driver.initialize()
        # Take the good buffers away first, so the bad one is the next used.
        host.feed(b"a" * (4 * 4096))
        driver.submit(0, [b"readable"], [16])
        driver.kick(0)
        host.feed(b"more")
        assert lb.read_status() & S.DEVICE_NEEDS_RESET
        assert N_OP_DRV in (device.needs_reset_reason or "")


def test_short_control_message_needs_reset() -> None:
    device, _ = multiport(2)
    with Loopback(device) as lb:
        driver = ConsoleDriver(lb)
        driver.initialize()
        driver.submit(W.CTRL_TX, [b"\x01\x00"], [])
        driver.kick(W.CTRL_TX)
        assert lb.read_status() & S.DEVICE_NEEDS_RESET
        assert "shorter than its 8-byte header" in (device.needs_reset_reason or "")


def test_writable_control_transmit_buffer_needs_reset() -> None:
    device, _ = multiport(2)
    with Loopback(device) as lb:
        driver = ConsoleDriver(lb)
        driver.initialize()
        driver.submit(W.CTRL_TX, [W.encode(W.Control(0, W.PORT_OPEN, 1))], [8])
        driver.kick(W.CTRL_TX)
        assert lb.read_status() & S.DEVICE_NEEDS_RESET


def test_odd_control_messages_are_ignored() -> None:
    device, hosts = multiport(2)
    with Loopback(device) as lb:
        driver = ConsoleDriver(lb)
        driver.initialize()
        assert driver.wait_for(lambda: len(driver.ports) == 2, 5)
        for msg in (
            W.Control(99, W.PORT_READY, 1),  # no such port
            W.Control(1, W.DEVICE_ADD),  # a device's message
            W.Control(0, 200, 7),  # unknown event
            W.Control(1, W.PORT_READY, 0),  # a failure report
            W.Control(0, W.DEVICE_READY, 0),
        ):
            driver.send_control(msg)
        assert not lb.read_status() & S.DEVICE_NEEDS_RESET
        driver.write(b"still fine", port=1)
        assert hosts[1].output == b"still fine"


def test_data_on_a_port_never_added_is_dropped() -> None:
    device, hosts = multiport(2, max_ports=3)
    with Loopback(device) as lb:
        driver = ConsoleDriver(lb)
        driver.initialize()
        driver.call(W.tx_queue(2), [b"nowhere"], [])
        assert not lb.read_status() & S.DEVICE_NEEDS_RESET
        assert all(not h.output for h in hosts)


def test_control_buffer_too_small_drops_the_message(monkeypatch: pytest.MonkeyPatch) -> None:
    from virtio.devices.console import driver as driver_module

    monkeypatch.setattr(driver_module, "CTRL_SIZE", 4)  # smaller than a message header
    device, _ = multiport(2)
    with Loopback(device) as lb:
        driver = ConsoleDriver(lb)
        driver.initialize()
        driver.wait_for(lambda: False, 0.2)
        assert device.dropped_controls >= 2 and not driver.ports
        assert driver.bad_controls >= 2  # the empty buffers it got back
        assert not lb.read_status() & S.DEVICE_NEEDS_RESET


# -- a device that breaks the rules -------------------------------------------------------


class HostileConsole(ConsoleDevice):
    """Sends whatever control bytes the test gives it."""

    def raw(self, data: bytes) -> None:
        self._ctrl_out.append(_Raw(data))
        self._flush_control()


class _Raw(W.Control):
    def __init__(self, data: bytes) -> None:
        super().__init__(0, 0)
        object.__setattr__(self, "raw", data)


def _encode_raw(msg: W.Control, order: str = "little") -> bytes:
    raw = getattr(msg, "raw", None)
    return raw if isinstance(raw, bytes) else _real_encode(msg, order)  # type: ignore[arg-type]


_real_encode = W.encode


@pytest.mark.normative(N_MULTI_DRV)
def test_driver_survives_a_hostile_device(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(W, "encode", _encode_raw)
    hosts = [MemoryHost(), MemoryHost()]
    device = HostileConsole(hosts)
    with Loopback(device) as lb:
        driver = ConsoleDriver(lb)
        driver.initialize()
        assert driver.wait_for(lambda: len(driver.ports) == 2, 5)
        sent_ready: list[W.Control] = []
        real_send = driver.send_control

        def recording_send(msg: W.Control, timeout: float = 10.0) -> None:
            sent_ready.append(msg)
            real_send(msg, timeout)

        monkeypatch.setattr(driver, "send_control", recording_send)
        device.raw(b"\x01")  # too short
        device.raw(struct.pack("<IHH", 7, W.DEVICE_ADD, 0))  # past max_nr_ports
        device.raw(struct.pack("<IHH", 1, W.DEVICE_ADD, 0))  # exists
        device.raw(struct.pack("<IHH", 5, W.CONSOLE_PORT, 1))  # no such port
        device.raw(struct.pack("<IHH", 1, W.RESIZE, 0) + b"\x01")  # size cut short
        device.raw(struct.pack("<IHH", 1, W.PORT_NAME, 1) + b"\xff\xfename")
        device.raw(struct.pack("<IHH", 0, W.PORT_READY, 1))  # a driver's message
        driver.pump()
        assert driver.bad_controls == 6
        assert driver.ports[1].name == "\ufffd\ufffdname"
        assert [(m.id, m.event, m.value) for m in sent_ready] == [(7, W.PORT_READY, 0)]
        assert driver.broken is None
        driver.write(b"ok", port=1)
        assert hosts[1].output == b"ok"


def test_driver_refuses_a_max_nr_ports_that_does_not_fit() -> None:
    class Liar(ConsoleDevice):
        def build_config(self) -> None:
            super().build_config()
            self.config[W.CFG_MAX_NR_PORTS : W.CFG_MAX_NR_PORTS + 4] = (50).to_bytes(4, "little")

    device = Liar([MemoryHost(), MemoryHost()])
    with Loopback(device) as lb:
        driver = ConsoleDriver(lb)
        with pytest.raises(NegotiationError, match="max_nr_ports 50"):
            driver.initialize()
        assert lb.read_status() & S.FAILED


# -- host sides ---------------------------------------------------------------------------


def test_unix_socket_host_side(tmp_path: Path) -> None:
    path = tmp_path / "con"
    hosts = [UnixHost(Path(f"{path}.0")), UnixHost(Path(f"{path}.1"))]
    device = ConsoleDevice(hosts, names=[None, "sock"])
    try:
        with Loopback(device) as lb:
            driver = ConsoleDriver(lb)
            driver.initialize()
            assert driver.wait_for(lambda: len(driver.ports) == 2, 5)
            assert not driver.ports[1].host_open
            client = socket.socket(socket.AF_UNIX)
            client.connect(f"{path}.1")
            client.settimeout(5)
            assert driver.wait_for(lambda: driver.ports[1].host_open, 5)
            # A second client is refused while the first is connected.
            second = socket.socket(socket.AF_UNIX)
            second.connect(f"{path}.1")
            second.settimeout(5)
            driver.wait_for(lambda: False, 0.3)
            assert second.recv(10) == b""
            driver.open_port(1)
            client.sendall(b"from the socket")
            assert driver.read_until(b"socket", port=1) == b"from the socket"
            driver.write(b"to the socket", port=1)
            driver.wait_for(lambda: False, 0.1)
            assert client.recv(100) == b"to the socket"
            client.close()
            assert driver.wait_for(lambda: not driver.ports[1].host_open, 5)
            # Console output with nobody connected waits for the next client.
            driver.write(b"early console", port=0)
            c0 = socket.socket(socket.AF_UNIX)
            c0.connect(f"{path}.0")
            c0.settimeout(5)
            driver.wait_for(lambda: False, 0.3)
            assert c0.recv(100) == b"early console"
            c0.close()
    finally:
        device.close()
    assert not Path(f"{path}.1").exists()


def test_pty_host_side_and_its_window_size() -> None:
    host = PtyHost()
    device = ConsoleDevice([host])
    slave = os.open(host.path, os.O_RDWR | os.O_NOCTTY)
    try:
        with Loopback(device) as lb:
            driver = ConsoleDriver(lb)
            driver.initialize()
            driver.write(b"guest says hi\n")
            assert os.read(slave, 100) == b"guest says hi\n"  # raw: no CRLF
            os.write(slave, b"host types")
            assert driver.read_until(b"types") == b"host types"
            fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 33, 111, 0, 0))
            assert driver.wait_for(lambda: driver.size == (111, 33), 5)
    finally:
        os.close(slave)
        device.close()


def test_log_host_side(tmp_path: Path) -> None:
    log = tmp_path / "guest.log"
    device = ConsoleDevice([LogHost(log)])
    try:
        with Loopback(device) as lb:
            driver = ConsoleDriver(lb)
            driver.initialize()
            driver.write(b"line one\n")
            driver.emergency_write(b"!")
    finally:
        device.close()
    assert log.read_bytes() == b"line one\n!"


def test_pty_output_nobody_reads_is_bounded() -> None:
    host = PtyHost()
    device = ConsoleDevice([host])
    try:
        with Loopback(device) as lb:
            driver = ConsoleDriver(lb)
            driver.initialize()
            for _ in range(40):
                driver.write(b"z" * 4096)  # nobody reads the pty: it fills, then the backlog
            assert host.written + len(host._backlog.pending) + host.dropped == 40 * 4096
            assert not lb.read_status() & S.DEVICE_NEEDS_RESET
    finally:
        device.close()


# -- options ---------------------------------------------------------------------------------


def test_the_queues_of_max_ports_fit_num_queues() -> None:
    assert W.queue_count(MAX_PORTS, True) == 65534
    with pytest.raises(ValueError, match="max_ports 32767"):
        ConsoleDevice([MemoryHost()], max_ports=MAX_PORTS + 1)


def test_serve_options(tmp_path: Path) -> None:
    import argparse

    from virtio.devices.console import options
    from virtio.devices.registry import DeviceSettings, device_type

    assert device_type("console").device is ConsoleDevice
    p = argparse.ArgumentParser()
    options.add_arguments(p)
    args = p.parse_args(["--unix", str(tmp_path / "c"), "--ports", "3", "--name", "a"])
    device = options.from_arguments(args, DeviceSettings())
    try:
        assert isinstance(device, ConsoleDevice)
        assert options.num_queues(args) == 8 and len(device.queues) == 8
        assert [p.name for p in device.ports.values()] == [None, "a", "port2"]
        assert (tmp_path / "c.2").is_socket()
    finally:
        device.close()
    for bad in (
        ["--ports", "0"],
        ["--ports", "2", "--name", "a", "--name", "b"],
        ["--cols", "70000"],
        ["--ports", "3", "--max-ports", "2"],
        ["--max-ports", "32767"],  # 65536 queues: more than num_queues can say
    ):
        with pytest.raises(ValueError):
            options.from_arguments(p.parse_args(bad), DeviceSettings())
    args = p.parse_args(["--log", str(tmp_path / "l"), "--ports", "2"])
    device = options.from_arguments(args, DeviceSettings())
    device.close()
    assert (tmp_path / "l").exists() and (tmp_path / "l.1").exists()


def test_stdio_host_side_with_an_unpollable_stdin(tmp_path: Path) -> None:
    from virtio.devices.console.host import pollable, stdio_host

    regular = tmp_path / "stdin"
    regular.write_bytes(b"x")
    fd = os.open(regular, os.O_RDONLY)
    try:
        assert not pollable(fd)
        r, w = os.pipe()
        assert pollable(r)
        os.close(r)
        os.close(w)
    finally:
        os.close(fd)
    host = stdio_host()
    assert host.write_fd == 1
    assert host.read_fd is None or pollable(host.read_fd)
