"""pyvirtio's blk driver, over its vhost-user front-end, against qemu-storage-daemon."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from virtio.bench.blk import JobSpec, LoadGenerator
from virtio.devices.blk import BlkDriver, BlkError
from virtio.errors import VirtioError
from virtio.spec import features as F
from virtio.vhost_user.frontend import connect_blk

N_BLK_DRV_OP = "drivernormative:Device Types / Block Device / Device Operation"
N_BLK_DRV_INIT = "drivernormative:Device Types / Block Device / Device Initialization"
N_INIT_DRV = "drivernormative:General Initialization And Device Operation / Device Initialization"
N_FEATURES_DRV = "drivernormative:Basic Facilities of a Virtio Device / Feature Bits"
N_CONFIG_DRV = "drivernormative:Basic Facilities of a Virtio Device / Device Configuration Space"


class Qsd:
    def __init__(self, tmp: Path, *, writable: bool = True, num_queues: int = 2) -> None:
        self.image = tmp / "qsd.img"
        self.image.write_bytes(bytes(32 << 20))
        self.socket = tmp / "qsd.sock"
        self.log = tmp / "qsd.log"
        cmd = [
            "qemu-storage-daemon",
            "--blockdev",
            f"driver=file,node-name=file0,filename={self.image}",
            "--blockdev",
            "driver=raw,node-name=disk0,file=file0",
            "--export",
            "type=vhost-user-blk,id=exp0,addr.type=unix,"
            f"addr.path={self.socket},node-name=disk0,"
            f"writable={'on' if writable else 'off'},num-queues={num_queues}",
        ]
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=log, start_new_session=True)
        deadline = time.monotonic() + 15
        while not self.socket.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"qemu-storage-daemon did not start: {self.log.read_text()}")
            time.sleep(0.05)

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=10)


@pytest.fixture
def qsd(tmp_path: Path) -> Iterator[Callable[..., Qsd]]:
    daemons: list[Qsd] = []

    def start(**kw: object) -> Qsd:
        d = Qsd(tmp_path, **kw)  # type: ignore[arg-type]
        daemons.append(d)
        return d

    yield start
    for d in daemons:
        d.kill()


@pytest.mark.normative(N_BLK_DRV_OP, N_BLK_DRV_INIT, N_INIT_DRV, N_FEATURES_DRV, N_CONFIG_DRV)
def test_write_read_verify_multiqueue_flush(qsd: Callable[..., Qsd]) -> None:
    daemon = qsd()
    with connect_blk(str(daemon.socket), num_queues=2) as frontend:
        driver = BlkDriver(frontend)
        driver.initialize()
        assert driver.has(F.VIRTIO_F_VERSION_1)
        assert not driver.has(F.VIRTIO_F_RING_PACKED)  # qemu-storage-daemon has none
        assert len(driver.queues) == 2
        assert driver.capacity == (32 << 20) // 512
        for queue in (0, 1):
            payload = os.urandom(64 << 10)
            driver.write(128 * queue, payload, queue=queue)
            assert driver.read(128 * queue, len(payload), queue=1 - queue) == payload
        driver.flush()
        assert driver.get_id()
        driver.reset()
    data = daemon.image.read_bytes()
    assert data[: 64 << 10] != bytes(64 << 10)


@pytest.mark.normative(N_BLK_DRV_OP)
def test_discard_and_write_zeroes(qsd: Callable[..., Qsd]) -> None:
    daemon = qsd()
    with connect_blk(str(daemon.socket)) as frontend:
        driver = BlkDriver(frontend)
        driver.initialize()
        assert driver.has(F.VIRTIO_BLK_F_DISCARD) and driver.has(F.VIRTIO_BLK_F_WRITE_ZEROES)
        driver.write(0, b"\x5a" * 16384)
        driver.write_zeroes([(8, 8)])
        assert driver.read(0, 16384) == b"\x5a" * 4096 + bytes(4096) + b"\x5a" * 8192
        driver.discard([(16, 8)])
        driver.reset()


@pytest.mark.normative(N_BLK_DRV_OP)
def test_read_only_export_refuses_writes(qsd: Callable[..., Qsd]) -> None:
    daemon = qsd(writable=False)
    with connect_blk(str(daemon.socket)) as frontend:
        driver = BlkDriver(frontend)
        driver.initialize()
        assert driver.geometry.read_only
        with pytest.raises(BlkError):
            driver.write_unchecked(0, b"x" * 512)
        driver.reset()
    assert daemon.image.read_bytes()[:512] == bytes(512)


def test_load_generator_with_verification(qsd: Callable[..., Qsd]) -> None:
    daemon = qsd()
    with connect_blk(str(daemon.socket), num_queues=2) as frontend:
        driver = BlkDriver(frontend)
        driver.initialize()
        spec = JobSpec(rw="randrw", iodepth=8, num_queues=2, runtime=0.5, size=4 << 20, verify=True)
        result = LoadGenerator(driver, spec).run()
        driver.reset()
    assert result.errors == 0 and result.verify_failures == 0
    assert result.reads > 0 and result.writes > 0


def test_backend_killed_mid_run_is_a_clear_error(qsd: Callable[..., Qsd]) -> None:
    daemon = qsd()
    with connect_blk(str(daemon.socket)) as frontend:
        driver = BlkDriver(frontend)
        driver.initialize()
        driver.write(0, b"y" * 4096)
        daemon.kill()
        started = time.monotonic()
        with pytest.raises((VirtioError, TimeoutError)):
            for i in range(1000):
                driver.read(i * 8, 4096, timeout=5)
        assert time.monotonic() - started < 10, "the driver hung on a dead back-end"


def test_bench_backends_compares_both(capsys: pytest.CaptureFixture[str]) -> None:
    import json

    from virtio.cli import main

    assert main(["bench", "backends", "--runtime", "0.3", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)["rows"]
    assert [r["job"] for r in rows] == ["4k randread QD1", "4k randread QD32", "1M seq read QD4"]
    for r in rows:
        assert r["qsd_iops"] > 0 and r["pyvirtio_iops"] > 0
        assert abs(r["ratio"] - r["pyvirtio_iops"] / r["qsd_iops"]) < 0.01


@pytest.mark.guest
def test_bench_guest_runs_fio_on_both(capsys: pytest.CaptureFixture[str]) -> None:
    import json

    from virtio.cli import main

    assert main(["bench", "guest", "--runtime", "1", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["vm"] == "uml" and len(data["rows"]) == 4
    for r in data["rows"]:
        assert r["pyvirtio_iops"] > 0 and r["qsd_iops"] > 0


def test_bench_latency_breaks_a_request_down(capsys: pytest.CaptureFixture[str]) -> None:
    import json

    from virtio.cli import main

    assert main(["bench", "latency", "--requests", "200", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    polled, kicked = data["polling (--poll-us 100)"], data["kicks only (--poll-us 0)"]
    end_to_end = "kick written -> driver sees it (end to end)"
    for stages in (polled, kicked):
        assert stages[end_to_end] > 0
        assert 0 < stages["request handled (header, preadv, status byte)"] < stages[end_to_end]
    # Only a back-end woken by the kick has a wake-up to time.
    assert "  of which: kick -> back-end loop awake (epoll wake-up)" in kicked
    assert "  of which: kick -> back-end loop awake (epoll wake-up)" not in polled
    assert data["qemu-storage-daemon end to end"] > 0
