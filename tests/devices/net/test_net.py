"""virtio-net: the device model and the driver, in process (register-level loopback)."""

from __future__ import annotations

import struct
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from virtio.core.events import EventSources
from virtio.devices.net import NetDevice, NetDriver, offload
from virtio.devices.net import wire as W
from virtio.devices.net.backend import Deliver
from virtio.errors import NegotiationError
from virtio.spec.status import DeviceStatus as S
from virtio.transport.loopback import Loopback

NET = "Device Types / Network Device"
N_CONFIG_DEV = f"devicenormative:{NET} / Device configuration layout"
N_CONFIG_DRV = f"drivernormative:{NET} / Device configuration layout"
N_TX_DEV = f"devicenormative:{NET} / Device Operation / Packet Transmission"
N_RXBUF_DEV = f"devicenormative:{NET} / Device Operation / Setting Up Receive Buffers"
N_RXBUF_DRV = f"drivernormative:{NET} / Device Operation / Setting Up Receive Buffers"
N_RX_DEV = f"devicenormative:{NET} / Device Operation / Processing of Incoming Packets"
N_RX_DRV = f"drivernormative:{NET} / Device Operation / Processing of Incoming Packets"
CVQ = f"{NET} / Device Operation / Control Virtqueue"
N_FILTER_DEV = f"devicenormative:{CVQ} / Packet Receive Filtering"
N_FILTER_DRV = f"drivernormative:{CVQ} / Packet Receive Filtering"
N_MAC_DEV = f"devicenormative:{CVQ} / Setting MAC Address Filtering"
N_VLAN_DEV = f"devicenormative:{CVQ} / VLAN Filtering"
N_ANNOUNCE_DEV = f"devicenormative:{CVQ} / Gratuitous Packet Sending"
N_ANNOUNCE_DRV = f"drivernormative:{CVQ} / Gratuitous Packet Sending"
N_MQ_DEV = f"devicenormative:{CVQ} / Automatic receive steering in multiqueue mode"
N_MQ_DRV = f"drivernormative:{CVQ} / Automatic receive steering in multiqueue mode"
N_OFFLOADS_DRV = f"drivernormative:{CVQ} / Offloads State Configuration / Setting Offloads State"
N_COAL_DEV = f"devicenormative:{CVQ} / Notifications Coalescing"
N_COAL_DRV = f"drivernormative:{CVQ} / Notifications Coalescing"
N_FRAMING_DRV = "drivernormative:Basic Facilities of a Virtio Device / Message Framing"

MAC_A = b"\x52\x54\x00\x12\x34\x56"
MAC_B = b"\x02\x00\x00\x00\x00\x02"


class Recorder:
    """A back-end that records what the guest sends and lets a test hand it frames."""

    name = "recorder"

    def __init__(self, tx_offloads: int = 0) -> None:
        self.tx_offloads = tx_offloads
        self.sent: list[tuple[W.NetHdr, bytes]] = []
        self.deliver: Deliver | None = None
        self.rx_offloads: list[int] = []
        self.events: EventSources | None = None

    def start(self, events: EventSources, deliver: Deliver) -> None:
        self.events = events
        self.deliver = deliver

    def stop(self) -> None:
        self.deliver = None

    def transmit(self, hdr: W.NetHdr, frame: bytes) -> None:
        self.sent.append((hdr, frame))

    def set_rx_offloads(self, guest_offloads: int) -> None:
        self.rx_offloads.append(guest_offloads)

    def close(self) -> None:
        pass


def ether(dst: bytes, src: bytes, payload: bytes, ethertype: bytes = b"\x88\xb5") -> bytes:
    return dst + src + ethertype + payload


def ipv4_tcp(payload: bytes, *, src_port: int = 1000, dst_port: int = 80) -> bytes:
    """An Ethernet/IPv4/TCP frame with correct checksums."""
    tcp = struct.pack("!HHIIBBHHH", src_port, dst_port, 1, 0, 5 << 4, 0x18, 65535, 0, 0)
    total = 20 + len(tcp) + len(payload)
    ip = bytearray(
        struct.pack(
            "!BBHHHBBH4s4s",
            0x45,
            0,
            total,
            1,
            0,
            64,
            6,
            0,
            bytes([192, 0, 2, 1]),
            bytes([192, 0, 2, 2]),
        )
    )
    ip[10:12] = offload.checksum(ip).to_bytes(2, "big")
    frame = bytearray(MAC_A + MAC_B + b"\x08\x00" + ip + tcp + payload)
    pseudo = bytes(ip[12:20]) + b"\x00\x06" + (len(tcp) + len(payload)).to_bytes(2, "big")
    l4 = 14 + 20
    frame[l4 + 16 : l4 + 18] = offload.checksum(pseudo + bytes(frame[l4:])).to_bytes(2, "big")
    return bytes(frame)


@contextmanager
def net(
    device: NetDevice | None = None, **driver_kw: object
) -> Iterator[tuple[NetDevice, NetDriver, Recorder]]:
    backend = Recorder()
    device = device or NetDevice(backend)
    if device.backend is not backend:
        backend = device.backend  # type: ignore[assignment]
    with Loopback(device) as lb:
        driver = NetDriver(lb, **driver_kw)  # type: ignore[arg-type]
        driver.initialize()
        driver.start()
        yield device, driver, backend


def deliver(
    device: NetDevice, backend: Recorder, frame: bytes, hdr: W.NetHdr | None = None
) -> bool:
    assert backend.deliver is not None
    ok = backend.deliver(hdr or W.NetHdr(), frame)
    device.flush()
    return ok


@pytest.mark.normative(N_CONFIG_DRV, N_TX_DEV)
def test_frames_both_ways() -> None:
    with net() as (device, driver, backend):
        assert driver.mac == MAC_A  # the NIC's address is the device's mac
        frame = ether(MAC_B, MAC_A, b"hello" * 20)
        assert driver.send(frame)
        driver.tx_in_flight()
        assert [f for _, f in backend.sent] == [frame]
        back = ether(MAC_A, MAC_B, b"world" * 20)
        assert deliver(device, backend, back)
        got = driver.receive(timeout=2)
        assert [f for _, f in got] == [back]
        assert got[0][0].num_buffers == 1


@pytest.mark.normative(N_RXBUF_DEV, N_RX_DEV)
def test_mergeable_buffers_hold_a_large_frame() -> None:
    backend = Recorder()
    device = NetDevice(backend)
    with net(device, rx_buffer_size=256) as (device, driver, backend):
        assert driver.has(W.MRG_RXBUF)
        frame = ether(MAC_A, MAC_B, bytes(range(256)) * 5)
        assert deliver(device, backend, frame)
        got = driver.receive(timeout=2)
        assert [f for _, f in got] == [frame]
        # 12 + 1294 bytes in 256-byte buffers: all but the last filled completely.
        assert got[0][0].num_buffers == -(-(12 + len(frame)) // 256)


@pytest.mark.normative(N_RXBUF_DEV)
def test_without_mrg_rxbuf_one_buffer_per_frame() -> None:
    with net(avoid_features=1 << W.MRG_RXBUF) as (device, driver, backend):
        assert not driver.has(W.MRG_RXBUF)
        frame = ether(MAC_A, MAC_B, b"x" * 1000)
        assert deliver(device, backend, frame)
        got = driver.receive(timeout=2)
        assert got[0][1] == frame and got[0][0].num_buffers == 1


@pytest.mark.normative(N_TX_DEV)
@pytest.mark.parametrize(
    "hdr",
    [
        W.NetHdr(gso_type=0x17),  # unknown GSO kind
        W.NetHdr(gso_type=W.GSO_TCPV4, gso_size=0, flags=W.HDR_F_NEEDS_CSUM),
        W.NetHdr(flags=W.HDR_F_NEEDS_CSUM, csum_start=90, csum_offset=16),  # outside
        W.NetHdr(gso_type=W.GSO_TCPV4 | W.GSO_TUNNEL_BITS, gso_size=100),
    ],
)
def test_malformed_tx_headers_are_dropped(hdr: W.NetHdr) -> None:
    with net() as (device, driver, backend):
        frame = ether(MAC_B, MAC_A, b"y" * 80)
        driver.send(frame, hdr)
        driver.send(frame)  # a good one after it still goes through
        driver.tx_in_flight()
        assert [f for _, f in backend.sent] == [frame]
        assert device.counters.tx_dropped == 1
        assert not device.status & S.DEVICE_NEEDS_RESET


@pytest.mark.normative(N_TX_DEV)
def test_partial_checksum_completed_when_backend_cannot() -> None:
    with net() as (_device, driver, backend):
        assert driver.has(W.CSUM)
        good = ipv4_tcp(b"payload" * 10)
        partial = bytearray(good)
        l4 = 34
        # What a driver leaves: the pseudo-header sum, not the checksum.
        pseudo = good[26:34] + b"\x00\x06" + (len(good) - l4).to_bytes(2, "big")
        partial[l4 + 16 : l4 + 18] = (~offload.checksum(pseudo) & 0xFFFF).to_bytes(2, "big")
        hdr = W.NetHdr(flags=W.HDR_F_NEEDS_CSUM, csum_start=l4, csum_offset=16)
        driver.send(bytes(partial), hdr)
        driver.tx_in_flight()
        assert len(backend.sent) == 1
        out_hdr, out = backend.sent[0]
        assert offload.verify(out) and out_hdr.flags == 0


@pytest.mark.normative(N_CONFIG_DEV, N_CONFIG_DRV)
def test_mtu_limits_both_ways() -> None:
    device = NetDevice(Recorder(), mtu=576)
    with net(device) as (device, driver, backend):
        assert driver.mtu == 576
        with pytest.raises(ValueError):
            driver.send(ether(MAC_B, MAC_A, bytes(600)))
        # The device does not pass a received packet over mtu + 14 with gso NONE.
        assert not deliver(device, backend, ether(MAC_A, MAC_B, bytes(600)))
        assert deliver(device, backend, ether(MAC_A, MAC_B, bytes(500)))
        assert len(driver.receive(timeout=2)) == 1


def test_mtu_range_is_checked() -> None:
    with pytest.raises(ValueError):
        NetDevice(mtu=67)
    with pytest.raises(ValueError):
        NetDevice(queue_pairs=0)


@pytest.mark.normative(N_FILTER_DEV, N_MAC_DEV)
def test_rx_filter_and_mac_table() -> None:
    with net() as (device, driver, backend):
        other = b"\x02\x99\x99\x99\x99\x99"
        assert deliver(device, backend, ether(other, MAC_B, b"p" * 50))  # promiscuous default
        assert driver.set_rx_mode(W.RX_PROMISC, False) == W.OK
        assert not deliver(device, backend, ether(other, MAC_B, b"q" * 50))
        assert deliver(device, backend, ether(MAC_A, MAC_B, b"r" * 50))
        assert driver.set_mac_table([other], []) == W.OK
        assert deliver(device, backend, ether(other, MAC_B, b"s" * 50))
        mcast = b"\x01\x00\x5e\x00\x00\x01"
        assert not deliver(device, backend, ether(mcast, MAC_B, b"t" * 50))
        assert driver.set_rx_mode(W.RX_ALLMULTI, True) == W.OK
        assert deliver(device, backend, ether(mcast, MAC_B, b"u" * 50))
        assert driver.set_rx_mode(W.RX_NOMULTI, True) == W.OK
        assert not deliver(device, backend, ether(mcast, MAC_B, b"v" * 50))
        assert driver.set_rx_mode(W.RX_NOBCAST, True) == W.OK
        assert not deliver(device, backend, ether(W.BROADCAST, MAC_B, b"w" * 50))
        got = [f[-50:-49] for _, f in driver.receive(timeout=2)]
        assert got == [b"p", b"r", b"s", b"u"]
        # A short table payload is an error and changes nothing.
        assert driver.command(W.CTRL_MAC_CLASS, W.MAC_TABLE_SET, b"\x05\0\0\0")[0] == W.ERR


@pytest.mark.normative(N_MAC_DEV)
def test_mac_addr_set_updates_config_first() -> None:
    with net() as (_device, driver, _backend):
        new = b"\x02\x11\x22\x33\x44\x55"
        assert driver.set_mac(new) == W.OK
        assert driver.read_config(W.CFG_MAC, 6) == new


@pytest.mark.normative(N_VLAN_DEV)
def test_vlan_filter() -> None:
    with net() as (device, driver, backend):
        tagged = MAC_A + MAC_B + b"\x81\x00\x00\x05" + b"\x88\xb5" + bytes(50)
        assert not deliver(device, backend, tagged)  # VLAN 5 is not in the table
        assert driver.vlan(5) == W.OK
        assert deliver(device, backend, tagged)
        assert driver.vlan(5, add=False) == W.OK
        assert not deliver(device, backend, tagged)
        assert driver.vlan(4096) == W.ERR


@pytest.mark.normative(N_ANNOUNCE_DEV, N_ANNOUNCE_DRV)
def test_announce_bit_cleared_by_ack() -> None:
    with net() as (device, driver, _backend):
        device.announce()
        status = int.from_bytes(driver.read_config(W.CFG_STATUS, 2), "little")
        assert status & W.S_ANNOUNCE
        assert driver.announce_ack() == W.OK
        status = int.from_bytes(driver.read_config(W.CFG_STATUS, 2), "little")
        assert not status & W.S_ANNOUNCE and status & W.S_LINK_UP


def test_link_status() -> None:
    with net() as (device, driver, backend):
        assert driver.link_up()
        device.set_link(False)
        assert not driver.link_up()
        assert not deliver(device, backend, ether(MAC_A, MAC_B, bytes(50)))


@pytest.mark.normative(N_MQ_DEV, N_MQ_DRV)
def test_multiqueue_pairs_and_steering() -> None:
    device = NetDevice(Recorder(), queue_pairs=4)
    with net(device, queue_pairs=4) as (device, driver, backend):
        assert driver.max_pairs == 4 and device.active_pairs == 4
        # A flow sent on transmitq3 comes back on receiveq3.
        out = ipv4_tcp(b"a" * 10, src_port=1234, dst_port=80)
        driver.send(out, pair=2)
        driver.tx_in_flight(2)
        reply = bytearray(out)
        reply[26:30], reply[30:34] = out[30:34], out[26:30]
        reply[34:36], reply[36:38] = out[36:38], out[34:36]
        assert deliver(device, backend, bytes(reply))
        assert driver.receive(timeout=2, pair=2)
        # 0 pairs or more than max are refused.
        for bad in (0, 5):
            ack, _ = driver.command(W.CTRL_MQ_CLASS, W.MQ_VQ_PAIRS_SET, bad.to_bytes(2, "little"))
            assert ack == W.ERR
        driver.set_queue_pairs(1)
        assert deliver(device, backend, bytes(reply))
        assert driver.receive(timeout=2, pair=0)


@pytest.mark.normative(N_OFFLOADS_DRV)
def test_offload_reconfiguration() -> None:
    with net() as (device, driver, backend):
        assert driver.set_offloads(1 << W.GUEST_CSUM) == W.OK
        assert device.guest_offloads == 1 << W.GUEST_CSUM
        assert backend.rx_offloads[-1] == 1 << W.GUEST_CSUM
        # An offload that was not negotiated is refused.
        assert driver.set_offloads(1 << 46) == W.ERR


@pytest.mark.normative(N_COAL_DEV, N_COAL_DRV)
def test_coalescing_parameters() -> None:
    with net() as (_device, driver, _backend):
        ack, _ = driver.command(
            W.CTRL_NOTF_COAL_CLASS, W.NOTF_COAL_RX_SET, struct.pack("<II", 50, 8)
        )
        assert ack == W.OK
        ack, got = driver.command(
            W.CTRL_NOTF_COAL_CLASS, W.NOTF_COAL_VQ_GET, struct.pack("<HH", 0, 0), result=8
        )
        assert ack == W.OK and struct.unpack("<II", got) == (50, 8)
        # Not an enabled data queue: ERR.
        ack, _ = driver.command(
            W.CTRL_NOTF_COAL_CLASS, W.NOTF_COAL_VQ_GET, struct.pack("<HH", 2, 0), result=8
        )
        assert ack == W.ERR


@pytest.mark.normative(N_FRAMING_DRV)
def test_control_command_without_ack_byte_needs_reset() -> None:
    with net() as (device, driver, _backend):
        ctrl = driver.ctrl_queue
        assert ctrl is not None
        driver.submit(ctrl, [bytes([W.CTRL_RX_CLASS, W.RX_PROMISC, 1])], [])
        driver.kick(ctrl)
        assert device.status & S.DEVICE_NEEDS_RESET
        assert device.needs_reset_reason is not None and N_FRAMING_DRV in device.needs_reset_reason


def test_unknown_and_oversized_control_commands_answer_err() -> None:
    with net() as (device, driver, _backend):
        assert driver.command(42, 0)[0] == W.ERR
        assert driver.command(W.CTRL_RX_CLASS, W.RX_PROMISC, b"\x01\x01")[0] == W.ERR
        assert (
            driver.command(W.CTRL_RX_CLASS, W.RX_PROMISC, bytes(W.MAX_CTRL_PAYLOAD + 1))[0] == W.ERR
        )
        assert not device.status & S.DEVICE_NEEDS_RESET


@pytest.mark.normative(N_RXBUF_DRV)
def test_receive_buffer_smaller_than_header_needs_reset() -> None:
    with net(rx_buffer_size=8) as (device, _driver, backend):
        deliver(device, backend, ether(MAC_A, MAC_B, bytes(50)))
        assert device.status & S.DEVICE_NEEDS_RESET
        assert device.needs_reset_reason is not None and N_RXBUF_DRV in device.needs_reset_reason


def test_frames_wait_for_buffers_in_a_backlog() -> None:
    device = NetDevice(Recorder(), queue_max_size=8)
    with net(device) as (device, driver, backend):
        frames = [ether(MAC_A, MAC_B, bytes([i]) * 60) for i in range(20)]
        for frame in frames:
            assert deliver(device, backend, frame)
        got: list[bytes] = []
        for _ in range(10):
            got += [f for _, f in driver.receive(timeout=1)]
            if len(got) == len(frames):
                break
        assert got == frames


def hostile_used(device: NetDevice, raw: bytes, written: int | None = None) -> None:
    """What a hostile device could write into one receive buffer, and claim."""
    (chain,) = device.pop_available(0, 1)
    chain.write(raw)
    device.push_used(0, [(chain, len(raw) if written is None else written)])


@pytest.mark.normative(N_RX_DRV)
@pytest.mark.parametrize(
    ("hdr", "reason"),
    [
        (W.NetHdr(num_buffers=0), "num_buffers of 0"),
        (W.NetHdr(num_buffers=5000), "larger than the receive queue"),
        (
            W.NetHdr(
                num_buffers=1,
                flags=W.HDR_F_NEEDS_CSUM,
                gso_type=W.GSO_TCPV4 | W.GSO_TUNNEL_BITS,
                gso_size=100,
            ),
            "both UDP tunnel bits",
        ),
    ],
)
def test_driver_drops_malformed_frames_from_a_device(hdr: W.NetHdr, reason: str) -> None:
    with net() as (device, driver, backend):
        frame = ether(MAC_A, MAC_B, b"z" * 60)
        hostile_used(device, W.encode_header(hdr, 12) + frame)
        assert driver.receive(timeout=0.5) == []
        assert driver.counters.errors == 1
        assert any(reason in r for r in driver.counters.reasons)
        # The driver goes on: a good frame after it arrives.
        assert deliver(device, backend, frame)
        assert [f for _, f in driver.receive(timeout=2)] == [frame]


@pytest.mark.normative(N_RX_DRV)
def test_driver_ignores_flag_bits_it_does_not_know() -> None:
    with net() as (device, driver, _backend):
        frame = ether(MAC_A, MAC_B, b"k" * 60)
        hostile_used(device, W.encode_header(W.NetHdr(flags=0x40, num_buffers=1), 12) + frame)
        got = driver.receive(timeout=2)
        assert [f for _, f in got] == [frame] and driver.counters.errors == 0


def test_driver_drops_a_used_length_shorter_than_the_header() -> None:
    with net() as (device, driver, _backend):
        hostile_used(device, bytes(12), written=5)
        assert driver.receive(timeout=0.5) == []
        assert driver.counters.errors == 1


@pytest.mark.normative(N_FILTER_DRV)
def test_driver_refuses_rx_commands_without_their_features() -> None:
    with net(avoid_features=1 << W.CTRL_RX_EXTRA) as (_device, driver, _backend):
        assert driver.set_rx_mode(W.RX_PROMISC, False) == W.OK
        with pytest.raises(NegotiationError):
            driver.set_rx_mode(W.RX_NOBCAST, True)
    with net(avoid_features=1 << W.CTRL_RX | 1 << W.CTRL_RX_EXTRA) as (_d, driver, _b):
        with pytest.raises(NegotiationError):
            driver.set_rx_mode(W.RX_PROMISC, False)
        with pytest.raises(NegotiationError):
            driver.set_mac_table([], [])


@pytest.mark.normative("drivernormative:" + CVQ + " / Setting MAC Address Filtering")
def test_driver_formats_the_mac_table() -> None:
    with net() as (device, driver, _backend):
        mcast = b"\x01\x00\x5e\x00\x00\x07"
        assert driver.set_mac_table([MAC_B], [mcast]) == W.OK
        assert device.filter.unicast == {MAC_B} and device.filter.multicast == {mcast}
        with pytest.raises(ValueError):
            driver.set_mac_table([mcast], [])
