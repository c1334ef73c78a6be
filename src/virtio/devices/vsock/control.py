"""The vsock device's control socket: a line protocol on a Unix socket, and its client.

One command a line, one line back::

    reset   ->  ok transport reset: 2 connection(s) dropped
    status  ->  connections=2 refused=0 rst_sent=1 transport_resets=0 ...

``reset`` drops every connection and sends the guest
VIRTIO_VSOCK_EVENT_TRANSPORT_RESET, as a VMM does after migration: the
guest then reads the configuration's guest_cid again and closes its
sockets. ``virtio vsock reset --control PATH`` is the client (:func:`main`).
"""

from __future__ import annotations

from virtio.control import DeviceControl, client_main
from virtio.devices.vsock.device import VsockDevice


class VsockControl(DeviceControl[VsockDevice]):
    """The control socket of one vsock device."""

    usage = "reset, status"

    def answer(self, verb: str, args: list[str]) -> str | None:
        device = self.device
        if args:
            return None
        if verb == "reset":
            if not device.live:
                return "error: the driver is not ready (DRIVER_OK not set)"
            dropped = len(device.conns)
            device.transport_reset()
            return f"ok transport reset: {dropped} connection(s) dropped"
        if verb == "status":
            counts = " ".join(f"{k}={v}" for k, v in sorted(device.stats.items()))
            return f"connections={len(device.conns)} guest_cid={device.guest_cid} {counts}".strip()
        return None


def main(argv: list[str]) -> int:
    """`virtio vsock reset --control PATH` (and `virtio vsock status`)."""
    return client_main(
        argv, prog="virtio vsock", what="vsock device", commands=("reset", "status"), value_help=""
    )
