"""Every registered device type, found by name, with its own driver over each in-process path."""

from __future__ import annotations

import argparse
import threading
from pathlib import Path

import pytest

from virtio.core.driver import VirtioDriver
from virtio.devices.registry import (
    DeviceSettings,
    DeviceType,
    by_device_id,
    device_type,
    device_types,
)
from virtio.spec.status import DeviceStatus as S
from virtio.transport.loopback import Loopback
from virtio.vhost_user.frontend import VhostUserFrontend
from virtio.vhost_user.server import VhostUserServer

N_INIT_DRV = "drivernormative:General Initialization And Device Operation / Device Initialization"
N_STATUS_DEV = "devicenormative:Basic Facilities of a Virtio Device / Device Status Field"
TYPES = list(device_types())
PATHS = {
    "loopback": {},
    "loopback-threaded": {"threaded": True},
    "legacy-little": {"legacy": True},
    "legacy-big": {"legacy": True, "legacy_order": "big"},
}


def exercise(kind: DeviceType, driver: VirtioDriver) -> None:
    """One request of the type's own kind, checked (the type's smoke request)."""
    if kind.smoke is not None:
        kind.smoke(driver)
    else:  # a type without one: at least it initialized
        assert driver.negotiated


def test_the_built_in_types_are_registered() -> None:
    assert {"blk", "rng"} <= set(TYPES)
    for name in TYPES:
        kind = device_type(name)
        assert kind.name == name and by_device_id(kind.device_id) is kind
        assert kind.device.device_id == kind.driver.device_id == kind.device_id
    with pytest.raises(KeyError, match="known: "):
        device_type("no-such-device")


@pytest.mark.normative(N_INIT_DRV, N_STATUS_DEV)
@pytest.mark.parametrize("path", list(PATHS), ids=list(PATHS))
@pytest.mark.parametrize("name", TYPES)
def test_each_type_with_its_driver_over_the_loopback(tmp_path: Path, name: str, path: str) -> None:
    kind = device_type(name)
    device = kind.example(tmp_path, DeviceSettings())
    try:
        with Loopback(device, **PATHS[path]) as lb:  # type: ignore[arg-type]
            driver = kind.driver(lb)
            driver.initialize()
            assert lb.read_status() & S.DRIVER_OK
            exercise(kind, driver)
            driver.reset()
            assert lb.read_status() == 0
    finally:
        device.close()


@pytest.mark.normative(N_INIT_DRV)
@pytest.mark.parametrize("name", TYPES)
def test_each_type_served_over_vhost_user(tmp_path: Path, name: str) -> None:
    kind = device_type(name)
    parser = argparse.ArgumentParser()
    kind.add_arguments(parser)
    # The type's own serve options, with what each requires (blk: an image).
    image = tmp_path / "image.img"
    image.write_bytes(bytes(1 << 20))
    required = {
        "blk": [str(image)],
        "scsi": [str(image)],
        "fs": ["--shared-dir", str(tmp_path)],
        "vsock": ["--guest-cid", "3", "--uds-path", str(tmp_path / "vsock")],
        "balloon": [],
        "pmem": [str(image)],
    }
    args = parser.parse_args(required.get(kind.name, []))
    device = kind.from_arguments(args, DeviceSettings())
    server = VhostUserServer(tmp_path / "vu.sock", device)
    server.bind()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        with VhostUserFrontend(str(tmp_path / "vu.sock"), device_id=kind.device_id) as frontend:
            driver = kind.driver(frontend)
            driver.initialize()
            exercise(kind, driver)
            driver.reset()
    finally:
        server.stop()
        thread.join(timeout=10)
        device.close()
    assert not thread.is_alive()
