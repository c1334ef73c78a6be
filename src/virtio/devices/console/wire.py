"""virtio-console's wire format: feature bits, config fields, queue roles, control messages.

Queues: port 0 has receiveq 0 and transmitq 1; with VIRTIO_CONSOLE_F_MULTIPORT
the control receiveq is 2 and the control transmitq 3, and port ``p >= 1``
has receiveq ``2 + 2p`` and transmitq ``3 + 2p``.

Control messages (``struct virtio_console_control``: le32 id, le16 event,
le16 value) are little-endian through a modern interface and in the guest's
byte order through a legacy one; RESIZE is followed by ``le16 cols, le16
rows`` and PORT_NAME by the port's UTF-8 name, without a NUL.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from virtio.layout import ByteOrder
from virtio.spec.features import (
    VIRTIO_CONSOLE_F_EMERG_WRITE,
    VIRTIO_CONSOLE_F_MULTIPORT,
    VIRTIO_CONSOLE_F_SIZE,
)

F_SIZE = VIRTIO_CONSOLE_F_SIZE
F_MULTIPORT = VIRTIO_CONSOLE_F_MULTIPORT
F_EMERG_WRITE = VIRTIO_CONSOLE_F_EMERG_WRITE

# -- struct virtio_console_config ------------------------------------------------------
CFG_COLS = 0
CFG_ROWS = 2
CFG_MAX_NR_PORTS = 4
CFG_EMERG_WR = 8
CONFIG_SIZE = 12

# -- queues -------------------------------------------------------------------------------
CTRL_RX = 2
CTRL_TX = 3

# -- control events ------------------------------------------------------------------------
DEVICE_READY = 0
DEVICE_ADD = 1
DEVICE_REMOVE = 2
PORT_READY = 3
CONSOLE_PORT = 4
RESIZE = 5
PORT_OPEN = 6
PORT_NAME = 7

EVENT_NAMES = {
    DEVICE_READY: "DEVICE_READY",
    DEVICE_ADD: "DEVICE_ADD",
    DEVICE_REMOVE: "DEVICE_REMOVE",
    PORT_READY: "PORT_READY",
    CONSOLE_PORT: "CONSOLE_PORT",
    RESIZE: "RESIZE",
    PORT_OPEN: "PORT_OPEN",
    PORT_NAME: "PORT_NAME",
}

#: Events only the driver sends, and only the device sends.
DRIVER_EVENTS = frozenset({DEVICE_READY, PORT_READY, PORT_OPEN})
DEVICE_EVENTS = frozenset({DEVICE_ADD, DEVICE_REMOVE, CONSOLE_PORT, RESIZE, PORT_OPEN, PORT_NAME})

CONTROL_SIZE = 8
RESIZE_SIZE = 4
#: The longest port name the device sends and the driver keeps (bytes of UTF-8).
MAX_NAME = 255

_FMT = {"little": struct.Struct("<IHH"), "big": struct.Struct(">IHH")}
_SIZE_FMT = {"little": struct.Struct("<HH"), "big": struct.Struct(">HH")}


class ControlError(ValueError):
    """A control message that cannot be decoded."""


@dataclass(frozen=True)
class Control:
    """One control message: its header and what follows it (a resize or a name)."""

    id: int
    event: int
    value: int = 0
    extra: bytes = b""

    def describe(self) -> str:
        name = EVENT_NAMES.get(self.event, f"event {self.event}")
        return f"{name} port {self.id} value {self.value}"


def rx_queue(port: int) -> int:
    """The receiveq of a port."""
    return 0 if port == 0 else 2 + 2 * port


def tx_queue(port: int) -> int:
    """The transmitq of a port."""
    return 1 if port == 0 else 3 + 2 * port


def port_of_queue(index: int) -> tuple[int, bool] | None:
    """(port, is_transmit) of a data queue; None for the control queues."""
    if index < 2:
        return 0, index == 1
    if index < 4:
        return None
    return index // 2 - 1, bool(index & 1)


def queue_count(max_ports: int, multiport: bool) -> int:
    return 2 * max_ports + 2 if multiport else 2


def encode(msg: Control, order: ByteOrder = "little") -> bytes:
    return _FMT[order].pack(msg.id, msg.event, msg.value) + msg.extra


def decode(data: bytes, order: ByteOrder = "little") -> Control:
    if len(data) < CONTROL_SIZE:
        raise ControlError(f"control message of {len(data)} bytes, shorter than its 8-byte header")
    port, event, value = _FMT[order].unpack_from(data)
    return Control(port, event, value, bytes(data[CONTROL_SIZE:]))


def resize(port: int, cols: int, rows: int, order: ByteOrder = "little") -> Control:
    """A RESIZE message: the spec's order, columns then rows."""
    return Control(port, RESIZE, 0, _SIZE_FMT[order].pack(cols, rows))


def decode_resize(msg: Control, order: ByteOrder = "little") -> tuple[int, int]:
    """(cols, rows) of a RESIZE message."""
    if len(msg.extra) < RESIZE_SIZE:
        raise ControlError(f"RESIZE with {len(msg.extra)} bytes of size, needs {RESIZE_SIZE}")
    cols, rows = _SIZE_FMT[order].unpack_from(msg.extra)
    return cols, rows


def port_name(port: int, name: str) -> Control:
    data = name.encode("utf-8")
    if len(data) > MAX_NAME:
        raise ValueError(f"port name of {len(data)} bytes, more than {MAX_NAME}")
    return Control(port, PORT_NAME, 1, data)
