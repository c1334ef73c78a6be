"""virtio-mmio, both sides: the register window over the seam, and the driver over a bus."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from virtio.core.registers import ISR_CONFIG, ISR_QUEUE
from virtio.devices.blk import BlkDevice, BlkDriver, BlkOptions
from virtio.devices.registry import DeviceSettings, device_type, device_types
from virtio.devices.rng import RngDevice, RngDriver
from virtio.memory import Allocator, GuestMemory
from virtio.spec import features as F
from virtio.spec.status import DeviceStatus as S
from virtio.transport.mmio import (
    CONFIG,
    MAGIC,
    NO_REGION,
    VENDOR_ID,
    LocalMmioBus,
    MmioDevice,
    MmioTransport,
    NoDevice,
    Reg,
    mmio_loopback,
)

N_MMIO_DEV = (
    "devicenormative:Virtio Transport Options / Virtio Over MMIO / MMIO Device Register Layout"
)
N_MMIO_DRV = (
    "drivernormative:Virtio Transport Options / Virtio Over MMIO / MMIO Device Register Layout"
)
N_MMIO_INIT_DRV = (
    "drivernormative:Virtio Transport Options / Virtio Over MMIO / "
    "MMIO-specific Initialization And Device Operation / Device Initialization"
)
N_MMIO_NOTIFY_DRV = (
    "drivernormative:Virtio Transport Options / Virtio Over MMIO / "
    "MMIO-specific Initialization And Device Operation / Notifications From The Device"
)
N_INIT_DRV = "drivernormative:General Initialization And Device Operation / Device Initialization"
VERSIONS = {"v2": (2, "little"), "v1-little": (1, "little"), "v1-big": (1, "big")}


def window(device: object | None = None, version: int = 2) -> tuple[MmioDevice, list[bool]]:
    dev = device if device is not None else RngDevice()
    assert isinstance(dev, (RngDevice, BlkDevice))
    memory = GuestMemory()
    memory.add(0, bytearray(1 << 20))
    dev.attach_memory(memory)
    lines: list[bool] = []
    return MmioDevice(dev, version=version, irq=lines.append), lines


@pytest.mark.normative(N_MMIO_INIT_DRV, N_MMIO_NOTIFY_DRV, N_INIT_DRV)
@pytest.mark.parametrize("layout", list(VERSIONS), ids=list(VERSIONS))
@pytest.mark.parametrize("name", list(device_types()))
def test_every_device_type_with_its_driver_over_mmio(
    tmp_path: Path, name: str, layout: str
) -> None:
    kind = device_type(name)
    version, order = VERSIONS[layout]
    device = kind.example(tmp_path, DeviceSettings())
    try:
        transport = mmio_loopback(device, version=version, legacy_order=order)  # type: ignore[arg-type]
        assert transport.device_id == kind.device_id and transport.legacy == (version == 1)
        driver = kind.driver(transport)
        driver.initialize()
        assert driver.has(F.VIRTIO_F_VERSION_1) == (version == 2)
        if isinstance(driver, BlkDriver):
            driver.write(2, b"over mmio".ljust(512, b"\0"))
            assert driver.read(2, 512).startswith(b"over mmio")
        elif isinstance(driver, RngDriver):
            assert len(driver.read(64)) == 64
        assert not device.needs_reset_reason, device.needs_reset_reason
        driver.reset()
        assert transport.read_status() == 0
    finally:
        device.close()


@pytest.mark.normative(N_MMIO_DEV)
@pytest.mark.parametrize("version", [2, 1])
def test_identification_and_shared_memory_registers(version: int) -> None:
    mmio, _lines = window(version=version)
    assert mmio.read(Reg.MAGIC_VALUE, 4) == MAGIC == int.from_bytes(b"virt", "little")
    assert mmio.read(Reg.VERSION, 4) == version
    assert mmio.read(Reg.DEVICE_ID, 4) == 4 and mmio.read(Reg.VENDOR_ID, 4) == VENDOR_ID
    mmio.write(Reg.DEVICE_FEATURES_SEL, 4, 1)
    high = mmio.read(Reg.DEVICE_FEATURES, 4)
    assert bool(high & 1) == (version == 2)  # VERSION_1 is bit 32: modern only
    mmio.write(Reg.DEVICE_FEATURES_SEL, 4, 7)
    assert mmio.read(Reg.DEVICE_FEATURES, 4) == 0
    if version == 2:
        mmio.write(Reg.SHM_SEL, 4, 0)  # the entropy device has no shared memory
        low, high = mmio.read(Reg.SHM_LEN_LOW, 4), mmio.read(Reg.SHM_LEN_HIGH, 4)
        assert low | high << 32 == NO_REGION
    assert not mmio.device.status & S.DEVICE_NEEDS_RESET


def live_rng(mmio: MmioDevice, features: int = 1 << F.VIRTIO_F_VERSION_1) -> Allocator:
    """Bring the window's rng live from the driver's side of the registers."""
    memory = mmio.device.memory
    assert isinstance(memory, GuestMemory)
    transport = MmioTransport(_Bus(mmio), memory, Allocator(0x10000, 0x40000))
    transport.write_status(S.ACKNOWLEDGE)
    transport.write_status(S.ACKNOWLEDGE | S.DRIVER)
    transport.write_driver_features(features)
    transport.write_status(S.ACKNOWLEDGE | S.DRIVER | S.FEATURES_OK)
    from virtio.queue import RingLayout

    transport.setup_queue(0, RingLayout.contiguous(0x1000, 8))
    transport.write_status(S.ACKNOWLEDGE | S.DRIVER | S.FEATURES_OK | S.DRIVER_OK)
    assert mmio.device.live
    return transport.allocator


class _Bus(LocalMmioBus):
    def __init__(self, mmio: MmioDevice) -> None:  # keep the test's own irq recorder
        irq = mmio.irq
        super().__init__(mmio)

        def both(level: bool) -> None:
            irq(level)
            self._irq(level)

        mmio.irq = both


@pytest.mark.normative(N_MMIO_DEV)
def test_interrupt_status_holds_events_until_acknowledged() -> None:
    mmio, lines = window()
    live_rng(mmio)
    device = mmio.device
    device.update_config(0, b"")  # a configuration change
    assert mmio.read(Reg.INTERRUPT_STATUS, 4) == ISR_CONFIG and lines == [True]
    assert mmio.read(Reg.INTERRUPT_STATUS, 4) == ISR_CONFIG  # reading does not clear it
    generation = mmio.read(Reg.CONFIG_GENERATION, 4)
    mmio.registers.notify_used(0)  # a used buffer notification too
    assert mmio.read(Reg.INTERRUPT_STATUS, 4) == ISR_CONFIG | ISR_QUEUE
    mmio.write(Reg.INTERRUPT_ACK, 4, ISR_CONFIG)
    assert mmio.read(Reg.INTERRUPT_STATUS, 4) == ISR_QUEUE and lines == [True]
    mmio.write(Reg.INTERRUPT_ACK, 4, ISR_QUEUE)
    assert mmio.read(Reg.INTERRUPT_STATUS, 4) == 0 and lines == [True, False]
    device.update_config(0, b"")
    assert mmio.read(Reg.CONFIG_GENERATION, 4) != generation
    # A reset clears InterruptStatus and every QueueReady.
    mmio.write(Reg.STATUS, 4, 0)
    assert mmio.read(Reg.INTERRUPT_STATUS, 4) == 0 and lines[-1] is False
    mmio.write(Reg.QUEUE_SEL, 4, 0)
    assert mmio.read(Reg.QUEUE_READY, 4) == 0 and device.queues[0].ring is None


@pytest.mark.normative(N_MMIO_DEV)
def test_queue_reset_reads_zero_with_queue_ready_once_done() -> None:
    mmio, _lines = window()
    live_rng(mmio, 1 << F.VIRTIO_F_VERSION_1 | 1 << F.VIRTIO_F_RING_RESET)
    mmio.write(Reg.QUEUE_SEL, 4, 0)
    assert mmio.read(Reg.QUEUE_READY, 4) == 1 and mmio.read(Reg.QUEUE_RESET, 4) == 0
    mmio.write(Reg.QUEUE_RESET, 4, 1)
    assert mmio.read(Reg.QUEUE_RESET, 4) == 0 and mmio.read(Reg.QUEUE_READY, 4) == 0
    assert mmio.device.queues[0].ring is None  # no access to the ring once not ready


HOSTILE = [
    ("a 16-bit read of a register", "read", Reg.STATUS, 2, 0),
    ("an unaligned read", "read", Reg.STATUS + 1, 4, 0),
    ("a write to MagicValue", "write", Reg.MAGIC_VALUE, 4, 1),
    ("a write to QueueSizeMax", "write", Reg.QUEUE_SIZE_MAX, 4, 8),
    ("a read of QueueNotify", "read", Reg.QUEUE_NOTIFY, 4, 0),
    ("a read of DriverFeatures", "read", Reg.DRIVER_FEATURES, 4, 0),
    ("an access where no register is", "read", 0x0F0, 4, 0),
    ("InterruptACK with undefined bits", "write", Reg.INTERRUPT_ACK, 4, 0x80),
    ("QueueSize beyond QueueSizeMax", "write", Reg.QUEUE_SIZE, 4, 1 << 15),
    ("a 3-byte config read", "read", CONFIG + 1, 3, 0),
    ("an unaligned 32-bit config read", "read", CONFIG + 2, 4, 0),
]


@pytest.mark.normative(N_MMIO_DRV)
@pytest.mark.parametrize("what,kind,offset,size,value", HOSTILE, ids=[h[0] for h in HOSTILE])
def test_hostile_register_accesses_need_reset(
    what: str, kind: str, offset: int, size: int, value: int
) -> None:
    mmio, _lines = window()
    mmio.write(Reg.STATUS, 4, S.ACKNOWLEDGE)
    if kind == "read":
        assert mmio.read(offset, size) == 0
    else:
        mmio.write(offset, size, value)
    device = mmio.device
    assert device.status & S.DEVICE_NEEDS_RESET, what
    assert device.needs_reset_reason is not None and N_MMIO_DRV in device.needs_reset_reason


@pytest.mark.normative(N_MMIO_DRV)
def test_queue_configuration_while_ready_needs_reset() -> None:
    mmio, _lines = window()
    live_rng(mmio)
    mmio.write(Reg.QUEUE_SEL, 4, 0)
    mmio.write(Reg.QUEUE_DESC_LOW, 4, 0x8000)
    assert mmio.device.status & S.DEVICE_NEEDS_RESET
    reason = mmio.device.needs_reset_reason
    assert reason is not None and "while it is ready" in reason and N_MMIO_DRV in reason


@pytest.mark.normative(N_MMIO_DRV)
def test_legacy_guest_page_size_must_be_a_power_of_two() -> None:
    mmio, _lines = window(version=1)
    mmio.write(Reg.GUEST_PAGE_SIZE, 4, 3000)
    assert mmio.device.status & S.DEVICE_NEEDS_RESET


@pytest.mark.normative(N_MMIO_DEV, N_MMIO_DRV)
@settings(max_examples=150, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.booleans(),
            st.integers(0, 0x140),
            st.sampled_from([1, 2, 3, 4, 8]),
            st.integers(0, 0xFFFFFFFF),
        ),
        max_size=40,
    )
)
def test_any_access_sequence_is_answered_and_never_raises(
    accesses: list[tuple[bool, int, int, int]],
) -> None:
    mmio, _lines = window()
    for is_write, offset, size, value in accesses:
        if is_write:
            mmio.write(offset, size, value)
        else:
            assert 0 <= mmio.read(offset, size) <= 0xFFFFFFFF
        if mmio.read(Reg.STATUS, 4) == 0:
            assert mmio.read(Reg.INTERRUPT_STATUS, 4) == 0  # nothing outlives a reset
    # Whatever happened, the identification registers still read right.
    assert mmio.read(Reg.MAGIC_VALUE, 4) == MAGIC and mmio.read(Reg.VERSION, 4) == 2


class FakeBus:
    def __init__(self, values: dict[int, int]) -> None:
        self.values = values
        self.reads: list[int] = []

    def read(self, offset: int, size: int) -> int:
        self.reads.append(offset)
        return self.values.get(offset, 0)

    def write(self, offset: int, size: int, value: int) -> None:
        raise AssertionError("the driver wrote to a window it should have ignored")

    def wait_interrupt(self, timeout: float | None) -> bool:
        return False


@pytest.mark.normative(N_MMIO_INIT_DRV)
def test_the_driver_ignores_windows_without_a_usable_device() -> None:
    memory, alloc = GuestMemory(), Allocator(0x1000, 0x1000)
    with pytest.raises(NoDevice, match="magic"):
        MmioTransport(FakeBus({Reg.MAGIC_VALUE: 0x12345678}), memory, alloc)
    with pytest.raises(NoDevice, match="version 3"):
        MmioTransport(FakeBus({Reg.MAGIC_VALUE: MAGIC, Reg.VERSION: 3}), memory, alloc)
    placeholder = FakeBus({Reg.MAGIC_VALUE: MAGIC, Reg.VERSION: 2, Reg.DEVICE_ID: 0})
    with pytest.raises(NoDevice, match="placeholder"):
        MmioTransport(placeholder, memory, alloc)
    # A placeholder: after DeviceID, no other register was touched.
    assert placeholder.reads == [Reg.MAGIC_VALUE, Reg.VERSION, Reg.DEVICE_ID]


@pytest.mark.normative(N_MMIO_NOTIFY_DRV)
def test_the_driver_acknowledges_what_it_handled(tmp_path: Path) -> None:
    image = tmp_path / "d.img"
    image.write_bytes(bytes(1 << 20))
    device = BlkDevice(image, BlkOptions())
    try:
        transport = mmio_loopback(device)
        driver = BlkDriver(transport)
        driver.initialize()
        driver.write(0, b"x" * 512)  # completes with a used buffer interrupt
        assert transport.bus.read(Reg.INTERRUPT_STATUS, 4) == 0  # read, handled, acknowledged
        device.update_capacity()
        assert transport.wait_interrupt(1.0)  # the config change: status read, then ACK
        assert transport.bus.read(Reg.INTERRUPT_STATUS, 4) == 0
    finally:
        device.close()


# Not a normative clause on MMIO (the register description says it): untagged.
def test_an_out_of_range_queue_select_reads_as_no_queue() -> None:
    mmio, _lines = window()
    mmio.write(Reg.STATUS, 4, S.ACKNOWLEDGE | S.DRIVER)
    mmio.write(Reg.QUEUE_SEL, 4, 0xFFFF_FFFF)
    # No such queue: its maximum size reads 0 and it is not ready; nothing breaks.
    assert mmio.read(Reg.QUEUE_SIZE_MAX, 4) == 0
    assert mmio.read(Reg.QUEUE_READY, 4) == 0
    assert not mmio.device.status & S.DEVICE_NEEDS_RESET
    mmio.write(Reg.QUEUE_SEL, 4, 0)
    assert mmio.read(Reg.QUEUE_SIZE_MAX, 4) > 0
