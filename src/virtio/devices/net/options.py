"""virtio-net's `virtio serve net` options: one device per socket, and their host side.

virtio serve net --socket a.sock --socket b.sock --switch   (two guests, one switch)
virtio serve net --socket a.sock --tap tap0                 (a guest on a TAP)
virtio serve net --socket a.sock --switch --pcap frames.pcap
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from virtio.core.device import VirtioDevice
from virtio.devices.net import wire as W
from virtio.devices.net.backend import NetBackend
from virtio.devices.net.device import NetDevice
from virtio.devices.registry import DeviceSettings

DEFAULT_MAC = "52:54:00:12:34:56"


def add_arguments(p: argparse.ArgumentParser) -> None:
    side = p.add_mutually_exclusive_group()
    side.add_argument(
        "--tap", metavar="NAME", help="a TAP interface (created if missing; needs CAP_NET_ADMIN)"
    )
    side.add_argument(
        "--switch",
        action="store_true",
        help="join every socket's device to a built-in learning switch (the default); "
        "one socket alone is a sink that counts and drops what it is sent",
    )
    p.add_argument(
        "--mac",
        default=DEFAULT_MAC,
        help=f"MAC address of the first device; later sockets count up (default {DEFAULT_MAC})",
    )
    p.add_argument("--mtu", type=int, default=None, help="offer VIRTIO_NET_F_MTU with this MTU")
    p.add_argument("--queues", type=int, default=1, help="receive/transmit queue pairs per device")
    p.add_argument("--speed", type=int, default=None, help="offer SPEED_DUPLEX: Mbit/s")
    p.add_argument("--standby", action="store_true", help="offer VIRTIO_NET_F_STANDBY")
    p.add_argument(
        "--tap-vnet-hdr",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="pass offloads to the TAP with IFF_VNET_HDR (default on; off: the device "
        "segments and checksums every frame itself)",
    )
    p.add_argument("--pcap", metavar="FILE", help="record every frame the host side sees")
    p.add_argument(
        "--no-offloads",
        action="store_true",
        help="offer no checksum or segmentation offloads (plain frames both ways)",
    )


def num_queues(args: argparse.Namespace) -> int:
    return 2 * int(args.queues) + 1


def qemu_options(socket_path: str, device: VirtioDevice) -> str:
    """QEMU's vhost-user netdev and virtio-net-pci for one socket and its device.

    QEMU's virtio-net takes its MAC from its own ``mac=`` (every QEMU defaults to
    52:54:00:12:34:56), not from the back-end: the command passes the device's.
    """
    assert isinstance(device, NetDevice)
    pairs = device.queue_pairs
    mq = f",queues={pairs}" if pairs > 1 else ""
    mac = f",mac={W.mac_text(device.mac)}" if device.mac else ""
    # vectors=0: Debian's QEMU 7.2 crashes in vhost_net_start with MSI-X here.
    return (
        f"-chardev socket,id=vnet0,path={socket_path},reconnect=1 "
        f"-netdev vhost-user,id=net0,chardev=vnet0{mq} "
        f"-device virtio-net-pci,netdev=net0,vectors=0{mac}{',mq=on' if pairs > 1 else ''}"
    )


def _macs(first: str, count: int) -> list[bytes]:
    base = int.from_bytes(W.parse_mac(first), "big")
    if base >> 40 & 1:
        raise ValueError(f"--mac {first} is a multicast address")
    return [((base + i) & (1 << 48) - 1).to_bytes(6, "big") for i in range(count)]


def _check(args: argparse.Namespace) -> None:
    if not 1 <= args.queues <= 64:
        raise ValueError("--queues must be 1..64")
    if args.mtu is not None and not 68 <= args.mtu <= 65535:
        raise ValueError("--mtu must be 68..65535")
    if args.speed is not None and not 0 <= args.speed <= 0x7FFFFFFF:
        raise ValueError("--speed must be 0..2147483647 Mbit/s")
    sockets = getattr(args, "socket", None)
    if args.tap and isinstance(sockets, list) and len(sockets) > 1:
        raise ValueError("--tap serves one socket (use --switch for several)")


def devices_for_sockets(
    args: argparse.Namespace, settings: DeviceSettings, count: int
) -> list[VirtioDevice]:
    """One device per socket, with the host side the options chose."""
    _check(args)
    macs = _macs(args.mac, count)
    backends: list[NetBackend]
    if args.tap:
        from virtio.devices.net.tap import TapBackend

        backends = [TapBackend(args.tap, vnet_hdr=args.tap_vnet_hdr)]
    else:
        from virtio.devices.net.switch import LearningSwitch, SwitchPort

        switch = LearningSwitch()
        backends = [SwitchPort(switch, i) for i in range(count)]
    if args.pcap:
        from virtio.devices.net.pcap import PcapTap, PcapWriter

        writer = PcapWriter(Path(args.pcap))
        if args.tap:
            backends = [PcapTap(b, writer) for b in backends]
        else:
            # Every frame crossing the switch, once.
            switch.tap_frames = lambda frame, _hdr: writer.write(frame, time.time())
    offer_mask = None
    if args.no_offloads:
        offer_mask = ~(W.GUEST_OFFLOAD_BITS | W.HOST_OFFLOAD_BITS | 1 << W.CTRL_GUEST_OFFLOADS)
    return [
        NetDevice(
            backend,
            mac=mac,
            mtu=args.mtu,
            queue_pairs=args.queues,
            speed=args.speed,
            standby=args.standby,
            offer_mask=offer_mask,
            queue_max_size=settings.queue_max_size,
            ring=settings.ring,
        )
        for backend, mac in zip(backends, macs, strict=True)
    ]


def from_arguments(args: argparse.Namespace, settings: DeviceSettings) -> VirtioDevice:
    return devices_for_sockets(args, settings, 1)[0]


def example(directory: Path, settings: DeviceSettings) -> VirtioDevice:
    return NetDevice(queue_max_size=settings.queue_max_size, ring=settings.ring)
