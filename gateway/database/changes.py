"""Follow the changes other replicas make to the shared PostgreSQL registry.

Mechanism: LISTEN/NOTIFY. Every write to adapters, experiment definitions and training jobs
sends ``pg_notify('gateway_changes', {"topic": ...})`` in its own transaction, so the
notification goes out exactly when the change commits (and never for a rolled-back one). Each
process holds one extra connection that LISTENs, in a thread; a notification marks its topic
dirty, and the event loop re-reads that topic's rows in full (``sync`` of the registry, the
experiments, the jobs) and applies the difference. Re-reading rather than applying the payload
keeps one code path for everything, and the tables are small.

What heals a lost notification (NOTIFY is not delivered to a connection that was down): every
topic is re-read every ``resync_seconds``, and at once after the listener (re)connects.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import threading
from collections.abc import Awaitable, Callable, Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from adapters.sql import CHANGES_CHANNEL, DatabaseUnavailableError, PostgresDatabase
from gateway.waiting import wait_event

log = logging.getLogger(__name__)
RECONNECT_SECONDS = (0.2, 0.5, 1.0, 2.0)  # waits between reconnection attempts (the last repeats)


class ChangeFeed:
    def __init__(self, db: PostgresDatabase, resync_seconds: float):
        self._db = db  # used for its URL and settings only: the listener opens its own connection
        self.resync_seconds = resync_seconds
        self._handlers: dict[str, Callable[[], Awaitable[None]]] = {}
        self._dirty: set[str] = set()
        self._wake = asyncio.Event()
        self._stop = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._task: asyncio.Task | None = None
        self._conn = None
        self.connected = False  # the listener holds a live connection (a readiness fact)
        self.reconnects = 0
        self.syncs = 0  # topic re-reads done (a metric, and what tests wait on)
        self.sync_errors = 0
        self._failing = False  # the last re-read failed (logged once until one succeeds)

    def subscribe(self, topic: str, handler: Callable[[], Awaitable[None]]) -> None:
        """``handler()`` re-reads ``topic``'s rows and applies them; called on the event loop."""
        self._handlers[topic] = handler

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._listen, name="db-changes", daemon=True)
        self._thread.start()
        self._task = self._loop.create_task(self._apply(), name="db-changes")

    async def close(self) -> None:
        self._stop.set()
        conn = self._conn
        if conn is not None:
            with contextlib.suppress(Exception):
                conn.cancel_safe(timeout=1.0)  # ends a notifies() wait at once
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, 5.0)

    def _mark(self, topics: set[str]) -> None:
        self._dirty |= topics
        self._wake.set()

    # ---- listener thread ------------------------------------------------------------------------
    def _listen(self) -> None:
        failures = 0
        while not self._stop.is_set():
            try:
                conn = self._db.connect()
            except DatabaseUnavailableError as exc:
                if failures == 0:
                    log.warning("change listener: %s; retrying", exc)
                self._pause(failures)
                failures += 1
                continue
            self._conn = conn
            try:
                conn.execute(f"LISTEN {CHANGES_CHANNEL}")
                if failures or self.reconnects:
                    log.info("change listener reconnected; re-reading everything")
                self.connected, failures = True, 0
                self.reconnects += 1
                self._signal(set(self._handlers))  # whatever changed while we were away
                while not self._stop.is_set():
                    for notification in conn.notifies(timeout=1.0):
                        self._signal({_topic(notification.payload)})
            except Exception as exc:  # noqa: BLE001 - any failure: reconnect
                if not self._stop.is_set():
                    log.warning("change listener lost its connection (%s); reconnecting",
                                str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__)
            finally:
                self.connected, self._conn = False, None
                with contextlib.suppress(Exception):
                    conn.close()
            self._pause(failures)
            failures += 1

    def _pause(self, failures: int) -> None:
        self._stop.wait(RECONNECT_SECONDS[min(failures, len(RECONNECT_SECONDS) - 1)])

    def _signal(self, topics: set[str]) -> None:
        topics &= set(self._handlers)
        if topics and self._loop is not None:
            self._loop.call_soon_threadsafe(self._mark, topics)

    # ---- event loop -----------------------------------------------------------------------------
    async def _apply(self) -> None:
        while True:
            await wait_event(self._wake, self.resync_seconds)
            self._wake.clear()
            topics, self._dirty = (self._dirty or set(self._handlers)), set()
            for topic in sorted(topics):
                try:
                    await self._handlers[topic]()
                    self.syncs += 1
                except asyncio.CancelledError:
                    raise
                except Exception as exc:  # noqa: BLE001 - kept dirty, tried again at the next round
                    self.sync_errors += 1
                    self._dirty.add(topic)
                    # once per outage: the next rounds fail alike until the server is back
                    log.log(logging.DEBUG if self._failing else logging.WARNING,
                            "cannot re-read %s from the database (serving goes on from memory): %s", topic, exc)
                    self._failing = True
            if self._failing and not self._dirty:
                self._failing = False
                log.info("the database is reachable again; memory follows it again")


def _topic(payload: str) -> str:
    try:
        return str(json.loads(payload)["topic"])
    except (ValueError, KeyError, TypeError):
        return ""


class ChangeFeedCollector(Collector):
    """Prometheus figures of the change feed, read at scrape time."""

    def __init__(self, feed: ChangeFeed):
        self.feed = feed

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        connected = GaugeMetricFamily("gateway_database_listener_connected",
                                      "1 while this replica listens for the shared database's changes.")
        connected.add_metric([], 1.0 if self.feed.connected else 0.0)
        yield connected
        for name, help_text, value in (
                ("gateway_database_resyncs", "Tables re-read from the shared database (after a change "
                 "notification, periodically, after a reconnect).", self.feed.syncs),
                ("gateway_database_resync_errors", "Re-reads of the shared database that failed (the server "
                 "unreachable); tried again at the next round.", self.feed.sync_errors)):
            family = CounterMetricFamily(name, help_text)
            family.add_metric([], value)
            yield family
