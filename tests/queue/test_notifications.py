"""Notification suppression (flags and event index) and notification data values."""

from __future__ import annotations

import pytest

from tests.queue.helpers import BUF_BASE, make_pair
from virtio.queue import DeviceQueue, DriverQueue, decode_notification, encode_notification
from virtio.queue.common import LE16, NOTIFY_DATA_PACKED, NOTIFY_DATA_SPLIT, need_event
from virtio.queue.split import SplitDeviceQueue

N_USED_SUPP_DEV = (
    "devicenormative:Basic Facilities of a Virtio Device / Virtqueues / "
    "Used Buffer Notification Suppression"
)
N_USED_SUPP_DRV = (
    "drivernormative:Basic Facilities of a Virtio Device / Virtqueues / "
    "Used Buffer Notification Suppression"
)
N_AVAIL_SUPP_DEV = (
    "devicenormative:Basic Facilities of a Virtio Device / Virtqueues / "
    "Available Buffer Notification Suppression"
)
N_AVAIL_SUPP_DRV = (
    "drivernormative:Basic Facilities of a Virtio Device / Virtqueues / "
    "Available Buffer Notification Suppression"
)
N_PACKED_NOTIFY = (
    "drivernormative:Basic Facilities of a Virtio Device / PAcked Virtqueues / "
    "The Virtqueue Descriptor Table"
)


def cycle(driver: DriverQueue, device: DeviceQueue, n: int = 1) -> None:
    """Add, pop and push ``n`` one-byte buffers."""
    for i in range(n):
        driver.add([], [(BUF_BASE + i, 1)], i)
    chains = device.pop_many()
    device.push_many([(c, 1) for c in chains])


def test_need_event_matches_the_spec_note() -> None:
    # used_event 0: notify after the first buffer (idx goes 0 -> 1), then after the 65536th.
    assert need_event(0, 1, 0)
    assert not need_event(0, 2, 1)
    assert need_event(0xFFFF, 0, 0xFFFF)  # crossing the 16-bit wrap


@pytest.mark.normative(N_USED_SUPP_DEV, N_USED_SUPP_DRV)
def test_split_used_notifications_with_flags() -> None:
    pair = make_pair(8)
    cycle(pair.driver, pair.device)
    assert pair.device.needs_notify()  # flags 0: MUST notify
    pair.driver.disable_interrupts()
    cycle(pair.driver, pair.device)
    assert not pair.device.needs_notify()  # flags 1: SHOULD NOT
    pair.driver.get_used()
    assert pair.driver.enable_interrupts() is False
    cycle(pair.driver, pair.device)
    assert pair.device.needs_notify()


@pytest.mark.normative(N_USED_SUPP_DEV, N_USED_SUPP_DRV)
def test_split_used_notifications_with_event_idx() -> None:
    pair = make_pair(8, event_idx=True)
    device = pair.device
    assert isinstance(device, SplitDeviceQueue)
    # With EVENT_IDX the flags' low bit is ignored by the device.
    LE16.struct.pack_into(device.ring.avail, 0, 1)
    pair.driver.enable_interrupts()  # used_event = 0
    cycle(pair.driver, device)
    assert device.needs_notify()  # idx reached used_event + 1
    pair.driver.get_used()
    cycle(pair.driver, device)
    assert not device.needs_notify()  # used_event not re-armed
    pair.driver.get_used()
    LE16.struct.pack_into(device.ring.avail, device.ring.used_event_off, 4)
    cycle(pair.driver, device, 2)  # idx 2 -> 4: not yet past 4
    assert not device.needs_notify()
    pair.driver.get_used()
    cycle(pair.driver, device)  # idx 4 -> 5: the entry at 4 was written
    assert device.needs_notify()


@pytest.mark.normative(N_AVAIL_SUPP_DEV, N_AVAIL_SUPP_DRV)
def test_split_kicks_with_flags_and_event_idx() -> None:
    pair = make_pair(8)
    pair.driver.add([], [(BUF_BASE, 1)], 0)
    assert pair.driver.kick_needed()
    assert not pair.driver.kick_needed()  # nothing new since the last kick
    pair.device.disable_notifications()
    pair.driver.add([], [(BUF_BASE, 1)], 1)
    assert not pair.driver.kick_needed()
    assert pair.device.enable_notifications()  # two buffers are waiting

    pair = make_pair(8, event_idx=True)
    pair.device.enable_notifications()  # avail_event = 0
    pair.driver.add([], [(BUF_BASE, 1)], 0)
    assert pair.driver.kick_needed()
    pair.driver.add([], [(BUF_BASE, 1)], 1)
    assert not pair.driver.kick_needed()  # the device has not re-armed
    pair.device.pop_many()
    assert not pair.device.enable_notifications()  # avail_event = 2, nothing pending
    pair.driver.add([], [(BUF_BASE, 1)], 2)
    assert pair.driver.kick_needed()


# Untagged: packed event suppression has no normative block of its own (its only
# one asks the driver for a memory barrier, which tests/queue/test_cross_process.py checks).
@pytest.mark.parametrize("event_idx", [False, True])
def test_packed_event_suppression(event_idx: bool) -> None:
    pair = make_pair(4, packed=True, event_idx=event_idx)
    cycle(pair.driver, pair.device)
    assert pair.device.needs_notify()  # ENABLE by default
    pair.driver.get_used()
    pair.driver.disable_interrupts()
    cycle(pair.driver, pair.device)
    assert not pair.device.needs_notify()  # DISABLE
    pair.driver.get_used()
    assert not pair.driver.enable_interrupts()
    # Across a wrap of the ring, the descriptor event still fires once.
    for _ in range(6):
        cycle(pair.driver, pair.device)
        assert pair.device.needs_notify()
        pair.driver.get_used()
        pair.driver.enable_interrupts()
    pair.device.disable_notifications()
    pair.driver.add([], [(BUF_BASE, 1)], 9)
    assert not pair.driver.kick_needed()
    assert pair.device.enable_notifications()


def test_notification_data_split() -> None:
    value = encode_notification(3, 0xABCD)
    assert value == NOTIFY_DATA_SPLIT.unpack_raw(NOTIFY_DATA_SPLIT.pack(vqn=3, next_idx=0xABCD))[0]
    assert decode_notification(value, packed=False) == (3, 0xABCD, None)


@pytest.mark.normative(N_PACKED_NOTIFY)
def test_notification_data_packed_matches_next_descriptor() -> None:
    """next_off/next_wrap name the next descriptor not yet made available."""
    pair = make_pair(4, packed=True)
    for i in range(5):  # wraps once: offset 1, wrap counter 0
        pair.driver.add([], [(BUF_BASE, 1)], i)
        chains = pair.device.pop_many()
        pair.device.push_many([(c, 1) for c in chains])
        pair.driver.get_used()
    value = pair.driver.notification_value(7)
    assert decode_notification(value, packed=True) == (7, 1, 0)
    fields = NOTIFY_DATA_PACKED.unpack(value.to_bytes(4, "little"))
    assert (fields["vqn"], fields["next_off"], fields["next_wrap"]) == (7, 1, 0)
