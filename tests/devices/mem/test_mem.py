"""virtio-mem: the device model and the driver, in process (register-level loopback)."""

from __future__ import annotations

import argparse
import os
import threading
from pathlib import Path

import pytest

from virtio.control import request
from virtio.devices.mem import MemDevice, MemDriver
from virtio.devices.mem import options as O
from virtio.devices.mem import wire as W
from virtio.devices.mem.control import MemControl, main
from virtio.devices.mem.driver import MemResponseError
from virtio.devices.registry import DeviceSettings, device_type
from virtio.queue import Chain, ChainWriter
from virtio.spec.status import DeviceStatus as S
from virtio.transport.loopback import Loopback
from virtio.transport.pci import pci_loopback

MEM = "Device Types / Memory Device"
N_CFG_DEV = f"devicenormative:{MEM} / Device configuration layout"
N_CFG_DRV = f"drivernormative:{MEM} / Device configuration layout"
N_INIT_DEV = f"devicenormative:{MEM} / Device Initialization"
N_INIT_DRV = f"drivernormative:{MEM} / Device Initialization"
N_OP_DEV = f"devicenormative:{MEM} / Device Operation"
N_OP_DRV = f"drivernormative:{MEM} / Device Operation"
N_PLUG_DEV = f"devicenormative:{MEM} / Device Operation / PLUG request"
N_PLUG_DRV = f"drivernormative:{MEM} / Device Operation / PLUG request"
N_UNPLUG_DEV = f"devicenormative:{MEM} / Device Operation / UNPLUG request"
N_ALL_DEV = f"devicenormative:{MEM} / Device Operation / UNPLUG ALL request"
N_STATE_DEV = f"devicenormative:{MEM} / Device Operation / STATE request"
N_STATE_DRV = f"drivernormative:{MEM} / Device Operation / STATE request"

MB = 1 << 20
BS = 2 * MB
BASE = 1 << 32


def make(**kw: object) -> MemDevice:
    args: dict[str, object] = {"region_size": 64 * MB, "block_size": BS, "addr": BASE}
    args.update(kw)
    return MemDevice(**args)  # type: ignore[arg-type]


def failed(lb: Loopback, device: MemDevice, normative: str) -> bool:
    reason = device.needs_reset_reason or ""
    return bool(lb.read_status() & S.DEVICE_NEEDS_RESET) and normative in reason


def test_wire_round_trips() -> None:
    req = W.Request(W.REQ_STATE, BASE + BS, 7)
    data = W.pack_request(req)
    assert len(data) == W.REQ_SIZE and W.unpack_request(data) == req
    # Padding is ignored on the way in.
    assert W.unpack_request(data[:2] + b"\xff" * 6 + data[8:18] + b"\xee" * 6) == req
    assert W.unpack_response(W.pack_response(W.RESP_ACK, W.STATE_MIXED)) == (0, 2)
    assert W.unpack_response(b"\x01\x00") == (W.RESP_NACK, 0)
    for bad in (b"", b"\x00" * 23):
        with pytest.raises(ValueError):
            W.unpack_request(bad)
    with pytest.raises(ValueError):
        W.unpack_response(b"\x00")


@pytest.mark.normative(N_CFG_DEV, N_CFG_DRV)
def test_config_and_features() -> None:
    device = make(requested_size=8 * MB, node_id=3, persistent_suspend=True)
    with Loopback(device) as lb:
        driver = MemDriver(lb)
        driver.initialize()
        for bit in (W.F_ACPI_PXM, W.F_UNPLUGGED_INACCESSIBLE, W.F_PERSISTENT_SUSPEND):
            assert driver.has(bit)
        c = driver.config()
        assert (c.block_size, c.addr, c.region_size) == (BS, BASE, 64 * MB)
        assert c.plugged_size == 0 and c.requested_size == 8 * MB
        assert c.requested_size <= c.usable_region_size <= c.region_size
        for value in (c.addr, c.region_size, c.usable_region_size, c.requested_size):
            assert value % c.block_size == 0
        assert driver.node_id == 3
    plain = make()
    assert not plain.offered_features >> W.F_ACPI_PXM & 1
    assert not plain.offered_features >> W.F_PERSISTENT_SUSPEND & 1
    with Loopback(plain) as lb:
        driver = MemDriver(lb)
        driver.initialize()
        assert driver.node_id is None  # the field means nothing without ACPI_PXM


def test_bad_geometry_is_refused() -> None:
    for kw in (
        {"block_size": 3 * MB},
        {"addr": BASE + 4096},
        {"region_size": 5 * MB},
        {"requested_size": 128 * MB},
        {"requested_size": MB},
        {"node_id": 1 << 16},
        {"block_size": 4096, "region_size": 1 << 40},
    ):
        with pytest.raises(ValueError):
            make(**kw)


@pytest.mark.normative(N_PLUG_DEV, N_UNPLUG_DEV, N_STATE_DEV, N_STATE_DRV, N_PLUG_DRV, N_CFG_DEV)
def test_plug_state_unplug() -> None:
    device = make(requested_size=16 * MB)
    with Loopback(device) as lb:
        driver = MemDriver(lb)
        driver.initialize()
        changes = driver.config_changes
        assert driver.state(BASE, 4) == (W.RESP_ACK, W.STATE_UNPLUGGED)
        assert driver.plug(BASE, 4) == W.RESP_ACK
        assert driver.config().plugged_size == 8 * MB
        assert driver.state(BASE, 4) == (W.RESP_ACK, W.STATE_PLUGGED)
        assert driver.state(BASE, 5) == (W.RESP_ACK, W.STATE_MIXED)
        assert driver.unplug(BASE + BS, 2) == W.RESP_ACK
        assert driver.state(BASE, 4) == (W.RESP_ACK, W.STATE_MIXED)
        assert driver.config().plugged_size == 4 * MB
        assert device.blocks[:4] == bytes([1, 0, 0, 1])
        # plugged_size changes are not notified.
        assert driver.config_changes == changes


@pytest.mark.normative(N_PLUG_DEV, N_UNPLUG_DEV, N_STATE_DEV)
def test_bad_ranges_are_answered_with_error() -> None:
    device = make(requested_size=16 * MB)
    with Loopback(device) as lb:
        driver = MemDriver(lb)
        driver.initialize()
        usable = driver.config().usable_region_size
        assert usable < 64 * MB  # the unusable part exists
        bad = [
            (BASE + 4096, 1),  # misaligned
            (BASE, 0),  # no blocks
            (BASE - BS, 1),  # below the region
            (BASE + usable - BS, 2),  # past the usable region
            (BASE + 64 * MB, 1),  # past the whole region
            ((1 << 64) - BS, 0xFFFF),  # far beyond
        ]
        for addr, n in bad:
            assert driver.plug(addr, n) == W.RESP_ERROR, (addr, n)
            assert driver.unplug(addr, n) == W.RESP_ERROR, (addr, n)
            resp, state = driver.state(addr, n)
            assert resp == W.RESP_ERROR and state == 0
        assert driver.plug(BASE, 2) == W.RESP_ACK
        assert driver.plug(BASE + BS, 2) == W.RESP_ERROR  # one block already plugged
        assert driver.unplug(BASE, 3) == W.RESP_ERROR  # one block already unplugged
        assert driver.config().plugged_size == 2 * BS
        assert not lb.read_status() & S.DEVICE_NEEDS_RESET


def test_plugging_beyond_the_requested_size_is_nacked() -> None:
    device = make(requested_size=4 * MB)
    with Loopback(device) as lb:
        driver = MemDriver(lb)
        driver.initialize()
        assert driver.plug(BASE, 3) == W.RESP_NACK
        assert driver.plug(BASE, 2) == W.RESP_ACK
        assert driver.plug(BASE + 2 * BS, 1) == W.RESP_NACK
        assert driver.config().plugged_size == 4 * MB


def test_unknown_request_type_is_an_error() -> None:
    device = make(requested_size=4 * MB)
    with Loopback(device) as lb:
        driver = MemDriver(lb)
        driver.initialize()
        assert driver.request(W.Request(9, BASE, 1)) == (W.RESP_ERROR, 0)
        assert not lb.read_status() & S.DEVICE_NEEDS_RESET


@pytest.mark.normative(N_ALL_DEV, N_CFG_DEV)
def test_unplug_all_shrinks_quietly() -> None:
    device = make(requested_size=16 * MB)
    with Loopback(device) as lb:
        driver = MemDriver(lb)
        driver.initialize()
        assert driver.plug(BASE, 8) == W.RESP_ACK
        device.set_requested_size(32 * MB)
        grown = driver.config().usable_region_size
        device.set_requested_size(0)
        assert driver.config().usable_region_size == grown  # never shrinks outside UNPLUG ALL
        changes = driver.config_changes
        assert driver.unplug_all() == W.RESP_ACK
        c = driver.config()
        assert c.plugged_size == 0 and c.usable_region_size == 0
        assert device.blocks.count(1) == 0 and driver.plugged == set()
        assert driver.config_changes == changes  # no notification for UNPLUG ALL


@pytest.mark.normative(N_CFG_DEV, N_OP_DRV)
def test_requested_size_changes_are_notified_and_followed() -> None:
    device = make(requested_size=0)
    with Loopback(device) as lb:
        driver = MemDriver(lb)
        driver.initialize()
        assert driver.config().usable_region_size == 0
        changes = driver.config_changes
        device.set_requested_size(10 * MB)
        assert lb.wait_until(lambda: driver.config_changes > changes, 5)
        c = driver.config()
        assert c.requested_size == 10 * MB and c.usable_region_size >= 10 * MB
        assert driver.balance() == 5
        assert driver.config().plugged_size == 10 * MB
        assert driver.balance() == 0
        device.set_requested_size(4 * MB)
        assert driver.balance() == -3
        assert driver.config().plugged_size == 4 * MB
        with pytest.raises(ValueError):
            device.set_requested_size(3 * MB)
        with pytest.raises(ValueError):
            device.set_requested_size(66 * MB)


@pytest.mark.normative(N_INIT_DEV, N_INIT_DRV)
def test_device_reset_keeps_blocks_and_the_driver_unplugs_them() -> None:
    device = make(requested_size=8 * MB)
    with Loopback(device) as lb:
        driver = MemDriver(lb)
        driver.initialize()
        assert driver.plug(BASE + 2 * BS, 2) == W.RESP_ACK
        lb.write_status(0)  # device reset
        assert device.plugged_size == 4 * MB and device.blocks[2:4] == b"\x01\x01"
        assert device.config[W.OFF_PLUGGED_SIZE : W.OFF_PLUGGED_SIZE + 8] == (4 * MB).to_bytes(
            8, "little"
        )
        # A new driver finds memory plugged that is not its own: UNPLUG ALL.
        again = MemDriver(lb)
        again.initialize()
        assert again.config().plugged_size == 0 and device.blocks.count(1) == 0
    device = make(requested_size=8 * MB)
    device.blocks[0] = 1
    device.plugged_blocks = 1
    device.system_reset()  # a system reset unplugs everything
    assert device.plugged_size == 0 and device.blocks.count(1) == 0


# -- a hostile driver -----------------------------------------------------------------------


@pytest.mark.normative(N_OP_DRV)
@pytest.mark.parametrize(
    ("out", "ins"),
    [
        ([b"\x00" * 23], [10]),  # a short request
        ([W.pack_request(W.Request(W.REQ_STATE, BASE, 1))], [9]),  # no room for the response
        ([], [10]),  # nothing to read
    ],
    ids=["short-request", "short-response", "no-request"],
)
def test_malformed_requests_fail_the_device(out: list[bytes], ins: list[int]) -> None:
    device = make(requested_size=8 * MB)
    with Loopback(device) as lb:
        driver = MemDriver(lb)
        driver.initialize()
        req = driver.submit(0, out, ins)
        driver.kick(0)
        assert failed(lb, device, N_OP_DRV)
        assert not req.done


@pytest.mark.normative(N_CFG_DRV)
def test_config_writes_fail_the_device() -> None:
    device = make(requested_size=8 * MB)
    with Loopback(device) as lb:
        driver = MemDriver(lb)
        driver.initialize()
        lb.write_config(W.OFF_REQUESTED_SIZE, (64 * MB).to_bytes(8, "little"))
        assert failed(lb, device, N_CFG_DRV)
        assert device.requested_size == 8 * MB


def test_padding_in_requests_is_ignored() -> None:
    device = make(requested_size=8 * MB)
    with Loopback(device) as lb:
        driver = MemDriver(lb)
        driver.initialize()
        raw = bytearray(W.pack_request(W.Request(W.REQ_PLUG, BASE, 1)))
        raw[2:8] = b"\xaa" * 6
        raw[18:24] = b"\xbb" * 6
        written, data = driver.call(0, [bytes(raw) + b"extra"], [W.RESP_SIZE])
        assert written == W.RESP_SIZE and W.unpack_response(data) == (W.RESP_ACK, 0)
        assert device.plugged_size == BS


# -- a hostile device -----------------------------------------------------------------------


class ShortAnswers(MemDevice):
    """Writes only the response type (or nothing at all)."""

    answer = b"\x00\x00"

    def handle_chain(self, queue_index: int, chain: Chain) -> int | None:
        return ChainWriter(chain).write(self.answer) if self.answer else 0


@pytest.mark.normative(N_STATE_DRV)
def test_short_responses_are_driver_errors() -> None:
    device = ShortAnswers(region_size=64 * MB, block_size=BS, addr=BASE)
    with Loopback(device) as lb:
        driver = MemDriver(lb)
        driver.initialize()
        assert driver.plug(BASE, 1) == W.RESP_ACK  # only the type matters
        with pytest.raises(MemResponseError, match="no state"):
            driver.state(BASE, 1)
        device.answer = b""
        with pytest.raises(MemResponseError, match="wrote 0 bytes"):
            driver.unplug(BASE, 1)
    device = ShortAnswers(region_size=64 * MB, block_size=BS, addr=BASE)
    device.answer = W.pack_response(W.RESP_BUSY, W.STATE_PLUGGED)
    with Loopback(device) as lb:
        driver = MemDriver(lb)
        driver.initialize()
        # A state in a response that is not ACK is ignored.
        assert driver.state(BASE, 1) == (W.RESP_BUSY, 0)
        with pytest.raises(MemResponseError, match="not acknowledged"):
            driver.unplug_all_until_done(attempts=3)


# -- the control socket and the options ------------------------------------------------------


def test_control_commands(tmp_path: Path) -> None:
    device = make(requested_size=0)
    ctl = tmp_path / "ctl"
    control = MemControl(ctl, device)
    try:
        assert control.command("set 8M") == "ok requested 8.0M (4 blocks)"
        assert device.requested_size == 8 * MB
        assert control.command("status").startswith(f"requested={8 * MB} plugged=0")
        assert control.command("set 3M").startswith("error: requested size")
        assert control.command("set 1G").startswith("error: requested size")
        assert control.command("set lots").startswith("error: not a size")
        assert control.command("").startswith("error: empty")
        assert control.command("grow now").startswith("error: unknown command")
    finally:
        device.close()
    assert not ctl.exists()


def test_control_socket_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    device = make(requested_size=0)
    ctl = tmp_path / "ctl"
    MemControl(ctl, device)
    with Loopback(device, threaded=True) as lb:
        driver = MemDriver(lb)
        driver.initialize()
        answers: list[str] = []

        def client() -> None:
            answers.append(request(ctl, "set 6M"))
            answers.append(request(ctl, "x" * 400))
            answers.append(str(main(["status", "--control", str(ctl)])))

        thread = threading.Thread(target=client)
        thread.start()
        assert lb.wait_until(lambda: driver.config_changes > 0, 10)
        thread.join(10)
        assert driver.balance() == 3 and device.plugged_size == 6 * MB
        assert answers[0] == "ok requested 6.0M (3 blocks)"
        assert answers[1] == "error: line too long" and answers[2] == "0"
        assert "requested=6291456" in capsys.readouterr().out
    device.close()
    assert main(["status", "--control", str(ctl)]) == 1  # nobody listens any more


def test_serve_options(tmp_path: Path) -> None:
    kind = device_type("mem")
    assert kind.device_id == 24 and kind.device is MemDevice
    parser = argparse.ArgumentParser()
    O.add_arguments(parser)
    geometry = ["--size", "1G", "--block-size", "4M", "--addr", "0x140000000"]
    rest = ["--requested", "64M", "--node-id", "1", "--control", str(tmp_path / "c")]
    args = parser.parse_args([*geometry, *rest, "--persistent-suspend", "--discard"])
    device = O.from_arguments(args, DeviceSettings())
    try:
        assert isinstance(device, MemDevice)
        assert (device.region_size, device.block_size, device.addr) == (
            1 << 30,
            4 * MB,
            0x140000000,
        )
        assert device.requested_size == 64 * MB and (tmp_path / "c").is_socket()
        assert device.offered_features >> W.F_PERSISTENT_SUSPEND & 1 and device.discard
        assert "1024 MiB" in device.describe()
    finally:
        device.close()
    for bad in (
        ["--size", "1G", "--block-size", "3M"],
        ["--size", "lots"],
        ["--size", "1G", "--addr", "0x1001"],
    ):
        with pytest.raises(ValueError):
            O.from_arguments(parser.parse_args(bad), DeviceSettings())
    example = kind.example(tmp_path, DeviceSettings())
    assert isinstance(example, MemDevice) and example.requested_size == 32 * MB


@pytest.mark.normative(N_CFG_DEV)
def test_over_pci_with_a_config_interrupt_and_the_block_hook() -> None:
    device = make(requested_size=0)
    seen: list[tuple[int, int, bool]] = []
    device.on_blocks_changed = lambda first, count, plugged: seen.append((first, count, plugged))
    transport = pci_loopback(device)
    driver = MemDriver(transport)
    driver.initialize()
    device.set_requested_size(8 * MB)
    assert transport.wait_until(lambda: driver.config_changes > 0, 5)
    assert driver.balance() == 4 and device.plugged_size == 8 * MB
    assert driver.unplug(BASE + BS, 1) == W.RESP_ACK
    assert seen[:4] == [(i, 1, True) for i in range(4)] and seen[4] == (1, 1, False)
    assert driver.unplug_all() == W.RESP_ACK
    assert seen[-1] == (0, 32, False)


# -- the region's memory ------------------------------------------------------------------


def block_data(index: int) -> bytes:
    """A block's own pattern: its index everywhere, and marks at both ends."""
    return b"<" + bytes([index + 0x40]) * (BS - 2) + b">"


@pytest.mark.normative(N_OP_DEV)
@pytest.mark.parametrize("discard", [False, True], ids=["keep", "discard"])
def test_plugged_memory_is_never_touched_and_unplugged_stays_readable(discard: bool) -> None:
    # The loopback's guest memory holds the region (shared memory, as a VMM maps it).
    device = make(requested_size=16 * MB, discard=discard)
    with Loopback(device, memfd=True) as lb:
        _region, fd = lb.guest.add_memfd(BASE, 64 * MB, name="mem-region")
        os.close(fd)
        driver = MemDriver(lb, avoid_features=1 << W.F_UNPLUGGED_INACCESSIBLE)
        driver.initialize()
        assert not driver.has(W.F_UNPLUGGED_INACCESSIBLE)
        usable = driver.config().usable_region_size // BS
        assert driver.plug(BASE, 8) == W.RESP_ACK
        # Plugged blocks can be read and written.
        for i in range(8):
            lb.memory.write(BASE + i * BS, block_data(i))
        # Every request leaves plugged memory alone, neighbours of unplugged blocks too.
        assert driver.unplug(BASE + 2 * BS, 2) == W.RESP_ACK
        assert driver.state(BASE, usable) == (W.RESP_ACK, W.STATE_MIXED)
        assert driver.plug(BASE + BS, 2) == W.RESP_ERROR  # block 1 is still plugged
        assert driver.plug(BASE, 1) == W.RESP_ERROR  # already plugged: nothing changes
        assert driver.unplug(BASE + 2 * BS, 1) == W.RESP_ERROR  # already unplugged
        assert driver.unplug(BASE + 7 * BS, 2) == W.RESP_ERROR  # block 8 is unplugged
        device.set_requested_size(20 * MB)
        driver.suspend()
        driver.resume()
        for i in (0, 1, 4, 5, 6, 7):
            assert lb.memory.read(BASE + i * BS, BS) == block_data(i), i
        # Unplugged blocks inside the usable region stay readable (through the CPU).
        for i in (2, 3, *range(8, usable)):
            data = lb.memory.read(BASE + i * BS, BS)
            if i in (2, 3):
                assert data == (bytes(BS) if discard else block_data(i))
            else:
                assert data == bytes(BS)  # never plugged, never written
        assert device.discarded_bytes == (2 * BS if discard else 0)
        # Plugged again, blocks 2 and 3 are writable; the rest are still intact.
        assert driver.plug(BASE + 2 * BS, 2) == W.RESP_ACK
        for i in (2, 3):
            lb.memory.write(BASE + i * BS, block_data(i))
        for i in range(8):
            assert lb.memory.read(BASE + i * BS, BS) == block_data(i), i
        # UNPLUG ALL gives everything back (or nothing at all without discard).
        assert driver.unplug_all() == W.RESP_ACK
        expect = [bytes(BS) if discard else block_data(i) for i in range(8)]
        assert [lb.memory.read(BASE + i * BS, BS) for i in range(8)] == expect
        assert device.discarded_bytes == (10 * BS if discard else 0)
        assert not lb.read_status() & S.DEVICE_NEEDS_RESET


def test_discard_keeps_to_unplugged_blocks_smaller_than_a_page() -> None:
    # Blocks of 1 KiB: only host pages wholly made of unplugged blocks go.
    kb = 1024
    device = MemDevice(
        region_size=64 * kb, block_size=kb, addr=BASE, requested_size=64 * kb, discard=True
    )
    with Loopback(device, memfd=True) as lb:
        _region, fd = lb.guest.add_memfd(BASE, 64 * kb, name="mem-region")
        os.close(fd)
        driver = MemDriver(lb)
        driver.initialize()
        assert driver.plug(BASE, 64) == W.RESP_ACK
        lb.memory.write(BASE, b"\xa5" * 64 * kb)
        assert driver.unplug(BASE + 3 * kb, 2) == W.RESP_ACK  # inside one 4 KiB page
        assert driver.unplug(BASE + 8 * kb, 8) == W.RESP_ACK  # two whole pages
        assert device.discarded_bytes == 8 * kb
        data = lb.memory.read(BASE, 64 * kb)
        assert data[: 8 * kb] == b"\xa5" * 8 * kb
        assert data[8 * kb : 16 * kb] == bytes(8 * kb)
        assert data[16 * kb :] == b"\xa5" * 48 * kb


def test_discard_without_the_region_in_guest_memory_does_nothing() -> None:
    device = make(requested_size=8 * MB, discard=True)
    with Loopback(device, memfd=True) as lb:  # the region (at 4 GiB) is not mapped here
        driver = MemDriver(lb)
        driver.initialize()
        assert driver.plug(BASE, 4) == W.RESP_ACK
        assert driver.unplug(BASE, 2) == W.RESP_ACK and driver.unplug_all() == W.RESP_ACK
        assert device.discarded_bytes == 0 and device.plugged_size == 0
        assert not lb.read_status() & S.DEVICE_NEEDS_RESET
