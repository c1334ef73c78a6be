"""The vsock control socket: a transport reset and the status line from the host."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from tests.devices.vsock.test_vsock import FakeBackend, settle, vsock
from virtio.devices.registry import DeviceSettings
from virtio.devices.vsock import VsockDevice
from virtio.devices.vsock import options as O
from virtio.devices.vsock.control import VsockControl, main


def test_reset_command_sends_the_transport_reset_event(tmp_path: Path) -> None:
    idle = VsockDevice(FakeBackend())
    control = VsockControl(tmp_path / "idle", idle)
    assert control.command("reset").startswith("error: the driver is not ready")
    idle.close()
    backend = FakeBackend()
    with vsock(backend) as (device, driver):
        control = VsockControl(tmp_path / "ctl", device)
        sock = driver.connect(5000)
        assert control.command("status").startswith("connections=1 guest_cid=")
        assert control.command("reset") == "ok transport reset: 1 connection(s) dropped"
        settle(driver)
        assert driver.transport_resets == 1 and not driver.sockets and sock.error
        assert backend.ends[0].closed and not device.conns
        assert "transport_resets=1" in control.command("status")
        for bad in ("reset now", "", "migrate"):
            assert control.command(bad).startswith("error")
    device.close()
    assert not (tmp_path / "ctl").exists()  # the device's close closed the socket


def test_serve_option_and_client(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser()
    O.add_arguments(parser)
    ctl = tmp_path / "ctl"
    args = parser.parse_args(["--uds-path", str(tmp_path / "v"), "--control", str(ctl)])
    device = O.from_arguments(args, DeviceSettings())
    assert isinstance(device, VsockDevice) and ctl.is_socket()
    device.close()
    assert not ctl.exists()
    assert main(["status", "--control", str(ctl)]) == 1  # nobody listens
    assert "ctl" in capsys.readouterr().err
