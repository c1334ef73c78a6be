"""The memory device: a region of guest-physical memory plugged block by block.

The device keeps one plugged/unplugged bit per block and answers the
driver's PLUG, UNPLUG, UNPLUG ALL and STATE requests with the checks the
spec asks for (alignment to ``block_size``, the range inside
``usable_region_size``, the state of every block covered). The host sets
``requested_size`` at run time (:meth:`MemDevice.set_requested_size`, from
the control socket); the device grows ``usable_region_size`` to fit and
notifies the driver. Block states survive a device reset (the spec forbids
changing them then); :meth:`MemDevice.system_reset` is the one place they
all go back to unplugged.

The memory itself is the guest's: a VMM maps the region, and the device
never writes to it. With ``discard`` the device gives the memory of blocks
it unplugs back to the host (``MADV_REMOVE`` on its mapping of the region,
when that mapping is shared memory it can see: they read as zeroes
afterwards); without it, the device model only keeps the accounting.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from virtio.core.device import RingOptions, VirtioDevice
from virtio.devices.guestpages import release_view
from virtio.devices.mem import wire as W
from virtio.errors import GuestMemoryError
from virtio.queue import Chain, ChainReader, ChainWriter
from virtio.spec.device_ids import DeviceId

log = logging.getLogger("virtio.mem")

MEM = "Device Types / Memory Device"
N_OP_DRV = f"drivernormative:{MEM} / Device Operation"
N_CONFIG_DRV = f"drivernormative:{MEM} / Device configuration layout"
N_CONFIG_DEV = f"devicenormative:{MEM} / Device configuration layout"
#: One state byte per block is kept: 16 MiB of them at most.
MAX_BLOCKS = 1 << 24


class MemDevice(VirtioDevice):
    """One queue (guest-request); the region is ``region_size`` bytes at ``addr``."""

    device_id = DeviceId.MEM

    def __init__(
        self,
        *,
        region_size: int,
        block_size: int = 2 << 20,
        addr: int = 1 << 32,
        requested_size: int = 0,
        node_id: int | None = None,
        unplugged_inaccessible: bool = True,
        persistent_suspend: bool = False,
        discard: bool = False,
        queue_max_size: int = 128,
        ring: RingOptions | None = None,
    ) -> None:
        if block_size < 1 or block_size & (block_size - 1):
            raise ValueError(f"block size {block_size} is not a power of two")
        for name, value in (("addr", addr), ("region size", region_size)):
            if value < 0 or value % block_size:
                raise ValueError(f"{name} {value:#x} is not a multiple of the block size")
        if region_size // block_size > MAX_BLOCKS:
            raise ValueError(
                f"{region_size // block_size} blocks: at most {MAX_BLOCKS} (bigger blocks)"
            )
        if addr + region_size > 1 << 64:
            raise ValueError("the region ends beyond the 64-bit address space")
        if node_id is not None and not 0 <= node_id <= 0xFFFF:
            raise ValueError(f"node id {node_id} does not fit a le16")
        self.block_size = block_size
        self.addr = addr
        self.region_size = region_size
        self.node_id = node_id
        self.unplugged_inaccessible = unplugged_inaccessible
        self.persistent_suspend = persistent_suspend
        self.discard = discard
        #: Bytes of unplugged blocks given back to the host (``discard``).
        self.discarded_bytes = 0
        self.blocks = bytearray(region_size // block_size)  # 1: plugged
        self.plugged_blocks = 0
        self.requested_size = 0
        self.usable_region_size = 0
        #: Called with (first block, count, plugged) after each change of state:
        #: a host that backs the region can populate or discard memory there.
        self.on_blocks_changed: Callable[[int, int, bool], None] | None = None
        self.closers: list[Callable[[], None]] = []
        self._check_requested(requested_size)
        self.requested_size = requested_size
        self.usable_region_size = self._usable_for(requested_size)
        super().__init__(num_queues=1, queue_max_size=queue_max_size, ring=ring)

    # -- configuration -----------------------------------------------------------

    def device_features(self) -> int:
        bits = 0
        if self.node_id is not None:
            bits |= 1 << W.F_ACPI_PXM
        if self.unplugged_inaccessible:
            bits |= 1 << W.F_UNPLUGGED_INACCESSIBLE
        if self.persistent_suspend:
            bits |= 1 << W.F_PERSISTENT_SUSPEND
        return bits

    def config_size(self) -> int:
        return W.CONFIG_SIZE

    @property
    def plugged_size(self) -> int:
        return self.plugged_blocks * self.block_size

    def mem_config(self) -> W.MemConfig:
        return W.MemConfig(
            block_size=self.block_size,
            node_id=self.node_id or 0,
            addr=self.addr,
            region_size=self.region_size,
            usable_region_size=self.usable_region_size,
            plugged_size=self.plugged_size,
            requested_size=self.requested_size,
        )

    def build_config(self) -> None:
        # From the current state: a device reset does not unplug anything.
        self.config[:] = W.pack_config(self.mem_config())

    def config_write(self, offset: int, data: bytes) -> bool:
        self.fail(f"driver wrote the read-only config at {offset}+{len(data)}", N_CONFIG_DRV)
        return True

    def _quiet_update(self) -> None:
        """Config changes the spec says not to notify (plugged_size, UNPLUG ALL)."""
        self.config[:] = W.pack_config(self.mem_config())
        self.config_generation = (self.config_generation + 1) & 0xFFFFFFFF

    def _usable_for(self, requested: int) -> int:
        """A usable region with room to choose blocks: half as much again as requested."""
        want = requested + requested // 2
        want = -(-want // self.block_size) * self.block_size
        return max(requested, min(self.region_size, want))

    def _check_requested(self, size: int) -> None:
        if size < 0 or size % self.block_size:
            raise ValueError(f"requested size {size} is not a multiple of {self.block_size}")
        if size > self.region_size:
            raise ValueError(f"requested size {size} is more than the region ({self.region_size})")

    # -- the host side --------------------------------------------------------------

    def set_requested_size(self, size: int) -> None:
        """Ask the driver to plug ``size`` bytes; the usable region grows to fit."""
        self._check_requested(size)
        self.requested_size = size
        # usable_region_size only grows here (it shrinks only on UNPLUG ALL).
        self.usable_region_size = max(self.usable_region_size, self._usable_for(size))
        packed = W.pack_config(self.mem_config())
        self.update_config(0, packed)  # notifies the driver

    def system_reset(self) -> None:
        """A system reset: every block unplugged (the spec's SHOULD), then a device reset."""
        self._set_blocks(0, len(self.blocks), False)
        self.usable_region_size = self._usable_for(self.requested_size)
        self.reset()

    def describe(self) -> str:
        return (
            f"MemDevice, region {self.region_size >> 20} MiB at {self.addr:#x}, "
            f"blocks of {self.block_size >> 10} KiB, requested {self.requested_size >> 20} MiB"
        )

    def close(self) -> None:
        for closer in reversed(self.closers):
            closer()
        self.closers.clear()

    # -- requests -------------------------------------------------------------------------

    def handle_chain(self, queue_index: int, chain: Chain) -> int | None:
        if chain.read_len < W.REQ_SIZE or chain.write_len < W.RESP_SIZE:
            self.fail(
                f"request of {chain.read_len} readable and {chain.write_len} writable bytes "
                f"(a request is {W.REQ_SIZE}, a response {W.RESP_SIZE})",
                N_OP_DRV,
            )
            return 0
        request = W.unpack_request(ChainReader(chain).read(W.REQ_SIZE))
        resp, state = self.serve(request)
        return ChainWriter(chain).write(W.pack_response(resp, state))

    def serve(self, request: W.Request) -> tuple[int, int]:
        """The response type (and STATE's state) for one request."""
        if request.type == W.REQ_UNPLUG_ALL:
            self._set_blocks(0, len(self.blocks), False)
            # Shrinking the usable region is allowed here, and only here.
            self.usable_region_size = self._usable_for(self.requested_size)
            self._quiet_update()
            return W.RESP_ACK, 0
        if request.type not in (W.REQ_PLUG, W.REQ_UNPLUG, W.REQ_STATE):
            log.info("unknown virtio-mem request type %d", request.type)
            return W.RESP_ERROR, 0
        first = self._range(request)
        if first is None:
            return W.RESP_ERROR, 0
        n = request.nb_blocks
        covered = self.blocks[first : first + n]
        plugged = covered.count(1)
        if request.type == W.REQ_STATE:
            if plugged == n:
                return W.RESP_ACK, W.STATE_PLUGGED
            return W.RESP_ACK, W.STATE_UNPLUGGED if plugged == 0 else W.STATE_MIXED
        if request.type == W.REQ_PLUG:
            if plugged:
                return W.RESP_ERROR, 0  # some block is already plugged
            if self.plugged_size + n * self.block_size > self.requested_size:
                return W.RESP_NACK, 0  # more than the device asked for
            self._set_blocks(first, n, True)
        else:
            if plugged != n:
                return W.RESP_ERROR, 0  # some block is already unplugged
            self._set_blocks(first, n, False)
        self._quiet_update()
        return W.RESP_ACK, 0

    def _range(self, request: W.Request) -> int | None:
        """The first block of a request's range, or None if the spec says ERROR."""
        offset = request.addr - self.addr
        if request.nb_blocks < 1 or request.addr % self.block_size or offset < 0:
            return None
        end = offset + request.nb_blocks * self.block_size
        if end > self.usable_region_size:
            return None
        return offset // self.block_size

    def _set_blocks(self, first: int, count: int, plugged: bool) -> None:
        if not plugged and self.discard:
            self._discard(first, count)
        value = 1 if plugged else 0
        before = self.blocks[first : first + count].count(1)
        self.blocks[first : first + count] = bytes([value]) * count
        self.plugged_blocks += (count if plugged else 0) - before
        if self.on_blocks_changed is not None and count:
            self.on_blocks_changed(first, count, plugged)

    def _discard(self, first: int, count: int) -> None:
        """Give back the memory of the plugged blocks among ``first..first+count``."""
        if self.memory is None:
            return
        blocks, end, bs = self.blocks, first + count, self.block_size
        while first < end:
            start = blocks.find(1, first, end)
            if start < 0:
                return
            stop = blocks.find(0, start, end)
            stop = end if stop < 0 else stop
            first = stop
            try:
                views = self.memory.iovecs(self.addr + start * bs, (stop - start) * bs)
            except GuestMemoryError:
                continue  # not mapped here: the VMM keeps that memory
            for view in views:
                self.discarded_bytes += release_view(view, "remove")
