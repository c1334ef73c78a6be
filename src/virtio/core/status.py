"""The device status state machine, written once as a transition table.

Every party that holds or drives a device status register uses this table:
the device model (:class:`~virtio.core.device.VirtioDevice`), the vhost-user
back-end session (which drives a device model the way a driver would) and
the vhost-user front-end (which keeps the register, as a VMM does).

The driver moves the status forward one bit at a time, in the order of
"Device Initialization". A phase is what the bits set so far say; each row
says which bit may be set next in that phase, which phase it leads to and
what the device must do. A legacy interface has no FEATURES_OK step: its
rows go from DRIVER straight to DRIVER_OK. Anything else a driver writes
(clearing a bit, skipping a step) is a :class:`StatusViolation` naming the
rule it breaks.

Like h11's state table, this module holds data and pure functions: it
changes nothing, it only says what a status write means.
"""

from __future__ import annotations

import enum
from collections.abc import Iterator
from dataclasses import dataclass

from virtio.spec.status import DeviceStatus as S

N_STATUS_DRV = "drivernormative:Basic Facilities of a Virtio Device / Device Status Field"
N_INIT_DRV = "drivernormative:General Initialization And Device Operation / Device Initialization"


class Interface(enum.Enum):
    """Which interface the driver uses: modern (VIRTIO 1.x) or legacy (0.9.5)."""

    MODERN = "modern"
    LEGACY = "legacy"


class Phase(enum.Enum):
    RESET = "reset"
    ACKNOWLEDGE = "acknowledge"
    DRIVER = "driver"
    FEATURES_OK = "features-ok"
    LIVE = "live"
    SUSPENDED = "suspended"


class Action(enum.Enum):
    """What the device does when a bit is set."""

    NONE = "none"
    #: Check the driver's features; refusing leaves FEATURES_OK clear.
    NEGOTIATE = "negotiate"
    #: Start the enabled queues: the device is live.
    GO_LIVE = "go-live"
    #: Stop consuming buffers (VIRTIO_F_SUSPEND); ignored before the device is live.
    SUSPEND = "suspend"
    #: The driver gave up on the device.
    FAIL = "fail"


# (phase, bit the driver sets) -> (next phase, action). Bits are set in this order.
_INIT_ORDER = (S.ACKNOWLEDGE, S.DRIVER, S.FEATURES_OK, S.DRIVER_OK, S.SUSPEND)

TRANSITIONS: dict[Interface, dict[tuple[Phase, S], tuple[Phase, Action]]] = {
    Interface.MODERN: {
        (Phase.RESET, S.ACKNOWLEDGE): (Phase.ACKNOWLEDGE, Action.NONE),
        (Phase.ACKNOWLEDGE, S.DRIVER): (Phase.DRIVER, Action.NONE),
        (Phase.DRIVER, S.FEATURES_OK): (Phase.FEATURES_OK, Action.NEGOTIATE),
        (Phase.FEATURES_OK, S.DRIVER_OK): (Phase.LIVE, Action.GO_LIVE),
        (Phase.LIVE, S.SUSPEND): (Phase.SUSPENDED, Action.SUSPEND),
    },
    Interface.LEGACY: {
        (Phase.RESET, S.ACKNOWLEDGE): (Phase.ACKNOWLEDGE, Action.NONE),
        (Phase.ACKNOWLEDGE, S.DRIVER): (Phase.DRIVER, Action.NONE),
        # Legacy devices take the features as they are written: no FEATURES_OK step.
        (Phase.DRIVER, S.DRIVER_OK): (Phase.LIVE, Action.GO_LIVE),
    },
}

# The phase a driver needs before it may set each bit (for error messages).
_NEEDS = {
    Interface.MODERN: {
        S.DRIVER: S.ACKNOWLEDGE,
        S.FEATURES_OK: S.DRIVER,
        S.DRIVER_OK: S.FEATURES_OK,
    },
    Interface.LEGACY: {S.DRIVER: S.ACKNOWLEDGE, S.DRIVER_OK: S.DRIVER},
}

#: Bits only the device sets; a driver's write of them is ignored.
DEVICE_OWNED = int(S.DEVICE_NEEDS_RESET)
# Plain ints: IntFlag arithmetic costs a microsecond, and is_live() runs per batch.
_LIVE_MASK = int(S.DRIVER_OK | S.SUSPEND | S.DEVICE_NEEDS_RESET | S.FAILED)
_DRIVER_OK = int(S.DRIVER_OK)


class StatusViolation(Exception):
    """The driver's status write breaks the status rules."""

    def __init__(self, reason: str, normative: str) -> None:
        super().__init__(reason)
        self.reason = reason
        self.normative = normative


def phase_of(status: int) -> Phase:
    """The phase the driver-written bits of ``status`` describe."""
    if status & S.SUSPEND and not status & S.DRIVER_OK:
        return Phase.SUSPENDED
    if status & S.DRIVER_OK:
        return Phase.LIVE
    if status & S.FEATURES_OK:
        return Phase.FEATURES_OK
    if status & S.DRIVER:
        return Phase.DRIVER
    if status & S.ACKNOWLEDGE:
        return Phase.ACKNOWLEDGE
    return Phase.RESET


@dataclass(frozen=True)
class Step:
    """One bit a status write sets, with what the device must do for it."""

    bit: S
    phase: Phase  # the phase once the bit is set
    action: Action


@dataclass(frozen=True)
class Write:
    """What one driver write of the status means."""

    reset: bool = False  # the driver wrote 0
    resume: bool = False  # SUSPEND cleared with DRIVER_OK set again
    steps: tuple[Step, ...] = ()
    #: The write sets nothing new (a repeat, or bits the device ignores).
    idle: bool = False


def interpret(interface: Interface, old: int, value: int) -> Write:
    """What writing ``value`` over status ``old`` means; raises StatusViolation."""
    value &= 0xFF
    if value == 0:
        return Write(reset=True)
    written = value & ~DEVICE_OWNED
    current = old & ~DEVICE_OWNED
    phase = phase_of(current)
    cleared = current & ~written
    if phase is Phase.SUSPENDED and written & S.DRIVER_OK:
        # Resuming: DRIVER_OK again, and SUSPEND may (is expected to) be cleared.
        if cleared & ~S.SUSPEND:
            raise StatusViolation(
                f"driver cleared status bits {S(cleared & ~S.SUSPEND)!r} when resuming",
                N_STATUS_DRV,
            )
        failed = (Step(S.FAILED, Phase.SUSPENDED, Action.FAIL),) if written & S.FAILED else ()
        return Write(resume=True, steps=failed)
    if cleared:
        raise StatusViolation(f"driver cleared status bits {S(cleared)!r}", N_STATUS_DRV)
    added = written & ~current
    steps: list[Step] = []
    table = TRANSITIONS[interface]
    for bit in _INIT_ORDER:
        if not added & bit:
            continue
        row = table.get((phase, bit))
        if row is None:
            if bit is S.SUSPEND:
                # Operations on SUSPEND before the device is live are ignored.
                continue
            if bit is S.FEATURES_OK and interface is Interface.LEGACY:
                continue  # a legacy device has no such step; the bit means nothing
            needed = _NEEDS[interface].get(bit)
            if needed is not None:
                raise StatusViolation(f"driver set {bit.name} before {needed.name}", N_INIT_DRV)
            raise StatusViolation(f"driver set {bit.name} in phase {phase.value}", N_INIT_DRV)
        phase, action = row
        steps.append(Step(bit, phase, action))
    if added & S.FAILED:
        steps.append(Step(S.FAILED, phase, Action.FAIL))
    return Write(steps=tuple(steps), idle=not steps)


def path(interface: Interface, target: Phase) -> Iterator[int]:
    """The status values a driver writes, in order, to bring a reset device to ``target``."""
    table = TRANSITIONS[interface]
    phase, status = Phase.RESET, 0
    while phase is not target:
        for (start, bit), (nxt, _action) in table.items():
            if start is phase:
                status |= bit
                phase = nxt
                yield status
                break
        else:
            raise ValueError(f"{target.value} cannot be reached on the {interface.value} interface")


def is_live(status: int) -> bool:
    """DRIVER_OK set and not suspended, failed or waiting for a reset."""
    return status & _LIVE_MASK == _DRIVER_OK
