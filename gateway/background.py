"""Work the engine thread runs between serving steps (training micro-steps), serving first.

With no serving work the background runs back to back. While requests wait or run it gets at
most ``duty_cycle`` of the engine's wall time: every serving step earns it
``step_seconds * duty_cycle / (1 - duty_cycle)`` seconds of credit, each unit of background work
spends what it took, and work runs only while the credit is positive. So the background takes at
most that share of the time, and most requests never wait for a unit at all.

"No serving work" means none for ``IDLE_GRACE_SECONDS``: a client that sends its next request
right after the previous answer must not find a training micro-step (seconds long on a CPU)
started in the gap. During the grace period the engine thread waits on its condition (a new
request wakes it) instead of spinning.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

log = logging.getLogger(__name__)
MAX_CREDIT_SECONDS = 1.0  # bounds a burst of background work after a long serving stretch
IDLE_GRACE_SECONDS = 1.0  # quiet time after the last serving step before full-speed background work
GRACE_POLL_SECONDS = 0.02  # bounds the wait in the grace period (a wake-up between check and wait)


class BackgroundWork:
    def __init__(self, work: Callable[[], bool], duty_cycle: float, idle_grace: float = IDLE_GRACE_SECONDS):
        """``work()`` does one unit (one micro-step) and returns True while it has more to do."""
        if not 0 < duty_cycle < 1:
            raise ValueError(f"duty_cycle must be in (0, 1), got {duty_cycle}")
        self.work = work
        self.duty_cycle = duty_cycle
        self.idle_grace = idle_grace
        self.wanted = False  # read by the engine's wait condition (under its lock)
        self.credit = 0.0
        self.seconds = 0.0  # total background time, for metrics and tests
        self._wakeups = 0  # so a wake during a unit that found nothing to do is not lost
        self._last_serving = float("-inf")  # perf_counter() of the last serving step
        self._cv = threading.Condition()

    def attach(self, cv: threading.Condition) -> None:
        """Share the engine's condition, so ``wake`` wakes its loop."""
        self._cv = cv

    def wake(self) -> None:
        """Called from any thread when there is work (a job was queued)."""
        with self._cv:
            self.wanted = True
            self._wakeups += 1
            self._cv.notify_all()

    def after_step(self, serving: bool, step_seconds: float) -> None:
        """Engine thread, after each serving step: run one unit of work if the budget allows."""
        now = time.perf_counter()
        if serving:  # also while nothing is wanted: a job queued right after a request gets the grace
            self._last_serving = now
        if not self.wanted:
            return
        if not serving and now - self._last_serving < self.idle_grace and self.credit <= 0:
            with self._cv:  # a request may follow at once: wait for it rather than start a unit
                self._cv.wait(GRACE_POLL_SECONDS)
            return
        if serving:
            ratio = self.duty_cycle / (1 - self.duty_cycle)
            self.credit = min(self.credit + step_seconds * ratio, MAX_CREDIT_SECONDS)
            if self.credit <= 0:
                return
        wakeups = self._wakeups
        started = time.perf_counter()
        try:
            more = self.work()
        except Exception:  # the work reports its own failures; this keeps the engine alive regardless
            log.exception("background work failed")
            more = False
        spent = time.perf_counter() - started
        self.seconds += spent
        idle = not serving and now - self._last_serving >= self.idle_grace
        self.credit = 0.0 if idle else self.credit - spent
        if not more:
            with self._cv:
                if self._wakeups == wakeups:
                    self.wanted = False
