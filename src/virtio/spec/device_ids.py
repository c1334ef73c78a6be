"""Device ids, from the Device Types chapter's table."""

from __future__ import annotations

import enum


class DeviceId(enum.IntEnum):
    INVALID = 0
    NET = 1
    BLOCK = 2
    CONSOLE = 3
    ENTROPY = 4
    BALLOON = 5
    IOMEMORY = 6
    RPMSG = 7
    SCSI = 8
    P9 = 9
    MAC80211_WLAN = 10
    RPROC_SERIAL = 11
    CAIF = 12
    MEMORY_BALLOON = 13
    GPU = 16
    RTC = 17
    INPUT = 18
    VSOCK = 19
    CRYPTO = 20
    SIGNAL_DIST = 21
    PSTORE = 22
    IOMMU = 23
    MEM = 24
    SOUND = 25
    FS = 26
    PMEM = 27
    RPMB = 28
    MAC80211_HWSIM = 29
    VIDEO_ENCODER = 30
    VIDEO_DECODER = 31
    SCMI = 32
    NITRO_SEC_MOD = 33
    I2C = 34
    WATCHDOG = 35
    CAN = 36
    PARAM_SERV = 38
    AUDIO_POLICY = 39
    BT = 40
    GPIO = 41
    RDMA = 42
    CAMERA = 43
    ISM = 44
    SPI = 45
    TEE = 46
    CPU_BALLOON = 47
    MEDIA = 48
    USB = 49


def device_name(device_id: int) -> str:
    """The spec's name for a device id ("block device", ...)."""
    from virtio.spec.data_files import device_ids_table

    for row in device_ids_table():
        if row["id"] == device_id:
            return str(row["name"])
    return f"unassigned device id {device_id}"
