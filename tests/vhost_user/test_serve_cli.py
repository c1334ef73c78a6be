"""`virtio serve blk` as a process: clean stop on SIGTERM, clear errors on bad input."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

from virtio.devices.blk import BlkDriver
from virtio.vhost_user.frontend import connect_blk

SERVE = [sys.executable, "-m", "virtio.cli", "serve", "blk"]


def test_sigterm_flushes_and_removes_the_socket(tmp_path: Path) -> None:
    image, sock = tmp_path / "d.img", tmp_path / "s.sock"
    image.write_bytes(bytes(1 << 20))
    proc = subprocess.Popen([*SERVE, "--socket", str(sock), str(image)], stderr=subprocess.PIPE)
    deadline = time.monotonic() + 15
    while not sock.exists():
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    with connect_blk(str(sock)) as frontend:
        driver = BlkDriver(frontend)
        driver.initialize()
        driver.write(0, b"durable!" * 64)
        driver.flush()
        driver.reset()
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=15)
    assert proc.returncode == 0
    assert not sock.exists()
    assert image.read_bytes()[:8] == b"durable!"
    log = err.decode()
    assert "attach QEMU with" in log and "attach User-Mode Linux with" in log
    assert "Traceback" not in log


def test_bad_input_gets_a_clear_error(tmp_path: Path) -> None:
    cases = [
        ([str(tmp_path / "missing.img")], "no such image"),
        (["--queue-size", "100", str(tmp_path / "x")], "power of 2"),
        (["--serial", "x" * 30, str(tmp_path / "x")], "at most 20 bytes"),
    ]
    (tmp_path / "x").write_bytes(bytes(4096))
    for args, message in cases:
        out = subprocess.run(
            [*SERVE, "--socket", str(tmp_path / "s.sock"), *args], capture_output=True, text=True
        )
        assert out.returncode == 2, out.stderr
        assert message in out.stderr
        assert "Traceback" not in out.stderr
    not_dir = tmp_path / "x"
    out = subprocess.run(
        [*SERVE, "--socket", str(not_dir / "s.sock"), str(tmp_path / "x")],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 1 and "cannot listen" in out.stderr and "Traceback" not in out.stderr


def test_serve_finds_device_types_by_name(tmp_path: Path) -> None:
    sock = tmp_path / "rng.sock"
    proc = subprocess.Popen(
        [sys.executable, "-m", "virtio.cli", "serve", "rng", "--socket", str(sock)],
        stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 15
    while not sock.exists():
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    from virtio.devices.rng import RngDriver
    from virtio.spec.device_ids import DeviceId
    from virtio.vhost_user.frontend import VhostUserFrontend

    with VhostUserFrontend(str(sock), device_id=DeviceId.ENTROPY) as frontend:
        driver = RngDriver(frontend)
        driver.initialize()
        assert len(driver.read(16)) == 16
        driver.reset()
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=15)
    assert proc.returncode == 0 and not sock.exists()
    assert "virtio_uml.device=" in err.decode() and ":4" in err.decode()
    for args, message in (
        (["rng", "--socket", str(sock), "--max-bytes", "0"], "--max-bytes must be at least 1"),
        (["nosuch", "--socket", str(sock)], "unknown device type 'nosuch'"),
    ):
        out = subprocess.run(
            [sys.executable, "-m", "virtio.cli", "serve", *args], capture_output=True, text=True
        )
        assert out.returncode == 2 and message in out.stderr and "Traceback" not in out.stderr
