"""The console driver: ports to write to and read from, and the control protocol.

    driver = ConsoleDriver(transport); driver.initialize()
    driver.write(b"hello\\n")                 # port 0
    driver.read(port=1, timeout=5.0)          # what the host side sent to port 1

With VIRTIO_CONSOLE_F_MULTIPORT the driver sends DEVICE_READY after
DRIVER_OK, answers each DEVICE_ADD with PORT_READY (0 for a port it cannot
have), each CONSOLE_PORT with PORT_OPEN 1, and keeps what PORT_NAME,
PORT_OPEN and RESIZE tell it. Control messages are handled whenever the
driver waits (:meth:`ConsoleDriver.pump`).

The driver does not trust the device: a control message it cannot decode,
for a port that does not exist or out of range is logged, counted in
``bad_controls`` and otherwise ignored; a used length past the buffer
counts only the bytes the buffer has.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

from virtio.core.driver import DriverTransport, Request, VirtioDriver
from virtio.devices.console import wire as W
from virtio.errors import NegotiationError
from virtio.spec.device_ids import DeviceId

log = logging.getLogger("virtio.console.driver")

#: Receive buffers kept posted per port (and on the control receiveq), and their size.
RX_BUFFERS = 4
RX_SIZE = 4096
CTRL_SIZE = W.CONTROL_SIZE + W.MAX_NAME + 1


@dataclass
class DriverPort:
    """A port as the driver knows it."""

    id: int
    name: str | None = None
    console: bool = False
    host_open: bool = False
    guest_open: bool = False
    size: tuple[int, int] | None = None
    received: bytearray = field(default_factory=bytearray)
    #: Whether its receive buffers are posted.
    posted: bool = False


class ConsoleDriver(VirtioDriver):
    device_id = DeviceId.CONSOLE

    def __init__(
        self,
        transport: DriverTransport,
        *,
        features: int | None = None,
        queue_size: int | None = None,
        avoid_features: int = 0,
    ) -> None:
        super().__init__(
            transport, features=features, queue_size=queue_size, avoid_features=avoid_features
        )
        self.max_ports = 1
        self.ports: dict[int, DriverPort] = {}
        #: Ports the device removed: what they received stays readable here.
        self.removed: dict[int, DriverPort] = {}
        #: The console size from the config space (VIRTIO_CONSOLE_F_SIZE).
        self.size: tuple[int, int] | None = None
        self.bad_controls = 0
        self.controls_seen: list[W.Control] = []

    def supported_features(self) -> int:
        return 1 << W.F_SIZE | 1 << W.F_MULTIPORT | 1 << W.F_EMERG_WRITE

    @property
    def multiport(self) -> bool:
        return self.has(W.F_MULTIPORT)

    def queues_wanted(self) -> int:
        if not self.multiport:
            self.max_ports = 1
            return 2
        raw = self.read_config(W.CFG_MAX_NR_PORTS, 4)
        nr = int.from_bytes(raw, self.byteorder)
        limit = (self.transport.num_queues() - 2) // 2
        if not 1 <= nr <= min(limit, 0x7FFF):
            raise NegotiationError(
                f"max_nr_ports {nr} does not fit the device's {self.transport.num_queues()} queues"
            )
        self.max_ports = nr
        return W.queue_count(nr, True)

    def setup(self) -> None:
        self._read_size()

    def initialize(self) -> None:
        super().initialize()
        self.ports = {}
        self.removed = {}
        if not self.multiport:
            port = DriverPort(0, console=True, host_open=True, guest_open=True)
            self.ports[0] = port
            self._post_port(port)
            return
        self._post(W.CTRL_RX, CTRL_SIZE)
        # The driver MUST send DEVICE_READY once MULTIPORT is negotiated.
        self.send_control(W.Control(0, W.DEVICE_READY, 1))
        self.pump()

    # -- receive buffers ---------------------------------------------------------------------

    def _post(self, queue: int, size: int, count: int = RX_BUFFERS) -> None:
        for _ in range(count):
            self.submit(queue, [], [size])
        self.kick(queue)

    def _post_port(self, port: DriverPort) -> None:
        if not port.posted:
            port.posted = True
            self._post(W.rx_queue(port.id), RX_SIZE)

    def _rx_queues(self) -> list[int]:
        queues = [W.rx_queue(p.id) for p in self.ports.values() if p.posted]
        if self.multiport:
            queues.append(W.CTRL_RX)
        return queues

    def pump(self) -> int:
        """Take what the device sent (data and control messages); returns how many buffers."""
        self._check_usable()
        handled = 0
        while True:
            progress = 0
            if self.multiport:
                for request in self.harvest(W.CTRL_RX):
                    data = self.read_in(request)
                    self._recycle(request, CTRL_SIZE)
                    self._control(data)
                    progress += 1
            for port in list(self.ports.values()) + list(self.removed.values()):
                if not port.posted:
                    continue
                for request in self.harvest(W.rx_queue(port.id)):
                    port.received += self.read_in(request)
                    live = port.id in self.ports
                    self._recycle(request, RX_SIZE if live else 0)
                    progress += 1
            if not progress:
                return handled
            handled += progress

    def _recycle(self, request: Request, size: int) -> None:
        queue = request.queue
        self.release(request)
        if size:
            self.submit(queue, [], [size])
            self.kick(queue)

    def wait_for(self, predicate: Callable[[], bool], timeout: float = 10.0) -> bool:
        """Handle what the device sends until ``predicate()``; False on timeout."""

        def check() -> bool:
            self.pump()
            if predicate():
                return True
            for index in self._rx_queues():
                self.queues[index].enable_interrupts()
            self.pump()
            return predicate()

        return self.transport.wait_until(check, timeout)

    # -- control messages -----------------------------------------------------------------

    def send_control(self, msg: W.Control, timeout: float = 10.0) -> None:
        self.call(W.CTRL_TX, [W.encode(msg, self.byteorder)], [], timeout)

    def _control(self, data: bytes) -> None:
        try:
            msg = W.decode(data, self.byteorder)
        except W.ControlError as err:
            self._bad(f"{err}")
            return
        self.controls_seen.append(msg)
        event, pid = msg.event, msg.id
        if event == W.DEVICE_ADD:
            if not 0 <= pid < self.max_ports:
                self._bad(f"DEVICE_ADD of port {pid}, max_nr_ports is {self.max_ports}")
                self.send_control(W.Control(pid, W.PORT_READY, 0))
                return
            if pid in self.ports:
                self._bad(f"DEVICE_ADD of port {pid}, which exists")
                return
            port = self.removed.pop(pid, None) or DriverPort(pid)
            port.name = None
            port.console = port.host_open = port.guest_open = False
            self.ports[pid] = port
            self._post_port(port)
            self.send_control(W.Control(pid, W.PORT_READY, 1))
            return
        known = self.ports.get(pid)
        if known is None or event not in W.DEVICE_EVENTS:
            self._bad(f"{msg.describe()}: no such port or not a device message")
            return
        port = known
        if event == W.DEVICE_REMOVE:
            self.removed[pid] = self.ports.pop(pid)
        elif event == W.CONSOLE_PORT:
            port.console = True
            port.guest_open = True
            # A console port MUST be answered with PORT_OPEN, value 1.
            self.send_control(W.Control(pid, W.PORT_OPEN, 1))
        elif event == W.RESIZE:
            try:
                port.size = W.decode_resize(msg, self.byteorder)
            except W.ControlError as err:
                self._bad(str(err))
        elif event == W.PORT_OPEN:
            port.host_open = bool(msg.value)
        elif event == W.PORT_NAME:
            # The spec says no NUL terminator; QEMU 7.2 sends one: the name ends at a NUL.
            raw = msg.extra[: W.MAX_NAME].split(b"\0", 1)[0]
            port.name = raw.decode("utf-8", "replace")

    def _bad(self, reason: str) -> None:
        self.bad_controls += 1
        log.warning("ignoring a control message: %s", reason)

    # -- configuration -------------------------------------------------------------------

    def _read_size(self) -> None:
        if self.has(W.F_SIZE):
            raw = self.read_config(W.CFG_COLS, 4)
            order = self.byteorder
            self.size = (int.from_bytes(raw[:2], order), int.from_bytes(raw[2:], order))

    def on_config_change(self) -> None:
        self._read_size()

    def emergency_write(self, data: bytes) -> None:
        """Write bytes through emerg_wr, one config write each (VIRTIO_CONSOLE_F_EMERG_WRITE)."""
        if not self.device_features >> W.F_EMERG_WRITE & 1:
            raise NegotiationError("device does not offer VIRTIO_CONSOLE_F_EMERG_WRITE")
        for byte in data:
            self.transport.write_config(W.CFG_EMERG_WR, byte.to_bytes(4, self.byteorder))

    # -- ports ------------------------------------------------------------------------------

    def port(self, pid: int) -> DriverPort:
        port = self.ports.get(pid)
        if port is None:
            raise KeyError(f"port {pid} does not exist (ports: {sorted(self.ports)})")
        return port

    def open_port(self, pid: int, opened: bool = True) -> None:
        """Tell the device the guest opened (or closed) a port: PORT_OPEN."""
        port = self.port(pid)
        if self.multiport:
            self.send_control(W.Control(pid, W.PORT_OPEN, int(opened)))
        port.guest_open = opened

    def write(self, data: bytes, port: int = 0, timeout: float = 10.0) -> None:
        """Send bytes on a port's transmitq (its used length is not looked at)."""
        self.port(port)
        for start in range(0, max(len(data), 1), RX_SIZE):
            self.call(W.tx_queue(port), [data[start : start + RX_SIZE]], [], timeout)

    def read(self, port: int = 0, timeout: float = 10.0) -> bytes:
        """What the port received so far, waiting up to ``timeout`` for at least a byte."""
        target = self.ports.get(port) or self.removed.get(port) or self.port(port)
        self.wait_for(lambda: bool(target.received), timeout)
        data = bytes(target.received)
        target.received.clear()
        return data

    def read_until(self, marker: bytes, port: int = 0, timeout: float = 10.0) -> bytes:
        """Everything received on a port up to and including ``marker``."""
        target = self.port(port)
        if not self.wait_for(lambda: marker in target.received, timeout):
            raise TimeoutError(f"{marker!r} not received on port {port} in {timeout}s")
        end = target.received.index(marker) + len(marker)
        data = bytes(target.received[:end])
        del target.received[:end]
        return data
