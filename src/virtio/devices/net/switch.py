"""A learning Ethernet switch joining net devices, each maybe on its own thread.

:class:`LearningSwitch` is the switching logic alone (sans-IO, guarded by a
lock): it learns which port each source MAC address lives behind and says
where a frame goes. :class:`SwitchPort` is the :class:`NetBackend` one device
plugs in: a frame its guest sends is switched at once, on the sender's
thread, and queued in each destination port's inbox; the destination's
eventfd wakes that device's host loop, which hands the queued frames to its
guest. A port whose device has not started (or was reset) takes nothing, so
no inbox grows without a guest behind it; a full inbox drops, as a congested
switch does.

GSO frames and partial checksums pass through as they are: the receiving
device adapts a frame to what its own guest negotiated.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from virtio.core.events import EventSources
from virtio.devices.net import wire
from virtio.devices.net.backend import Deliver
from virtio.devices.net.wire import NetHdr

#: Sees every frame a port hands to the switch, with its header (a pcap writer).
FrameHook = Callable[[bytes, NetHdr], None]


@dataclass
class PortStats:
    """Frames the switch took from a port (``rx``) and sent to it (``tx``)."""

    rx: int = 0
    tx: int = 0


class LearningSwitch:
    """Which ports a frame goes to, learning source addresses on the way.

    Known unicast goes to the port its address was last seen on (and nowhere if
    that is where it came from); unknown unicast, multicast and broadcast flood
    to every other port. A frame with nowhere to go (a one-port switch is a
    sink), or too short for an Ethernet header, is counted in ``dropped``.

    With ``ageing`` (seconds), an address not seen for that long is forgotten;
    the caller passes the time in, the switch never reads a clock. The table
    holds at most ``max_entries`` addresses: a guest sending from endless
    made-up addresses pushes out the oldest entries, never the host's memory.
    """

    def __init__(self, *, ageing: float | None = None, max_entries: int = 4096) -> None:
        if max_entries < 1:
            raise ValueError("max_entries must be at least 1")
        self.ageing = ageing
        self.max_entries = max_entries
        #: Frames sent to the one port their destination is known on.
        self.forwarded = 0
        #: Frames flooded to every other port.
        self.flooded = 0
        #: Frames that went nowhere.
        self.dropped = 0
        #: Called with every frame a port hands in (before it is switched, so a capture
        #: of a one-port sink still shows its guest's traffic).
        self.tap_frames: FrameHook | None = None
        #: The backends plugged in, by port number (kept by :class:`SwitchPort`).
        self.endpoints: dict[int, SwitchPort] = {}
        self._lock = threading.Lock()
        self._ports: dict[int, PortStats] = {}
        self._flood: dict[int, tuple[int, ...]] = {}
        self._table: dict[bytes, tuple[int, float]] = {}

    # -- ports -----------------------------------------------------------------------------

    def add_port(self, number: int) -> None:
        with self._lock:
            if number in self._ports:
                raise ValueError(f"switch port {number} is already in use")
            self._ports[number] = PortStats()
            self._reflood()

    def remove_port(self, number: int) -> None:
        """Unplug a port and forget the addresses learnt on it."""
        with self._lock:
            if self._ports.pop(number, None) is None:
                return
            self._reflood()
            gone = [mac for mac, (port, _) in self._table.items() if port == number]
            for mac in gone:
                del self._table[mac]

    @property
    def ports(self) -> list[int]:
        with self._lock:
            return list(self._ports)

    def port_stats(self, number: int) -> PortStats:
        """A copy of one port's counters."""
        with self._lock:
            stats = self._ports[number]
            return PortStats(stats.rx, stats.tx)

    # -- the address table -----------------------------------------------------------------

    def lookup(self, mac: bytes, now: float = 0.0) -> int | None:
        """The port ``mac`` was learnt on, if it is known (and not aged out at ``now``)."""
        with self._lock:
            entry = self._table.get(mac)
            if entry is None or self._stale(entry, now):
                return None
            return entry[0]

    def expire(self, now: float) -> int:
        """Forget the addresses aged out at ``now``; returns how many."""
        if self.ageing is None:
            return 0
        with self._lock:
            stale = [mac for mac, entry in self._table.items() if self._stale(entry, now)]
            for mac in stale:
                del self._table[mac]
            return len(stale)

    def __len__(self) -> int:
        """How many addresses are known."""
        return len(self._table)

    # -- switching -------------------------------------------------------------------------

    def has_peers(self, port: int) -> bool:
        """Whether a frame from ``port`` could go anywhere (other ports are plugged in)."""
        return bool(self._flood.get(port))

    def sink(self, src_port: int) -> None:
        """Count a frame from a port alone on the switch: received and dropped."""
        with self._lock:
            stats = self._ports.get(src_port)
            if stats is not None:
                stats.rx += 1
            self.dropped += 1

    def forward(self, src_port: int, frame: bytes, now: float = 0.0) -> list[int]:
        """The ports ``frame`` from ``src_port`` goes to (empty: dropped)."""
        with self._lock:
            ports = self._ports
            stats = ports.get(src_port)
            if stats is None:
                raise ValueError(f"switch port {src_port} is not plugged in")
            stats.rx += 1
            if len(frame) < wire.ETH_HLEN:
                self.dropped += 1
                return []
            table = self._table
            ageing = self.ageing
            src = frame[6:12]
            if not src[0] & 1:
                entry = table.get(src)
                # Written only when new, moved, or (with ageing) to refresh its time.
                if entry is None or entry[0] != src_port or ageing is not None:
                    if entry is None and len(table) >= self.max_entries:
                        del table[next(iter(table))]
                    table[src] = (src_port, now)
            if not frame[0] & 1:
                entry = table.get(frame[:6])
                if entry is not None and (ageing is None or now - entry[1] < ageing):
                    port = entry[0]
                    if port == src_port:
                        self.dropped += 1
                        return []
                    self.forwarded += 1
                    ports[port].tx += 1
                    return [port]
            others = self._flood[src_port]
            if not others:
                self.dropped += 1
                return []
            self.flooded += 1
            for port in others:
                ports[port].tx += 1
            return list(others)

    def _stale(self, entry: tuple[int, float], now: float) -> bool:
        return self.ageing is not None and now - entry[1] >= self.ageing

    def _reflood(self) -> None:
        numbers = sorted(self._ports)
        self._flood = {n: tuple(p for p in numbers if p != n) for n in numbers}


class SwitchPort:
    """One device's plug on a :class:`LearningSwitch` (a :class:`NetBackend`)."""

    def __init__(
        self,
        switch: LearningSwitch,
        number: int,
        *,
        inbox_limit: int = 1024,
        batch: int = 64,
    ) -> None:
        if inbox_limit < 1 or batch < 1:
            raise ValueError("inbox_limit and batch must be at least 1")
        self.name = f"switch port {number}"
        #: GSO and partial checksums go through the switch untouched.
        self.tx_offloads = wire.HOST_OFFLOAD_BITS
        self.switch = switch
        self.number = number
        self.inbox_limit = inbox_limit
        self.batch = batch
        #: Frames this port's guest sent into the switch.
        self.tx_frames = 0
        #: Frames handed to this port's guest.
        self.rx_frames = 0
        self._dropped_inbox = 0  # under _lock: inbox full, or no guest (other threads)
        self._dropped_rx = 0  # the guest had no room (this device's thread only)
        self._lock = threading.Lock()
        self._inbox: deque[tuple[NetHdr, bytes]] = deque()
        self._running = False
        self._events: EventSources | None = None
        self._deliver: Deliver | None = None
        self._wake = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        try:
            switch.add_port(number)
        except BaseException:
            os.close(self._wake)
            raise
        switch.endpoints[number] = self

    @property
    def dropped(self) -> int:
        """Frames for this port's guest that never reached it."""
        return self._dropped_inbox + self._dropped_rx

    @property
    def queued(self) -> int:
        return len(self._inbox)

    def fileno(self) -> int:
        """The eventfd that says the inbox has frames."""
        return self._wake

    # -- NetBackend ------------------------------------------------------------------------

    def start(self, events: EventSources, deliver: Deliver) -> None:
        if self._wake < 0:
            raise ValueError(f"{self.name}: closed")
        self.stop()
        self._events = events
        self._deliver = deliver
        with self._lock:
            self._running = True
        events.watch(self._wake, self._woken)

    def stop(self) -> None:
        with self._lock:
            self._running = False
            self._dropped_inbox += len(self._inbox)
            self._inbox.clear()
            self._drain()
        events, self._events = self._events, None
        self._deliver = None
        if events is not None:
            events.unwatch(self._wake)

    def transmit(self, hdr: NetHdr, frame: bytes) -> None:
        if self._wake < 0:  # closed: unplugged from the switch
            return
        self.tx_frames += 1
        switch = self.switch
        hook = switch.tap_frames
        if hook is not None:
            hook(frame, hdr)
        if not switch.has_peers(self.number):
            # A one-port switch (a sink): nothing to learn or look up.
            switch.sink(self.number)
            return
        now = time.monotonic() if switch.ageing is not None else 0.0
        endpoints = switch.endpoints
        # Every receiver of a flooded frame gets the same header object: a device
        # never changes a header it is handed (it derives its own for the guest).
        for number in switch.forward(self.number, frame, now):
            port = endpoints.get(number)
            if port is not None:  # else unplugged meanwhile
                port._enqueue(hdr, frame)

    def set_rx_offloads(self, guest_offloads: int) -> None:
        pass  # the receiving device adapts frames to its guest itself

    def close(self) -> None:
        self.stop()
        switch = self.switch
        if switch.endpoints.get(self.number) is self:
            del switch.endpoints[self.number]
            switch.remove_port(self.number)
        with self._lock:
            wake, self._wake = self._wake, -1
            if wake >= 0:
                os.close(wake)

    # -- internals -------------------------------------------------------------------------

    def _enqueue(self, hdr: NetHdr, frame: bytes) -> None:
        """A frame for this port's guest (any thread)."""
        with self._lock:
            inbox = self._inbox
            if not self._running or len(inbox) >= self.inbox_limit:
                self._dropped_inbox += 1
                return
            inbox.append((hdr, frame))
            if len(inbox) == 1:
                # Under the lock: the eventfd is never written after close() closed it,
                # and it is set exactly while the inbox has frames.
                os.eventfd_write(self._wake, 1)

    def _drain(self) -> None:
        if self._wake >= 0:
            with contextlib.suppress(BlockingIOError):
                os.eventfd_read(self._wake)

    def _woken(self, now: float) -> None:
        deliver = self._deliver
        if deliver is None:
            return
        with self._lock:
            inbox = self._inbox
            count = min(len(inbox), self.batch)
            taken = [inbox.popleft() for _ in range(count)]
            if not inbox:
                # Left set when frames remain: the host's level-triggered wait comes back.
                self._drain()
        delivered = 0
        for hdr, frame in taken:
            if deliver(hdr, frame):
                delivered += 1
            if self._deliver is not deliver:  # stopped from inside deliver
                break
        self.rx_frames += delivered
        self._dropped_rx += len(taken) - delivered
