"""The vhost-user server is the device's host: it serves the fds and timers a device asks for."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from virtio.core.device import DEFERRED, VirtioDevice
from virtio.core.driver import VirtioDriver
from virtio.core.events import Timer
from virtio.devices.blk import BlkDevice, BlkDriver, BlkOptions
from virtio.devices.rng import RngDevice, RngDriver
from virtio.queue import Chain, ChainWriter
from virtio.spec.device_ids import DeviceId
from virtio.vhost_user.frontend import VhostUserFrontend
from virtio.vhost_user.server import VhostUserServer

N_BLK_DEV_OP = "devicenormative:Device Types / Block Device / Device Operation"
N_ENTROPY_DEV = "devicenormative:Device Types / Entropy Device / Device Operation"


@contextmanager
def served(device: VirtioDevice, sock: Path) -> Iterator[Path]:
    server = VhostUserServer(sock, device)
    server.bind()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield sock
    finally:
        server.stop()
        thread.join(timeout=10)
        assert not thread.is_alive()


@pytest.mark.normative(N_BLK_DEV_OP)
def test_worker_completions_arrive_through_a_watched_eventfd(tmp_path: Path) -> None:
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(16 << 20))
    device = BlkDevice(image, BlkOptions(workers=2, inline_max=4096))
    try:
        with (
            served(device, tmp_path / "vu.sock") as sock,
            VhostUserFrontend(str(sock), device_id=DeviceId.BLOCK) as frontend,
        ):
            driver = BlkDriver(frontend)
            driver.initialize()
            payloads = [os.urandom(1 << 20) for _ in range(4)]
            requests = [driver.submit_write(2048 * i, p) for i, p in enumerate(payloads)]
            driver.kick(0)
            for request in requests:
                driver.wait(request, 20)
                driver.finish(request, "write")
            for i, payload in enumerate(payloads):
                assert driver.read(2048 * i, 1 << 20, timeout=20) == payload
            assert device.io is not None and device.io.outstanding == 0
            driver.reset()
        # Large transfers went through the workers and came back through the eventfd
        # the device asked the server's loop to watch: the four reads one at a time,
        # two of the four writes (sent together: the ring's thread copied the others).
        assert device.stats["deferred"] == 6
    finally:
        device.close()
    assert image.read_bytes()[: 1 << 20] == payloads[0]


@pytest.mark.normative(N_ENTROPY_DEV)
def test_a_rate_limited_device_timer_fires_in_the_server_loop(tmp_path: Path) -> None:
    device = RngDevice(max_bytes=128, period=0.25)
    with (
        served(device, tmp_path / "vu.sock") as sock,
        VhostUserFrontend(str(sock), device_id=DeviceId.ENTROPY) as frontend,
    ):
        driver = RngDriver(frontend)
        driver.initialize()
        start = time.monotonic()
        got = [len(driver.read(128, timeout=10)) for _ in range(3)]
        elapsed = time.monotonic() - start
        assert got == [128, 128, 128]
        # Two refills of the budget, each a timer the device asked for.
        assert 0.4 <= elapsed < 8, elapsed
        driver.reset()


class HostInput(VirtioDevice):
    """Answers each request with what the host writes into a pipe, or empty after a timeout.

    Like a console's receive queue: the device watches the pipe's read end and
    asks for a timer, both through ``self.events``; it never blocks or reads a
    clock itself.
    """

    device_id = 4  # an entropy-shaped device: one queue of writable buffers

    def __init__(self, fd: int, timeout: float) -> None:
        self.fd = fd
        self.timeout = timeout
        self.waiting: list[Chain] = []
        self.timer: Timer | None = None
        self.answers: list[str] = []
        super().__init__(num_queues=1)

    def on_driver_ok(self) -> None:
        self.events.watch(self.fd, self._input)

    def on_reset(self) -> None:
        self.events.unwatch(self.fd)
        self.waiting.clear()

    def handle_chain(self, queue_index: int, chain: Chain) -> int | None:
        self.waiting.append(chain)
        if self.timer is None:
            self.timer = self.events.call_later(self.timeout, self._give_up)
        return DEFERRED

    def _input(self, now: float) -> None:
        data = os.read(self.fd, 4096)
        if self.waiting and data:
            chain = self.waiting.pop(0)
            self.answers.append("input")
            self.complete(0, chain, ChainWriter(chain).write(data[: chain.write_len]))
            if not self.waiting and self.timer is not None:
                # Nothing left to time out: the next request gets a full timeout of its own.
                self.events.cancel(self.timer)
                self.timer = None

    def _give_up(self, now: float) -> None:
        self.timer = None
        if self.waiting:
            done = [(chain, 0) for chain in self.waiting]
            self.waiting.clear()
            self.answers.extend("timeout" for _ in done)
            self.complete_many(0, done)


class InputDriver(VirtioDriver):
    device_id = 4


# Untagged: host event sources are pyvirtio's seam, not a clause of the spec.
def test_a_device_that_watches_an_fd_and_sets_a_timer(tmp_path: Path) -> None:
    read_end, write_end = os.pipe()
    os.set_blocking(read_end, False)
    device = HostInput(read_end, timeout=0.3)
    try:
        with (
            served(device, tmp_path / "vu.sock") as sock,
            VhostUserFrontend(str(sock), device_id=4) as frontend,
        ):
            driver = InputDriver(frontend)
            driver.initialize()
            # Data from the host: the watched fd completes the request.
            request = driver.submit(0, [], [64])
            driver.kick(0)
            time.sleep(0.05)
            os.write(write_end, b"typed on the host")
            driver.wait(request, 10)
            assert driver.read_in(request) == b"typed on the host"
            driver.release(request)
            # Nothing from the host: the timer completes it, empty.
            start = time.monotonic()
            request = driver.submit(0, [], [64])
            driver.kick(0)
            driver.wait(request, 10)
            assert request.written == 0 and time.monotonic() - start >= 0.25
            driver.release(request)
            driver.reset()
        assert device.answers == ["input", "timeout"]
    finally:
        os.close(read_end)
        os.close(write_end)


def test_a_control_socket_answers_while_no_front_end_is_connected(tmp_path: Path) -> None:
    from virtio.control import request
    from virtio.devices.mem import MemDevice
    from virtio.devices.mem.control import MemControl

    device = MemDevice(region_size=64 << 20, block_size=2 << 20)
    ctl = tmp_path / "mem.ctl"
    MemControl(ctl, device)
    try:
        with served(device, tmp_path / "vu.sock"):
            # Served from the server's wait for a front-end: no session, no hang.
            assert request(ctl, "set 8M", timeout=5) == "ok requested 8.0M (4 blocks)"
            assert request(ctl, "status", timeout=5).startswith(f"requested={8 << 20} ")
            assert device.requested_size == 8 << 20
    finally:
        device.close()
