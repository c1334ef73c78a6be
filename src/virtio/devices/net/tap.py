"""A Linux TAP interface as the host side of a net device.

The TAP is opened through ``/dev/net/tun`` with ``IFF_TAP | IFF_NO_PI`` and,
by default, ``IFF_VNET_HDR``: every frame then carries a 12-byte
little-endian ``virtio_net_hdr`` (with ``num_buffers``), the same header a
modern guest uses, so GSO frames and partial checksums pass between guest
and kernel untouched, in both directions. Without the header, the device
must segment and checksum everything itself (``tx_offloads`` is 0) and the
guest receives plain frames.

Opening a name that does not exist creates a TAP that lasts as long as the
file descriptor (root, or CAP_NET_ADMIN, needed); opening an existing one
attaches to it, which a user may do without privileges once root made it
persistent for them::

    ip tuntap add dev pyvtap0 mode tap vnet_hdr user alice
    ip addr add 192.0.2.1/24 dev pyvtap0 && ip link set pyvtap0 up

To keep a guest's traffic off the host's own network, put the TAP's kernel
end into a network namespace of its own (the file descriptor stays attached
when the interface moves)::

    ip netns add vm0
    # TapBackend("pyvtap0") is open, then:
    ip link set pyvtap0 netns vm0
    ip -n vm0 addr add 192.0.2.1/24 dev pyvtap0
    ip -n vm0 link set pyvtap0 up
    ...
    ip netns del vm0
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import struct
import sys

from virtio.core.events import EventSources
from virtio.devices.net import wire
from virtio.devices.net.backend import Deliver
from virtio.devices.net.wire import NetHdr

log = logging.getLogger("virtio.net.tap")

# -- <linux/if_tun.h> ------------------------------------------------------------------
TUNSETIFF = 0x400454CA
TUNSETOFFLOAD = 0x400454D0
TUNSETVNETHDRSZ = 0x400454D8
TUNSETVNETLE = 0x400454DC

IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000

TUN_F_CSUM = 0x01
TUN_F_TSO4 = 0x02
TUN_F_TSO6 = 0x04
TUN_F_TSO_ECN = 0x08
TUN_F_UFO = 0x10
TUN_F_USO4 = 0x20
TUN_F_USO6 = 0x40

IFNAMSIZ = 16
#: ``struct ifreq``: the name, the flags, and the rest of the union.
_IFREQ = struct.Struct(f"{IFNAMSIZ}sH22x")

#: The vnet header the TAP reads and writes: the modern ``virtio_net_hdr`` with
#: ``num_buffers`` (12 bytes, little-endian once TUNSETVNETLE is in force).
VNET_HDR_SIZE = 12
# The 12-byte layout packed directly: wire.encode_header/decode_header go through
# the 32-byte form, which costs a copy and a padding step on every frame.
_VNET_HDR = struct.Struct("<BBHHHHH")
assert _VNET_HDR.size == VNET_HDR_SIZE
_PLAIN_HDR = bytes(VNET_HDR_SIZE)

#: Frames read per wakeup: the host loop is level-triggered, so what is left
#: waits for the next round, and the other devices of the loop get their turn.
RX_BATCH = 64
#: Room for the largest frame the kernel hands over with GSO on, and more.
_RX_BUFFER = 1 << 17

_CSUM_BIT = 1 << wire.GUEST_CSUM


def tun_offload_flags(guest_offloads: int) -> int:
    """The TUNSETOFFLOAD flags for the guest's GUEST_* offload bits.

    The kernel refuses any segmentation flag without TUN_F_CSUM, ECN without a
    TSO flag, and USO4 or USO6 alone; those are left out (the kernel then
    segments, or checksums, before handing the frame over).
    """

    def has(bit: int) -> bool:
        return bool(guest_offloads >> bit & 1)

    if not has(wire.GUEST_CSUM):
        return 0
    flags = TUN_F_CSUM
    if has(wire.GUEST_TSO4):
        flags |= TUN_F_TSO4
    if has(wire.GUEST_TSO6):
        flags |= TUN_F_TSO6
    if flags & (TUN_F_TSO4 | TUN_F_TSO6) and has(wire.GUEST_ECN):
        flags |= TUN_F_TSO_ECN
    if has(wire.GUEST_UFO):
        flags |= TUN_F_UFO
    if has(wire.GUEST_USO4) and has(wire.GUEST_USO6):
        flags |= TUN_F_USO4 | TUN_F_USO6
    return flags


def _check_name(name: str) -> bytes:
    raw = name.encode()
    if not raw or len(raw) >= IFNAMSIZ or b"/" in raw or b"\0" in raw or any(c <= 32 for c in raw):
        raise ValueError(
            f"not a usable interface name: {name!r} (1 to {IFNAMSIZ - 1} bytes, no '/' or spaces)"
        )
    return raw


class TapBackend:
    """A net device's host side on a TAP interface (see the module docstring)."""

    def __init__(self, name: str, *, vnet_hdr: bool = True) -> None:
        raw = _check_name(name)
        self.vnet_hdr = vnet_hdr
        self.tx_offloads = wire.HOST_OFFLOAD_BITS if vnet_hdr else 0
        self.rx_frames = 0
        self.tx_frames = 0
        self.dropped = 0
        #: Writes the kernel refused (other than a full queue), and the last such error.
        self.tx_errors = 0
        self.last_error: OSError | None = None
        #: The TUNSETOFFLOAD flags in force.
        self.offload_flags = 0
        self._events: EventSources | None = None
        self._deliver: Deliver | None = None
        self._rx_csum = False
        try:
            fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as e:
            raise OSError(e.errno, f"TAP {name}: cannot open /dev/net/tun: {e.strerror}") from e
        self._fd = fd
        try:
            flags = IFF_TAP | IFF_NO_PI | (IFF_VNET_HDR if vnet_hdr else 0)
            try:
                result = fcntl.ioctl(fd, TUNSETIFF, _IFREQ.pack(raw, flags))
            except OSError as e:
                hint = ""
                if e.errno == errno.EPERM:
                    hint = " (creating a TAP needs CAP_NET_ADMIN; or attach to a persistent one)"
                elif e.errno in (errno.EINVAL, errno.EBUSY):
                    hint = " (is it a TAP, with matching flags, and not in use?)"
                raise OSError(e.errno, f"TAP {name}: cannot attach: {e.strerror}{hint}") from e
            #: The interface's name as the kernel gave it (a pattern like "tap%d" is resolved).
            self.ifname = _IFREQ.unpack(result)[0].rstrip(b"\0").decode()
            self.name = f"tap {self.ifname}"
            if vnet_hdr:
                try:
                    fcntl.ioctl(fd, TUNSETVNETHDRSZ, struct.pack("i", VNET_HDR_SIZE))
                except OSError as e:
                    raise OSError(
                        e.errno, f"TAP {name}: cannot set the vnet header size: {e.strerror}"
                    ) from e
                try:
                    fcntl.ioctl(fd, TUNSETVNETLE, struct.pack("i", 1))
                except OSError as e:
                    # Native order is little-endian already; only a big-endian host needs it.
                    if sys.byteorder != "little":
                        raise OSError(
                            e.errno, f"TAP {name}: cannot make the vnet header little-endian"
                        ) from e
                # An attached persistent TAP may keep a previous user's offloads.
                self._set_offload(0)
        except BaseException:
            os.close(fd)
            self._fd = -1
            raise
        self._rxbuf = bytearray(_RX_BUFFER)
        self._rxview = memoryview(self._rxbuf)
        self._hdrbuf = bytearray(VNET_HDR_SIZE)
        self._rx_iov = [self._hdrbuf, self._rxbuf] if vnet_hdr else [self._rxbuf]

    def fileno(self) -> int:
        return self._fd

    # -- NetBackend ------------------------------------------------------------------------

    def start(self, events: EventSources, deliver: Deliver) -> None:
        if self._fd < 0:
            raise OSError(errno.EBADF, f"{self.name}: closed")
        self.stop()
        self._events = events
        self._deliver = deliver
        events.watch(self._fd, self._readable)

    def stop(self) -> None:
        events, self._events = self._events, None
        self._deliver = None
        if events is not None and self._fd >= 0:
            events.unwatch(self._fd)

    def transmit(self, hdr: NetHdr, frame: bytes) -> None:
        try:
            if not self.vnet_hdr:
                os.write(self._fd, frame)
            elif not hdr.flags and not hdr.gso_type:
                # No offload asked for: the all-zero header says just that.
                os.writev(self._fd, (_PLAIN_HDR, frame))
            else:
                head = _VNET_HDR.pack(
                    hdr.flags,
                    hdr.gso_type,
                    hdr.hdr_len,
                    hdr.gso_size,
                    hdr.csum_start,
                    hdr.csum_offset,
                    0,
                )
                os.writev(self._fd, (head, frame))
        except BlockingIOError:
            self.dropped += 1
            return
        except OSError as e:
            # A header the kernel rejects (EINVAL), the interface down (EIO): the frame
            # is lost, as on a wire; the guest must not see an error for it.
            self.dropped += 1
            self.tx_errors += 1
            self.last_error = e
            return
        self.tx_frames += 1

    def set_rx_offloads(self, guest_offloads: int) -> None:
        if not self.vnet_hdr or self._fd < 0:
            return
        flags = tun_offload_flags(guest_offloads)
        try:
            self._set_offload(flags)
        except OSError as e:
            usos = TUN_F_USO4 | TUN_F_USO6
            if e.errno != errno.EINVAL or not flags & usos:
                raise
            # A kernel before 6.2 knows no USO: the guest just gets segmented datagrams.
            self._set_offload(flags & ~usos)
        self._rx_csum = bool(guest_offloads & _CSUM_BIT)

    def close(self) -> None:
        self.stop()
        fd, self._fd = self._fd, -1
        if fd >= 0:
            os.close(fd)

    # -- internals -------------------------------------------------------------------------

    def _set_offload(self, flags: int) -> None:
        try:
            fcntl.ioctl(self._fd, TUNSETOFFLOAD, flags)
        except OSError as e:
            raise OSError(
                e.errno, f"{self.name}: TUNSETOFFLOAD {flags:#x} refused: {e.strerror}"
            ) from e
        self.offload_flags = flags

    def _readable(self, now: float) -> None:
        deliver = self._deliver
        if deliver is None:
            return
        fd = self._fd
        iov = self._rx_iov
        view = self._rxview
        vnet = self.vnet_hdr
        hdrbuf = self._hdrbuf
        unpack = _VNET_HDR.unpack_from
        keep_flags = self._rx_csum
        for _ in range(RX_BATCH):
            try:
                n = os.readv(fd, iov)
            except BlockingIOError:
                return
            except OSError as e:
                # The interface went away under us (EBADFD) or similar: the fd would
                # stay readable forever, so stop watching it rather than spin.
                log.warning("%s: read failed, no more frames for the guest: %s", self.name, e)
                self.last_error = e
                self.stop()
                return
            if vnet:
                n -= VNET_HDR_SIZE
                if n < 0:
                    continue
                flags, gso_type, hdr_len, gso_size, cs, co, _ = unpack(hdrbuf)
                # Without GUEST_CSUM the guest must see flags 0 (the kernel may still say
                # DATA_VALID); num_buffers is the device's to fill (the kernel skips it).
                hdr = NetHdr(flags if keep_flags else 0, gso_type, hdr_len, gso_size, cs, co)
            else:
                hdr = NetHdr()
            if n > wire.MAX_GSO_FRAME:
                self.dropped += 1
                continue
            if deliver(hdr, bytes(view[:n])):
                self.rx_frames += 1
            else:
                self.dropped += 1
            if self._deliver is None:  # the device stopped us from inside deliver
                return
