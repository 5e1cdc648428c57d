"""Throttling key guesses per client address: the console's sign-ins and bearer keys."""

from __future__ import annotations

import time
from collections import OrderedDict, deque
from collections.abc import Callable

from gateway.address_groups import address_group

MAX_TRACKED_CLIENTS = 10_000  # addresses a throttle remembers at once (bounded memory under a flood)


class FailureThrottle:
    """At most ``max_failures`` failed attempts per client address in a sliding ``window``;
    beyond that every attempt is refused (even with the right key) until old failures age out.
    An IPv6 address counts as its /64 network (``gateway.address_groups``)."""

    def __init__(self, max_failures: int, window_seconds: float = 60.0, clock: Callable[[], float] = time.monotonic):
        self.max_failures = max_failures
        self.window = window_seconds
        self.clock = clock
        self._failures: OrderedDict[str, deque[float]] = OrderedDict()

    def retry_after(self, client: str) -> float | None:
        """Seconds until ``client`` may try again, or None when it may try now."""
        failures = self._recent(client)
        if len(failures) < self.max_failures:
            return None
        return max(0.0, failures[0] + self.window - self.clock())

    def failures(self, client: str) -> int:
        """Failures of ``client`` within the window."""
        return len(self._recent(client))

    def failed(self, client: str) -> None:
        client = address_group(client)
        failures = self._recent(client)
        failures.append(self.clock())
        self._failures[client] = failures
        self._failures.move_to_end(client)
        while len(self._failures) > MAX_TRACKED_CLIENTS:
            self._failures.popitem(last=False)

    def succeeded(self, client: str) -> None:
        self._failures.pop(address_group(client), None)

    def _recent(self, client: str) -> deque[float]:
        failures = self._failures.get(address_group(client), deque())
        cutoff = self.clock() - self.window
        while failures and failures[0] <= cutoff:
            failures.popleft()
        return failures
