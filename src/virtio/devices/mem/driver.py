"""The memory device driver: reads the region's layout, plugs and unplugs blocks.

It does not trust the device: a response too short to hold its type is an
error, and only the response type (and, for an acknowledged STATE, the
state) is read, as the spec asks. :meth:`MemDriver.balance` moves
``plugged_size`` toward ``requested_size`` by plugging the lowest unplugged
blocks of the usable region and unplugging the highest plugged ones.
"""

from __future__ import annotations

from virtio.core.driver import VirtioDriver
from virtio.devices.mem import wire as W
from virtio.errors import VirtioError
from virtio.spec.device_ids import DeviceId


class MemResponseError(VirtioError):
    """The device's response could not be read."""


class MemDriver(VirtioDriver):
    device_id = DeviceId.MEM
    #: The blocks this driver plugged (by index), the only ones it unplugs.
    plugged: set[int]

    def supported_features(self) -> int:
        return 1 << W.F_ACPI_PXM | 1 << W.F_UNPLUGGED_INACCESSIBLE | 1 << W.F_PERSISTENT_SUSPEND

    def initialize(self) -> None:
        super().initialize()
        self.plugged = set()
        if self.config().plugged_size:
            # Memory left plugged by an earlier driver: not ours, so give it all back.
            self.unplug_all_until_done()

    def config(self) -> W.MemConfig:
        return W.unpack_config(self.read_config(0, W.CONFIG_SIZE))

    @property
    def node_id(self) -> int | None:
        """The ACPI PXM of the region, or None without VIRTIO_MEM_F_ACPI_PXM."""
        return self.config().node_id if self.has(W.F_ACPI_PXM) else None

    # -- requests -------------------------------------------------------------------------

    def request(self, req: W.Request, timeout: float = 30.0) -> tuple[int, int]:
        """(response type, state) for one request."""
        written, data = self.call(0, [W.pack_request(req)], [W.RESP_SIZE], timeout)
        if written < 2:
            raise MemResponseError(f"device wrote {written} bytes of a {W.RESP_SIZE}-byte response")
        resp, state = W.unpack_response(data[: max(written, 2)])
        if req.type != W.REQ_STATE or resp != W.RESP_ACK:
            state = 0  # the rest of the response means nothing then
        elif written < W.RESP_SIZE:
            raise MemResponseError(f"STATE response of {written} bytes has no state")
        return resp, state

    def plug(self, addr: int, nb_blocks: int) -> int:
        resp, _ = self.request(W.Request(W.REQ_PLUG, addr, nb_blocks))
        if resp == W.RESP_ACK:
            self.plugged.update(self._indexes(addr, nb_blocks))
        return resp

    def unplug(self, addr: int, nb_blocks: int) -> int:
        resp, _ = self.request(W.Request(W.REQ_UNPLUG, addr, nb_blocks))
        if resp == W.RESP_ACK:
            self.plugged.difference_update(self._indexes(addr, nb_blocks))
        return resp

    def unplug_all(self) -> int:
        resp, _ = self.request(W.Request(W.REQ_UNPLUG_ALL))
        if resp == W.RESP_ACK:
            self.plugged.clear()
        return resp

    def unplug_all_until_done(self, attempts: int = 100) -> None:
        """UNPLUG ALL until acknowledged (the driver's SHOULD at initialization)."""
        for _ in range(attempts):
            if self.unplug_all() == W.RESP_ACK:
                return
        raise MemResponseError(f"UNPLUG ALL not acknowledged in {attempts} attempts")

    def state(self, addr: int, nb_blocks: int) -> tuple[int, int]:
        """(response type, state: STATE_PLUGGED, STATE_UNPLUGGED or STATE_MIXED)."""
        return self.request(W.Request(W.REQ_STATE, addr, nb_blocks))

    def _indexes(self, addr: int, nb_blocks: int) -> range:
        c = self.config()
        first = (addr - c.addr) // c.block_size
        return range(first, first + nb_blocks)

    # -- following requested_size ----------------------------------------------------------

    def balance(self, max_blocks: int = W.MAX_BLOCKS) -> int:
        """Plug or unplug one block at a time toward requested_size; blocks moved (+/-)."""
        c = self.config()
        bs = c.block_size
        moved = 0
        usable = c.usable_region_size // bs
        plugged = len(self.plugged)
        want = c.requested_size // bs
        while plugged < want and abs(moved) < max_blocks:
            free = next((i for i in range(usable) if i not in self.plugged), None)
            if free is None or self.plug(c.addr + free * bs, 1) != W.RESP_ACK:
                break
            plugged += 1
            moved += 1
        while plugged > want and abs(moved) < max_blocks:
            top = max(self.plugged)
            if self.unplug(c.addr + top * bs, 1) != W.RESP_ACK:
                break
            plugged -= 1
            moved -= 1
        return moved
