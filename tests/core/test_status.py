"""The status state machine: one table, modern and legacy rows, used by every party."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from virtio.core.device import VirtioDevice
from virtio.core.status import (
    TRANSITIONS,
    Action,
    Interface,
    Phase,
    StatusViolation,
    interpret,
    path,
    phase_of,
)
from virtio.devices.rng import RngDevice
from virtio.memory import GuestMemory
from virtio.queue import RingLayout
from virtio.spec import features as F
from virtio.spec.status import DeviceStatus as S

N_STATUS_DRV = "drivernormative:Basic Facilities of a Virtio Device / Device Status Field"
N_INIT_DRV = "drivernormative:General Initialization And Device Operation / Device Initialization"
N_FEATURES_DEV = "devicenormative:Basic Facilities of a Virtio Device / Feature Bits"
N_SUSPEND_DEV = "devicenormative:General Initialization And Device Operation / Device Suspend"
LIVE = S.ACKNOWLEDGE | S.DRIVER | S.FEATURES_OK | S.DRIVER_OK


@pytest.mark.normative(N_INIT_DRV)
def test_paths_follow_the_initialization_sequence() -> None:
    assert list(path(Interface.MODERN, Phase.LIVE)) == [
        S.ACKNOWLEDGE,
        S.ACKNOWLEDGE | S.DRIVER,
        S.ACKNOWLEDGE | S.DRIVER | S.FEATURES_OK,
        LIVE,
    ]
    # A legacy interface has no FEATURES_OK step.
    assert list(path(Interface.LEGACY, Phase.LIVE)) == [
        S.ACKNOWLEDGE,
        S.ACKNOWLEDGE | S.DRIVER,
        S.ACKNOWLEDGE | S.DRIVER | S.DRIVER_OK,
    ]
    with pytest.raises(ValueError):
        list(path(Interface.LEGACY, Phase.FEATURES_OK))
    for rows in TRANSITIONS.values():
        for (phase, bit), (nxt, action) in rows.items():
            if action is Action.SUSPEND:
                continue  # the device, not the write, then clears DRIVER_OK
            before = _status(phase)
            assert phase_of(before) is phase
            assert phase_of(before | bit) is nxt
    assert phase_of((LIVE | S.SUSPEND) & ~S.DRIVER_OK) is Phase.SUSPENDED


def _status(phase: Phase) -> int:
    for value in (0, *path(Interface.MODERN, Phase.LIVE)):
        if phase_of(value) is phase:
            return value
    raise AssertionError(phase)


@pytest.mark.normative(N_STATUS_DRV, N_INIT_DRV)
def test_interpretations_of_driver_writes() -> None:
    write = interpret(Interface.MODERN, 0, S.ACKNOWLEDGE | S.DRIVER)
    assert [s.bit for s in write.steps] == [S.ACKNOWLEDGE, S.DRIVER]
    write = interpret(Interface.MODERN, S.ACKNOWLEDGE | S.DRIVER, LIVE)
    assert [s.action for s in write.steps] == [Action.NEGOTIATE, Action.GO_LIVE]
    with pytest.raises(StatusViolation) as err:
        interpret(Interface.MODERN, LIVE, S.ACKNOWLEDGE)
    assert err.value.normative == N_STATUS_DRV
    with pytest.raises(StatusViolation, match="DRIVER_OK before FEATURES_OK") as err:
        interpret(
            Interface.MODERN, S.ACKNOWLEDGE | S.DRIVER, S.ACKNOWLEDGE | S.DRIVER | S.DRIVER_OK
        )
    assert err.value.normative == N_INIT_DRV
    # Legacy: DRIVER_OK straight after DRIVER; a FEATURES_OK bit means nothing.
    write = interpret(
        Interface.LEGACY, S.ACKNOWLEDGE | S.DRIVER, S.ACKNOWLEDGE | S.DRIVER | S.DRIVER_OK
    )
    assert [s.action for s in write.steps] == [Action.GO_LIVE]
    assert interpret(
        Interface.LEGACY, S.ACKNOWLEDGE | S.DRIVER, S.ACKNOWLEDGE | S.DRIVER | S.FEATURES_OK
    ).idle
    # SUSPEND before the device is live is ignored; 0 is a reset.
    assert interpret(Interface.MODERN, S.ACKNOWLEDGE, S.ACKNOWLEDGE | S.SUSPEND).idle
    assert interpret(Interface.MODERN, LIVE, 0).reset
    # Resuming clears SUSPEND, which is the one bit a driver may clear.
    suspended = (LIVE | S.SUSPEND) & ~S.DRIVER_OK
    assert interpret(Interface.MODERN, suspended, LIVE).resume


@pytest.mark.normative(N_STATUS_DRV, N_INIT_DRV)
@given(st.integers(0, 0xFF), st.integers(0, 0xFF))
def test_no_write_reaches_live_without_features_ok_on_the_modern_interface(
    old: int, value: int
) -> None:
    try:
        write = interpret(Interface.MODERN, old, value)
    except StatusViolation:
        return
    goes_live = any(s.action is Action.GO_LIVE for s in write.steps)
    if goes_live:
        negotiated_now = any(s.action is Action.NEGOTIATE for s in write.steps)
        assert old & S.FEATURES_OK or negotiated_now


class Refusing(RngDevice):
    def validate_features(self, features: int) -> str | None:
        return "refuses everything"


@pytest.mark.normative(N_FEATURES_DEV, N_INIT_DRV)
def test_refused_features_with_driver_ok_in_the_same_write_never_go_live() -> None:
    """Once measured: one write of FEATURES_OK|DRIVER_OK with refused features went live."""
    device = Refusing()
    memory = GuestMemory()
    memory.add(0, bytearray(1 << 20))
    device.attach_memory(memory)
    device.write_status(S.ACKNOWLEDGE)
    device.write_status(S.ACKNOWLEDGE | S.DRIVER)
    device.write_driver_features(1 << F.VIRTIO_F_VERSION_1)
    device.write_status(LIVE)
    assert not device.status & S.FEATURES_OK
    assert not device.live and not device.status & S.DRIVER_OK
    assert device.status & S.DEVICE_NEEDS_RESET
    assert device.needs_reset_reason is not None and N_INIT_DRV in device.needs_reset_reason
    assert device.negotiated == 0


@pytest.mark.normative(N_SUSPEND_DEV)
def test_suspend_needs_the_feature_and_a_live_device() -> None:
    device: VirtioDevice = RngDevice()
    memory = GuestMemory()
    memory.add(0, bytearray(1 << 20))
    device.attach_memory(memory)
    for value in (S.ACKNOWLEDGE, S.ACKNOWLEDGE | S.DRIVER):
        device.write_status(value)
    device.write_driver_features(1 << F.VIRTIO_F_VERSION_1)  # SUSPEND not negotiated
    device.write_status(S.ACKNOWLEDGE | S.DRIVER | S.FEATURES_OK)
    layout = RingLayout.contiguous(0x1000, 8)
    device.configure_queue(0, size=8, desc=layout.desc, driver=layout.driver, device=layout.device)
    device.enable_queue(0)
    device.write_status(LIVE)
    device.write_status(LIVE | S.SUSPEND)
    assert device.status == LIVE  # ignored: the feature was not negotiated
