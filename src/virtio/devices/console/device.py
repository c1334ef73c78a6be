"""The console device: ports whose bytes go to host sides, and the control queues.

Without VIRTIO_CONSOLE_F_MULTIPORT there is one port (0), live as soon as
the driver is. With it, the device announces each port (DEVICE_ADD) once
the driver says it is ready (DEVICE_READY) and, when the driver has set a
port up (PORT_READY), says whether it is a console (CONSOLE_PORT), its name
(PORT_NAME) and whether its host end is open (PORT_OPEN); a port's input is
held until the driver has opened it, so a guest that discards input for
closed ports loses nothing.

Receive buffers are taken when host input arrives (``pop_receive_buffer``), not
when the driver kicks; host input the guest has no room for waits, and past
:data:`INPUT_LIMIT` bytes the host side is asked to stop reading. Host I/O
goes through ``self.events`` (see :mod:`virtio.devices.console.host`).
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

from virtio.core.device import DEFERRED, RingOptions, VirtioDevice
from virtio.devices.console import wire as W
from virtio.devices.console.host import MemoryHost, PortHost, PortLink
from virtio.errors import SpecViolation
from virtio.queue import Chain, ChainReader, ChainWriter
from virtio.spec.device_ids import DeviceId
from virtio.spec.status import DeviceStatus as S

log = logging.getLogger("virtio.console")

CONSOLE = "Device Types / Console Device"
N_INIT_DEV = f"devicenormative:{CONSOLE} / Device Initialization"
N_OP_DRV = f"drivernormative:{CONSOLE} / Device Operation"
N_MULTI_DEV = f"devicenormative:{CONSOLE} / Device Operation / Multiport Device Operation"
N_MULTI_DRV = f"drivernormative:{CONSOLE} / Device Operation / Multiport Device Operation"

#: Host input held per port before its host side is asked to stop reading.
INPUT_LIMIT = 64 << 10
#: The most ports: their queues (2 * MAX_PORTS + 2) fit a le16 num_queues.
MAX_PORTS = 0x7FFE
#: Control messages waiting for control receive buffers before new ones are dropped.
CONTROL_BACKLOG = 1024


@dataclass
class Port:
    """One port as the device sees it."""

    id: int
    host: PortHost
    name: str | None = None
    console: bool = False
    #: Announced to the driver (DEVICE_ADD sent).
    added: bool = False
    #: The driver set it up (PORT_READY with value 1).
    ready: bool = False
    #: The guest has it open (PORT_OPEN from the driver).
    guest_open: bool = False
    inbound: bytearray = field(default_factory=bytearray)
    #: Receive chains handed to handle_chain (a resubmitted ring), used before popping.
    spare: deque[Chain] = field(default_factory=deque)


class ConsoleDevice(VirtioDevice):
    """Ports on host sides; MULTIPORT with ``max_ports`` > 1, SIZE, EMERG_WRITE."""

    device_id = DeviceId.CONSOLE

    def __init__(
        self,
        hosts: Sequence[PortHost] | None = None,
        *,
        max_ports: int | None = None,
        multiport: bool | None = None,
        names: Sequence[str | None] = (),
        size: tuple[int, int] | None = (80, 24),
        emerg_write: bool = True,
        queue_max_size: int = 256,
        ring: RingOptions | None = None,
    ) -> None:
        hosts = list(hosts) if hosts is not None else [MemoryHost()]
        if not hosts:
            raise ValueError("a console needs at least port 0")
        self.max_ports = max_ports if max_ports is not None else len(hosts)
        # 2 queues a port and 2 control queues: num_queues is a le16 (at most 65535).
        if not 1 <= self.max_ports <= MAX_PORTS or len(hosts) > self.max_ports:
            raise ValueError(f"{len(hosts)} ports with max_ports {self.max_ports}")
        self.multiport = self.max_ports > 1 if multiport is None else multiport
        if not self.multiport and self.max_ports > 1:
            raise ValueError("more than one port needs VIRTIO_CONSOLE_F_MULTIPORT")
        if size is not None and not all(0 <= v <= 0xFFFF for v in size):
            raise ValueError(f"console size {size} outside 0..65535")
        self.size = size
        self.offer_size = size is not None
        self.emerg_write = emerg_write
        self.ports: dict[int, Port] = {}
        for i, host in enumerate(hosts):
            name = names[i] if i < len(names) else None
            self.ports[i] = Port(i, host, name=name, console=i == 0)
        #: Bytes the driver wrote to emerg_wr (also sent to port 0's host side).
        self.emergency = bytearray()
        self.dropped_controls = 0
        self._driver_ready = False
        self._ctrl_out: deque[W.Control] = deque()
        super().__init__(
            num_queues=W.queue_count(self.max_ports, self.multiport),
            queue_max_size=queue_max_size,
            ring=ring,
        )
        for port in self.ports.values():
            self._start_host(port)

    # -- what the device declares -----------------------------------------------------

    def device_features(self) -> int:
        bits = 0
        if self.offer_size:
            bits |= 1 << W.F_SIZE
        if self.multiport:
            bits |= 1 << W.F_MULTIPORT
        if self.emerg_write:
            bits |= 1 << W.F_EMERG_WRITE
        return bits

    def config_size(self) -> int:
        return W.CONFIG_SIZE

    def build_config(self) -> None:
        order = self.byteorder
        cols, rows = self.size or (0, 0)
        c = self.config
        c[W.CFG_COLS : W.CFG_COLS + 2] = cols.to_bytes(2, order)
        c[W.CFG_ROWS : W.CFG_ROWS + 2] = rows.to_bytes(2, order)
        nr = self.max_ports if self.multiport else 0
        c[W.CFG_MAX_NR_PORTS : W.CFG_MAX_NR_PORTS + 4] = nr.to_bytes(4, order)

    def queues_for_features(self, features: int) -> int:
        return W.queue_count(self.max_ports, bool(features >> W.F_MULTIPORT & 1))

    def describe(self) -> str:
        hosts = ", ".join(f"port {p.id}: {p.host.name}" for p in self.ports.values())
        mode = f"multiport, {self.max_ports} ports max" if self.multiport else "single port"
        return f"virtio-console {mode} ({hosts})"

    def close(self) -> None:
        for port in self.ports.values():
            port.host.close()

    # -- config space -------------------------------------------------------------------

    def write_config(self, offset: int, data: bytes) -> None:
        # emerg_wr works at any time, even before the driver negotiated anything.
        low = W.CFG_EMERG_WR + (3 if self.byteorder == "big" else 0)
        end = offset + len(data)
        if self.emerg_write and offset >= W.CFG_EMERG_WR and end <= W.CFG_EMERG_WR + 4:
            # Bytes of emerg_wr without its lower byte carry no character: ignored,
            # and never an error, whatever the device's state.
            if offset <= low < end:
                self._emergency(data[low - offset])
            return
        super().write_config(offset, data)

    def _emergency(self, byte: int) -> None:
        self.emergency.append(byte)
        port = self.ports.get(0)
        if port is not None:
            port.host.write(bytes([byte]))

    def resize(self, cols: int, rows: int) -> None:
        """The console (port 0) has a new size: config fields and, with MULTIPORT, RESIZE."""
        if not (0 <= cols <= 0xFFFF and 0 <= rows <= 0xFFFF):
            raise ValueError(f"console size {cols}x{rows} outside 0..65535")
        self.size = (cols, rows)
        if not self.offer_size:
            return
        order = self.byteorder
        self.update_config(W.CFG_COLS, cols.to_bytes(2, order) + rows.to_bytes(2, order))
        port = self.ports.get(0)
        if self.has(W.F_MULTIPORT) and port is not None and port.ready and port.console:
            self._send(W.resize(0, cols, rows, order))

    # -- ports (hot-plug) -----------------------------------------------------------

    def add_port(self, host: PortHost, *, name: str | None = None, port: int | None = None) -> int:
        """Plug in a port; announced with DEVICE_ADD if the driver is ready. Returns its id."""
        if not self.multiport:
            raise ValueError("adding ports needs VIRTIO_CONSOLE_F_MULTIPORT")
        if port is None:
            port = next((i for i in range(self.max_ports) if i not in self.ports), None)
            if port is None:
                raise ValueError(f"all {self.max_ports} ports are in use")
        # The device MUST NOT add a port that exists, nor one past max_nr_ports.
        if port in self.ports or not 0 <= port < self.max_ports:
            raise ValueError(f"cannot add port {port} ({N_MULTI_DEV})")
        if name is not None:
            W.port_name(port, name)  # checks the length
        p = Port(port, host, name=name)
        self.ports[port] = p
        self._start_host(p)
        if self._driver_ready and self.has(W.F_MULTIPORT):
            self._announce(p)
        return port

    def remove_port(self, port: int) -> PortHost:
        """Unplug a port (DEVICE_REMOVE); returns its host side, still open."""
        p = self.ports.get(port)
        # The device MUST NOT remove a port it has not added.
        if p is None:
            raise ValueError(f"port {port} does not exist ({N_MULTI_DEV})")
        del self.ports[port]
        p.host.link = PortLink()
        p.host.pause_input()
        if p.added and self.has(W.F_MULTIPORT):
            self._send(W.Control(port, W.DEVICE_REMOVE))
        return p.host

    def _start_host(self, port: Port) -> None:
        pid = port.id
        port.host.start(
            self.events,
            PortLink(
                deliver=lambda data: self._host_input(pid, data),
                connected=lambda up: self._host_connected(pid, up),
                resized=lambda cols, rows: self._host_resized(pid, cols, rows),
            ),
        )

    # -- lifecycle -----------------------------------------------------------------------

    def on_driver_ok(self) -> None:
        for port in self.ports.values():
            self._push_input(port)

    def on_reset(self) -> None:
        self._driver_ready = False
        self._ctrl_out.clear()
        for port in self.ports.values():
            port.added = port.ready = port.guest_open = False
            port.spare.clear()

    def quiesce(self, queue_index: int) -> None:
        role = W.port_of_queue(queue_index)
        port = self.ports.get(role[0]) if role is not None and not role[1] else None
        if port is not None and port.spare:
            spare = list(port.spare)
            port.spare.clear()
            self.complete_many(queue_index, [(c, 0) for c in spare])

    # -- host side events ------------------------------------------------------------

    def _host_input(self, pid: int, data: bytes) -> None:
        port = self.ports.get(pid)
        if port is None:
            return
        port.inbound += data
        log.debug("port %d: %d bytes from the host side", pid, len(data))
        if len(port.inbound) >= INPUT_LIMIT:
            port.host.pause_input()
        self._push_input(port)

    def _host_connected(self, pid: int, up: bool) -> None:
        port = self.ports.get(pid)
        if port is not None and port.ready and self.has(W.F_MULTIPORT):
            self._send(W.Control(pid, W.PORT_OPEN, int(up)))

    def _host_resized(self, pid: int, cols: int, rows: int) -> None:
        if pid == 0:
            self.resize(cols, rows)

    # -- queues ---------------------------------------------------------------------------

    def _is_rx(self, index: int) -> bool:
        if index >= self.queue_count:
            return False
        if index == W.CTRL_RX:
            return self.has(W.F_MULTIPORT)
        role = W.port_of_queue(index)
        return role is not None and not role[1]

    def process_queue(self, index: int, *, rearm: bool = True) -> int:
        if self._is_rx(index):
            # Receive buffers are filled when there is something to send.
            if index == W.CTRL_RX:
                return self._flush_control()
            role = W.port_of_queue(index)
            assert role is not None
            port = self.ports.get(role[0])
            return self._push_input(port) if port is not None else 0
        return super().process_queue(index, rearm=rearm)

    def rearm_queue(self, index: int) -> int:
        if self._is_rx(index):
            return self.process_queue(index)
        return super().rearm_queue(index)

    def handle_chain(self, queue_index: int, chain: Chain) -> int | None:
        if queue_index == W.CTRL_TX and self.has(W.F_MULTIPORT):
            return self._control_in(chain)
        role = W.port_of_queue(queue_index)
        if role is None:
            # The control receiveq (a resubmitted ring): nothing to say yet.
            if chain.read_len:
                self.fail("control receiveq buffer has device-readable parts", N_OP_DRV)
                return 0
            return 0
        pid, transmit = role
        if not transmit:
            port = self.ports.get(pid)
            if chain.read_len:
                self.fail(f"receiveq {queue_index} buffer has device-readable parts", N_OP_DRV)
                return 0
            if port is None:
                return 0
            port.spare.append(chain)
            return DEFERRED
        if chain.write_len:
            # The driver MUST NOT put a device-writable buffer in a transmitq.
            self.fail(f"transmitq {queue_index} buffer has device-writable parts", N_OP_DRV)
            return 0
        data = ChainReader(chain).read_all()
        port = self.ports.get(pid)
        if port is None or (self.has(W.F_MULTIPORT) and not port.added):
            log.info("dropping %d bytes sent on port %d, which was not added", len(data), pid)
            return 0
        port.host.write(data)
        return 0

    def _take(self, index: int, port: Port | None) -> Chain | None:
        if port is not None and port.spare:
            return port.spare.popleft()
        # The driver MUST NOT put a device-readable buffer in a receiveq.
        return self.pop_receive_buffer(index, N_OP_DRV)

    def _complete(self, index: int, chain: Chain, written: int) -> None:
        q = self.queues[index]
        if id(chain) in q.deferred:
            self.complete(index, chain, written)
        else:
            self.push_used(index, [(chain, written)])

    def _want_buffers(self, index: int) -> None:
        ring = self.queues[index].ring
        if ring is None:
            return
        try:
            if ring.enable_notifications():
                # Buffers arrived meanwhile: a kick may never come, so look again.
                self.events.call_later(0.0, lambda _now: self._look_again(index))
        except SpecViolation as err:
            self.fail(err.message, err.normative)

    def _look_again(self, index: int) -> None:
        self.process_queue(index)

    def _deliverable(self, port: Port) -> bool:
        if not self.live or not port.inbound:
            return False
        if self.has(W.F_MULTIPORT):
            return port.ready and port.guest_open
        return port.id == 0

    def _push_input(self, port: Port) -> int:
        """Move held host input into the port's receive buffers; returns buffers used."""
        index = W.rx_queue(port.id)
        if not self._deliverable(port) or index >= self.queue_count:
            return 0
        if self.queues[index].ring is None:
            return 0
        used = 0
        while port.inbound:
            chain = self._take(index, port)
            if chain is None:
                if not self.status & S.DEVICE_NEEDS_RESET:
                    self._want_buffers(index)
                break
            n = min(chain.write_len, len(port.inbound))
            written = ChainWriter(chain).write(port.inbound[:n]) if n else 0
            del port.inbound[:written]
            self._complete(index, chain, written)
            used += 1
        if len(port.inbound) < INPUT_LIMIT // 2:
            port.host.resume_input()
        if used:
            log.debug("port %d: %d receive buffers filled", port.id, used)
        return used

    # -- control messages ------------------------------------------------------------

    def _send(self, msg: W.Control) -> None:
        if len(self._ctrl_out) >= CONTROL_BACKLOG:
            self.dropped_controls += 1
            log.warning("control receiveq full: dropping %s", msg.describe())
            return
        log.debug("console -> driver: %s", msg.describe())
        self._ctrl_out.append(msg)
        self._flush_control()

    def _flush_control(self) -> int:
        if not self.live or not self.has(W.F_MULTIPORT) or self.queues[W.CTRL_RX].ring is None:
            return 0
        used = 0
        order = self.byteorder
        while self._ctrl_out:
            chain = self._take(W.CTRL_RX, None)
            if chain is None:
                if not self.status & S.DEVICE_NEEDS_RESET:
                    self._want_buffers(W.CTRL_RX)
                break
            msg = self._ctrl_out.popleft()
            data = W.encode(msg, order)
            written = 0
            if chain.write_len < W.CONTROL_SIZE:
                self.dropped_controls += 1
                log.warning(
                    "control buffer of %d bytes cannot hold %s", chain.write_len, msg.describe()
                )
            else:
                if len(data) > chain.write_len:
                    log.warning("control buffer too small: %s cut short", msg.describe())
                written = ChainWriter(chain).write(data[: chain.write_len])
            self._complete(W.CTRL_RX, chain, written)
            used += 1
        return used

    def _control_in(self, chain: Chain) -> int:
        if chain.write_len:
            self.fail("control transmitq buffer has device-writable parts", N_OP_DRV)
            return 0
        raw = ChainReader(chain).read(min(chain.read_len, W.CONTROL_SIZE + W.MAX_NAME))
        try:
            msg = W.decode(raw, self.byteorder)
        except W.ControlError as err:
            self.fail(f"control transmitq: {err}")
            return 0
        log.debug("driver -> console: %s", msg.describe())
        if msg.event == W.DEVICE_READY:
            self._device_ready(msg.value)
            return 0
        if msg.event not in (W.PORT_READY, W.PORT_OPEN):
            log.info("ignoring %s: not a message a driver sends", msg.describe())
            return 0
        port = self.ports.get(msg.id)
        if port is None or not port.added:
            log.info("ignoring %s: no such port", msg.describe())
            return 0
        if msg.event == W.PORT_READY:
            self._port_ready(port, msg.value)
        else:
            port.guest_open = bool(msg.value)
            self._push_input(port)
        return 0

    def _device_ready(self, value: int) -> None:
        if value != 1:
            log.warning("driver reports DEVICE_READY failure (value %d)", value)
            return
        self._driver_ready = True
        for port in sorted(self.ports.values(), key=lambda p: p.id):
            if not port.added:
                self._announce(port)

    def _announce(self, port: Port) -> None:
        port.added = True
        self._send(W.Control(port.id, W.DEVICE_ADD))

    def _port_ready(self, port: Port, value: int) -> None:
        if value != 1:
            log.warning("driver could not set up port %d", port.id)
            return
        port.ready = True
        order = self.byteorder
        if port.console:
            self._send(W.Control(port.id, W.CONSOLE_PORT, 1))
            if self.size is not None and self.has(W.F_SIZE):
                self._send(W.resize(port.id, *self.size, order))
        if port.name is not None:
            self._send(W.port_name(port.id, port.name))
        if port.host.connected:
            self._send(W.Control(port.id, W.PORT_OPEN, 1))
