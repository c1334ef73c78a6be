"""`virtio bench latency`: where one blk request's time goes, from kick to call.

One 4 KiB read at a time (queue depth 1) from pyvirtio's blk driver and
front-end to `virtio serve blk` in another process. Both processes stamp the
same clock (CLOCK_MONOTONIC): the driver when it kicks and when it sees the
used buffer; the back-end, traced from outside its code (a wrapper module
that patches a few methods in its own process), when its loop wakes for the
kick, when the ring pop returns, around the device's request handling, when
the used entry is published and when the call eventfd is written. The table
gives the median of each stage, with the back-end polling its rings (the
default) and waiting for kicks (``--poll-us 0``); the same driver against
qemu-storage-daemon gives the end-to-end figure to compare with.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from virtio.bench.peers import qsd_command, start_process, stop_process
from virtio.devices.blk import BlkDriver
from virtio.devices.blk.wire import BLK_REQ_HEADER, T_IN
from virtio.spec import features as F
from virtio.vhost_user.frontend import connect_blk

_HDR = BLK_REQ_HEADER.struct
STAGES = [
    ("kick written -> request popped from the ring", "kick", "popped"),
    ("  of which: kick -> back-end loop awake (epoll wake-up)", "kick", "wake"),
    ("  of which: awake -> popped (dispatch to the ring)", "wake", "popped"),
    ("popped -> the device's handler starts", "popped", "handle"),
    ("request handled (header, preadv, status byte)", "handle", "handled"),
    ("handled -> used entry published (push, event check)", "handled", "pushed"),
    ("published -> call eventfd written", "pushed", "signalled"),
    ("published -> driver sees the used entry", "pushed", "seen"),
    ("kick written -> driver sees it (end to end)", "kick", "seen"),
]


# -- the traced back-end (a child process) ------------------------------------------


def _serve_traced(sock: str, image: str, trace: str, poll_us: float, packed: bool) -> None:
    """Run `virtio serve blk`'s server with time stamps around its steps."""
    from virtio.core.device import RingOptions
    from virtio.devices.blk import BlkDevice
    from virtio.queue.packed import PackedDeviceQueue
    from virtio.queue.split import SplitDeviceQueue
    from virtio.vhost_user import server as server_module
    from virtio.vhost_user.backend import BackendSession

    clock = time.monotonic_ns
    stamps: dict[str, list[int]] = {k: [] for k in ("wake", "popped", "handle", "handled")}
    stamps.update(pushed=[])
    woke = [0]

    def traced(
        cls: type,
        name: str,
        before: Callable[[Any, Any], None] | None,
        after: Callable[[Any, Any], None] | None,
    ) -> None:
        original = getattr(cls, name)

        def wrapper(self: object, *args: object, **kw: object) -> object:
            if before is not None:
                before(self, args)
            result = original(self, *args, **kw)
            if after is not None:
                after(self, result)
            return result

        setattr(cls, name, wrapper)

    def on_kick(_self: object, _args: object) -> None:
        woke[0] = clock()

    def on_poll(_self: object, _args: object) -> None:
        woke[0] = clock()

    def on_pop(_self: object, result: object) -> None:
        if isinstance(result, list) and result:
            stamps["wake"].append(woke[0])
            stamps["popped"].append(clock())

    traced(server_module.VhostUserServer, "_kick", on_kick, None)
    traced(BackendSession, "poll", on_poll, None)
    for ring in (SplitDeviceQueue, PackedDeviceQueue):
        traced(ring, "pop_many", None, on_pop)
        traced(ring, "push_many", None, lambda _s, _r: stamps["pushed"].append(clock()))
    traced(BlkDevice, "handle_chain", lambda _s, _a: stamps["handle"].append(clock()),
           lambda _s, _r: stamps["handled"].append(clock()))  # fmt: skip
    signals: list[tuple[int, int]] = []  # (the push it follows, time)

    def on_signal(_self: object, _args: object) -> None:
        signals.append((len(stamps["pushed"]) - 1, clock()))

    traced(server_module.OsHost, "signal", on_signal, None)

    device = BlkDevice(image, ring=RingOptions(packed=packed))
    server = server_module.VhostUserServer(sock, device, poll_us=poll_us)
    signal.signal(signal.SIGTERM, lambda *_: server.stop())
    try:
        server.serve_forever()
    finally:
        device.close()
        Path(trace).write_text(json.dumps({**stamps, "signals": signals}))


# -- the driver side ------------------------------------------------------------------


def _qd1_reads(sock: Path, count: int, sleep_on_call: bool) -> dict[str, list[int]]:
    """``count`` 4 KiB reads one at a time; returns the driver's time stamps."""
    clock = time.monotonic_ns
    kicks: list[int] = []
    seen: list[int] = []
    with connect_blk(str(sock)) as frontend:
        driver = BlkDriver(frontend, avoid_features=1 << F.VIRTIO_F_RING_PACKED)
        driver.initialize()
        queue = driver.queues[0]
        alloc = frontend.allocator
        header, data, status = alloc.alloc(16), alloc.alloc(4096, 4096), alloc.alloc(1)
        memory = frontend.memory
        kick_fd = frontend.kick_fds[0]
        sectors = driver.capacity // 8
        for i in range(count + 50):
            memory.write(header, _HDR.pack(T_IN, 0, (i * 7919 % sectors) * 8))
            queue.add([(header, 16)], [(data, 4096), (status, 1)], i)
            t_kick = clock()
            if queue.kick_needed():
                os.eventfd_write(kick_fd, 1)
            if sleep_on_call:
                while not queue.enable_interrupts():
                    frontend.wait_interrupt(1.0)
                    if queue.has_used():
                        break
                queue.disable_interrupts()
            else:
                while not queue.has_used():
                    pass
            t_seen = clock()
            assert queue.get_used() == [(i, 4097)]
            if i >= 50:  # the first requests warm both processes up
                kicks.append(t_kick)
                seen.append(t_seen)
        driver.reset()
    return {"kick": kicks, "seen": seen}


def _medians(trace: dict[str, Any], driver: dict[str, list[int]], woken: bool) -> dict[str, float]:
    n = len(driver["kick"])
    # The back-end served 50 warm-up requests first; its last n stamps match ours.
    rows = {
        key: values[-n:] for key, values in trace.items() if key != "signals" and len(values) >= n
    }
    rows.update(driver)
    out: dict[str, float] = {}
    for name, start, end in STAGES:
        if not woken and "wake" in (start, end):
            continue  # polling found the request: no wake-up to time
        if end == "signalled":
            # Only the pushes the driver wanted a call for have one.
            pushed = trace["pushed"]
            deltas = [(t - pushed[i]) / 1000 for i, t in trace["signals"][-n:] if i >= 0]
            if deltas:
                out[name] = round(statistics.median(deltas), 1)
            continue
        if start in rows and end in rows:
            deltas = [(b - a) / 1000 for a, b in zip(rows[start], rows[end], strict=True)]
            out[name] = round(statistics.median(deltas), 1)
    return out


def run_pyvirtio(
    image: Path, work: Path, poll_us: float, count: int, sleep: bool
) -> dict[str, float]:
    sock, trace = work / f"lat-{poll_us}.sock", work / f"lat-{poll_us}.json"
    cmd = [sys.executable, "-m", "virtio.bench.latency", "--serve", str(sock), str(image),
           str(trace), str(poll_us)]  # fmt: skip
    proc = start_process(cmd, sock, work / f"lat-{poll_us}.log")
    try:
        driver = _qd1_reads(sock, count, sleep)
    finally:
        stop_process(proc)
    return _medians(json.loads(trace.read_text()), driver, woken=poll_us == 0)


def run_qsd(image: Path, work: Path, count: int, sleep: bool) -> float:
    sock = work / "qsd.sock"
    proc = start_process(qsd_command(image, sock), sock, work / "qsd.log")
    try:
        driver = _qd1_reads(sock, count, sleep)
    finally:
        stop_process(proc)
    deltas = [(b - a) / 1000 for a, b in zip(driver["kick"], driver["seen"], strict=True)]
    return round(statistics.median(deltas), 1)


def main(argv: list[str]) -> int:
    if argv and argv[0] == "--serve":
        _serve_traced(argv[1], argv[2], argv[3], float(argv[4]), packed=False)
        return 0
    parser = argparse.ArgumentParser(prog="virtio bench latency", description=__doc__)
    parser.add_argument("--requests", type=int, default=3000, help="4 KiB reads per run")
    parser.add_argument(
        "--sleep", action="store_true", help="the driver sleeps on the call eventfd (no polling)"
    )
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    if args.requests < 10:
        parser.error("--requests must be at least 10")
    with tempfile.TemporaryDirectory(prefix="pyvirtio-latency-") as tmp:
        work = Path(tmp)
        image = work / "disk.img"
        with open(image, "wb") as f:
            f.truncate(64 << 20)
        try:
            polled = run_pyvirtio(image, work, 100.0, args.requests, args.sleep)
            kicked = run_pyvirtio(image, work, 0.0, args.requests, args.sleep)
            qsd = run_qsd(image, work, args.requests, args.sleep)
        except (RuntimeError, subprocess.SubprocessError, OSError) as err:
            print(f"virtio bench latency: {err}", file=sys.stderr)
            return 1
    result = {"polling (--poll-us 100)": polled, "kicks only (--poll-us 0)": kicked}
    if args.json:
        print(json.dumps({**result, "qemu-storage-daemon end to end": qsd}))
        return 0
    print("| stage (median, us) | polling (--poll-us 100) | kicks only (--poll-us 0) |")
    print("| --- | ---: | ---: |")
    for name, _start, _end in STAGES:
        print(f"| {name} | {polled.get(name, '-')} | {kicked.get(name, '-')} |")
    print(f"| qemu-storage-daemon, kick written -> driver sees it | {qsd} | {qsd} |")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
