"""Device configuration layouts of VIRTIO 1.4, as data.

Every device type whose "Device configuration layout" section defines a
structure has one :class:`ConfigLayout` here: the structure's fields in
order, each with its offset, its type as the spec writes it (``u8``,
``le16``, ``le32``, ``le64``, ``char``; arrays as a type and a count) and
the feature bits that make it valid. Nested structures (the block device's
``geometry``, ``topology`` and ``zoned``, the IOMMU's ranges) are flattened
with dotted names (``geometry.cylinders``).

Validity, as the sections put it:

* ``requires``: the field exists (or is valid) only if at least one of
  these features is offered (net ``max_virtqueue_pairs``: VIRTIO_NET_F_MQ
  or VIRTIO_NET_F_RSS). Empty: always valid.
* ``invalid_with``: the field is valid only while none of these features
  is negotiated (pmem ``start`` and ``size`` with
  VIRTIO_PMEM_F_SHMEM_REGION).
* ``reserved``: padding and ``unused`` fields: part of the layout, never
  decoded.
* ``readable=False``: a field the driver writes and does not read (the
  console's ``emerg_wr``).

Byte order: little-endian through a modern interface. Through a legacy
interface the multi-byte fields are in the guest's native byte order
(``legacy_order="guest"``), except where the spec says otherwise (the
traditional balloon: little-endian even then). Only net, blk, console,
entropy, balloon and SCSI (and 9P, which has no layout in this spec) have
a legacy interface.

Device types whose section says "None currently defined" or "no
configuration data" (entropy, RTC, SCMI, I2C) have a layout with no fields.
Device ids the spec reserves without describing the device (9P transport,
and the rest) have none: :func:`layout_for` returns ``None``.

The input device's configuration is a window: the driver writes
``select`` and ``subsel``, then reads ``size`` and the union ``u``. Its
layout has ``selector=True``; :data:`INPUT_CFG` names the selectors and
:data:`INPUT_DEVIDS` and :data:`INPUT_ABSINFO` the structures ``u`` holds.

Standard library only: this is spec data, read by the drivers, the devices
and ``virtio probe`` alike.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

#: Bytes per element of each spec type (``le8`` appears once, in virtio_mem_config).
TYPE_SIZES: dict[str, int] = {"u8": 1, "le8": 1, "char": 1, "le16": 2, "le32": 4, "le64": 8}

Display = Literal["dec", "hex", "mac", "string", "bytes"]


@dataclass(frozen=True)
class ConfigField:
    """One field of a device configuration structure."""

    name: str
    offset: int
    type: str
    count: int = 1
    requires: tuple[str, ...] = ()
    invalid_with: tuple[str, ...] = ()
    reserved: bool = False
    readable: bool = True
    #: How a value reads best: a number (dec/hex), a MAC address, a string or raw bytes.
    display: Display = "dec"

    @property
    def size(self) -> int:
        return TYPE_SIZES[self.type] * self.count

    @property
    def end(self) -> int:
        return self.offset + self.size

    @property
    def is_integer(self) -> bool:
        """A single number (decoded in the interface's byte order), not an array."""
        return self.count == 1 and self.type != "char"


@dataclass(frozen=True)
class ConfigLayout:
    """A device type's configuration structure."""

    device_id: int
    struct: str  # "" for a device type that defines no configuration fields
    size: int  # sizeof the structure, tail included
    fields: tuple[ConfigField, ...]
    section: str  # the spec's label of the "Device configuration layout" section
    legacy_order: Literal["guest", "little"] = "guest"
    selector: bool = False
    note: str = ""

    def field(self, name: str) -> ConfigField:
        for f in self.fields:
            if f.name == name:
                return f
        raise KeyError(f"{self.struct} has no field {name!r}")


def _f(
    name: str,
    offset: int,
    type_: str,
    count: int = 1,
    *requires: str,
    display: Display = "dec",
) -> ConfigField:
    if display == "dec" and type_ == "char":
        display = "string"
    elif display == "dec" and count > 1:
        display = "bytes"
    return ConfigField(name, offset, type_, count, tuple(requires), display=display)


def _pad(name: str, offset: int, count: int) -> ConfigField:
    return ConfigField(name, offset, "u8", count, reserved=True, display="bytes")


def _section(device: str, title: str = "Device configuration layout") -> str:
    return f"sec:Device Types / {device} / {title}"


NET = "VIRTIO_NET_F_"
BLK = "VIRTIO_BLK_F_"

LAYOUTS: dict[int, ConfigLayout] = {
    layout.device_id: layout
    for layout in (
        ConfigLayout(
            1,
            "virtio_net_config",
            28,
            (
                _f("mac", 0, "u8", 6, NET + "MAC", display="mac"),
                _f("status", 6, "le16", 1, NET + "STATUS", display="hex"),
                _f("max_virtqueue_pairs", 8, "le16", 1, NET + "MQ", NET + "RSS"),
                _f("mtu", 10, "le16", 1, NET + "MTU"),
                _f("speed", 12, "le32", 1, NET + "SPEED_DUPLEX"),
                _f("duplex", 16, "u8", 1, NET + "SPEED_DUPLEX", display="hex"),
                _f("rss_max_key_size", 17, "u8", 1, NET + "RSS", NET + "HASH_REPORT"),
                _f("rss_max_indirection_table_length", 18, "le16", 1, NET + "RSS"),
                _f(
                    "supported_hash_types",
                    20,
                    "le32",
                    1,
                    NET + "RSS",
                    NET + "HASH_REPORT",
                    display="hex",
                ),
                _f("supported_tunnel_types", 24, "le32", 1, NET + "HASH_TUNNEL", display="hex"),
            ),
            _section("Network Device"),
            note="mac always exists but is only valid with VIRTIO_NET_F_MAC",
        ),
        ConfigLayout(
            2,
            "virtio_blk_config",
            96,
            (
                _f("capacity", 0, "le64"),
                _f("size_max", 8, "le32", 1, BLK + "SIZE_MAX"),
                _f("seg_max", 12, "le32", 1, BLK + "SEG_MAX"),
                _f("geometry.cylinders", 16, "le16", 1, BLK + "GEOMETRY"),
                _f("geometry.heads", 18, "u8", 1, BLK + "GEOMETRY"),
                _f("geometry.sectors", 19, "u8", 1, BLK + "GEOMETRY"),
                _f("blk_size", 20, "le32", 1, BLK + "BLK_SIZE"),
                _f("topology.physical_block_exp", 24, "u8", 1, BLK + "TOPOLOGY"),
                _f("topology.alignment_offset", 25, "u8", 1, BLK + "TOPOLOGY"),
                _f("topology.min_io_size", 26, "le16", 1, BLK + "TOPOLOGY"),
                _f("topology.opt_io_size", 28, "le32", 1, BLK + "TOPOLOGY"),
                _f("writeback", 32, "u8", 1, BLK + "CONFIG_WCE"),
                _pad("unused0", 33, 1),
                _f("num_queues", 34, "le16", 1, BLK + "MQ"),
                _f("max_discard_sectors", 36, "le32", 1, BLK + "DISCARD"),
                _f("max_discard_seg", 40, "le32", 1, BLK + "DISCARD"),
                _f("discard_sector_alignment", 44, "le32", 1, BLK + "DISCARD"),
                _f("max_write_zeroes_sectors", 48, "le32", 1, BLK + "WRITE_ZEROES"),
                _f("max_write_zeroes_seg", 52, "le32", 1, BLK + "WRITE_ZEROES"),
                _f("write_zeroes_may_unmap", 56, "u8", 1, BLK + "WRITE_ZEROES"),
                _pad("unused1", 57, 3),
                _f("max_secure_erase_sectors", 60, "le32", 1, BLK + "SECURE_ERASE"),
                _f("max_secure_erase_seg", 64, "le32", 1, BLK + "SECURE_ERASE"),
                _f("secure_erase_sector_alignment", 68, "le32", 1, BLK + "SECURE_ERASE"),
                _f("zoned.zone_sectors", 72, "le32", 1, BLK + "ZONED"),
                _f("zoned.max_open_zones", 76, "le32", 1, BLK + "ZONED"),
                _f("zoned.max_active_zones", 80, "le32", 1, BLK + "ZONED"),
                _f("zoned.max_append_sectors", 84, "le32", 1, BLK + "ZONED"),
                _f("zoned.write_granularity", 88, "le32", 1, BLK + "ZONED"),
                _f("zoned.model", 92, "u8", 1, BLK + "ZONED"),
                _pad("zoned.unused2", 93, 3),
            ),
            _section("Block Device"),
        ),
        ConfigLayout(
            3,
            "virtio_console_config",
            12,
            (
                _f("cols", 0, "le16", 1, "VIRTIO_CONSOLE_F_SIZE"),
                _f("rows", 2, "le16", 1, "VIRTIO_CONSOLE_F_SIZE"),
                _f("max_nr_ports", 4, "le32", 1, "VIRTIO_CONSOLE_F_MULTIPORT"),
                ConfigField(
                    "emerg_wr",
                    8,
                    "le32",
                    requires=("VIRTIO_CONSOLE_F_EMERG_WRITE",),
                    readable=False,
                ),
            ),
            _section("Console Device"),
            note="emerg_wr is written by the driver (emergency write), not read",
        ),
        ConfigLayout(4, "", 0, (), _section("Entropy Device")),
        ConfigLayout(
            5,
            "virtio_balloon_config",
            16,
            (
                _f("num_pages", 0, "le32"),
                _f("actual", 4, "le32"),
                _f("free_page_hint_cmd_id", 8, "le32", 1, "VIRTIO_BALLOON_F_FREE_PAGE_HINT"),
                _f("poison_val", 12, "le32", 1, "VIRTIO_BALLOON_F_PAGE_POISON", display="hex"),
            ),
            _section("Memory Balloon Device"),
            legacy_order="little",
            note="little-endian through the legacy interface too",
        ),
        ConfigLayout(
            8,
            "virtio_scsi_config",
            36,
            (
                _f("num_queues", 0, "le32"),
                _f("seg_max", 4, "le32"),
                _f("max_sectors", 8, "le32"),
                _f("cmd_per_lun", 12, "le32"),
                _f("event_info_size", 16, "le32"),
                _f("sense_size", 20, "le32"),
                _f("cdb_size", 24, "le32"),
                _f("max_channel", 28, "le16"),
                _f("max_target", 30, "le16"),
                _f("max_lun", 32, "le32"),
            ),
            _section("SCSI Host Device"),
        ),
        ConfigLayout(
            16,
            "virtio_gpu_config",
            20,
            (
                _f("events_read", 0, "le32", display="hex"),
                _f("events_clear", 4, "le32", display="hex"),
                _f("num_scanouts", 8, "le32"),
                _f("num_capsets", 12, "le32"),
                _f("blob_alignment", 16, "le32", 1, "VIRTIO_GPU_F_BLOB_ALIGNMENT"),
            ),
            _section("GPU Device"),
        ),
        ConfigLayout(17, "", 0, (), _section("RTC Device")),
        ConfigLayout(
            18,
            "virtio_input_config",
            136,
            (
                _f("select", 0, "u8"),
                _f("subsel", 1, "u8"),
                _f("size", 2, "u8"),
                _pad("reserved", 3, 5),
                _f("u", 8, "u8", 128),
            ),
            _section("Input Device"),
            selector=True,
            note="a window: the driver writes select and subsel, then reads size and u",
        ),
        ConfigLayout(
            19,
            "virtio_vsock_config",
            8,
            (_f("guest_cid", 0, "le64"),),
            _section("Socket Device"),
        ),
        ConfigLayout(
            20,
            "virtio_crypto_config",
            56,
            (
                _f("status", 0, "le32", display="hex"),
                _f("max_dataqueues", 4, "le32"),
                _f("crypto_services", 8, "le32", display="hex"),
                _f("cipher_algo_l", 12, "le32", display="hex"),
                _f("cipher_algo_h", 16, "le32", display="hex"),
                _f("hash_algo", 20, "le32", display="hex"),
                _f("mac_algo_l", 24, "le32", display="hex"),
                _f("mac_algo_h", 28, "le32", display="hex"),
                _f("aead_algo", 32, "le32", display="hex"),
                _f("max_cipher_key_len", 36, "le32"),
                _f("max_auth_key_len", 40, "le32"),
                _f("akcipher_algo", 44, "le32", display="hex"),
                _f("max_size", 48, "le64"),
            ),
            _section("Crypto Device"),
        ),
        ConfigLayout(
            23,
            "virtio_iommu_config",
            40,
            (
                _f("page_size_mask", 0, "le64", display="hex"),
                _f("input_range.start", 8, "le64", 1, "VIRTIO_IOMMU_F_INPUT_RANGE", display="hex"),
                _f("input_range.end", 16, "le64", 1, "VIRTIO_IOMMU_F_INPUT_RANGE", display="hex"),
                _f("domain_range.start", 24, "le32", 1, "VIRTIO_IOMMU_F_DOMAIN_RANGE"),
                _f("domain_range.end", 28, "le32", 1, "VIRTIO_IOMMU_F_DOMAIN_RANGE"),
                _f("probe_size", 32, "le32", 1, "VIRTIO_IOMMU_F_PROBE"),
                _f("bypass", 36, "u8", 1, "VIRTIO_IOMMU_F_BYPASS_CONFIG"),
                _pad("reserved", 37, 3),
            ),
            _section("IOMMU Device"),
        ),
        ConfigLayout(
            24,
            "virtio_mem_config",
            56,
            (
                _f("block_size", 0, "le64"),
                _f("node_id", 8, "le16", 1, "VIRTIO_MEM_F_ACPI_PXM"),
                ConfigField("padding", 10, "le8", 6, reserved=True, display="bytes"),
                _f("addr", 16, "le64", display="hex"),
                _f("region_size", 24, "le64"),
                _f("usable_region_size", 32, "le64"),
                _f("plugged_size", 40, "le64"),
                _f("requested_size", 48, "le64"),
            ),
            _section("Memory Device"),
        ),
        ConfigLayout(
            25,
            "virtio_snd_config",
            16,
            (
                _f("jacks", 0, "le32"),
                _f("streams", 4, "le32"),
                _f("chmaps", 8, "le32"),
                _f("controls", 12, "le32", 1, "VIRTIO_SND_F_CTLS"),
            ),
            _section("Sound Device", "Device Configuration Layout"),
        ),
        ConfigLayout(
            26,
            "virtio_fs_config",
            44,
            (
                _f("tag", 0, "char", 36),
                _f("num_request_queues", 36, "le32"),
                _f("notify_buf_size", 40, "le32", 1, "VIRTIO_FS_F_NOTIFICATION"),
            ),
            _section("File System Device"),
        ),
        ConfigLayout(
            27,
            "virtio_pmem_config",
            16,
            (
                ConfigField(
                    "start", 0, "le64", invalid_with=("VIRTIO_PMEM_F_SHMEM_REGION",), display="hex"
                ),
                ConfigField("size", 8, "le64", invalid_with=("VIRTIO_PMEM_F_SHMEM_REGION",)),
            ),
            _section("PMEM Device"),
        ),
        ConfigLayout(
            28,
            "virtio_rpmb_config",
            3,
            (
                _f("capacity", 0, "u8"),
                _f("max_wr_cnt", 1, "u8"),
                _f("max_rd_cnt", 2, "u8"),
            ),
            _section("RPMB Device"),
        ),
        ConfigLayout(32, "", 0, (), _section("SCMI Device")),
        ConfigLayout(34, "", 0, (), _section("I2C Adapter Device")),
        ConfigLayout(
            36,
            "virtio_can_config",
            2,
            (_f("status", 0, "le16", display="hex"),),
            _section("CAN Device"),
        ),
        ConfigLayout(
            41,
            "virtio_gpio_config",
            8,
            (
                _f("ngpio", 0, "le16"),
                _pad("padding", 2, 2),
                _f("gpio_names_size", 4, "le32"),
            ),
            _section("GPIO Device"),
        ),
        ConfigLayout(
            45,
            "virtio_spi_config",
            32,
            (
                _f("cs_max_number", 0, "u8"),
                _f("cs_change_supported", 1, "u8"),
                _f("tx_nbits_supported", 2, "u8", display="hex"),
                _f("rx_nbits_supported", 3, "u8", display="hex"),
                _f("bits_per_word_mask", 4, "le32", display="hex"),
                _f("mode_func_supported", 8, "le32", display="hex"),
                _f("max_freq_hz", 12, "le32"),
                _f("max_word_delay_ns", 16, "le32"),
                _f("max_cs_setup_ns", 20, "le32"),
                _f("max_cs_hold_ns", 24, "le32"),
                _f("max_cs_inactive_ns", 28, "le32"),
            ),
            _section("SPI Controller Device"),
        ),
        ConfigLayout(
            48,
            "virtio_media_config",
            40,
            (
                _f("device_caps", 0, "le32", display="hex"),
                _f("device_type", 4, "le32"),
                ConfigField("card", 8, "le8", 32, display="string"),
            ),
            _section("Media Device", "Device Configuration Layout"),
        ),
    )
}


def layout_for(device_id: int) -> ConfigLayout | None:
    """The configuration layout of a device type; None if the spec describes none."""
    return LAYOUTS.get(device_id)


# -- the input device's window -------------------------------------------------------------

#: enum virtio_input_config_select
INPUT_CFG: dict[str, int] = {
    "VIRTIO_INPUT_CFG_UNSET": 0x00,
    "VIRTIO_INPUT_CFG_ID_NAME": 0x01,
    "VIRTIO_INPUT_CFG_ID_SERIAL": 0x02,
    "VIRTIO_INPUT_CFG_ID_DEVIDS": 0x03,
    "VIRTIO_INPUT_CFG_PROP_BITS": 0x10,
    "VIRTIO_INPUT_CFG_EV_BITS": 0x11,
    "VIRTIO_INPUT_CFG_ABS_INFO": 0x12,
}
#: Where the union ``u`` starts in virtio_input_config, and how long it is.
INPUT_U_OFFSET, INPUT_U_SIZE = 8, 128
#: struct virtio_input_devids, at its offsets in the configuration space (inside ``u``).
INPUT_DEVIDS: tuple[ConfigField, ...] = (
    _f("bustype", 8, "le16", display="hex"),
    _f("vendor", 10, "le16", display="hex"),
    _f("product", 12, "le16", display="hex"),
    _f("version", 14, "le16", display="hex"),
)
#: struct virtio_input_absinfo, at its offsets in the configuration space (inside ``u``).
INPUT_ABSINFO: tuple[ConfigField, ...] = (
    _f("min", 8, "le32"),
    _f("max", 12, "le32"),
    _f("fuzz", 16, "le32"),
    _f("flat", 20, "le32"),
    _f("res", 24, "le32"),
)
