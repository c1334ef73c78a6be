"""What the I/O adapters (vhost-user, QEMU's proxy) share: ring polling and failure logs."""

from __future__ import annotations

import logging

from virtio.errors import VirtioError, one_line

log = logging.getLogger("virtio.host")


class AdaptivePolling:
    """When to poll the rings instead of sleeping until a kick (as QEMU's poll-max-ns).

    After serving a kick the loop keeps polling the rings, kicks off, for up to
    ``window`` seconds; work found keeps it polling. The window adapts to the
    driver: if the next kick after giving up came within ``max_window`` (polling
    a little longer would have caught it), the window doubles; if it came later
    (the poll was wasted), it halves, down to 0 (no polling). A guest that sends
    requests milliseconds apart is never polled for; a driver waiting on its
    requests microseconds apart is polled for, and spared its kicks and our wake-up.
    """

    def __init__(self, max_window: float) -> None:
        self.max_window = max(0.0, max_window)
        self.window = self.max_window / 4
        self.active = False
        self._last_work = 0.0
        self._gave_up: float | None = None

    def kicked(self, now: float) -> None:
        if self._gave_up is not None and self.max_window:
            idle = now - self._gave_up
            if idle < self.max_window:
                self.window = min(self.max_window, max(2 * self.window, 2e-6))
            else:
                self.window = self.window / 2 if self.window > 2e-6 else 0.0
            self._gave_up = None

    def step(self, now: float, served: int) -> bool:
        """After a poll that served ``served`` chains: True to keep polling."""
        if served:
            self._last_work = now
            self.active = self.window > 0
            return self.active
        if self.active and now - self._last_work < self.window:
            return True
        self.active = False
        self._gave_up = now
        return False


def log_failure(what: str, err: Exception, name: str = "", *, logger: logging.Logger = log) -> None:
    """One error line, ``what: reason``; the full traceback of the cause at debug level.

    A reason that begins with the message's ``name`` (as the session's do) is not
    made to repeat it.
    """
    reason = one_line(err)
    if name and reason.startswith(f"{name}: "):
        reason = reason[len(name) + 2 :]
    logger.error("%s: %s", what, reason)
    cause = err.__cause__ if isinstance(err, VirtioError) else err
    if cause is not None:
        logger.debug("the cause, in full:", exc_info=cause)
