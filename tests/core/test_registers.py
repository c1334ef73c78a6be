"""A device driven through the transport seam alone, register by register."""

from __future__ import annotations

from pathlib import Path

import pytest

from virtio.core.device import RingOptions
from virtio.core.registers import ISR_CONFIG, ISR_QUEUE, NO_VECTOR, DeviceRegisters
from virtio.core.status import Interface
from virtio.devices.blk import BlkDevice, BlkOptions
from virtio.devices.blk.wire import BLK_REQ_HEADER, S_OK, T_IN, T_OUT
from virtio.devices.rng import RngDevice
from virtio.layout import ByteOrder
from virtio.memory import Allocator, GuestMemory
from virtio.queue import RingLayout, driver_queue, encode_notification
from virtio.spec import features as F
from virtio.spec.status import DeviceStatus as S

N_INIT_DRV = "drivernormative:General Initialization And Device Operation / Device Initialization"
N_STATUS_DEV = "devicenormative:Basic Facilities of a Virtio Device / Device Status Field"
N_FEATURES_DEV = "devicenormative:Basic Facilities of a Virtio Device / Feature Bits"
N_QRESET_DEV = (
    "devicenormative:Basic Facilities of a Virtio Device / Virtqueues / Virtqueue Reset / "
    "Virtqueue Reset"
)
N_LEGACY_LAYOUT_DRV = "drivernormative:Basic Facilities of a Virtio Device / Virtqueues"
N_BLK_DEV_OP = "devicenormative:Device Types / Block Device / Device Operation"
N_ENTROPY_DEV = "devicenormative:Device Types / Entropy Device / Device Operation"


class Interrupts:
    """An interrupt sink that records what the device raised."""

    def __init__(self) -> None:
        self.queue: list[tuple[int, int]] = []
        self.config: list[int] = []

    def queue_interrupt(self, queue: int, vector: int) -> None:
        self.queue.append((queue, vector))

    def config_interrupt(self, vector: int) -> None:
        self.config.append(vector)


def features(regs: DeviceRegisters) -> int:
    value = 0
    for word in (0, 1):
        regs.device_feature_select = word
        value |= regs.device_feature << (32 * word)
    return value


def accept(regs: DeviceRegisters, value: int) -> None:
    for word in (0, 1):
        regs.driver_feature_select = word
        regs.driver_feature = value >> (32 * word) & 0xFFFFFFFF


@pytest.mark.normative(N_INIT_DRV, N_STATUS_DEV, N_FEATURES_DEV, N_ENTROPY_DEV)
def test_rng_through_the_registers_with_msix_vectors() -> None:
    memory = GuestMemory()
    memory.add(0, bytearray(1 << 20))
    device = RngDevice()
    device.attach_memory(memory)
    sink = Interrupts()
    regs = DeviceRegisters(device, interrupts=sink, vectors=2)
    assert regs.device_id == 4 and regs.num_queues == 1
    regs.status = S.ACKNOWLEDGE
    regs.status = S.ACKNOWLEDGE | S.DRIVER
    offered = features(regs)
    assert offered >> F.VIRTIO_F_VERSION_1 & 1
    wanted = 1 << F.VIRTIO_F_VERSION_1 | 1 << F.VIRTIO_F_EVENT_IDX
    accept(regs, wanted)
    regs.driver_feature_select = 1
    assert regs.driver_feature == 1  # VERSION_1 is bit 0 of word 1
    regs.status = S.ACKNOWLEDGE | S.DRIVER | S.FEATURES_OK
    assert regs.status & S.FEATURES_OK
    regs.config_msix_vector = 0
    regs.queue_select = 0
    assert regs.queue_max_size == 64
    regs.queue_msix_vector = 5  # beyond the 2 vectors: refused, reads back NO_VECTOR
    assert regs.queue_msix_vector == NO_VECTOR
    regs.queue_msix_vector = 1
    layout = RingLayout.contiguous(0x1000, 16)
    regs.queue_size = 16
    regs.queue_desc, regs.queue_driver, regs.queue_device = (
        layout.desc,
        layout.driver,
        layout.device,
    )
    regs.queue_enable = 1
    assert regs.queue_enable == 1 and regs.queue_notify_off == 0
    regs.status = S.ACKNOWLEDGE | S.DRIVER | S.FEATURES_OK | S.DRIVER_OK
    assert device.live

    ring = driver_queue(memory, layout, event_idx=True, allocator=Allocator(0x10000, 0x10000))
    # The driver end was made after the device end: both start from a cleared ring.
    ring.add([], [(0x20000, 32)], "entropy")
    assert ring.kick_needed()
    regs.notify(0)  # a PCI notify write of the queue index
    assert sink.queue == [(0, 1)]
    assert regs.read_isr() == ISR_QUEUE and regs.read_isr() == 0  # read clears it
    ((token, written),) = ring.get_used()
    assert token == "entropy" and written == 32

    device.update_config(0, b"")
    assert sink.config == [0] and regs.interrupt_status == ISR_CONFIG
    regs.ack_interrupt(ISR_CONFIG)
    assert regs.interrupt_status == 0


@pytest.mark.normative(N_INIT_DRV, N_BLK_DEV_OP)
def test_out_of_range_queue_select_reads_zero_and_writes_nothing(tmp_path: Path) -> None:
    image = tmp_path / "d.img"
    image.write_bytes(bytes(1 << 20))
    device = BlkDevice(image, BlkOptions(num_queues=2))
    try:
        memory = GuestMemory()
        memory.add(0, bytearray(1 << 20))
        device.attach_memory(memory)
        regs = DeviceRegisters(device)
        regs.queue_select = 7
        assert regs.queue_max_size == 0 and regs.queue_size == 0 and regs.queue_desc == 0
        regs.queue_size = 8
        regs.queue_desc = 0x1000
        regs.queue_enable = 1
        assert all(not q.enabled and q.desc == 0 for q in device.queues)
        assert not device.status & S.DEVICE_NEEDS_RESET
        # Configuring a queue after enabling it is the driver's error.
        regs.status = S.ACKNOWLEDGE
        regs.status = S.ACKNOWLEDGE | S.DRIVER
        accept(regs, 1 << F.VIRTIO_F_VERSION_1)
        regs.status = S.ACKNOWLEDGE | S.DRIVER | S.FEATURES_OK
        regs.queue_select = 1
        regs.queue_enable = 1
        regs.queue_desc = 0x2000
        assert device.status & S.DEVICE_NEEDS_RESET
        assert device.needs_reset_reason is not None and N_INIT_DRV in device.needs_reset_reason
    finally:
        device.close()


def live_rng(device: RngDevice, features: int) -> tuple[DeviceRegisters, GuestMemory, RingLayout]:
    """An entropy device brought live through the registers, its queue 0 at 0x1000."""
    memory = GuestMemory()
    memory.add(0, bytearray(1 << 20))
    device.attach_memory(memory)
    regs = DeviceRegisters(device)
    for value in (S.ACKNOWLEDGE, S.ACKNOWLEDGE | S.DRIVER):
        regs.status = value
    accept(regs, features)
    regs.status = S.ACKNOWLEDGE | S.DRIVER | S.FEATURES_OK
    layout = RingLayout.contiguous(0x1000, 8)
    regs.queue_size = 8
    regs.queue_desc, regs.queue_driver = layout.desc, layout.driver
    regs.queue_device = layout.device
    regs.queue_enable = 1
    regs.status = S.ACKNOWLEDGE | S.DRIVER | S.FEATURES_OK | S.DRIVER_OK
    assert device.live
    return regs, memory, layout


@pytest.mark.normative(N_QRESET_DEV)
def test_queue_reset_register_reads_zero_once_done() -> None:
    device = RngDevice()
    regs, _memory, _layout = live_rng(
        device, 1 << F.VIRTIO_F_VERSION_1 | 1 << F.VIRTIO_F_RING_RESET
    )
    regs.queue_reset = 1
    # Reset completed within the write: queue_reset and queue_enable both read 0.
    assert regs.queue_reset == 0 and regs.queue_enable == 0
    assert device.queues[0].ring is None and regs.queue_desc == 0


@pytest.mark.normative(N_INIT_DRV, N_BLK_DEV_OP)
def test_notification_data_is_decoded_per_the_spec(tmp_path: Path) -> None:
    device = RngDevice(ring=RingOptions(notification_data=True, packed=False))
    features = 1 << F.VIRTIO_F_VERSION_1 | 1 << F.VIRTIO_F_NOTIFICATION_DATA
    regs, memory, layout = live_rng(device, features)
    ring = driver_queue(memory, layout, allocator=Allocator(0x10000, 0x10000))
    ring.add([], [(0x20000, 8)], "x")
    data = ring.notification_value()
    assert data == encode_notification(0, 1)  # queue 0, next available index 1
    regs.notify(data)  # the high half is the next index, not a queue number
    assert ring.get_used() == [("x", 8)]
    assert not device.status & S.DEVICE_NEEDS_RESET


@pytest.mark.normative(N_LEGACY_LAYOUT_DRV, N_BLK_DEV_OP)
@pytest.mark.parametrize("order", ["little", "big"])
def test_legacy_interface_queue_by_page_frame_number(tmp_path: Path, order: str) -> None:
    image = tmp_path / "d.img"
    image.write_bytes(bytes(1 << 20))
    device = BlkDevice(image, BlkOptions())
    try:
        memory = GuestMemory()
        memory.add(0, bytearray(2 << 20))
        device.attach_memory(memory)
        byteorder: ByteOrder = "little" if order == "little" else "big"
        regs = DeviceRegisters(device, interface=Interface.LEGACY, legacy_order=byteorder)
        # Legacy: 32 feature bits, no VERSION_1; capacity in the guest's byte order.
        regs.device_feature_select = 0
        offered = regs.device_feature
        regs.device_feature_select = 1
        assert regs.device_feature == 0
        assert int.from_bytes(regs.read_config(0, 8), byteorder) == 2048
        regs.status = S.ACKNOWLEDGE
        regs.status = S.ACKNOWLEDGE | S.DRIVER
        regs.driver_feature_select = 0
        regs.driver_feature = offered & (1 << F.VIRTIO_BLK_F_FLUSH)
        regs.queue_select = 0
        size = regs.queue_max_size
        regs.queue_pfn = 0x10  # the ring at 64 KiB, used ring on the next 4096 boundary
        regs.status = S.ACKNOWLEDGE | S.DRIVER | S.DRIVER_OK  # no FEATURES_OK step
        assert device.live and device.byteorder == byteorder
        layout = RingLayout.legacy(0x10000, size)
        ring = driver_queue(
            memory, layout, allocator=Allocator(0x100000, 0x100000), order=byteorder
        )
        header = BLK_REQ_HEADER.with_order(byteorder).struct
        memory.write(0x180000, header.pack(T_OUT, 0, 3) + b"legacy!!" * 64)
        ring.add([(0x180000, 16), (0x180010, 512)], [(0x190000, 1)], "w")
        regs.notify(0)
        memory.write(0x1A0000, header.pack(T_IN, 0, 3))
        ring.add([(0x1A0000, 16)], [(0x1B0000, 512), (0x190001, 1)], "r")
        regs.notify(0)
        assert sorted(str(t) for t, _ in ring.get_used()) == ["r", "w"]
        assert memory.read(0x190000, 2) == bytes([S_OK, S_OK])
        assert memory.read(0x1B0000, 512) == b"legacy!!" * 64
        assert image.read_bytes()[3 * 512 : 4 * 512] == b"legacy!!" * 64
        regs.queue_pfn = 0  # legacy: writing 0 stops the queue
        assert device.queues[0].ring is None
    finally:
        device.close()
