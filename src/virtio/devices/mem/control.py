"""The memory device's control socket: a line protocol on a Unix socket, and its client.

One command a line, one line back::

    set 64M   ->  ok requested 64.0M (32 blocks)
    status    ->  requested=67108864 plugged=33554432 usable=100663296 region=536870912 ...

Served from the device's own host loop (its sockets are watched through
``device.events``), so a new requested size reaches the driver, as a
configuration change notification (or, with no driver yet, the size
it finds when it starts).
``virtio mem set 64M --control PATH`` is the client (:func:`main`).
"""

from __future__ import annotations

import logging

from virtio.control import DeviceControl, client_main
from virtio.devices.mem.device import MemDevice
from virtio.sizes import format_size, parse_size

log = logging.getLogger("virtio.mem")


class MemControl(DeviceControl[MemDevice]):
    """The control socket of one mem device."""

    usage = "set SIZE, status"

    def answer(self, verb: str, args: list[str]) -> str | None:
        device = self.device
        if verb == "set" and len(args) == 1:
            size = parse_size(args[0])
            device.set_requested_size(size)
            blocks = size // device.block_size
            return f"ok requested {format_size(size)} ({blocks} blocks)"
        if verb == "status" and not args:
            return (
                f"requested={device.requested_size} plugged={device.plugged_size} "
                f"usable={device.usable_region_size} region={device.region_size} "
                f"block={device.block_size} addr={device.addr:#x}"
            )
        return None


def main(argv: list[str]) -> int:
    """`virtio mem set SIZE --control PATH` (and `virtio mem status`)."""
    return client_main(
        argv,
        prog="virtio mem",
        what="memory device",
        commands=("set", "status"),
        value_help="set: the requested size (64M, 1G)",
    )
