"""What a device offers, read through any driver-side transport, changing nothing.

:func:`probe` follows the initialization sequence only as far as reading
needs: reset (and wait for it to complete), ACKNOWLEDGE, DRIVER; then the
device features, the device configuration and the virtqueues' maximum
sizes; then reset again. It never sets FEATURES_OK, so nothing is
negotiated and the device stays as it came out of reset.

The configuration is decoded by the spec's tables
(:mod:`virtio.spec.config_layouts`): a field that depends on a feature is
read only when the device offers that feature, each field with an access
of its own width (8-bit fields with 8-bit accesses, 16-bit with 16-bit,
32- and 64-bit with 32-bit ones), all between two reads of the
configuration generation, again until they agree. Through a legacy
interface the fields are in the guest's byte order (except where the spec
says otherwise). The input device's configuration is a select window: the
name, serial, ids, property and event bits and absolute axes are read one
selector at a time. A device type the spec gives no layout (9P) gets its
raw bytes.

The rules followed are the driver requirements of "Device Configuration
Space" (check the feature before reading an optional field; read between
two equal generation counts) and "Device Reset" (a reset is complete when
the status reads back 0).
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass, field
from typing import Protocol

from virtio.layout import ByteOrder
from virtio.spec import features as F
from virtio.spec.config_layouts import (
    INPUT_ABSINFO,
    INPUT_CFG,
    INPUT_DEVIDS,
    INPUT_U_OFFSET,
    INPUT_U_SIZE,
    ConfigField,
    ConfigLayout,
    layout_for,
)
from virtio.spec.data_files import features_table
from virtio.spec.device_ids import device_name
from virtio.spec.status import DeviceStatus

#: How often the configuration is read again while its generation keeps changing.
GENERATION_RETRIES = 8
#: How much of an undescribed configuration space is dumped.
RAW_CONFIG_BYTES = 256
#: Linux evdev event type names (the input device's EV_BITS subsel values), for reading.
EV_NAMES = {
    0x00: "EV_SYN",
    0x01: "EV_KEY",
    0x02: "EV_REL",
    0x03: "EV_ABS",
    0x04: "EV_MSC",
    0x05: "EV_SW",
    0x11: "EV_LED",
    0x12: "EV_SND",
    0x14: "EV_REP",
    0x15: "EV_FF",
    0x16: "EV_PWR",
    0x17: "EV_FF_STATUS",
}
EV_ABS = 0x03

ConfigValue = int | str | list[int]


class ProbeTransport(Protocol):
    """What the probe needs of a driver-side transport (PciTransport and MmioTransport have it)."""

    device_id: int
    legacy: bool
    legacy_order: ByteOrder

    def read_status(self) -> int: ...

    def write_status(self, value: int) -> None: ...

    def read_device_features(self) -> int: ...

    def read_config(self, offset: int, size: int) -> bytes: ...

    def write_config(self, offset: int, data: bytes) -> None: ...

    def config_generation(self) -> int: ...

    def num_queues(self) -> int: ...

    def queue_max_size(self, index: int) -> int: ...


class ProbeFailed(RuntimeError):
    """The device did not behave as a virtio device (a reset that never completes, ...)."""


@dataclass
class Queue:
    index: int
    max_size: int


@dataclass
class Probe:
    """What :func:`probe` found."""

    transport: str  # pci, pci-legacy, mmio, mmio-legacy
    device_id: int
    device_type: str
    device_features: int
    features: list[str]
    config: dict[str, ConfigValue]
    #: Fields left unread because none of the features they depend on is offered.
    config_absent: dict[str, list[str]]
    config_struct: str | None
    config_notes: list[str]
    queues: list[Queue]
    status_after_reset: int
    #: Per-field display hints (dec, hex, mac, string, bytes, list) for human output.
    display: dict[str, str] = field(default_factory=dict)
    transport_info: dict[str, object] = field(default_factory=dict)

    def to_json(self) -> dict[str, object]:
        return {
            "transport": self.transport,
            "device_id": self.device_id,
            "device_type": self.device_type,
            "device_features": self.device_features,
            "features": list(self.features),
            "config_struct": self.config_struct,
            "config": dict(self.config),
            "config_absent": {k: list(v) for k, v in self.config_absent.items()},
            "config_notes": list(self.config_notes),
            "queues": [{"index": q.index, "max_size": q.max_size} for q in self.queues],
            "num_queues": len(self.queues),
            "status_after_reset": self.status_after_reset,
            "transport_info": dict(self.transport_info),
        }


@functools.cache
def _spec_names(device_id: int) -> dict[int, str]:
    """Every name features.json gives a bit of this device type (legacy ones too)."""
    out: dict[int, str] = {}
    for row in features_table():
        if row["device_id"] in (device_id, None):
            out.setdefault(int(row["bit"]), str(row["name"]))
    return out


def feature_name(device_id: int, bit: int) -> str:
    """The spec's name of a feature bit; ``bit N`` for one the spec does not name."""
    name = F.feature_name(device_id, bit)
    if name.startswith("bit "):
        # Names the generated constants leave out (legacy bit 30 is called UNUSED).
        name = _spec_names(device_id).get(bit, name)
    return name


def feature_names(device_id: int, features: int) -> list[str]:
    return [feature_name(device_id, b) for b in range(features.bit_length()) if features >> b & 1]


def transport_kind(transport: object, *, mmio: bool) -> str:
    legacy = bool(getattr(transport, "legacy", False))
    return ("mmio" if mmio else "pci") + ("-legacy" if legacy else "")


def reset(transport: ProbeTransport, timeout: float = 2.0) -> int:
    """Write 0 to the device status and wait until it reads back 0 (a completed reset)."""
    transport.write_status(0)
    deadline = time.monotonic() + timeout
    while True:
        status = transport.read_status()
        if status == 0:
            return 0
        if time.monotonic() > deadline:
            raise ProbeFailed(f"device status still {status:#x} {timeout}s after a reset")
        time.sleep(0.001)


def probe(transport: ProbeTransport, *, kind: str) -> Probe:
    """Reset, ACKNOWLEDGE, DRIVER, read features, configuration and queues, reset."""
    reset(transport)
    transport.write_status(DeviceStatus.ACKNOWLEDGE)
    transport.write_status(DeviceStatus.ACKNOWLEDGE | DeviceStatus.DRIVER)
    device_id = transport.device_id
    offered = transport.read_device_features()
    try:
        decoded = read_configuration(transport, device_id, offered)
        queues = [
            Queue(index, transport.queue_max_size(index)) for index in range(transport.num_queues())
        ]
    finally:
        status = reset(transport)
    return Probe(
        transport=kind,
        device_id=device_id,
        device_type=device_name(device_id),
        device_features=offered,
        features=feature_names(device_id, offered),
        config=decoded.values,
        config_absent=decoded.absent,
        config_struct=decoded.struct,
        config_notes=decoded.notes,
        queues=queues,
        status_after_reset=status,
        display=decoded.display,
    )


@dataclass
class Decoded:
    struct: str | None
    values: dict[str, ConfigValue] = field(default_factory=dict)
    absent: dict[str, list[str]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    display: dict[str, str] = field(default_factory=dict)


def _offered_names(device_id: int, offered: int) -> set[str]:
    return {f.name for f in F.features_for(device_id, include_legacy=True) if offered >> f.bit & 1}


def read_configuration(transport: ProbeTransport, device_id: int, offered: int) -> Decoded:
    """The device configuration decoded field by field, consistent by the generation count."""
    layout = layout_for(device_id)
    for _attempt in range(GENERATION_RETRIES):
        before = transport.config_generation()
        if layout is None:
            decoded = _raw(transport)
        elif layout.selector:
            decoded = _input(transport, layout)
        else:
            decoded = _fields(transport, layout, _offered_names(device_id, offered))
        if transport.config_generation() == before:
            return decoded
    decoded.notes.append(
        f"the configuration generation changed on each of {GENERATION_RETRIES} reads: "
        "the values may be inconsistent"
    )
    return decoded


def _order(transport: ProbeTransport, layout: ConfigLayout | None) -> ByteOrder:
    if not transport.legacy or (layout is not None and layout.legacy_order == "little"):
        return "little"
    return transport.legacy_order


def _read_bytes(transport: ProbeTransport, offset: int, size: int) -> bytes:
    """An array: one 8-bit access per element."""
    return b"".join(transport.read_config(offset + i, 1) for i in range(size))


def _read_int(transport: ProbeTransport, f: ConfigField, order: ByteOrder) -> int:
    # One access of the field's width (the transports split a 64-bit field in two 32-bit
    # accesses); the bytes come back in configuration space order.
    return int.from_bytes(transport.read_config(f.offset, f.size), order)


def _text(raw: bytes) -> str:
    return raw.split(b"\0", 1)[0].decode("utf-8", errors="replace")


def _value(transport: ProbeTransport, f: ConfigField, order: ByteOrder) -> ConfigValue:
    if f.is_integer:
        return _read_int(transport, f, order)
    raw = _read_bytes(transport, f.offset, f.size)
    if f.display == "string":
        return _text(raw)
    if f.display == "mac":
        return ":".join(f"{b:02x}" for b in raw)
    return raw.hex()


def _fields(transport: ProbeTransport, layout: ConfigLayout, offered: set[str]) -> Decoded:
    order = _order(transport, layout)
    out = Decoded(layout.struct or None)
    if not layout.fields:
        out.notes.append("the spec defines no configuration fields for this device type")
    if layout.note:
        out.notes.append(layout.note)
    for f in layout.fields:
        if f.reserved or not f.readable:
            continue
        if f.requires and not offered & set(f.requires):
            out.absent[f.name] = list(f.requires)
            continue
        out.values[f.name] = _value(transport, f, order)
        out.display[f.name] = f.display
        if f.invalid_with and offered & set(f.invalid_with):
            # Nothing is negotiated by a probe: the field stays valid, but say why it may be 0.
            out.notes.append(
                f"{f.name} is not valid once {' or '.join(f.invalid_with)} is negotiated"
            )
    return out


def _raw(transport: ProbeTransport) -> Decoded:
    out = Decoded(None)
    raw = _read_bytes(transport, 0, RAW_CONFIG_BYTES).rstrip(b"\xff")
    if raw:
        out.values["raw"] = raw.hex()
        out.display["raw"] = "bytes"
    out.notes.append(
        "VIRTIO 1.4 defines no configuration layout for this device type: raw bytes "
        f"(the first {RAW_CONFIG_BYTES}, trailing 0xff trimmed: QEMU reads past the end as 0xff)"
    )
    return out


# -- the input device: a select window -------------------------------------------------------


def _select(transport: ProbeTransport, select: int, subsel: int) -> int:
    """Point the window at (select, subsel); the size of what it then holds."""
    transport.write_config(0, bytes([select]))
    transport.write_config(1, bytes([subsel]))
    return transport.read_config(2, 1)[0]


def _bits(raw: bytes) -> list[int]:
    return [8 * i + b for i, byte in enumerate(raw) for b in range(8) if byte >> b & 1]


def _input(transport: ProbeTransport, layout: ConfigLayout) -> Decoded:
    order = _order(transport, layout)
    out = Decoded(layout.struct)
    out.notes.append("read through the select window: one select/subsel write per item")
    for name, select in (
        ("name", INPUT_CFG["VIRTIO_INPUT_CFG_ID_NAME"]),
        ("serial", INPUT_CFG["VIRTIO_INPUT_CFG_ID_SERIAL"]),
    ):
        size = min(_select(transport, select, 0), INPUT_U_SIZE)
        out.values[name] = _text(_read_bytes(transport, INPUT_U_OFFSET, size))
        out.display[name] = "string"
    if _select(transport, INPUT_CFG["VIRTIO_INPUT_CFG_ID_DEVIDS"], 0):
        for f in INPUT_DEVIDS:
            key = f"devids.{f.name}"
            out.values[key] = _read_int(transport, f, order)
            out.display[key] = f.display
    size = min(_select(transport, INPUT_CFG["VIRTIO_INPUT_CFG_PROP_BITS"], 0), INPUT_U_SIZE)
    out.values["prop_bits"] = _bits(_read_bytes(transport, INPUT_U_OFFSET, size))
    out.display["prop_bits"] = "list"
    abs_codes: list[int] = []
    for ev in range(0x20):
        size = min(_select(transport, INPUT_CFG["VIRTIO_INPUT_CFG_EV_BITS"], ev), INPUT_U_SIZE)
        if not size:
            continue
        codes = _bits(_read_bytes(transport, INPUT_U_OFFSET, size))
        key = f"ev_bits.{EV_NAMES.get(ev, hex(ev))}"
        out.values[key] = codes
        out.display[key] = "list"
        if ev == EV_ABS:
            abs_codes = codes
    for code in abs_codes:
        if not _select(transport, INPUT_CFG["VIRTIO_INPUT_CFG_ABS_INFO"], code):
            continue
        for f in INPUT_ABSINFO:
            key = f"abs_info.{code}.{f.name}"
            out.values[key] = _read_int(transport, f, order)
            out.display[key] = f.display
    _select(transport, INPUT_CFG["VIRTIO_INPUT_CFG_UNSET"], 0)
    return out
