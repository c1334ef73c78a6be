"""pyvirtio's net driver against QEMU's own virtio-net-pci and its user-mode network, via qtest.

No guest runs: the driver (through qtest and the shared guest RAM) and the
minimal IPv4 host on top of it (:mod:`virtio.devices.net.ministack`) are the
guest. QEMU's slirp is the network: it serves DHCP, answers ARP for its
gateway 10.0.2.2 and echoes pings to it, all in process. ``restrict=on`` keeps
it from ever connecting outside; slirp then leaves the router and DNS options
(3 and 6) out of its DHCP replies, so the gateway pinged is the DHCP server.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from ipaddress import IPv4Address

import pytest

from virtio.devices.net import NetDriver
from virtio.devices.net import ministack as M
from virtio.devices.net import wire as W
from virtio.spec import features as F
from virtio.transport.pci import PciTransport
from virtio.vm.qtest import QemuMachine, QtestPciBus, qemu_machine

N_CONFIG_DRV = "drivernormative:Device Types / Network Device / Device configuration layout"

QEMU_MAC = bytes.fromhex("525400c0ffee")
GATEWAY = IPv4Address("10.0.2.2")
#: slirp's own MAC for its virtual host: 52:55 and then the address.
GATEWAY_MAC = bytes.fromhex("52550a000202")
NETDEV = ["-netdev", "user,id=n0,restrict=on"]


@dataclass
class Tap:
    """A FrameLink between the host and the driver that keeps every frame both ways."""

    link: M.NetDriverLink
    sent: list[bytes] = field(default_factory=list)
    received: list[bytes] = field(default_factory=list)

    @property
    def mac(self) -> bytes:
        return self.link.mac

    def send(self, frame: bytes) -> None:
        self.sent.append(frame)
        self.link.send(frame)

    def receive(self, timeout: float) -> list[bytes]:
        frames = self.link.receive(timeout)
        self.received += frames
        return frames


@dataclass
class Net:
    machine: QemuMachine
    transport: PciTransport
    driver: NetDriver
    link: M.NetDriverLink
    tap: Tap
    host: M.MiniHost


@contextlib.contextmanager
def qemu_net(
    options: str = ",disable-legacy=on", *, force_legacy: bool = False, **driver: int
) -> Iterator[Net]:
    device = f"virtio-net-pci,netdev=n0,mac={W.mac_text(QEMU_MAC)}{options}"
    with qemu_machine([device], machine="q35", extra=NETDEV) as machine:
        (transport,) = machine.pci_transports(force_legacy=force_legacy)
        assert transport.device_id == 1
        net = NetDriver(transport, **driver)
        net.initialize()
        net.start()
        link = M.NetDriverLink(net)
        tap = Tap(link)
        yield Net(machine, transport, net, link, tap, M.MiniHost(tap))
        assert net.counters.errors == 0, net.counters.reasons
        net.reset()
        assert transport.read_status() == 0
        # QEMU's device model found nothing wrong in our accesses.
        assert "virtio" not in machine.guest_error_text().lower(), machine.guest_error_text()


def lease_ping_and_check(net: Net, mac: bytes) -> None:
    """DHCP, ARP and ping the gateway; then what went over the wire carried ``mac``."""
    host, tap = net.host, net.tap
    lease = host.dhcp(timeout=6.0)
    assert lease.address == IPv4Address("10.0.2.15")
    assert lease.netmask == IPv4Address("255.255.255.0")
    assert lease.server == GATEWAY
    assert lease.router is None and lease.dns == ()  # restrict=on: slirp leaves 3 and 6 out
    assert lease.lease_time is not None and lease.lease_time > 0
    assert host.resolve(GATEWAY) == GATEWAY_MAC
    for seq in (1, 2):
        payload = f"pyvirtio echo {seq}".encode() * 8
        reply = host.ping(GATEWAY, seq=seq, ident=0x5056, payload=payload)
        assert (reply.type, reply.ident, reply.seq) == (M.ICMP_ECHO_REPLY, 0x5056, seq)
        assert reply.payload == payload
    assert host.malformed == 0

    # Every frame the driver sent had ``mac`` for source, and the DHCP requests it as chaddr.
    sent = [M.decode(frame) for frame in tap.sent]
    assert sent and all(p.eth.src == mac for p in sent)
    requests = [M.Dhcp.parse(p.udp.payload) for p in sent if p.udp is not None]
    kinds = [r.message_type for r in requests]
    assert kinds == [M.DHCPDISCOVER, M.DHCPREQUEST]
    assert all(r.chaddr == mac and r.flags & M.DHCP_FLAG_BROADCAST for r in requests)
    # slirp saw that address: its ARP reply and its echo replies are addressed to it.
    got = [M.decode(frame) for frame in tap.received]
    arp = [p for p in got if p.arp is not None and p.arp.op == M.ARP_REPLY]
    assert arp and all(p.eth.dst == mac and p.arp is not None and p.arp.tha == mac for p in arp)
    echoes = [p for p in got if p.icmp is not None]
    assert len(echoes) == 2 and all(p.eth.dst == mac for p in echoes)
    offers = [M.Dhcp.parse(p.udp.payload) for p in got if p.udp is not None]
    assert {o.message_type for o in offers} == {M.DHCPOFFER, M.DHCPACK}
    assert all(o.chaddr == mac for o in offers)


@pytest.mark.timeout(30)
@pytest.mark.normative(N_CONFIG_DRV)
def test_dhcp_arp_and_ping_through_qemu_modern_virtio_net_pci() -> None:
    with qemu_net() as net:
        driver, transport = net.driver, net.transport
        assert transport.pci_device_id == 0x1041 and not transport.legacy
        assert driver.has(F.VIRTIO_F_VERSION_1) and driver.hdr_size == 12
        # VIRTIO_NET_F_MAC negotiated: the NIC's address is the config mac, QEMU's mac=.
        assert driver.has(W.MAC) and driver.mac == QEMU_MAC
        assert driver.read_config(W.CFG_MAC, 6) == QEMU_MAC
        # VIRTIO_NET_F_STATUS negotiated: the link state comes from status (slirp: up).
        assert driver.has(W.STATUS) and driver.link_up()
        lease_ping_and_check(net, QEMU_MAC)
        bus = transport.bus
        assert isinstance(bus, QtestPciBus) and transport.vectors > 0
        assert bus.messages >= 1  # receive completions came as MSI-X messages
        assert all(hdr.num_buffers == 1 for hdr in net.link.rx_headers)


@pytest.mark.timeout(30)
@pytest.mark.normative(N_CONFIG_DRV)
def test_dhcp_and_ping_through_the_legacy_interface_of_a_transitional_virtio_net_pci() -> None:
    # Without VIRTIO_NET_F_MRG_RXBUF a legacy header has no num_buffers: 10 bytes.
    with qemu_net("", force_legacy=True, avoid_features=1 << W.MRG_RXBUF) as net:
        driver, transport = net.driver, net.transport
        assert transport.pci_device_id == 0x1000 and transport.legacy
        assert not driver.has(F.VIRTIO_F_VERSION_1) and not driver.has(W.MRG_RXBUF)
        assert driver.hdr_size == 10
        assert driver.has(W.MAC) and driver.mac == QEMU_MAC
        lease_ping_and_check(net, QEMU_MAC)


@pytest.mark.timeout(30)
@pytest.mark.normative(N_CONFIG_DRV)
def test_without_the_mac_feature_the_driver_uses_a_locally_administered_address() -> None:
    with qemu_net(avoid_features=1 << W.MAC) as net:
        driver = net.driver
        assert not driver.has(W.MAC)
        mac = driver.mac
        assert mac != QEMU_MAC
        assert mac[0] & 0x02 and not W.is_multicast(mac)  # locally administered, unicast
        lease_ping_and_check(net, mac)


@pytest.mark.timeout(30)
def test_mergeable_receive_buffers_carry_qemu_frames_across_several_buffers() -> None:
    # 64-byte receive buffers: a DHCP reply from slirp (about 590 bytes) spans ten of them.
    size = 64
    with qemu_net(rx_buffer_size=size) as net:
        assert net.driver.has(W.MRG_RXBUF) and size >= net.driver.hdr_size
        lease_ping_and_check(net, QEMU_MAC)
        headers, frames = list(net.link.rx_headers), net.tap.received
        assert len(headers) == len(frames)
        # QEMU fills each buffer before taking the next: num_buffers is exact.
        for hdr, frame in zip(headers, frames, strict=True):
            assert hdr.num_buffers == -(-(net.driver.hdr_size + len(frame)) // size)
        assert max(hdr.num_buffers for hdr in headers) >= 9
        # The reassembled DHCP replies passed their UDP checksums (or the lease had failed).
        assert net.driver.counters.rx_packets == len(frames)
