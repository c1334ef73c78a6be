"""Blocking waits for driver transports: the clock lives here, not in the driver core."""

from __future__ import annotations

import time
from collections.abc import Callable


def wait_until(
    predicate: Callable[[], bool],
    timeout: float,
    wait_interrupt: Callable[[float | None], bool],
    *,
    step: float = 0.5,
) -> bool:
    """Wait (on the transport's interrupts) until ``predicate()``; False on timeout.

    ``wait_interrupt(t)`` blocks for at most ``t`` seconds or until the
    device signals something; the predicate is checked after each wake-up and
    once more at the deadline.
    """
    if predicate():
        return True
    deadline = time.monotonic() + timeout
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return predicate()
        wait_interrupt(min(remaining, step))
        if predicate():
            return True
