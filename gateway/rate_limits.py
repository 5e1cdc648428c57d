"""Per-key limits, as pure code: concurrent requests, requests per minute, tokens per minute.

No FastAPI, no torch, no wall clock of its own: every time is read from an injected ``clock``
(monotonic seconds), so the table tests drive time by hand.

Requests and tokens per minute are token buckets: a bucket holds at most one minute's allowance
and refills continuously at that allowance per minute, so a key may burst up to its limit and is
then held to the rate. A request's tokens are not known until it ends, so admission *reserves*
the most it can use (prompt tokens + every choice's ``max_tokens``) and ``settle`` gives back what
it did not use (LiteLLM and OpenAI also count ``max_tokens`` against the limit up front).
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

Clock = Callable[[], float]
MINUTE = 60.0
CONCURRENCY_RETRY_SECONDS = 1.0  # nothing says when a running request ends: ask to retry soon


@dataclass(frozen=True)
class KeyLimits:
    """A key's limits; None: no limit of that kind."""

    max_concurrent: int | None = None
    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None


@dataclass(frozen=True)
class Refusal:
    """Why a request was refused, and when trying again can succeed (``inf``: never as it is)."""

    limit: str  # "concurrency", "requests", "tokens"
    message: str
    retry_after: float

    @property
    def retry_after_header(self) -> str | None:
        """Whole seconds, rounded up (at least 1), for a Retry-After header; None when never."""
        return None if math.isinf(self.retry_after) else str(max(1, math.ceil(self.retry_after)))


class TokenBucket:
    """``capacity`` units, refilled at ``capacity`` per ``period`` seconds; starts full."""

    def __init__(self, capacity: int, period: float = MINUTE, clock: Clock = time.monotonic):
        if capacity < 1:
            raise ValueError("a bucket holds at least one unit")
        self.capacity = float(capacity)
        self.rate = capacity / period
        self._clock = clock
        self._level = self.capacity
        self._at = clock()

    def level(self) -> float:
        now = self._clock()
        self._level = min(self.capacity, self._level + (now - self._at) * self.rate)
        self._at = now
        return self._level

    def take(self, amount: float) -> float:
        """Take ``amount`` if the bucket holds it and return 0.0; otherwise take nothing and return
        the seconds until it will (``inf`` when ``amount`` exceeds the capacity)."""
        if amount > self.capacity:
            return math.inf
        level = self.level()
        if level >= amount:
            self._level = level - amount
            return 0.0
        return (amount - level) / self.rate

    def give_back(self, amount: float) -> None:
        """Return units taken earlier (never above the capacity)."""
        self._level = min(self.capacity, self.level() + amount)


class KeyLimiter:
    """The limits of one key. Thread-safe: admission runs on the event loop, but settling may not."""

    def __init__(self, limits: KeyLimits, clock: Clock = time.monotonic):
        self.limits = limits
        self.running = 0
        self._lock = threading.Lock()
        self._requests = (TokenBucket(limits.requests_per_minute, clock=clock)
                          if limits.requests_per_minute else None)
        self._tokens = TokenBucket(limits.tokens_per_minute, clock=clock) if limits.tokens_per_minute else None

    def admit(self) -> Refusal | None:
        """Start a request: counts against concurrency and requests per minute. None: admitted (call
        ``release`` once it ends); else nothing was counted."""
        with self._lock:
            cap = self.limits.max_concurrent
            if cap is not None and self.running >= cap:
                return Refusal("concurrency", f"this key has {cap} requests in flight, its limit",
                               CONCURRENCY_RETRY_SECONDS)
            if self._requests is not None:
                wait = self._requests.take(1)
                if wait:
                    return Refusal("requests", f"this key's limit of {self.limits.requests_per_minute} requests "
                                   "per minute is reached", wait)
            self.running += 1
            return None

    def widen(self, extra: int) -> Refusal | None:
        """Count ``extra`` more sequences of an admitted request (its prompts × n beyond the first)
        against ``max_concurrent``, which bounds batch rows: one request of n 8 took 8 rows as
        one. None: counted (``release`` them with the request); else nothing was counted."""
        with self._lock:
            cap = self.limits.max_concurrent
            if cap is None or extra <= 0:
                return None
            if 1 + extra > cap:
                return Refusal("concurrency", f"this request runs {1 + extra} sequences (prompts x n), more than "
                               f"this key's limit of {cap} in flight; lower n", math.inf)
            if self.running + extra > cap:
                return Refusal("concurrency", f"this request runs {1 + extra} sequences (prompts x n); with those "
                               f"in flight, that passes this key's limit of {cap}", CONCURRENCY_RETRY_SECONDS)
            self.running += extra
            return None

    def release(self, count: int = 1) -> None:
        with self._lock:
            self.running = max(0, self.running - count)

    def reserve(self, tokens: int) -> Refusal | None:
        """Reserve ``tokens`` against tokens per minute. None: reserved (``settle`` it later)."""
        if self._tokens is None:
            return None
        with self._lock:
            wait = self._tokens.take(tokens)
        if not wait:
            return None
        limit = self.limits.tokens_per_minute
        if math.isinf(wait):
            return Refusal("tokens", f"this request may use {tokens} tokens (prompt + max_tokens for every "
                           f"choice), more than this key's limit of {limit} tokens per minute; lower max_tokens "
                           "or n", wait)
        return Refusal("tokens", f"this key's limit of {limit} tokens per minute is reached (this request "
                       f"reserves {tokens}: prompt + max_tokens for every choice)", wait)

    def settle(self, reserved: int, used: int) -> None:
        """A request that reserved ``reserved`` tokens ended having used ``used``: return the rest."""
        if self._tokens is not None and reserved > used:
            with self._lock:
                self._tokens.give_back(reserved - used)
