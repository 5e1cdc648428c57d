"""Writes of training job records that never take the scheduler down.

A store can fail at any write (disk full, database locked past its busy timeout). The writer logs
and counts the failure and keeps the record as unsaved instead of raising; ``flush`` tries the
unsaved ones again (the job manager calls it before starting any new job). Writes reach the store
in the order they were made, each with the record's state at the time of the call.
"""

from __future__ import annotations

import asyncio
import copy
import functools
import logging

from adapters.sql import DatabaseUnavailableError
from gateway.training.errors import TooManyTrainingJobsError, TrainingStoreError
from gateway.training.store import TrainingJobRecord, TrainingJobStore

log = logging.getLogger(__name__)


class JobEndedElsewhereError(Exception):
    """Nothing was written: the stored job had already ended (another replica ended it, e.g. it
    finished there while this one was cancelling it)."""


class RecordWriter:
    def __init__(self, store: TrainingJobStore):
        self.store = store
        self._lock = asyncio.Lock()
        self._unsaved: dict[str, TrainingJobRecord] = {}  # records whose latest write failed
        self._owners: dict[str, str] = {}  # the claim an unsaved record's write is conditional on
        self.errors = 0  # failed writes since start (a metric)
        self.last_error: str | None = None
        self.last_exception: BaseException | None = None

    @property
    def unsaved(self) -> int:
        return len(self._unsaved)

    async def put(self, record: TrainingJobRecord, owner: str | None = None) -> bool:
        """Write the record's current state; False when the store failed (the record is retried).
        With ``owner``: only while ``owner`` holds the job's claim (``TrainingJobStore.put``)."""
        snapshot = copy.deepcopy(record)
        write = functools.partial(self.store.put, snapshot, owner=owner) if owner else functools.partial(
            self.store.put, snapshot)
        async with self._lock:
            try:
                written = await asyncio.to_thread(write)
            except Exception as exc:  # noqa: BLE001 - whatever the store raises, never fatal here
                self._failed(exc)
                self._unsaved[record.id] = record
                if owner:
                    self._owners[record.id] = owner
                return False
        self._unsaved.pop(record.id, None)
        self._owners.pop(record.id, None)
        if not written and owner is None:  # (a claim lost is the lease's business: renew says so)
            raise JobEndedElsewhereError(f"the training job {record.id!r} already ended on another replica")
        return True

    async def insert(self, record: TrainingJobRecord, max_active: int) -> bool:
        """A new job's first write, refused with ``TooManyTrainingJobsError`` when ``max_active``
        jobs are queued or running (``TrainingJobStore.put``); False when the store failed (not
        kept: the creation fails)."""
        async with self._lock:
            try:
                await asyncio.to_thread(self.store.put, copy.deepcopy(record), max_active=max_active)
            except TooManyTrainingJobsError:
                raise
            except Exception as exc:  # noqa: BLE001 - the caller answers with the failure
                self._failed(exc, kept=False)
                return False
        return True

    async def flush(self) -> bool:
        """Write every unsaved record again; True once none is left."""
        if not self._unsaved:
            return True
        for record in list(self._unsaved.values()):
            try:
                if not await self.put(record, self._owners.get(record.id)):
                    return False
            except JobEndedElsewhereError:  # the store's ending stands; a sync adopts it
                continue
        log.info("training job records are saved again")
        return True

    async def delete(self, job_id: str) -> None:
        async with self._lock:
            try:
                await asyncio.to_thread(self.store.delete, job_id)
            except Exception as exc:  # noqa: BLE001 - told to the caller as a typed error
                self._failed(exc)
                if isinstance(exc, DatabaseUnavailableError):
                    raise DatabaseUnavailableError(f"the job could not be deleted: {exc}") from None
                raise TrainingStoreError(f"the job could not be deleted: {self.last_error}") from None
        self._unsaved.pop(job_id, None)
        self._owners.pop(job_id, None)

    def _failed(self, exc: BaseException, kept: bool = True) -> None:
        self.errors += 1
        self.last_exception = exc
        self.last_error = f"{type(exc).__name__}: {exc}"
        log.error("cannot write training job records%s: %s", " (kept, and tried again later)" if kept else "",
                  self.last_error)
