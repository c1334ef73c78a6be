"""virtio-scsi wire format: configuration space, requests, responses, events, constants."""

from __future__ import annotations

from virtio.layout import Bytes, Layout, le16, le32, le64, u8

DEFAULT_SENSE_SIZE = 96
DEFAULT_CDB_SIZE = 32

# Virtqueues.
CONTROLQ = 0
EVENTQ = 1
REQUESTQ = 2

# Response values (request queues and control queue).
S_OK = 0
S_OVERRUN = 1
S_ABORTED = 2
S_BAD_TARGET = 3
S_RESET = 4
S_BUSY = 5
S_TRANSPORT_FAILURE = 6
S_TARGET_FAILURE = 7
S_NEXUS_FAILURE = 8
S_FAILURE = 9
S_FUNCTION_SUCCEEDED = 10
S_FUNCTION_REJECTED = 11
S_INCORRECT_LUN = 12
S_FUNCTION_COMPLETE = 0

# task_attr.
S_SIMPLE = 0
S_ORDERED = 1
S_HEAD = 2
S_ACA = 3

# Control queue request types and task management functions.
T_TMF = 0
T_AN_QUERY = 1
T_AN_SUBSCRIBE = 2

T_TMF_ABORT_TASK = 0
T_TMF_ABORT_TASK_SET = 1
T_TMF_CLEAR_ACA = 2
T_TMF_CLEAR_TASK_SET = 3
T_TMF_I_T_NEXUS_RESET = 4
T_TMF_LOGICAL_UNIT_RESET = 5
T_TMF_QUERY_TASK = 6
T_TMF_QUERY_TASK_SET = 7

# Asynchronous notification event bits.
EVT_ASYNC_OPERATIONAL_CHANGE = 2
EVT_ASYNC_POWER_MGMT = 4
EVT_ASYNC_EXTERNAL_REQUEST = 8
EVT_ASYNC_MEDIA_CHANGE = 16
EVT_ASYNC_MULTI_HOST = 32
EVT_ASYNC_DEVICE_BUSY = 64

# Events.
T_EVENTS_MISSED = 0x80000000
T_NO_EVENT = 0
T_TRANSPORT_RESET = 1
T_ASYNC_NOTIFY = 2
T_PARAM_CHANGE = 3

EVT_RESET_HARD = 0
EVT_RESET_RESCAN = 1
EVT_RESET_REMOVED = 2

SCSI_CONFIG = Layout(
    "virtio_scsi_config",
    [
        ("num_queues", le32),
        ("seg_max", le32),
        ("max_sectors", le32),
        ("cmd_per_lun", le32),
        ("event_info_size", le32),
        ("sense_size", le32),
        ("cdb_size", le32),
        ("max_channel", le16),
        ("max_target", le16),
        ("max_lun", le32),
    ],
)

#: The fixed part of virtio_scsi_req_cmd before the PI fields and ``cdb[cdb_size]``.
REQ_CMD_HEADER = Layout(
    "virtio_scsi_req_cmd header",
    [("lun", Bytes(8)), ("id", le64), ("task_attr", u8), ("prio", u8), ("crn", u8)],
)

#: The T10 PI fields (VIRTIO_SCSI_F_T10_PI), between ``crn`` and ``cdb`` as Linux and
#: QEMU place them (the spec's listing shows them after ``cdb``).
REQ_CMD_PI = Layout("virtio_scsi_req_cmd pi", [("pi_bytesout", le32), ("pi_bytesin", le32)])

#: The fixed part of the device-writable response before ``sense[sense_size]``.
RESP_CMD = Layout(
    "virtio_scsi_resp_cmd",
    [
        ("sense_len", le32),
        ("residual", le32),
        ("status_qualifier", le16),
        ("status", u8),
        ("response", u8),
    ],
)

CTRL_TMF = Layout(
    "virtio_scsi_ctrl_tmf",
    [("type", le32), ("subtype", le32), ("lun", Bytes(8)), ("id", le64)],
)

CTRL_AN = Layout(
    "virtio_scsi_ctrl_an", [("type", le32), ("lun", Bytes(8)), ("event_requested", le32)]
)
CTRL_AN_RESP = Layout("virtio_scsi_ctrl_an response", [("event_actual", le32), ("response", u8)])

EVENT = Layout("virtio_scsi_event", [("event", le32), ("lun", Bytes(8)), ("reason", le32)])

#: The REPORT LUNS well-known logical unit.
REPORT_LUNS_WLUN = bytes((0xC1, 0x01, 0, 0, 0, 0, 0, 0))


def encode_lun(lun: int, target: int = 0) -> bytes:
    """The 8-byte virtio-scsi LUN: 1, target, a single-level LUN (flat space above 255)."""
    if not 0 <= target <= 255 or not 0 <= lun <= 16383:
        raise ValueError(f"target {target} / lun {lun} outside 0..255 / 0..16383")
    if lun < 256:
        return bytes((1, target, 0, lun, 0, 0, 0, 0))
    return bytes((1, target, 0x40 | lun >> 8, lun & 0xFF, 0, 0, 0, 0))


def report_luns_entry(lun: int) -> bytes:
    """One REPORT LUNS list entry (SAM single-level: peripheral or flat space)."""
    if lun < 256:
        return bytes((0, lun, 0, 0, 0, 0, 0, 0))
    return bytes((0x40 | lun >> 8, lun & 0xFF, 0, 0, 0, 0, 0, 0))


N_SCSI = "Device Types / SCSI Host Device"
N_CONFIG_DEV = f"devicenormative:{N_SCSI} / Device configuration layout"
N_CONFIG_DRV = f"drivernormative:{N_SCSI} / Device configuration layout"
N_INIT_DEV = f"devicenormative:{N_SCSI} / Device Initialization"
N_REQ_DEV = f"devicenormative:{N_SCSI} / Device Operation / Device Operation: Request Queues"
N_REQ_DRV = f"drivernormative:{N_SCSI} / Device Operation / Device Operation: Request Queues"
N_EVENT_DEV = f"devicenormative:{N_SCSI} / Device Operation / Device Operation: eventq"
N_EVENT_DRV = f"drivernormative:{N_SCSI} / Device Operation / Device Operation: eventq"
