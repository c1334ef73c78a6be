"""The learning switch: its forwarding decisions, and its ports as net backends."""

from __future__ import annotations

import select
import threading
import time
from collections.abc import Callable

import pytest

from virtio.core.events import EventSources
from virtio.devices.net import wire
from virtio.devices.net.switch import LearningSwitch, PortStats, SwitchPort
from virtio.devices.net.wire import NetHdr

A = bytes.fromhex("02000000000a")
B = bytes.fromhex("02000000000b")
C = bytes.fromhex("02000000000c")
MCAST = bytes.fromhex("01005e000001")


def frame(dst: bytes, src: bytes, payload: bytes = b"x" * 46) -> bytes:
    return dst + src + b"\x08\x00" + payload


def switch_with(
    *numbers: int, ageing: float | None = None, max_entries: int = 4096
) -> LearningSwitch:
    sw = LearningSwitch(ageing=ageing, max_entries=max_entries)
    for n in numbers:
        sw.add_port(n)
    return sw


# -- LearningSwitch (sans-IO) ---------------------------------------------------------------


def test_unknown_destination_floods_then_the_reply_is_switched() -> None:
    sw = switch_with(1, 2, 3)
    assert sw.forward(1, frame(B, A)) == [2, 3]
    assert sw.flooded == 1 and sw.lookup(A) == 1
    # B answers: A is known, only port 1 gets it; B is learnt on port 2.
    assert sw.forward(2, frame(A, B)) == [1]
    assert sw.forward(1, frame(B, A)) == [2]
    assert (sw.forwarded, sw.flooded, sw.dropped) == (2, 1, 0)
    assert sw.port_stats(1) == PortStats(rx=2, tx=1)
    assert sw.port_stats(2) == PortStats(rx=1, tx=2)
    assert sw.port_stats(3) == PortStats(rx=0, tx=1)
    assert len(sw) == 2


def test_broadcast_and_multicast_flood_and_multicast_sources_are_not_learnt() -> None:
    sw = switch_with(1, 2, 3)
    assert sw.forward(2, frame(wire.BROADCAST, A)) == [1, 3]
    assert sw.forward(3, frame(MCAST, B)) == [1, 2]
    # Even to a destination that was learnt, multicast floods.
    sw.forward(1, frame(B, C))
    assert sw.forward(1, frame(wire.BROADCAST, C)) == [2, 3]
    # A frame claiming a multicast source never enters the table.
    sw.forward(1, frame(B, MCAST))
    assert sw.lookup(MCAST) is None
    assert sw.forward(2, frame(MCAST, A)) == [1, 3]


def test_a_station_that_moves_is_relearnt() -> None:
    sw = switch_with(1, 2, 3)
    sw.forward(1, frame(B, A))
    sw.forward(3, frame(B, A))
    assert sw.lookup(A) == 3
    assert sw.forward(2, frame(A, B)) == [3]


def test_destination_on_the_source_port_is_filtered() -> None:
    sw = switch_with(1, 2)
    assert sw.forward(1, frame(B, A)) == [2]
    # B lives on port 1 too (behind the same guest): A is known there, nothing leaves.
    assert sw.forward(1, frame(A, B)) == []
    assert sw.forward(1, frame(B, A)) == []
    assert (sw.dropped, sw.flooded, sw.forwarded) == (2, 1, 0)
    assert sw.port_stats(2).tx == 1


def test_a_one_port_switch_is_a_sink() -> None:
    sw = switch_with(7)
    for dst in (B, wire.BROADCAST, MCAST):
        assert sw.forward(7, frame(dst, A)) == []
    assert (sw.dropped, sw.forwarded, sw.flooded) == (3, 0, 0)
    assert sw.port_stats(7) == PortStats(rx=3, tx=0)


def test_runts_are_dropped_and_unknown_ports_refused() -> None:
    sw = switch_with(1, 2)
    assert sw.forward(1, b"\xff" * 13) == []
    assert sw.dropped == 1
    with pytest.raises(ValueError, match="not plugged in"):
        sw.forward(9, frame(B, A))
    with pytest.raises(ValueError, match="already in use"):
        sw.add_port(1)


def test_removing_a_port_forgets_its_addresses() -> None:
    sw = switch_with(1, 2, 3)
    sw.forward(2, frame(A, B))
    sw.remove_port(2)
    assert sw.lookup(B) is None
    assert sw.ports == [1, 3]
    assert sw.forward(1, frame(B, A)) == [3]


def test_ageing_uses_the_time_it_is_given() -> None:
    sw = switch_with(1, 2, 3, ageing=10.0)
    sw.forward(2, frame(A, B), now=100.0)
    assert sw.forward(1, frame(B, A), now=109.0) == [2]
    assert sw.lookup(B, now=110.0) is None
    assert sw.forward(1, frame(B, A), now=110.0) == [2, 3]  # forgotten: flood
    assert sw.expire(now=200.0) == 2  # A (seen at 110) and B
    assert len(sw) == 0


def test_the_table_is_bounded() -> None:
    sw = switch_with(1, 2, max_entries=4)
    for i in range(10):
        sw.forward(1, frame(A, bytes([2, 0, 0, 0, 1, i])))
    assert len(sw) == 4
    # The newest stay, the oldest went.
    assert sw.lookup(bytes([2, 0, 0, 0, 1, 9])) == 1
    assert sw.lookup(bytes([2, 0, 0, 0, 1, 0])) is None


def test_forwarding_is_consistent_across_threads() -> None:
    sw = switch_with(1, 2, 3, 4)
    per_thread = 2000

    def sender(port: int) -> None:
        src = bytes([2, 0, 0, 0, 0, port])
        for i in range(per_thread):
            sw.forward(port, frame(bytes([2, 0, 0, 0, 0, 1 + (port + i) % 4]), src))

    threads = [threading.Thread(target=sender, args=(p,)) for p in (1, 2, 3, 4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    total = 4 * per_thread
    assert sw.forwarded + sw.flooded + sw.dropped == total
    assert sum(sw.port_stats(p).rx for p in (1, 2, 3, 4)) == total
    assert sum(sw.port_stats(p).tx for p in (1, 2, 3, 4)) == sw.forwarded + 3 * sw.flooded


# -- SwitchPort (backends over eventfds) ----------------------------------------------------


class Guest:
    """A device's side of a port: its own EventSources and what was delivered."""

    def __init__(self, port: SwitchPort, room: bool = True) -> None:
        self.port = port
        self.events = EventSources()
        self.got: list[tuple[NetHdr, bytes]] = []
        self.room = room
        port.start(self.events, self.deliver)

    def deliver(self, hdr: NetHdr, frame: bytes) -> bool:
        if self.room:
            self.got.append((hdr, frame))
        return self.room


def serve(guests: list[Guest], until: Callable[[], bool], timeout: float = 5.0) -> bool:
    """One host loop for all guests: select on their fds, then fd_ready, as a host would."""
    deadline = time.monotonic() + timeout
    while not until():
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        owner = {fd: g.events for g in guests for fd in g.events.fds}
        ready, _, _ = select.select(list(owner), [], [], min(left, 0.1))
        for fd in ready:
            owner[fd].fd_ready(fd, time.monotonic())
    return True


def readable(fd: int) -> bool:
    return bool(select.select([fd], [], [], 0)[0])


def test_ports_switch_frames_between_guests() -> None:
    sw = LearningSwitch()
    ports = [SwitchPort(sw, n) for n in (0, 1, 2)]
    try:
        guests = [Guest(p) for p in ports]
        assert ports[0].tx_offloads == wire.HOST_OFFLOAD_BITS
        assert all(p.fileno() in g.events.fds for p, g in zip(ports, guests, strict=True))
        gso = NetHdr(flags=wire.HDR_F_NEEDS_CSUM, gso_type=wire.GSO_TCPV4, gso_size=1448)
        ports[0].transmit(gso, frame(wire.BROADCAST, A))
        assert serve(guests, lambda: len(guests[1].got) == 1 and len(guests[2].got) == 1)
        # The header goes through as it is: the receiving device adapts it.
        assert guests[1].got[0] == (gso, frame(wire.BROADCAST, A))
        assert guests[0].got == []
        ports[1].transmit(NetHdr(), frame(A, B))
        assert serve(guests, lambda: len(guests[0].got) == 1)
        assert guests[0].got[0][1] == frame(A, B)
        assert len(guests[2].got) == 1  # B's reply to A went to A alone
        assert (sw.forwarded, sw.flooded) == (1, 1)
        assert [p.rx_frames for p in ports] == [1, 1, 1]
        assert [p.tx_frames for p in ports] == [1, 1, 0]
        assert all(not readable(p.fileno()) for p in ports)
    finally:
        for p in ports:
            p.close()
    assert sw.ports == [] and sw.endpoints == {}


def test_eventfd_is_written_once_per_batch_and_delivery_is_bounded() -> None:
    sw = LearningSwitch()
    src, dst = SwitchPort(sw, 1), SwitchPort(sw, 2, batch=8)
    try:
        guest = Guest(dst)
        Guest(src)
        for i in range(20):
            src.transmit(NetHdr(), frame(wire.BROADCAST, A, bytes([i]) * 46))
        assert dst.queued == 20
        assert readable(dst.fileno())
        # One wakeup delivers at most a batch; the eventfd stays set while frames wait.
        guest.events.fd_ready(dst.fileno(), 0.0)
        assert len(guest.got) == 8 and dst.queued == 12
        assert readable(dst.fileno())
        assert serve([guest], lambda: dst.queued == 0)
        assert [f[14] for _, f in guest.got] == list(range(20))
        assert not readable(dst.fileno())
        # Empty now: a spurious wakeup delivers nothing and does not fail.
        guest.events.fd_ready(dst.fileno(), 0.0)
        assert len(guest.got) == 20 and dst.rx_frames == 20
    finally:
        src.close()
        dst.close()


def test_a_full_inbox_drops_and_counts() -> None:
    sw = LearningSwitch()
    src, dst = SwitchPort(sw, 1), SwitchPort(sw, 2, inbox_limit=5)
    try:
        Guest(dst)
        for _ in range(12):
            src.transmit(NetHdr(), frame(B, A))
        assert dst.queued == 5
        assert dst.dropped == 7
        assert sw.port_stats(2).tx == 12  # the switch sent them; the port had no room
    finally:
        src.close()
        dst.close()


def test_a_port_without_a_started_device_takes_nothing() -> None:
    sw = LearningSwitch()
    src, idle = SwitchPort(sw, 1), SwitchPort(sw, 2)
    try:
        for _ in range(3000):
            src.transmit(NetHdr(), frame(wire.BROADCAST, A))
        assert idle.queued == 0 and idle.dropped == 3000
        assert not readable(idle.fileno())
        # Started, then reset with frames waiting: they are dropped, not kept for later.
        guest = Guest(idle)
        src.transmit(NetHdr(), frame(wire.BROADCAST, A))
        assert idle.queued == 1
        idle.stop()
        assert idle.queued == 0 and idle.dropped == 3001
        assert idle.fileno() not in guest.events.fds
        assert not readable(idle.fileno())
    finally:
        src.close()
        idle.close()


def test_a_guest_without_room_drops() -> None:
    sw = LearningSwitch()
    src, dst = SwitchPort(sw, 1), SwitchPort(sw, 2)
    try:
        guest = Guest(dst, room=False)
        src.transmit(NetHdr(), frame(B, A))
        src.transmit(NetHdr(), frame(B, A))
        assert serve([guest], lambda: dst.queued == 0)
        assert dst.dropped == 2 and dst.rx_frames == 0
    finally:
        src.close()
        dst.close()


def test_one_port_alone_is_a_sink_and_the_hook_sees_its_frames() -> None:
    sw = LearningSwitch()
    seen: list[tuple[bytes, NetHdr]] = []
    sw.tap_frames = lambda f, h: seen.append((f, h))
    port = SwitchPort(sw, 0)
    try:
        Guest(port)
        hdr = NetHdr()
        port.transmit(hdr, frame(wire.BROADCAST, A))
        port.transmit(hdr, frame(B, A))
        assert port.tx_frames == 2 and sw.dropped == 2
        assert seen == [(frame(wire.BROADCAST, A), hdr), (frame(B, A), hdr)]
        assert port.rx_frames == 0 and not readable(port.fileno())
    finally:
        port.close()
    port.transmit(NetHdr(), frame(B, A))  # closed: ignored
    assert port.tx_frames == 2
    port.close()  # closing twice is harmless
    assert port.fileno() == -1 and sw.ports == []


def test_ports_on_threads_of_their_own() -> None:
    """Each device on its own host thread, sending to the others at once."""
    sw = LearningSwitch()
    count, n = 300, 3
    ports = [SwitchPort(sw, i, inbox_limit=4 * count) for i in range(n)]
    macs = [bytes([2, 0, 0, 0, 0, i + 1]) for i in range(n)]
    guests = [Guest(p) for p in ports]
    # Teach the switch every address first, so that frames go to one port each.
    for p, mac in zip(ports, macs, strict=True):
        p.transmit(NetHdr(), frame(wire.BROADCAST, mac))
    assert serve(guests, lambda: all(len(g.got) == n - 1 for g in guests))
    for g in guests:
        g.got.clear()
    stop = threading.Event()

    def device(i: int) -> None:
        for k in range(count):
            dst = macs[(i + 1 + k % (n - 1)) % n]
            ports[i].transmit(NetHdr(), frame(dst, macs[i]))
        # Keep serving this device's host loop until everyone is done.
        while not stop.is_set():
            serve([guests[i]], lambda: stop.is_set(), timeout=0.05)

    threads = [threading.Thread(target=device, args=(i,)) for i in range(n)]
    try:
        for t in threads:
            t.start()
        deadline = time.monotonic() + 10
        while sum(len(g.got) for g in guests) < n * count and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        stop.set()
        for t in threads:
            t.join()
        for p in ports:
            p.close()
    assert [len(g.got) for g in guests] == [count] * n
    assert sum(p.dropped for p in ports) == 0
    for g, mac in zip(guests, macs, strict=True):
        assert all(f[:6] == mac for _, f in g.got)
