"""Device status bits (Basic Facilities: Device Status Field)."""

from __future__ import annotations

import enum


class DeviceStatus(enum.IntFlag):
    ACKNOWLEDGE = 1
    DRIVER = 2
    DRIVER_OK = 4
    FEATURES_OK = 8
    SUSPEND = 16
    DEVICE_NEEDS_RESET = 64
    FAILED = 128
