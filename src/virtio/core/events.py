"""Host event sources: what a device model asks its host to wait for.

A device that completes requests later (a network backend's socket, a
worker thread's completion eventfd, a rate limiter's timer) cannot block and
cannot read a clock: it is sans-IO. It records here which file descriptors it
wants watched and which timers it wants, and its host (the vhost-user
server's epoll loop, the loopback transport's wait) serves them, passing the
current time in. The core never reads a clock: a deadline is either given
(computed from a ``now`` the device was handed) or a delay that the host
turns into a deadline with its own clock the next time it looks.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable, Mapping

#: Called with the host's current time (seconds on its monotonic clock).
Callback = Callable[[float], None]


class Timer:
    """A one-shot timer a device asked for; cancel it with :meth:`EventSources.cancel`."""

    __slots__ = ("callback", "cancelled", "deadline", "delay", "seq")

    def __init__(
        self, seq: int, callback: Callback, deadline: float | None, delay: float | None
    ) -> None:
        self.seq = seq
        self.callback = callback
        self.deadline = deadline
        self.delay = delay
        self.cancelled = False

    def __lt__(self, other: Timer) -> bool:
        # Only armed timers (with a deadline) are ever compared, in the heap.
        assert self.deadline is not None and other.deadline is not None
        return (self.deadline, self.seq) < (other.deadline, other.seq)


class EventSources:
    """File descriptors to watch and timers to fire, as a device asked for them."""

    def __init__(self) -> None:
        self._fds: dict[int, Callback] = {}
        self._heap: list[Timer] = []
        self._unarmed: list[Timer] = []
        self._seq = itertools.count()
        self._listeners: list[Callable[[], None]] = []

    # -- the device's side ------------------------------------------------------

    def watch(self, fd: int, callback: Callback) -> None:
        """Call ``callback(now)`` whenever ``fd`` is readable."""
        self._fds[fd] = callback
        self._changed()

    def unwatch(self, fd: int) -> None:
        if self._fds.pop(fd, None) is not None:
            self._changed()

    def call_at(self, deadline: float, callback: Callback) -> Timer:
        """Call ``callback(now)`` once the host's clock reaches ``deadline``."""
        timer = Timer(next(self._seq), callback, deadline, None)
        heapq.heappush(self._heap, timer)
        self._changed()
        return timer

    def call_later(self, delay: float, callback: Callback) -> Timer:
        """Call ``callback(now)`` ``delay`` seconds after the host next looks."""
        timer = Timer(next(self._seq), callback, None, delay)
        self._unarmed.append(timer)
        self._changed()
        return timer

    def cancel(self, timer: Timer) -> None:
        timer.cancelled = True

    def clear(self) -> None:
        """Forget every watch and timer (the device was reset or closed)."""
        for timer in self._heap + self._unarmed:
            timer.cancelled = True
        self._fds.clear()
        self._heap.clear()
        self._unarmed.clear()
        self._changed()

    # -- the host's side ----------------------------------------------------------------

    @property
    def fds(self) -> Mapping[int, Callback]:
        return self._fds

    def add_listener(self, listener: Callable[[], None]) -> None:
        """``listener()`` runs whenever the watched fds or the timers change."""
        self._listeners.append(listener)

    def remove_listener(self, listener: Callable[[], None]) -> None:
        if listener in self._listeners:
            self._listeners.remove(listener)

    def next_deadline(self, now: float) -> float | None:
        """The earliest deadline; delays asked for since the last look start at ``now``."""
        for timer in self._unarmed:
            if not timer.cancelled:
                assert timer.delay is not None
                timer.deadline = now + timer.delay
                heapq.heappush(self._heap, timer)
        self._unarmed.clear()
        heap = self._heap
        while heap and heap[0].cancelled:
            heapq.heappop(heap)
        return heap[0].deadline if heap else None

    def run_due(self, now: float) -> int:
        """Fire every timer due at ``now``; returns how many fired."""
        self.next_deadline(now)
        fired = 0
        heap = self._heap
        while heap and (heap[0].cancelled or (heap[0].deadline or 0.0) <= now):
            timer = heapq.heappop(heap)
            if timer.cancelled:
                continue
            timer.cancelled = True
            fired += 1
            timer.callback(now)
        return fired

    def fd_ready(self, fd: int, now: float) -> None:
        callback = self._fds.get(fd)
        if callback is not None:
            callback(now)

    def _changed(self) -> None:
        for listener in list(self._listeners):
            listener()
