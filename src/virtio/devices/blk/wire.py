"""virtio-blk wire format: configuration space, request header, segments, constants."""

from __future__ import annotations

from virtio.layout import Bits, Bytes, Layout, le16, le32, le64, u8

SECTOR_SIZE = 512
ID_BYTES = 20

# Request types.
T_IN = 0
T_OUT = 1
T_FLUSH = 4
T_GET_ID = 8
T_GET_LIFETIME = 10
T_DISCARD = 11
T_WRITE_ZEROES = 13
T_SECURE_ERASE = 14

# Status values (the last byte of every request).
S_OK = 0
S_IOERR = 1
S_UNSUPP = 2

BLK_CONFIG = Layout(
    "virtio_blk_config",
    [
        ("capacity", le64),
        ("size_max", le32),
        ("seg_max", le32),
        ("cylinders", le16),
        ("heads", u8),
        ("sectors", u8),
        ("blk_size", le32),
        ("physical_block_exp", u8),
        ("alignment_offset", u8),
        ("min_io_size", le16),
        ("opt_io_size", le32),
        ("writeback", u8),
        ("unused0", u8),
        ("num_queues", le16),
        ("max_discard_sectors", le32),
        ("max_discard_seg", le32),
        ("discard_sector_alignment", le32),
        ("max_write_zeroes_sectors", le32),
        ("max_write_zeroes_seg", le32),
        ("write_zeroes_may_unmap", u8),
        ("unused1", Bytes(3)),
        ("max_secure_erase_sectors", le32),
        ("max_secure_erase_seg", le32),
        ("secure_erase_sector_alignment", le32),
        ("zone_sectors", le32),
        ("max_open_zones", le32),
        ("max_active_zones", le32),
        ("max_append_sectors", le32),
        ("write_granularity", le32),
        ("model", u8),
        ("unused2", Bytes(3)),
    ],
)

BLK_REQ_HEADER = Layout(
    "virtio_blk_req header", [("type", le32), ("reserved", le32), ("sector", le64)]
)

BLK_DISCARD_WRITE_ZEROES = Layout(
    "virtio_blk_discard_write_zeroes",
    [
        ("sector", le64),
        ("num_sectors", le32),
        ("flags", Bits(le32, [("unmap", 1), ("reserved", 31)])),
    ],
)

BLK_LIFETIME = Layout(
    "virtio_blk_lifetime",
    [
        ("pre_eol_info", le16),
        ("device_lifetime_est_typ_a", le16),
        ("device_lifetime_est_typ_b", le16),
    ],
)

N_BLK_DEV_OP = "devicenormative:Device Types / Block Device / Device Operation"
N_BLK_DRV_OP = "drivernormative:Device Types / Block Device / Device Operation"
N_BLK_DEV_INIT = "devicenormative:Device Types / Block Device / Device Initialization"
N_BLK_DRV_INIT = "drivernormative:Device Types / Block Device / Device Initialization"
