"""virtio-balloon: the device model and the driver, in process (register-level loopback)."""

from __future__ import annotations

import argparse
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from virtio.control import request
from virtio.devices.balloon import BalloonDevice, BalloonDriver
from virtio.devices.balloon import options as O
from virtio.devices.balloon import wire as W
from virtio.devices.balloon.control import BalloonControl, main
from virtio.devices.guestpages import release_view
from virtio.devices.registry import DeviceSettings
from virtio.errors import NegotiationError
from virtio.sizes import parse_size
from virtio.spec.status import DeviceStatus as S
from virtio.transport.loopback import Loopback

BALLOON = "Device Types / Memory Balloon Device"
N_OP_DEV = f"devicenormative:{BALLOON} / Device Operation"
N_OP_DRV = f"drivernormative:{BALLOON} / Device Operation"
N_FEAT_DRV = f"drivernormative:{BALLOON} / Feature bits"
N_FEAT_DEV = f"devicenormative:{BALLOON} / Feature bits"
N_STATS_DEV = f"devicenormative:{BALLOON} / Device Operation / Memory Statistics"
N_STATS_DRV = f"drivernormative:{BALLOON} / Device Operation / Memory Statistics"
N_HINT_DEV = f"devicenormative:{BALLOON} / Device Operation / Free Page Hinting"
N_HINT_DRV = f"drivernormative:{BALLOON} / Device Operation / Free Page Hinting"
N_POISON_DRV = f"drivernormative:{BALLOON} / Device Operation / Page Poison"
N_POISON_DEV = f"devicenormative:{BALLOON} / Device Operation / Page Poison"
N_REPORT_DEV = f"devicenormative:{BALLOON} / Device Operation / Free Page Reporting"
N_REPORT_DRV = f"drivernormative:{BALLOON} / Device Operation / Free Page Reporting"


def until(driver: BalloonDriver, done: Callable[[], bool], timeout: float = 10.0) -> bool:
    """Serve the driver (stats refills, target changes) until ``done()``."""

    def check() -> bool:
        driver.service()
        return done()

    return driver.transport.wait_until(check, timeout)


def failed(lb: Loopback, device: BalloonDevice, normative: str) -> bool:
    reason = device.needs_reset_reason or ""
    return bool(lb.read_status() & S.DEVICE_NEEDS_RESET) and normative in reason


# -- wire format ----------------------------------------------------------------------


def test_wire_round_trips() -> None:
    assert W.unpack_pfns(W.pack_pfns([1, 2, 0xFFFFFFFF])) == (1, 2, 0xFFFFFFFF)
    with pytest.raises(ValueError, match="whole number"):
        W.unpack_pfns(b"\x01\x02\x03")
    stats = {W.S_MEMFREE: 1 << 30, W.S_MEMTOT: 2 << 30}
    for order in ("little", "big"):
        data = W.pack_stats(stats, order)
        assert len(data) == 20
        assert W.unpack_stats(data, order) == (stats, 0)
        assert W.unpack_cmd_id(W.pack_cmd_id(7, order), order) == 7
    assert parse_size("64M") == 64 << 20 and parse_size("1GiB") == 1 << 30
    assert parse_size("4096") == 4096 and W.pages_for(4097) == 2
    with pytest.raises(ValueError, match="not a size"):
        parse_size("lots")
    assert W.runs([5, 3, 4, 9, 9]) == [(3, 3), (9, 1)]
    assert "free_memory=1.0G" in W.format_stats(stats)


@pytest.mark.normative(N_STATS_DEV)
def test_unknown_stat_tags_are_ignored_in_any_order() -> None:
    data = W.pack_stats({W.S_MEMTOT: 5, 99: 1, W.S_MEMFREE: 3}) + b"\x00" * 4
    stats, extra = W.unpack_stats(data)
    assert stats == {W.S_MEMTOT: 5, W.S_MEMFREE: 3} and extra == 4


def test_queue_roles_follow_the_features() -> None:
    assert W.queue_roles(0) == ["inflateq", "deflateq"]
    every = sum(1 << b for b in range(6))
    assert W.queue_roles(every) == [
        "inflateq",
        "deflateq",
        "statsq",
        "free_page_vq",
        "reporting_vq",
    ]
    assert W.queue_roles(1 << W.PAGE_REPORTING) == ["inflateq", "deflateq", "reporting_vq"]


# -- inflate and deflate --------------------------------------------------------------


@pytest.mark.normative(N_OP_DEV, N_OP_DRV)
@pytest.mark.parametrize("legacy", [False, True], ids=["modern", "legacy-big"])
def test_driver_follows_the_target_up_and_down(legacy: bool) -> None:
    device = BalloonDevice(target_pages=100)
    with Loopback(device, memfd=True, legacy=legacy, legacy_order="big") as lb:
        driver = BalloonDriver(lb)
        driver.initialize()
        assert driver.follow() == 100
        assert len(device.pages) == 100 and device.actual == 100
        # The config space is little-endian through the legacy interface too.
        assert lb.read_config(W.ACTUAL, 4) == (100).to_bytes(4, "little")
        assert device.counters.released_bytes == 100 * W.PAGE_SIZE
        device.set_target(30)
        assert until(driver, lambda: device.actual == 30)
        assert len(device.pages) == 30 and device.counters.deflated == 70
        assert {a >> W.PAGE_SHIFT for a in driver.ballooned} == device.pages


def test_removed_pages_really_leave_the_backing_memory() -> None:
    device = BalloonDevice(release="remove", target_pages=4)
    with Loopback(device, memfd=True) as lb:
        driver = BalloonDriver(lb)
        driver.initialize()
        spare = lb.allocator.alloc(8 * W.PAGE_SIZE, W.PAGE_SIZE)
        lb.allocator.free(spare)
        # The driver takes the lowest free pages: put data in them first.
        lb.memory.write(spare, b"\xaa" * 8 * W.PAGE_SIZE)
        driver.follow()
        first = min(driver.ballooned)
        assert lb.memory.read(first, W.PAGE_SIZE) == bytes(W.PAGE_SIZE)


def test_heap_memory_is_never_advised() -> None:
    device = BalloonDevice(target_pages=8)
    with Loopback(device) as lb:  # a bytearray: the Python heap
        driver = BalloonDriver(lb)
        driver.initialize()
        assert driver.follow() == 8
        assert device.counters.released_bytes == 0
    assert release_view(memoryview(bytearray(1 << 16)), "dontneed") == 0


def test_release_keeps_to_whole_pages_inside_the_view() -> None:
    import mmap

    m = mmap.mmap(-1, 4 * mmap.PAGESIZE)
    view = memoryview(m)
    try:
        assert release_view(view[100 : 100 + mmap.PAGESIZE], "dontneed") == 0
        assert release_view(view[100 : 100 + 3 * mmap.PAGESIZE], "dontneed") == 2 * mmap.PAGESIZE
        assert release_view(view[: mmap.PAGESIZE], "none") == 0
    finally:
        view.release()
        m.close()


@pytest.mark.normative(N_OP_DEV)
def test_pfns_outside_guest_memory_or_unknown_are_ignored() -> None:
    device = BalloonDevice()
    with Loopback(device, memfd=True, memory_size=4 << 20) as lb:
        driver = BalloonDriver(lb)
        driver.initialize()
        driver.call(0, [W.pack_pfns([0xFFFFF, 0x10000000, 0xFFFFFFFF])])
        driver.call(1, [W.pack_pfns([0x200])])  # never inflated
        assert not lb.read_status() & S.DEVICE_NEEDS_RESET
        assert device.pages == set() and device.counters.ignored == 4
        assert device.counters.released_bytes == 0


def test_balloon_stops_when_the_driver_runs_out_of_pages() -> None:
    # A hostile (or greedy) device asks for more than the guest has.
    device = BalloonDevice(target_pages=0xFFFFFFFF)
    with Loopback(device, memory_size=2 << 20) as lb:
        driver = BalloonDriver(lb)
        driver.initialize()
        got = driver.follow()
        assert 0 < got < 512 and device.actual == got


# -- hostile drivers ------------------------------------------------------------------


@pytest.mark.normative(N_OP_DRV)
@pytest.mark.parametrize("queue", [0, 1])
def test_malformed_pfn_buffers_fail_the_device(queue: int) -> None:
    for out, ins in (([b"\x01\x02\x03"], []), ([W.pack_pfns([1])], [16])):
        device = BalloonDevice()
        with Loopback(device) as lb:
            driver = BalloonDriver(lb)
            driver.initialize()
            request_ = driver.submit(queue, out, ins)
            driver.kick(queue)
            assert failed(lb, device, N_OP_DRV)
            assert not request_.done


@pytest.mark.normative(N_STATS_DRV)
def test_a_second_stats_buffer_fails_the_device() -> None:
    device = BalloonDevice()
    with Loopback(device) as lb:
        driver = BalloonDriver(lb)
        driver.initialize()
        driver.submit(2, [W.pack_stats({W.S_MEMFREE: 1})])
        driver.kick(2)
        assert failed(lb, device, N_STATS_DRV)


@pytest.mark.normative(N_STATS_DRV)
def test_a_writable_stats_buffer_fails_the_device() -> None:
    device = BalloonDevice()
    with Loopback(device) as lb:
        driver = BalloonDriver(lb, features=1 << W.FREE_PAGE_HINT | 1 << W.STATS_VQ)
        driver.initialize()
        device.request_stats()
        driver.poll()
        driver.submit(2, [], [10])
        driver.kick(2)
        assert failed(lb, device, N_STATS_DRV)


@pytest.mark.normative(N_HINT_DRV)
def test_hint_protocol_violations_fail_the_device() -> None:
    device = BalloonDevice()
    with Loopback(device) as lb:
        driver = BalloonDriver(lb)
        driver.initialize()
        driver.submit(3, [b"\x02\x00\x00\x00\x00"])  # five bytes, not four
        driver.kick(3)
        assert failed(lb, device, N_HINT_DRV)
    device = BalloonDevice()
    with Loopback(device) as lb:
        driver = BalloonDriver(lb)
        driver.initialize()
        cmd_id = device.start_hinting()
        driver.call(3, [W.pack_cmd_id(cmd_id)])
        driver.submit(3, [W.pack_cmd_id(cmd_id)])
        driver.kick(3)
        assert failed(lb, device, N_HINT_DRV)


@pytest.mark.normative(N_POISON_DRV)
def test_poison_val_changed_while_live_fails_the_device() -> None:
    device = BalloonDevice()
    with Loopback(device) as lb:
        driver = BalloonDriver(lb, poison_val=0x5A5A5A5A)
        driver.initialize()
        assert device.poison_val == 0x5A5A5A5A
        lb.write_config(W.POISON_VAL, b"\x00\x00\x00\x00")
        assert failed(lb, device, N_POISON_DRV)


def test_num_pages_and_cmd_id_are_read_only() -> None:
    device = BalloonDevice(target_pages=5)
    with Loopback(device) as lb:
        driver = BalloonDriver(lb)
        driver.initialize()
        lb.write_config(W.NUM_PAGES, b"\xff\xff\xff\xff")
        lb.write_config(W.FREE_PAGE_HINT_CMD_ID, b"\x09\x00\x00\x00")
        assert driver.target == 5 and driver.cmd_id == W.CMD_ID_DONE
        assert not lb.read_status() & S.DEVICE_NEEDS_RESET


def test_actual_counts_once_its_last_byte_is_written() -> None:
    device = BalloonDevice()
    with Loopback(device, legacy=True) as lb:
        driver = BalloonDriver(lb)
        driver.initialize()
        lb.write_config(W.ACTUAL, b"\x10")
        lb.write_config(W.ACTUAL + 1, b"\x00")
        lb.write_config(W.ACTUAL + 2, b"\x00")
        assert device.actual == 0
        lb.write_config(W.ACTUAL + 3, b"\x00")
        assert device.actual == 0x10


# -- statistics -----------------------------------------------------------------------


@pytest.mark.normative(N_STATS_DEV, N_STATS_DRV)
def test_stats_arrive_and_the_timer_asks_for_more() -> None:
    seen: list[dict[int, int]] = []
    device = BalloonDevice(stats_interval=0.05, on_stats=seen.append)
    with Loopback(device) as lb:
        driver = BalloonDriver(lb)
        driver.initialize()
        assert device.stats[W.S_MEMTOT] == lb.allocator.size
        assert driver.wait_stats_request(5.0)
        assert until(driver, lambda: device.counters.stats_updates >= 3)
        assert len(seen) >= 3 and seen[-1][W.S_MEMFREE] > 0
        # One buffer with the device at all times.
        assert device.deferred_count == 1


@pytest.mark.normative(N_STATS_DEV)
def test_legacy_stats_are_in_guest_order_and_the_first_is_ignored() -> None:
    device = BalloonDevice(stats_interval=None)
    with Loopback(device, legacy=True, legacy_order="big") as lb:
        driver = BalloonDriver(lb, features=1 << W.STATS_VQ, stats=lambda: {W.S_MEMFREE: 1 << 20})
        # stats_interval=None: no statsq offered, so the driver gets none.
        driver.initialize()
        assert not driver.has(W.STATS_VQ)
    device = BalloonDevice(stats_interval=60)
    with Loopback(device, legacy=True, legacy_order="big") as lb:
        driver = BalloonDriver(lb, stats=lambda: {W.S_MEMFREE: 1 << 20})
        driver.initialize()
        assert device.stats == {} and device.counters.stats_updates == 0
        assert device.request_stats()
        assert until(driver, lambda: device.counters.stats_updates == 1)
        assert device.stats == {W.S_MEMFREE: 1 << 20}


def test_a_driver_without_the_stats_queue_gets_compact_queue_numbers() -> None:
    device = BalloonDevice(stats_interval=None)
    with Loopback(device) as lb:
        driver = BalloonDriver(lb)
        driver.initialize()
        assert device.roles == ["inflateq", "deflateq", "free_page_vq", "reporting_vq"]
        assert driver.report_free_pages(4) == 4
        assert device.counters.reported_bytes == 4 * W.PAGE_SIZE
        with pytest.raises(NegotiationError, match="statsq"):
            driver.queue_of(W.STATSQ)


# -- free page hinting, reporting, poison ---------------------------------------------


@pytest.mark.normative(N_HINT_DEV, N_HINT_DRV)
def test_a_free_page_hinting_round() -> None:
    device = BalloonDevice()
    with Loopback(device) as lb:
        driver = BalloonDriver(lb)
        driver.initialize()
        assert driver.hint_free_pages(8) == 0  # DONE: no round
        cmd_id = device.start_hinting()
        assert cmd_id >= W.CMD_ID_FIRST and driver.cmd_id == cmd_id
        assert driver.hint_free_pages(8) == 8
        assert device.counters.hinted_pages == 8
        # The next round has a new id; hints with the old one are ignored.
        new_id = device.start_hinting()
        assert new_id != cmd_id
        driver.call(3, [W.pack_cmd_id(cmd_id)])
        driver.call(3, [], [W.PAGE_SIZE])
        assert device.counters.hinted_pages == 8
        device.stop_hinting(done=True)
        assert driver.cmd_id == W.CMD_ID_DONE
        assert not lb.read_status() & S.DEVICE_NEEDS_RESET


@pytest.mark.normative(N_REPORT_DEV, N_REPORT_DRV, N_POISON_DEV, N_POISON_DRV, N_FEAT_DRV)
def test_reported_pages_keep_the_poison_value() -> None:
    device = BalloonDevice(release="remove")
    with Loopback(device, memfd=True) as lb:
        driver = BalloonDriver(lb, poison_val=0xDEADBEEF)
        driver.initialize()
        assert driver.has(W.PAGE_POISON) and device.poison_val == 0xDEADBEEF
        page = lb.allocator.alloc(W.PAGE_SIZE, W.PAGE_SIZE)
        lb.allocator.free(page)
        assert driver.report_free_pages(1) == 1
        # Removal would zero the page: with a poison value the device keeps it.
        assert lb.memory.read(page, 8) == (0xDEADBEEF).to_bytes(4, "little") * 2
        assert device.counters.reported_bytes == W.PAGE_SIZE
        # Deflated pages come back holding the poison value.
        device.set_target(2)
        assert until(driver, lambda: device.actual == 2)
        device.set_target(0)
        assert until(driver, lambda: device.actual == 0)


@pytest.mark.normative(N_FEAT_DRV)
def test_a_driver_without_poison_declines_the_feature() -> None:
    device = BalloonDevice()
    with Loopback(device) as lb:
        driver = BalloonDriver(lb)
        driver.initialize()
        assert driver.has(W.MUST_TELL_HOST)
        assert not driver.has(W.PAGE_POISON) and driver.has(W.PAGE_REPORTING)


@pytest.mark.normative(N_FEAT_DRV)
def test_a_poisoning_driver_reports_pages_only_with_page_poison() -> None:
    # The driver keeps poison_val in its free pages: without PAGE_POISON the
    # device could change reported pages, so reporting is declined.
    device = BalloonDevice(page_poison=False)
    with Loopback(device) as lb:
        driver = BalloonDriver(lb, poison_val=0x5A5A5A5A)
        driver.initialize()
        assert driver.has(W.MUST_TELL_HOST)
        assert not driver.has(W.PAGE_POISON) and not driver.has(W.PAGE_REPORTING)
        assert W.REPORTING_VQ not in device.roles
        with pytest.raises(NegotiationError, match="reporting_vq"):
            driver.report_free_pages(1)
        plain = BalloonDriver(lb)
        plain.initialize()
        assert plain.has(W.PAGE_REPORTING) and not plain.has(W.PAGE_POISON)
        assert plain.report_free_pages(2) == 2
    device = BalloonDevice()
    with Loopback(device) as lb:
        driver = BalloonDriver(lb, poison_val=0x5A5A5A5A)
        driver.initialize()
        assert driver.has(W.PAGE_POISON) and driver.has(W.PAGE_REPORTING)


@pytest.mark.normative(N_FEAT_DEV)
def test_removed_pages_need_a_driver_that_tells_the_host(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # MADV_REMOVE loses the pages' contents: MUST_TELL_HOST is then required.
    device = BalloonDevice(release="remove", target_pages=4)
    assert device.require_must_tell_host
    with Loopback(device, memfd=True) as lb:
        driver = BalloonDriver(lb, avoid_features=1 << W.MUST_TELL_HOST)
        with caplog.at_level("INFO"), pytest.raises(NegotiationError, match="refused"):
            driver.initialize()
        assert not lb.read_status() & S.FEATURES_OK
        assert "refusing FEATURES_OK" in caplog.text and "MUST_TELL_HOST" in caplog.text
        assert "release remove" in caplog.text and N_FEAT_DEV in caplog.text
        # A driver that accepts it is served.
        driver = BalloonDriver(lb)
        driver.initialize()
        assert driver.has(W.MUST_TELL_HOST) and driver.follow() == 4
    # Pages that keep their contents (or a device told not to care): no refusal.
    for kw in ({"release": "dontneed"}, {"release": "remove", "require_must_tell_host": False}):
        device = BalloonDevice(target_pages=4, **kw)
        with Loopback(device, memfd=True) as lb:
            driver = BalloonDriver(lb, avoid_features=1 << W.MUST_TELL_HOST)
            driver.initialize()
            assert not driver.has(W.MUST_TELL_HOST) and driver.follow() == 4
    # Nothing to refuse when the bit is not offered.
    device = BalloonDevice(release="remove", must_tell_host=False)
    assert not device.require_must_tell_host
    with Loopback(device, memfd=True) as lb:
        BalloonDriver(lb).initialize()
        assert lb.read_status() & S.DRIVER_OK


def test_a_legacy_driver_without_must_tell_host_is_served() -> None:
    # A legacy interface cannot refuse features: such guests must be supported.
    device = BalloonDevice(release="remove", target_pages=4)
    with Loopback(device, memfd=True, legacy=True) as lb:
        driver = BalloonDriver(lb, avoid_features=1 << W.MUST_TELL_HOST)
        driver.initialize()
        assert not driver.has(W.MUST_TELL_HOST) and driver.follow() == 4
        assert not lb.read_status() & S.DEVICE_NEEDS_RESET


def test_reset_gives_every_page_back() -> None:
    device = BalloonDevice(target_pages=16)
    with Loopback(device) as lb:
        driver = BalloonDriver(lb)
        driver.initialize()
        driver.follow()
        driver.reset()
        assert device.pages == set() and device.actual == 0
        assert device.target_pages == 16 and lb.read_config(W.NUM_PAGES, 4) == b"\x10\0\0\0"


# -- the control socket and the options -----------------------------------------------


def test_control_commands(tmp_path: Path) -> None:
    device = BalloonDevice()
    ctl = tmp_path / "ctl"
    control = BalloonControl(ctl, device)
    try:
        assert control.command("set 1M") == "ok target 1.0M (256 pages)"
        assert device.target_pages == 256
        assert control.command("status").startswith("target=256 actual=0")
        assert control.command("stats") == "(none)"
        assert control.command("hint") == "ok cmd_id 2"
        assert control.command("hint stop") == "ok cmd_id 0"
        assert control.command("hint done") == "ok cmd_id 1"
        assert control.command("set 99T").startswith("error: ")
        assert control.command("set lots").startswith("error: not a size")
        assert control.command("").startswith("error: empty")
        assert control.command("explode now").startswith("error: unknown command")
    finally:
        device.close()
    assert not ctl.exists()


def test_control_socket_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    device = BalloonDevice()
    ctl = tmp_path / "ctl"
    BalloonControl(ctl, device)
    with Loopback(device, threaded=True) as lb:
        driver = BalloonDriver(lb)
        driver.initialize()
        answers: list[str] = []

        def client() -> None:
            answers.append(request(ctl, "set 64K"))
            answers.append(request(ctl, "x" * 400))
            # The status is asked once the driver has followed the target.
            deadline = time.monotonic() + 10
            while device.actual != 16 and time.monotonic() < deadline:
                time.sleep(0.01)
            answers.append(str(main(["status", "--control", str(ctl)])))

        thread = threading.Thread(target=client)
        thread.start()
        assert until(driver, lambda: device.actual == 16)
        thread.join(10)
        assert answers[0] == "ok target 64.0K (16 pages)"
        assert answers[1] == "error: line too long" and answers[2] == "0"
        assert "actual=16" in capsys.readouterr().out
    device.close()
    assert main(["stats", "--control", str(ctl)]) == 1  # nobody listens any more


def test_control_socket_survives_garbage(tmp_path: Path) -> None:
    device = BalloonDevice()
    ctl = tmp_path / "ctl"
    BalloonControl(ctl, device)
    with Loopback(device, threaded=True):
        garbage = b"\xff\xfe\x00set\x00 1M\r\n\n\x1b[2Jstatus now\nset \xd9\xa3K\nset " + b"9" * 200
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(10)
            sock.connect(str(ctl))
            sock.sendall(garbage + b"\nhint\n")
            answers = b""
            while answers.count(b"\n") < 6:
                chunk = sock.recv(4096)
                assert chunk, answers
                answers += chunk
        lines = answers.decode().splitlines()
        assert [line.split(":")[0] for line in lines[:3]] == ["error"] * 3, lines
        assert "unknown command" in lines[0] and "empty" in lines[1]
        assert "\x1b" not in lines[2]  # echoed escaped, never raw
        assert lines[3].startswith("error: not a size")  # an Arabic-Indic 3: ASCII digits only
        assert "more than the balloon can hold" in lines[4]
        assert lines[5] == "ok cmd_id 2"
        # A client that leaves mid-line loses nothing for the others.
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.connect(str(ctl))
            sock.sendall(b"set 4")
        assert request(ctl, "set 8K") == "ok target 8.0K (2 pages)"
    device.close()


def test_serve_options(tmp_path: Path) -> None:
    parser = argparse.ArgumentParser()
    O.add_arguments(parser)
    args = parser.parse_args(
        ["--target", "8M", "--control", str(tmp_path / "c"), "--no-free-page-hint"]
    )
    assert args.require_must_tell_host is None
    assert O.num_queues(args) == 4
    device = O.from_arguments(args, DeviceSettings())
    try:
        assert isinstance(device, BalloonDevice)
        assert device.target_pages == 2048 and (tmp_path / "c").is_socket()
        assert not device.offered_features >> W.FREE_PAGE_HINT & 1
        assert "FREE_PAGE_HINT" not in device.describe()
        assert not device.require_must_tell_host  # release dontneed keeps the contents
    finally:
        device.close()
    for flags, required in (
        (["--release", "remove"], True),
        (["--release", "remove", "--no-require-must-tell-host"], False),
        (["--require-must-tell-host"], True),
    ):
        device = O.from_arguments(parser.parse_args(flags), DeviceSettings())
        assert isinstance(device, BalloonDevice)
        assert device.require_must_tell_host is required
        device.close()
    for bad in (["--target", "much"], ["--stats-interval", "-1"], ["--target", "100T"]):
        with pytest.raises(ValueError):
            O.from_arguments(parser.parse_args(bad), DeviceSettings())
