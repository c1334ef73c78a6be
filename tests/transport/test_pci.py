"""virtio-pci, both sides: a PCI function's configuration space and BARs over the seam."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from virtio.core.device import RingOptions, SharedMemoryRegion
from virtio.core.registers import ISR_CONFIG, ISR_QUEUE, NO_VECTOR
from virtio.devices.blk import BlkDevice
from virtio.devices.registry import DeviceSettings, device_type, device_types
from virtio.devices.rng import RngDevice, RngDriver
from virtio.memory import Allocator, GuestMemory
from virtio.queue import RingLayout
from virtio.spec import features as F
from virtio.spec.status import DeviceStatus as S
from virtio.transport.pci import (
    BAR_LEGACY,
    BAR_MODERN,
    BAR_MSIX,
    CFG_BAR0,
    CFG_CAPS,
    CFG_COMMAND,
    CFG_STATUS,
    CMD_BUS_MASTER,
    CMD_MEMORY,
    COMMON_OFF,
    DEVICE_OFF,
    ISR_OFF,
    MSIX_ENABLE,
    MSIX_PBA,
    NOTIFY_OFF,
    STATUS_CAP_LIST,
    STATUS_INTERRUPT,
    TRANSITIONAL,
    CapType,
    LocalPciBus,
    NotVirtio,
    PciFunction,
    PciTransport,
    pci_loopback,
)

P = "Virtio Transport Options / Virtio Over PCI Bus / "
N_DISCOVERY_DEV = f"devicenormative:{P}PCI Device Discovery"
N_DISCOVERY_DRV = f"drivernormative:{P}PCI Device Discovery"
N_LAYOUT_DRV = f"drivernormative:{P}PCI Device Layout"
N_LAYOUT_DEV = f"devicenormative:{P}PCI Device Layout"
N_CAPS_DEV = f"devicenormative:{P}Virtio Structure PCI Capabilities"
N_CAPS_DRV = f"drivernormative:{P}Virtio Structure PCI Capabilities"
N_COMMON_DEV = f"devicenormative:{P}PCI Device Layout / Common configuration structure layout"
N_COMMON_DRV = f"drivernormative:{P}PCI Device Layout / Common configuration structure layout"
N_NOTIFY_CAP_DEV = f"devicenormative:{P}PCI Device Layout / Notification capability"
N_ISR_DEV = f"devicenormative:{P}PCI Device Layout / ISR status capability"
N_DEVICE_CFG_DEV = f"devicenormative:{P}PCI Device Layout / Device-specific configuration"
N_CFG_ACCESS_DEV = f"devicenormative:{P}PCI Device Layout / PCI configuration access capability"
N_CFG_ACCESS_DRV = f"drivernormative:{P}PCI Device Layout / PCI configuration access capability"
OPS = f"{P}PCI-specific Initialization And Device Operation / "
N_MSIX_DEV = f"devicenormative:{OPS}Device Initialization / MSI-X Vector Configuration"
N_MSIX_DRV = f"drivernormative:{OPS}Device Initialization / MSI-X Vector Configuration"
N_AVAIL_NOTIFY_DRV = f"drivernormative:{OPS}Available Buffer Notifications"
N_USED_NOTIFY_DEV = f"devicenormative:{OPS}Used Buffer Notifications"
N_CONFIG_NOTIFY_DEV = f"devicenormative:{OPS}Notification of Device Configuration Changes"
N_CONFIG_NOTIFY_DRV = f"drivernormative:{OPS}Notification of Device Configuration Changes"
N_INIT_DRV = "drivernormative:General Initialization And Device Operation / Device Initialization"

SHAPES = {
    "modern-msix": {},
    "modern-intx": {"msix_vectors": 0},
    "transitional-modern": {"transitional": True},
    "legacy-msix": {"transitional": True, "force_legacy": True},
    "legacy-intx": {"transitional": True, "force_legacy": True, "msix_vectors": 0},
    "legacy-big-endian": {"transitional": True, "force_legacy": True, "legacy_order": "big"},
}


@pytest.mark.normative(N_DISCOVERY_DRV, N_LAYOUT_DRV, N_AVAIL_NOTIFY_DRV, N_CONFIG_NOTIFY_DRV)
@pytest.mark.normative(N_MSIX_DRV, N_INIT_DRV)
@pytest.mark.parametrize(
    ("name", "shape"),
    [
        (name, shape)
        for name, kind in device_types().items()
        for shape in SHAPES
        # Transitional and legacy shapes exist only for types with a transitional id.
        if shape.startswith("modern-") or kind.device_id in TRANSITIONAL
    ],
)
def test_every_device_type_with_its_driver_over_pci(tmp_path: Path, name: str, shape: str) -> None:
    kind = device_type(name)
    device = kind.example(tmp_path, DeviceSettings(ring=RingOptions(notification_data=True)))
    try:
        transport = pci_loopback(device, **SHAPES[shape])  # type: ignore[arg-type]
        assert transport.device_id == kind.device_id
        assert transport.legacy == ("legacy" in shape)
        driver = kind.driver(transport)
        driver.initialize()
        assert driver.has(F.VIRTIO_F_VERSION_1) != transport.legacy
        if kind.smoke is not None:
            kind.smoke(driver)
        bus = transport.bus
        assert isinstance(bus, LocalPciBus)
        # Interrupts came the configured way: MSI-X messages, or INTx.
        if kind.smoke is not None:
            assert (bus.messages > 0) == ("intx" not in shape)
        else:
            assert "intx" not in shape or bus.messages == 0
        assert not device.needs_reset_reason, device.needs_reset_reason
        driver.reset()
        assert transport.read_status() == 0
    finally:
        device.close()


def function(
    transitional: bool = False, msix: int = 2
) -> tuple[PciFunction, list[tuple[int, int]], list[bool]]:
    device = RngDevice()
    memory = GuestMemory()
    memory.add(0, bytearray(1 << 20))
    device.attach_memory(memory)
    messages: list[tuple[int, int]] = []
    lines: list[bool] = []
    fn = PciFunction(
        device,
        transitional=transitional,
        msix_vectors=msix,
        msi=lambda a, d: messages.append((a, d)),
        intx=lines.append,
    )
    return fn, messages, lines


def caps(fn: PciFunction) -> dict[int, tuple[int, bytes]]:
    """cfg_type (or 0x11 for MSI-X) -> (position, raw capability bytes), walking the list."""
    out: dict[int, tuple[int, bytes]] = {}
    at = fn.config_read(CFG_CAPS, 1)
    while at:
        kind = fn.config_read(at, 1)
        length = 12 if kind == 0x11 else fn.config_read(at + 2, 1)
        if kind == 0x09 and fn.config_read(at + 3, 1) == CapType.PCI_CFG:
            length = 16  # pci_cfg_data is a window: reading it is an access of its own
        raw = bytes(fn.config_read(at + i, 1) for i in range(length))
        out[0x11 if kind == 0x11 else raw[3]] = (at, raw)
        at = fn.config_read(at + 1, 1)
    return out


@pytest.mark.normative(N_DISCOVERY_DEV)
@pytest.mark.parametrize("transitional", [False, True])
def test_ids_follow_the_discovery_rules(transitional: bool) -> None:
    fn, _m, _l = function(transitional)
    vendor, device_id = fn.config_read(0, 2), fn.config_read(2, 2)
    revision, subsystem = fn.config_read(8, 1), fn.config_read(0x2E, 2)
    assert vendor == 0x1AF4
    if transitional:
        assert device_id == 0x1005 and revision == 0 and subsystem == 4
    else:
        assert device_id == 0x1040 + 4 and revision >= 1 and subsystem >= 0x40


@pytest.mark.normative(N_CAPS_DEV, N_NOTIFY_CAP_DEV, N_DEVICE_CFG_DEV, N_CFG_ACCESS_DEV)
def test_capabilities_describe_the_modern_bar() -> None:
    fn, _m, _l = function()
    assert fn.config_read(CFG_STATUS, 2) & STATUS_CAP_LIST
    found = caps(fn)
    assert {CapType.COMMON, CapType.NOTIFY, CapType.ISR, CapType.DEVICE, CapType.PCI_CFG} <= set(
        found
    )
    for cfg_type in (CapType.COMMON, CapType.NOTIFY, CapType.ISR, CapType.DEVICE):
        _at, raw = found[cfg_type]
        bar, offset, length = raw[4], *struct.unpack_from("<II", raw, 8)
        assert bar == BAR_MODERN and offset % 4 == 0 and length >= 1
        assert offset + length <= fn.bars[BAR_MODERN].size
    _at, notify = found[CapType.NOTIFY]
    assert notify[2] == 20  # cap_len covers notify_off_multiplier
    multiplier = struct.unpack_from("<I", notify, 16)[0]
    assert (
        multiplier and multiplier & (multiplier - 1) == 0 and (multiplier.bit_length() - 1) % 2 == 0
    )
    length = struct.unpack_from("<I", notify, 12)[0]
    assert length >= (fn.registers.num_queues - 1) * multiplier + 4
    assert found[CapType.PCI_CFG][1][2] == 20  # cap_len covers pci_cfg_data
    assert not fn.device.status & S.DEVICE_NEEDS_RESET


@pytest.mark.normative(N_COMMON_DEV)
def test_bars_size_and_the_common_configuration_reads_as_specified() -> None:
    fn, _m, _l = function(transitional=True)
    for index, bar in fn.bars.items():
        fn.config_write(CFG_BAR0 + 4 * index, 4, 0xFFFFFFFF)
        mask = fn.config_read(CFG_BAR0 + 4 * index, 4)
        assert (~(mask & ~0xF) + 1) & 0xFFFFFFFF == bar.size
        assert bool(mask & 1) == bar.io
    fn.bar_write(BAR_MODERN, COMMON_OFF + 0x00, 4, 1)
    assert fn.bar_read(BAR_MODERN, COMMON_OFF + 0x04, 4) == fn.registers.device_features >> 32
    fn.bar_write(BAR_MODERN, COMMON_OFF + 0x00, 4, 5)
    assert fn.bar_read(BAR_MODERN, COMMON_OFF + 0x04, 4) == 0
    fn.bar_write(BAR_MODERN, COMMON_OFF + 0x16, 2, 9)  # no queue 9
    assert fn.bar_read(BAR_MODERN, COMMON_OFF + 0x18, 2) == 0
    fn.bar_write(BAR_MODERN, COMMON_OFF + 0x16, 2, 0)
    assert fn.bar_read(BAR_MODERN, COMMON_OFF + 0x1C, 2) == 0  # queue_enable 0 at reset
    # The 64-bit queue addresses take their 32-bit halves independently.
    fn.bar_write(BAR_MODERN, COMMON_OFF + 0x24, 4, 0x1)
    fn.bar_write(BAR_MODERN, COMMON_OFF + 0x20, 4, 0x2000)
    assert fn.registers.queue_desc == 0x1_0000_2000
    assert fn.bar_read(BAR_MODERN, COMMON_OFF + 0x24, 4) == 1
    assert not fn.device.status & S.DEVICE_NEEDS_RESET


@pytest.mark.normative(N_COMMON_DEV)
def test_config_generation_changes_after_any_unseen_change_even_past_256() -> None:
    fn, _m, _l = function()
    before = fn.bar_read(BAR_MODERN, COMMON_OFF + 0x15, 1)
    for _ in range(256):
        fn.device.update_config(0, b"")  # no reads in between: an 8-bit counter would wrap
    assert fn.bar_read(BAR_MODERN, COMMON_OFF + 0x15, 1) != before
    same = fn.bar_read(BAR_MODERN, COMMON_OFF + 0x15, 1)
    assert fn.bar_read(BAR_MODERN, COMMON_OFF + 0x15, 1) == same  # nothing changed since


def live(fn: PciFunction, *, msix: bool) -> None:
    """A driver's set-up, register by register, up to DRIVER_OK with queue 0 at 0x1000."""
    fn.config_write(CFG_COMMAND, 2, CMD_MEMORY | CMD_BUS_MASTER)
    if msix:
        for vector in range(fn.msix_vectors):
            fn.bar_write(BAR_MSIX, 16 * vector, 4, 0xFEE00000)
            fn.bar_write(BAR_MSIX, 16 * vector + 8, 4, 0x40 + vector)
            fn.bar_write(BAR_MSIX, 16 * vector + 12, 4, 0)
        at = caps(fn)[0x11][0]
        fn.config_write(at + 2, 2, MSIX_ENABLE)

    def common(off: int, size: int, value: int) -> None:
        fn.bar_write(BAR_MODERN, COMMON_OFF + off, size, value)

    common(0x14, 1, S.ACKNOWLEDGE)
    common(0x14, 1, S.ACKNOWLEDGE | S.DRIVER)
    common(0x08, 4, 1)
    common(0x0C, 4, 1)  # VERSION_1
    common(0x14, 1, S.ACKNOWLEDGE | S.DRIVER | S.FEATURES_OK)
    if msix:
        common(0x10, 2, 0)
    layout = RingLayout.contiguous(0x1000, 8)
    common(0x16, 2, 0)
    common(0x18, 2, 8)
    for off, addr in ((0x20, layout.desc), (0x28, layout.driver), (0x30, layout.device)):
        common(off, 4, addr)
    if msix:
        common(0x1A, 2, 1)
    common(0x1C, 2, 1)
    common(0x14, 1, S.ACKNOWLEDGE | S.DRIVER | S.FEATURES_OK | S.DRIVER_OK)
    assert fn.device.live


@pytest.mark.normative(N_ISR_DEV)
def test_intx_follows_the_isr_and_reading_it_clears_it() -> None:
    fn, messages, lines = function(msix=0)
    live(fn, msix=False)
    fn.device.update_config(0, b"")
    assert lines == [True] and fn.config_read(CFG_STATUS, 2) & STATUS_INTERRUPT
    fn.registers.notify_used(0)
    assert fn.bar_read(BAR_MODERN, ISR_OFF, 1) == ISR_CONFIG | ISR_QUEUE
    assert lines == [True, False] and not fn.config_read(CFG_STATUS, 2) & STATUS_INTERRUPT
    assert fn.bar_read(BAR_MODERN, ISR_OFF, 1) == 0 and messages == []


@pytest.mark.normative(N_MSIX_DEV, N_USED_NOTIFY_DEV, N_CONFIG_NOTIFY_DEV)
def test_msix_vectors_masks_and_no_vector() -> None:
    fn, messages, lines = function(msix=2)
    live(fn, msix=True)
    assert fn.bar_read(BAR_MODERN, COMMON_OFF + 0x10, 2) == 0
    fn.bar_write(BAR_MODERN, COMMON_OFF + 0x16, 2, 0)
    assert fn.bar_read(BAR_MODERN, COMMON_OFF + 0x1A, 2) == 1
    fn.device.update_config(0, b"")
    fn.registers.notify_used(0)
    assert messages == [(0xFEE00000, 0x40), (0xFEE00000, 0x41)] and lines == []
    # A masked vector is held pending in the PBA and sent when unmasked.
    fn.bar_write(BAR_MSIX, 16 * 1 + 12, 4, 1)
    fn.registers.notify_used(0)
    assert len(messages) == 2 and fn.bar_read(BAR_MSIX, MSIX_PBA, 8) == 0b10
    fn.bar_write(BAR_MSIX, 16 * 1 + 12, 4, 0)
    assert messages[-1] == (0xFEE00000, 0x41) and fn.bar_read(BAR_MSIX, MSIX_PBA, 8) == 0
    # Unmapped (NO_VECTOR): no interrupt at all.
    fn.bar_write(BAR_MODERN, COMMON_OFF + 0x1A, 2, NO_VECTOR)
    fn.bar_write(BAR_MODERN, COMMON_OFF + 0x10, 2, NO_VECTOR)
    fn.registers.notify_used(0)
    fn.device.update_config(0, b"")
    assert len(messages) == 3 and lines == []
    # A reset unmaps every event.
    fn.bar_write(BAR_MODERN, COMMON_OFF + 0x14, 1, 0)
    assert fn.bar_read(BAR_MODERN, COMMON_OFF + 0x10, 2) == NO_VECTOR


@pytest.mark.normative(N_CFG_ACCESS_DEV)
def test_the_pci_configuration_access_window_reaches_the_bar() -> None:
    fn, _m, _l = function()
    at = caps(fn)[CapType.PCI_CFG][0]
    fn.config_write(at + 4, 1, BAR_MODERN)
    fn.config_write(at + 8, 4, COMMON_OFF + 0x12)  # num_queues
    fn.config_write(at + 12, 4, 2)
    assert fn.config_read(at + 16, 2) == fn.registers.num_queues
    fn.config_write(at + 8, 4, COMMON_OFF + 0x16)  # queue_select, through the window
    fn.config_write(at + 16, 2, 0)
    assert fn.registers.queue_select == 0 and not fn.device.status & S.DEVICE_NEEDS_RESET


HOSTILE = [
    ("a 16-bit write of device_status", N_LAYOUT_DRV, COMMON_OFF + 0x14, 2, 1),
    ("a 32-bit write of queue_select", N_LAYOUT_DRV, COMMON_OFF + 0x16, 4, 0),
    ("a write of num_queues", N_COMMON_DRV, COMMON_OFF + 0x12, 2, 3),
    ("a write of config_generation", N_COMMON_DRV, COMMON_OFF + 0x15, 1, 3),
    ("0 written to queue_enable", N_COMMON_DRV, COMMON_OFF + 0x1C, 2, 0),
    ("a queue size that is not a power of 2", N_COMMON_DRV, COMMON_OFF + 0x18, 2, 6),
    ("a 3-byte device configuration read", N_LAYOUT_DRV, DEVICE_OFF + 1, 3, None),
    ("a 32-bit notification without NOTIFICATION_DATA", N_AVAIL_NOTIFY_DRV, NOTIFY_OFF, 4, 0),
    ("an event mapped outside the MSI-X table", N_MSIX_DRV, COMMON_OFF + 0x10, 2, 9),
]


@pytest.mark.normative(N_LAYOUT_DRV, N_COMMON_DRV, N_AVAIL_NOTIFY_DRV, N_MSIX_DRV)
@pytest.mark.parametrize("what,rule,offset,size,value", HOSTILE, ids=[h[0] for h in HOSTILE])
def test_hostile_accesses_need_reset(
    what: str, rule: str, offset: int, size: int, value: int | None
) -> None:
    fn, _m, _l = function()
    fn.bar_write(BAR_MODERN, COMMON_OFF + 0x14, 1, S.ACKNOWLEDGE)
    if value is None:
        assert fn.bar_read(BAR_MODERN, offset, size) == 0
    else:
        fn.bar_write(BAR_MODERN, offset, size, value)
    reason = fn.device.needs_reset_reason
    assert fn.device.status & S.DEVICE_NEEDS_RESET, what
    assert reason is not None and rule in reason, reason


@pytest.mark.normative(N_CFG_ACCESS_DRV)
def test_a_misaligned_configuration_window_access_needs_reset() -> None:
    fn, _m, _l = function()
    at = caps(fn)[CapType.PCI_CFG][0]
    fn.config_write(at + 4, 1, BAR_MODERN)
    fn.config_write(at + 8, 4, COMMON_OFF + 0x13)
    fn.config_write(at + 12, 4, 2)
    fn.config_read(at + 16, 2)
    reason = fn.device.needs_reset_reason
    assert reason is not None and N_CFG_ACCESS_DRV in reason


class Bus(LocalPciBus):
    def __init__(self, fn: PciFunction, vendor: int | None = None) -> None:
        super().__init__(fn)
        self.vendor = vendor

    def config_read(self, offset: int, size: int) -> int:
        if offset == 0 and self.vendor is not None:
            return self.vendor
        return super().config_read(offset, size)


@pytest.mark.normative(N_DISCOVERY_DRV, N_CAPS_DRV)
def test_the_driver_matches_only_virtio_functions() -> None:
    memory = GuestMemory()
    from virtio.memory import Allocator

    alloc = Allocator(0x1000, 0x1000)
    fn, _m, _l = function()
    with pytest.raises(NotVirtio, match="not a virtio function"):
        PciTransport(Bus(fn, vendor=0x8086), memory, alloc)
    fn, _m, _l = function()
    with pytest.raises(NotVirtio, match="no legacy I/O BAR"):
        PciTransport(Bus(fn), memory, alloc, force_legacy=True)  # a modern-only function
    fn, _m, _l = function(transitional=True)
    transport = PciTransport(Bus(fn), memory, alloc)
    assert transport.device_id == 4 and not transport.legacy  # transitional, used as modern
    assert set(transport.caps) >= {CapType.COMMON, CapType.NOTIFY, CapType.ISR, CapType.DEVICE}
    assert fn.bars[BAR_LEGACY].io


@pytest.mark.normative(N_LAYOUT_DEV)
def test_blk_capacity_as_two_independent_halves(tmp_path: Path) -> None:
    image = tmp_path / "d.img"
    image.write_bytes(bytes(3 << 20))
    device = BlkDevice(image)
    try:
        memory = GuestMemory()
        memory.add(0, bytearray(1 << 20))
        device.attach_memory(memory)
        fn = PciFunction(device)
        low = fn.bar_read(BAR_MODERN, DEVICE_OFF, 4)
        high = fn.bar_read(BAR_MODERN, DEVICE_OFF + 4, 4)
        assert low | high << 32 == (3 << 20) // 512
    finally:
        device.close()


def _negotiate(fn: PciFunction) -> None:
    for status in (S.ACKNOWLEDGE, S.ACKNOWLEDGE | S.DRIVER):
        fn.bar_write(BAR_MODERN, COMMON_OFF + 0x14, 1, status)
    fn.bar_write(BAR_MODERN, COMMON_OFF + 0x08, 4, 1)
    fn.bar_write(BAR_MODERN, COMMON_OFF + 0x0C, 4, 1)  # VIRTIO_F_VERSION_1 (bit 32)
    fn.bar_write(BAR_MODERN, COMMON_OFF + 0x14, 1, S.ACKNOWLEDGE | S.DRIVER | S.FEATURES_OK)


@pytest.mark.normative(N_INIT_DRV)
def test_queue_addresses_written_after_enabling_need_reset() -> None:
    fn, _m, _l = function()
    _negotiate(fn)
    fn.bar_write(BAR_MODERN, COMMON_OFF + 0x16, 2, 0)
    for offset, value in ((0x20, 0x1000), (0x28, 0x2000), (0x30, 0x3000)):
        fn.bar_write(BAR_MODERN, COMMON_OFF + offset, 4, value)
    fn.bar_write(BAR_MODERN, COMMON_OFF + 0x1C, 2, 1)
    assert not fn.device.status & S.DEVICE_NEEDS_RESET
    fn.bar_write(BAR_MODERN, COMMON_OFF + 0x20, 4, 0x8000)  # queue_desc of the live queue
    reason = fn.device.needs_reset_reason
    assert fn.device.status & S.DEVICE_NEEDS_RESET
    assert reason is not None and N_INIT_DRV in reason and "queue 0" in reason


@pytest.mark.normative(N_COMMON_DEV)
def test_an_out_of_range_queue_select_reads_an_unavailable_queue() -> None:
    fn, _m, _l = function()
    _negotiate(fn)
    fn.bar_write(BAR_MODERN, COMMON_OFF + 0x16, 2, 0x7FFF)
    # "A 0 means the queue is unavailable": the device presents 0 in queue_size.
    assert fn.bar_read(BAR_MODERN, COMMON_OFF + 0x18, 2) == 0
    assert fn.bar_read(BAR_MODERN, COMMON_OFF + 0x1C, 2) == 0
    fn.bar_write(BAR_MODERN, COMMON_OFF + 0x20, 4, 0x1000)  # nothing to configure: ignored
    assert fn.bar_read(BAR_MODERN, COMMON_OFF + 0x20, 4) == 0
    fn.bar_write(BAR_MODERN, COMMON_OFF + 0x16, 2, 0)
    assert fn.bar_read(BAR_MODERN, COMMON_OFF + 0x18, 2) > 0


@pytest.mark.normative(N_LAYOUT_DRV)
@pytest.mark.parametrize("offset", [0x00, 0x14, 0x20], ids=["feature", "status", "queue_desc"])
def test_a_64_bit_access_to_the_common_configuration_needs_reset(offset: int) -> None:
    fn, _m, _l = function()
    # Fields are read with accesses of their own width, 64-bit ones as two
    # 32-bit halves: an 8-byte access is never one the driver may make.
    assert fn.bar_read(BAR_MODERN, COMMON_OFF + offset, 8) == 0
    reason = fn.device.needs_reset_reason
    assert reason is not None and N_LAYOUT_DRV in reason and "8 bytes" in reason


N_SHM_CAP_DEV = f"devicenormative:{P}PCI Device Layout / Shared memory capability"
N_VENDOR_DEV = f"devicenormative:{P}PCI Device Layout / Vendor data capability"
N_VENDOR_DRV = f"drivernormative:{P}PCI Device Layout / Vendor data capability"
N_GUARD_DEV = (
    f"devicenormative:{OPS}Device Initialization / Non-transitional Device With Legacy Driver"
)


class SharingRng(RngDevice):
    """An entropy device that also exposes two shared memory regions (for the transport)."""

    def __init__(self) -> None:
        super().__init__()
        self.windows = {3: bytearray(0x1800), 7: bytearray(0x100)}

    def shared_memory_regions(self) -> tuple[SharedMemoryRegion, ...]:
        return tuple(SharedMemoryRegion(i, len(b), b) for i, b in self.windows.items())


def all_caps(fn: PciFunction) -> list[bytes]:
    found, at = [], fn.config_read(CFG_CAPS, 1)
    while at:
        length = 12 if fn.config_read(at, 1) == 0x11 else fn.config_read(at + 2, 1)
        if fn.config_read(at + 3, 1) == CapType.PCI_CFG:
            length = 16
        found.append(bytes(fn.config_read(at + i, 1) for i in range(length)))
        at = fn.config_read(at + 1, 1)
    return found


@pytest.mark.normative(N_SHM_CAP_DEV)
def test_shared_memory_regions_are_capabilities_inside_a_64_bit_bar() -> None:
    device = SharingRng()
    memory = GuestMemory()
    memory.add(0, bytearray(1 << 20))
    device.attach_memory(memory)
    fn = PciFunction(device)
    shm = [c for c in all_caps(fn) if c[0] == 0x09 and c[3] == CapType.SHARED_MEMORY]
    # virtio_pci_cap64: one per region, cap.id unique, offset/length split in halves.
    assert [len(c) for c in shm] == [24, 24] and sorted(c[5] for c in shm) == [3, 7]
    # The BAR: 64-bit prefetchable memory; its size from writing all ones to both halves.
    fn.config_write(CFG_BAR0 + 8, 4, 0xFFFFFFFF)
    fn.config_write(CFG_BAR0 + 12, 4, 0xFFFFFFFF)
    low, high = fn.config_read(CFG_BAR0 + 8, 4), fn.config_read(CFG_BAR0 + 12, 4)
    assert low & 0xF == 0xC and high == 0xFFFFFFFF
    size = (~((high << 32 | low) & ~0xF) + 1) & (1 << 64) - 1
    for cap in shm:
        bar, offset, length, offset_hi, length_hi = struct.unpack_from("<B3xIIII", cap, 4)
        assert bar == 2 and offset + (offset_hi << 32) + length + (length_hi << 32) <= size
    # Placed above 4 GiB, the driver finds the regions and reaches their memory.
    fn.config_write(CFG_BAR0 + 12, 4, 0x1)
    fn.config_write(CFG_BAR0 + 8, 4, 0x0)
    assert fn.locate(0x1_0000_0000 + 0x10, io=False) == (2, 0x10)
    transport = PciTransport(LocalPciBus(fn), memory, Allocator(0x1000, 0xF0000))
    assert {i: r[2] for i, r in transport.shared_memory.items()} == {3: 0x1800, 7: 0x100}
    transport.write_shared_memory(3, 0x17FC, 4, 0xCAFEF00D)
    assert device.windows[3][0x17FC:] == (0xCAFEF00D).to_bytes(4, "little")
    device.windows[7][0x10] = 0x5A
    assert transport.read_shared_memory(7, 0x10, 1) == 0x5A
    with pytest.raises(ValueError, match="region 7"):
        transport.read_shared_memory(7, 0xFE, 4)


@pytest.mark.normative(N_VENDOR_DEV, N_VENDOR_DRV)
def test_vendor_data_capabilities_are_side_effect_free_and_left_alone() -> None:
    device = RngDevice()
    memory = GuestMemory()
    memory.add(0, bytearray(1 << 20))
    device.attach_memory(memory)
    data = b"pyvirtio-test"[:10]  # 6 + 10 bytes: a multiple of 4
    fn = PciFunction(device, vendor_data=[(0x1B36, data), (0x8086, b"\0\0")])
    vendor = [c for c in all_caps(fn) if c[0] == 0x09 and c[3] == CapType.VENDOR_DATA]
    assert [(len(c), c[4:6]) for c in vendor] == [(16, b"\x36\x1b"), (8, b"\x86\x80")]
    before = (fn.registers.status, bytes(fn.config_space))
    assert all_caps(fn) == all_caps(fn)  # reads change nothing
    assert (fn.registers.status, bytes(fn.config_space)) == before
    transport = PciTransport(LocalPciBus(fn), memory, Allocator(0x1000, 0xF0000))
    assert [v for _at, v in transport.vendor_data] == [0x1B36, 0x8086]
    rng = RngDriver(transport)
    rng.initialize()
    assert len(rng.read(16)) == 16
    for bad in ([(0x1AF4, b"\0\0")], [(0x1B36, b"\0")]):
        with pytest.raises(ValueError, match="vendor"):
            PciFunction(RngDevice(), vendor_data=bad)


@pytest.mark.normative(N_GUARD_DEV)
def test_a_legacy_driver_on_a_non_transitional_function_is_fenced_off() -> None:
    device = RngDevice()
    fn = PciFunction(device, legacy_guard=True)
    assert fn.config_read(CFG_BAR0, 4) & 1  # an I/O BAR in BAR0
    fn.bar_write(BAR_MODERN, COMMON_OFF + 0x14, 1, S.ACKNOWLEDGE)
    assert fn.bar_read(BAR_MODERN, COMMON_OFF + 0x14, 1) == S.ACKNOWLEDGE
    fn.bar_write(BAR_LEGACY, 18, 1, 0)  # a legacy driver resets "its" device
    for bar, offset, size in (
        (BAR_MODERN, COMMON_OFF + 0x14, 1),
        (BAR_MODERN, 0, 4),
        (BAR_LEGACY, 0, 4),
        (BAR_MSIX, 0, 4),
    ):
        assert fn.bar_read(bar, offset, size) == 0
    fn.bar_write(BAR_MODERN, COMMON_OFF + 0x14, 1, S.ACKNOWLEDGE | S.DRIVER)  # ignored
    assert device.read_status() == S.ACKNOWLEDGE
    fn.reset()
    assert fn.bar_read(BAR_MODERN, COMMON_OFF + 0x12, 2) == 1  # num_queues again
    with pytest.raises(ValueError, match="real legacy BAR"):
        PciFunction(RngDevice(), transitional=True, legacy_guard=True)


N_ISR_DRV = f"drivernormative:{P}PCI Device Layout / ISR status capability"


class CountingBus(LocalPciBus):
    """Counts the driver's reads of the ISR status byte."""

    isr_reads = 0

    def bar_read(self, bar: int, offset: int, size: int) -> int:
        if bar == BAR_MODERN and offset == ISR_OFF:
            self.isr_reads += 1
        return super().bar_read(bar, offset, size)


@pytest.mark.normative(N_ISR_DRV)
@pytest.mark.parametrize("vectors", [2, 0], ids=["msix", "intx"])
def test_with_msix_the_driver_leaves_the_isr_alone(vectors: int) -> None:
    device = RngDevice()
    memory = GuestMemory()
    memory.add(0, bytearray(1 << 20))
    device.attach_memory(memory)
    bus = CountingBus(PciFunction(device, msix_vectors=vectors))
    rng = RngDriver(PciTransport(bus, memory, Allocator(0x1000, 0xF0000)))
    rng.initialize()
    for _ in range(4):
        assert len(rng.read(16)) == 16
    # MSI-X: a queue interrupt names its queue, so the ISR is not read; INTx: it must be.
    assert (bus.isr_reads == 0) if vectors else (bus.isr_reads >= 4)
