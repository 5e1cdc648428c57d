"""Waiting for an ``asyncio.Event`` with a timeout, without losing a cancellation.

Python 3.11's ``asyncio.wait_for`` returns the inner result when the waiting task is cancelled
just as the inner wait completes (CPython gh-86296, fixed in 3.12): the cancellation is
swallowed. A ``while True`` loop that waits that way can then never be cancelled, and whoever
awaits its cancellation (a shutdown) waits forever. ``asyncio.wait`` has no such window.
"""

from __future__ import annotations

import asyncio


async def wait_event(event: asyncio.Event, seconds: float) -> bool:
    """Wait until ``event`` is set or ``seconds`` pass; True when it is set. A cancellation of the
    caller always propagates."""
    waiter = asyncio.ensure_future(event.wait())
    try:
        await asyncio.wait((waiter,), timeout=seconds)
    finally:
        waiter.cancel()  # nothing when it is done; else it must not outlive this call
    return event.is_set()
