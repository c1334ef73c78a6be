"""Worker threads for device models whose backends block (files, block devices).

A device model stays single-threaded: it hands a blocking job (an
``os.preadv`` into guest buffers, say) to :class:`IoThreads` and returns
DEFERRED for the chain. Workers run the jobs, the GIL released inside the
system calls; each result is queued and an eventfd is written. The device
model asked its host to watch that eventfd (``device.events``), so the host's
loop calls back into the device model's thread, which completes the chains
in one batch. Only the jobs touch the workers; device state never does.
"""

from __future__ import annotations

import contextlib
import os
import queue
import select
import threading
import time
from collections.abc import Callable
from typing import Generic, TypeVar

from virtio.core.events import EventSources

T = TypeVar("T")
Job = Callable[[], object]


class IoThreads(Generic[T]):
    """A pool of threads running blocking jobs; results come back through ``on_done``.

    ``on_done(results)`` runs in the host's thread with ``(token, result)``
    pairs, where a job that raised gives its exception as the result.
    """

    def __init__(
        self,
        events: EventSources,
        count: int,
        on_done: Callable[[list[tuple[T, object]]], None],
        *,
        name: str = "virtio-io",
    ) -> None:
        if count < 1:
            raise ValueError("an I/O pool needs at least one thread")
        self.events = events
        self.count = count
        self.on_done = on_done
        self.name = name
        self._jobs: queue.SimpleQueue[tuple[T, Job] | None] = queue.SimpleQueue()
        self._done: queue.SimpleQueue[tuple[T, object]] = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []
        self._efd = -1
        # Only the host's thread counts (submit and deliver): no lock needed.
        self._outstanding = 0

    @property
    def outstanding(self) -> int:
        """Jobs submitted whose results were not delivered yet."""
        return self._outstanding

    def submit(self, token: T, job: Job) -> None:
        if not self._threads:
            self._start()
        self._outstanding += 1
        self._jobs.put((token, job))

    def _start(self) -> None:
        self._efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.events.watch(self._efd, self._ready)
        for i in range(self.count):
            thread = threading.Thread(target=self._work, name=f"{self.name}-{i}", daemon=True)
            thread.start()
            self._threads.append(thread)

    def _work(self) -> None:
        while True:
            item = self._jobs.get()
            if item is None:
                return
            token, job = item
            try:
                result: object = job()
            except Exception as err:  # handed to the device model, which answers an error
                result = err
            self._done.put((token, result))
            with contextlib.suppress(OSError):
                os.eventfd_write(self._efd, 1)

    def _ready(self, _now: float) -> None:
        with contextlib.suppress(BlockingIOError):
            os.eventfd_read(self._efd)
        self.deliver()

    def deliver(self) -> None:
        """Hand every finished job's result to ``on_done`` (in the caller's thread)."""
        results: list[tuple[T, object]] = []
        while True:
            try:
                results.append(self._done.get_nowait())
            except queue.Empty:
                break
        if not results:
            return
        self._outstanding -= len(results)
        self.on_done(results)

    def drain(self, timeout: float = 60.0) -> None:
        """Wait for every submitted job, then deliver their results."""
        deadline = time.monotonic() + timeout
        while self._outstanding:
            if self._done.empty():
                remaining = deadline - time.monotonic()
                ready = select.select([self._efd], [], [], max(0.0, remaining))[0]
                if not ready and self._done.empty():
                    raise TimeoutError(f"{self.name}: I/O did not finish in {timeout}s")
                with contextlib.suppress(BlockingIOError):
                    os.eventfd_read(self._efd)
            self.deliver()

    def close(self) -> None:
        """Stop the threads (after draining what they are doing)."""
        if not self._threads:
            return
        with contextlib.suppress(TimeoutError):
            self.drain()
        for _ in self._threads:
            self._jobs.put(None)
        for thread in self._threads:
            thread.join(timeout=5)
        self._threads = []
        self.events.unwatch(self._efd)
        os.close(self._efd)
        self._efd = -1
