"""virtio-rng: the entropy device and its driver."""

from __future__ import annotations

import pytest

from virtio.devices.rng import RngDevice, RngDriver
from virtio.spec.status import DeviceStatus as S
from virtio.transport.loopback import Loopback

N_DEV = "devicenormative:Device Types / Entropy Device / Device Operation"
N_DRV = "drivernormative:Device Types / Entropy Device / Device Operation"


@pytest.mark.normative(N_DEV, N_DRV)
@pytest.mark.parametrize("threaded", [False, True])
def test_random_bytes(threaded: bool) -> None:
    with Loopback(RngDevice(), threaded=threaded) as lb:
        driver = RngDriver(lb)
        driver.initialize()
        a, b = driver.read(64), driver.read(64)
        assert len(a) == len(b) == 64 and a != b


@pytest.mark.normative(N_DEV, N_DRV)
def test_driver_uses_only_what_the_device_wrote() -> None:
    device = RngDevice(max_per_request=10)
    with Loopback(device) as lb:
        driver = RngDriver(lb)
        driver.initialize()
        assert len(driver.read(100)) == 10


@pytest.mark.normative(N_DRV)
def test_readable_buffer_needs_reset() -> None:
    device = RngDevice()
    with Loopback(device) as lb:
        driver = RngDriver(lb)
        driver.initialize()
        driver.submit(0, [b"not allowed"], [16])
        driver.kick(0)
        assert lb.read_status() & S.DEVICE_NEEDS_RESET
        assert device.needs_reset_reason is not None and N_DRV in device.needs_reset_reason
