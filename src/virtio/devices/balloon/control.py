"""The balloon's control socket: a line protocol on a Unix socket, and its client.

One command a line, one line back::

    set 64M        ->  ok target 64.0M (16384 pages)
    status         ->  target=16384 actual=16384 ballooned=16384 stats=3 ...
    stats          ->  free_memory=120.5M total_memory=250.0M ...   (and asks for fresh ones)
    hint           ->  ok cmd_id 2          (start a free page hinting round)
    hint stop|done ->  ok cmd_id 0|1

The server side is served from the device's own host loop (it watches its
sockets through ``device.events``), so commands reach the device while a
front-end is connected. ``virtio balloon set 64M --control PATH`` is the
client (:func:`main`).
"""

from __future__ import annotations

import logging

from virtio.control import DeviceControl, client_main
from virtio.devices.balloon import wire as W
from virtio.devices.balloon.device import MAX_PAGES, BalloonDevice
from virtio.sizes import format_size, parse_size

log = logging.getLogger("virtio.balloon")


class BalloonControl(DeviceControl[BalloonDevice]):
    """The control socket of one balloon device."""

    usage = "set SIZE, status, stats, hint [stop|done]"

    def answer(self, verb: str, args: list[str]) -> str | None:
        device = self.device
        if verb == "set" and len(args) == 1:
            pages = W.pages_for(parse_size(args[0]))
            if pages > MAX_PAGES:
                return f"error: {args[0]} is more than the balloon can hold"
            device.set_target(pages)
            return f"ok target {format_size(pages * W.PAGE_SIZE)} ({pages} pages)"
        if verb == "status" and not args:
            c = device.counters
            return (
                f"target={device.target_pages} actual={device.actual} "
                f"ballooned={len(device.pages)} stats={c.stats_updates} "
                f"inflated={c.inflated} deflated={c.deflated} ignored={c.ignored} "
                f"reported={c.reported_bytes} released={c.released_bytes} "
                f"hinted={c.hinted_pages} cmd_id={device.cmd_id}"
            )
        if verb == "stats" and not args:
            device.request_stats()
            return W.format_stats(device.stats)
        if verb == "hint" and len(args) <= 1:
            what = args[0].lower() if args else "start"
            if what == "start":
                return f"ok cmd_id {device.start_hinting()}"
            if what in ("stop", "done"):
                device.stop_hinting(done=what == "done")
                return f"ok cmd_id {device.cmd_id}"
        return None


def main(argv: list[str]) -> int:
    """`virtio balloon set SIZE --control PATH` (and status, stats, hint)."""
    return client_main(
        argv,
        prog="virtio balloon",
        what="balloon",
        commands=("set", "status", "stats", "hint"),
        value_help="set: the target size (64M, 1G); hint: stop|done",
    )
