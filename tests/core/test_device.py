"""The device state machine, driven directly like a sloppy or hostile driver would."""

from __future__ import annotations

from pathlib import Path

import pytest

from virtio.core.device import DeviceHooks, RingOptions, VirtioDevice
from virtio.devices.blk import BlkDevice, BlkOptions
from virtio.devices.rng import RngDevice
from virtio.memory import GuestMemory
from virtio.queue import Chain, RingLayout, driver_queue
from virtio.spec import features as F
from virtio.spec.status import DeviceStatus as S

N_STATUS_DRV = "drivernormative:Basic Facilities of a Virtio Device / Device Status Field"
N_STATUS_DEV = "devicenormative:Basic Facilities of a Virtio Device / Device Status Field"
N_FEATURES_DRV = "drivernormative:Basic Facilities of a Virtio Device / Feature Bits"
N_FEATURES_DEV = "devicenormative:Basic Facilities of a Virtio Device / Feature Bits"
N_RESET_DEV = "devicenormative:Basic Facilities of a Virtio Device / Device Reset"
N_CONFIG_DEV = "devicenormative:Basic Facilities of a Virtio Device / Device Configuration Space"
N_INIT_DRV = "drivernormative:General Initialization And Device Operation / Device Initialization"
N_SUSPEND_DEV = "devicenormative:General Initialization And Device Operation / Device Suspend"
N_QRESET_DEV = (
    "devicenormative:Basic Facilities of a Virtio Device / Virtqueues / Virtqueue Reset / "
    "Virtqueue Reset"
)
N_RESERVED_DEV = "devicenormative:Reserved Feature Bits"
INIT = (S.ACKNOWLEDGE, S.ACKNOWLEDGE | S.DRIVER)


class Hooks(DeviceHooks):
    def __init__(self) -> None:
        self.used: list[int] = []
        self.config = 0

    def notify_used(self, queue_index: int) -> None:
        self.used.append(queue_index)

    def notify_config(self) -> None:
        self.config += 1


class NetLike(VirtioDevice):
    """A device offering net feature bits, to exercise feature requirements."""

    device_id = 1

    def __init__(self, offered: int) -> None:
        self._offered = offered
        super().__init__(num_queues=1, hooks=Hooks())

    def device_features(self) -> int:
        return self._offered

    def handle_chain(self, queue_index: int, chain: Chain) -> int:
        return 0


def rng_with_memory(ring: RingOptions | None = None) -> tuple[RngDevice, Hooks, GuestMemory]:
    hooks = Hooks()
    device = RngDevice(ring=ring)
    device.hooks = hooks
    memory = GuestMemory()
    memory.add(0, bytearray(1 << 20))
    device.attach_memory(memory)
    return device, hooks, memory


def negotiate(device: VirtioDevice, features: int | None = None) -> None:
    for status in INIT:
        device.write_status(status)
    device.write_driver_features(device.offered_features if features is None else features)
    device.write_status(S.ACKNOWLEDGE | S.DRIVER | S.FEATURES_OK)


def go_live(device: VirtioDevice, memory: GuestMemory) -> RingLayout:
    negotiate(device, 1 << F.VIRTIO_F_VERSION_1)
    layout = RingLayout.contiguous(0x1000, 8)
    device.configure_queue(0, size=8, desc=layout.desc, driver=layout.driver, device=layout.device)
    device.enable_queue(0)
    device.write_status(S.ACKNOWLEDGE | S.DRIVER | S.FEATURES_OK | S.DRIVER_OK)
    return layout


@pytest.mark.normative(N_STATUS_DEV, N_INIT_DRV)
def test_initialization_sequence_reaches_driver_ok() -> None:
    device, _hooks, memory = rng_with_memory()
    go_live(device, memory)
    assert device.status == S.ACKNOWLEDGE | S.DRIVER | S.FEATURES_OK | S.DRIVER_OK
    assert device.live and device.queues[0].ring is not None


@pytest.mark.normative(N_STATUS_DRV, N_STATUS_DEV)
def test_clearing_a_status_bit_needs_reset() -> None:
    device, hooks, memory = rng_with_memory()
    go_live(device, memory)
    device.write_status(S.ACKNOWLEDGE | S.DRIVER | S.DRIVER_OK)
    assert device.status & S.DEVICE_NEEDS_RESET
    assert device.needs_reset_reason is not None and N_STATUS_DRV in device.needs_reset_reason
    # With DRIVER_OK set, entering DEVICE_NEEDS_RESET sends a config change notification.
    assert hooks.config == 1


@pytest.mark.normative(N_INIT_DRV)
@pytest.mark.parametrize(
    "sequence",
    [[S.DRIVER], [S.ACKNOWLEDGE, S.ACKNOWLEDGE | S.FEATURES_OK], [S.ACKNOWLEDGE | S.DRIVER_OK]],
)
def test_out_of_order_status_needs_reset(sequence: list[int]) -> None:
    device, _hooks, _memory = rng_with_memory()
    for status in sequence:
        device.write_status(status)
    assert device.status & S.DEVICE_NEEDS_RESET
    assert device.needs_reset_reason is not None and N_INIT_DRV in device.needs_reset_reason


@pytest.mark.normative(N_FEATURES_DEV, N_FEATURES_DRV, N_RESERVED_DEV)
def test_features_ok_refused_for_invalid_subsets() -> None:
    v1 = 1 << F.VIRTIO_F_VERSION_1
    ctrl, mq = 1 << F.VIRTIO_NET_F_CTRL_VQ, 1 << F.VIRTIO_NET_F_MQ
    device = NetLike(ctrl | mq)
    for bad in (v1 | 1 << 63, ctrl, v1 | mq):  # not offered / no VERSION_1 / missing CTRL_VQ
        device.reset()
        negotiate(device, bad)
        assert not device.status & S.FEATURES_OK, hex(bad)
        assert not device.status & S.DEVICE_NEEDS_RESET
    device.reset()
    negotiate(device, v1 | ctrl | mq)
    assert device.status & S.FEATURES_OK
    assert device.negotiated == v1 | ctrl | mq


@pytest.mark.normative(N_FEATURES_DEV)
def test_device_cannot_offer_a_feature_without_its_requirement() -> None:
    with pytest.raises(ValueError) as err:
        NetLike(1 << F.VIRTIO_NET_F_MQ)
    assert "VIRTIO_NET_F_MQ requires VIRTIO_NET_F_CTRL_VQ" in str(err.value)
    assert N_FEATURES_DEV in str(err.value)
    # With its requirement offered too, the same feature is fine.
    assert NetLike(1 << F.VIRTIO_NET_F_MQ | 1 << F.VIRTIO_NET_F_CTRL_VQ).offered_features


@pytest.mark.normative(N_INIT_DRV)
def test_changing_features_after_features_ok_needs_reset() -> None:
    device, _hooks, _memory = rng_with_memory()
    negotiate(device, 1 << F.VIRTIO_F_VERSION_1)
    device.write_driver_features(1 << F.VIRTIO_F_VERSION_1 | 1 << F.VIRTIO_F_EVENT_IDX)
    assert device.status & S.DEVICE_NEEDS_RESET


@pytest.mark.normative(N_CONFIG_DEV, N_INIT_DRV)
def test_config_readable_before_features_ok_but_not_writable(tmp_path: Path) -> None:
    image = tmp_path / "d.img"
    image.write_bytes(bytes(1 << 20))
    device = BlkDevice(image, BlkOptions())
    try:
        device.write_status(S.ACKNOWLEDGE)
        assert int.from_bytes(device.read_config(0, 8), "little") == 2048
        assert device.read_config(device.config_size() - 2, 8)[2:] == bytes(6)  # zero past end
        device.write_config(20, b"\0")
        assert device.status & S.DEVICE_NEEDS_RESET
    finally:
        device.close()


# Untagged: the config generation is presented by each transport (PCI's common
# configuration, MMIO's ConfigGeneration); the core only keeps the counter.
def test_config_generation_and_change_notifications() -> None:
    device, hooks, memory = rng_with_memory()
    generation = device.config_generation
    device.update_config(0, b"")
    assert device.config_generation == generation + 1
    assert hooks.config == 0  # not live: no notification
    go_live(device, memory)
    device.update_config(0, b"")
    assert hooks.config == 1


@pytest.mark.normative(N_STATUS_DEV, N_INIT_DRV)
def test_no_buffers_consumed_before_driver_ok() -> None:
    device, hooks, _memory = rng_with_memory()
    for status in INIT:
        device.write_status(status)
    device.notify(0)  # before FEATURES_OK: the driver broke the sequence
    assert device.status & S.DEVICE_NEEDS_RESET
    assert hooks.used == []


@pytest.mark.normative(N_STATUS_DEV)
def test_a_kick_between_features_ok_and_driver_ok_is_served_at_driver_ok() -> None:
    # Linux's virtio_balloon kicks its statistics queue before DRIVER_OK.
    device, hooks, memory = rng_with_memory()
    negotiate(device, 1 << F.VIRTIO_F_VERSION_1)
    layout = RingLayout.contiguous(0x1000, 8)
    device.configure_queue(0, size=8, desc=layout.desc, driver=layout.driver, device=layout.device)
    device.enable_queue(0)
    ring = driver_queue(memory, layout)
    ring.add((), [(0x8000, 16)], "buffer")
    device.notify(0)
    assert not device.status & S.DEVICE_NEEDS_RESET
    assert hooks.used == [] and ring.get_used() == []  # nothing consumed yet
    device.write_status(S.ACKNOWLEDGE | S.DRIVER | S.FEATURES_OK | S.DRIVER_OK)
    assert ring.get_used() == [("buffer", 16)]


@pytest.mark.normative(N_RESET_DEV)
def test_reset_forgets_everything_and_the_device_works_again() -> None:
    device, _hooks, memory = rng_with_memory()
    go_live(device, memory)
    device.write_status(S.ACKNOWLEDGE)  # clears bits: needs reset
    assert device.status & S.DEVICE_NEEDS_RESET
    device.write_status(0)
    assert device.status == 0 and device.negotiated == 0 and device.needs_reset_reason is None
    assert all(q.ring is None and not q.enabled for q in device.queues)
    go_live(device, memory)
    assert device.live


@pytest.mark.normative(N_QRESET_DEV)
def test_queue_reset_needs_the_feature() -> None:
    device, _hooks, memory = rng_with_memory()
    go_live(device, memory)  # RING_RESET not negotiated
    device.reset_queue(0)
    assert device.status & S.DEVICE_NEEDS_RESET

    device, _hooks, memory = rng_with_memory()
    negotiate(device, 1 << F.VIRTIO_F_VERSION_1 | 1 << F.VIRTIO_F_RING_RESET)
    layout = RingLayout.contiguous(0x1000, 8)
    device.configure_queue(0, size=8, desc=layout.desc, driver=layout.driver, device=layout.device)
    device.enable_queue(0)
    device.write_status(device.status | S.DRIVER_OK)
    device.reset_queue(0)
    q = device.queues[0]
    assert q.ring is None and not q.enabled and q.desc == 0
    device.configure_queue(0, size=4, desc=layout.desc, driver=layout.driver, device=layout.device)
    device.enable_queue(0)
    assert q.ring is not None and q.ring.size == 4


@pytest.mark.normative(N_SUSPEND_DEV)
def test_suspend_and_resume() -> None:
    device, hooks, _memory = rng_with_memory()
    device.write_status(S.ACKNOWLEDGE | S.SUSPEND)  # before initialization: ignored
    assert not device.status & S.SUSPEND
    device.reset()
    device.hooks = hooks
    negotiate(device, 1 << F.VIRTIO_F_VERSION_1 | 1 << F.VIRTIO_F_SUSPEND)
    layout = RingLayout.contiguous(0x1000, 8)
    device.configure_queue(0, size=8, desc=layout.desc, driver=layout.driver, device=layout.device)
    device.enable_queue(0)
    live = S.ACKNOWLEDGE | S.DRIVER | S.FEATURES_OK | S.DRIVER_OK
    device.write_status(live)
    device.write_status(live | S.SUSPEND)
    assert device.status & S.SUSPEND and not device.status & S.DRIVER_OK
    device.update_config(0, b"")
    assert hooks.config == 0  # held back while suspended
    device.write_status(device.status | S.DRIVER_OK)
    assert device.status & S.DRIVER_OK and not device.status & S.SUSPEND
    assert hooks.config == 1  # delivered on resume


def test_ring_options_offer_the_core_bits() -> None:
    bits = RingOptions(in_order=True, notification_data=True, access_platform=True).feature_bits()
    for bit in (
        F.VIRTIO_F_VERSION_1,
        F.VIRTIO_F_IN_ORDER,
        F.VIRTIO_F_NOTIFICATION_DATA,
        F.VIRTIO_F_ACCESS_PLATFORM,
        F.VIRTIO_F_RING_PACKED,
    ):
        assert bits >> bit & 1
