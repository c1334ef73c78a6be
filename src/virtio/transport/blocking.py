"""Blocking waits for driver transports: the clock lives here, not in the driver core."""

from __future__ import annotations

import contextlib
import errno
import os
import select
import time
from collections.abc import Callable, Sequence
from typing import Any

from virtio.core.events import EventSources


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


def serve_events(
    events: EventSources,
    timeout: float | None,
    *,
    wake_fds: Sequence[int] = (),
    lock: Any = None,
) -> bool:
    """Wait up to ``timeout`` for a device's fds and timers, and serve what is due.

    ``wake_fds`` are eventfds that end the wait early (they are drained, not
    served); ``lock`` (an RLock or None) is held while the device runs.
    Returns whether anything of the device's was served.
    """
    guard = lock if lock is not None else contextlib.nullcontext()
    now = time.monotonic()
    with guard:
        deadline = events.next_deadline(now)
        fds = list(events.fds)
    wait = timeout
    if deadline is not None:
        until = max(0.0, deadline - now)
        wait = until if wait is None else min(wait, until)
    watched = [*fds, *wake_fds]
    if not watched:
        if wait is None:
            return False
        time.sleep(wait)
        ready: list[int] = []
    else:
        try:
            ready = select.select(watched, [], [], wait)[0]
        except OSError as err:
            if err.errno != errno.EBADF:
                raise
            # A watched fd was closed meanwhile (the driver's thread reset the
            # device): the caller looks again with the fds as they are now.
            return False
    now = time.monotonic()
    served = False
    with guard:
        for fd in ready:
            if fd in wake_fds:
                with contextlib.suppress(BlockingIOError):
                    os.eventfd_read(fd)
                continue
            events.fd_ready(fd, now)
            served = True
        served = events.run_due(now) > 0 or served
    return served
