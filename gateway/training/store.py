"""Training job records behind a small interface; SQLite (WAL, in the gateway database) by default.

A record is one JSON document keyed by job id; each write is one transaction, so after a crash
the database holds the previous or the new version of a record, never half of one.
"""

from __future__ import annotations

import json
import threading
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

from adapters.store import open_sqlite

QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELLED = "queued", "running", "succeeded", "failed", "cancelled"
STATES = (QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELLED)
TERMINAL = (SUCCEEDED, FAILED, CANCELLED)


@dataclass
class TrainingJobRecord:
    """What the API shows about a job, and what survives a restart."""

    id: str
    state: str
    config: dict[str, Any]
    created: float
    dataset: dict[str, Any] = field(default_factory=dict)  # format, example counts, skipped lines
    started: float | None = None
    finished: float | None = None
    progress: dict[str, Any] = field(default_factory=dict)  # adapters.training.trainer.Progress.as_dict()
    error: str | None = None
    adapter_id: str | None = None  # the registered adapter, once succeeded
    note: str | None = None  # e.g. why a finished adapter was not registered
    # what a job created through /v1/fine_tuning/jobs was asked (model, files, suffix, metadata,
    # method); None for jobs of the admin API (gateway.fine_tuning.views shows both)
    fine_tuning: dict[str, Any] | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class TrainingJobStore(Protocol):
    def load_all(self) -> list[TrainingJobRecord]: ...

    def put(self, record: TrainingJobRecord) -> None:
        """Insert, or replace the record with the same id, atomically."""

    def delete(self, job_id: str) -> None: ...

    def close(self) -> None: ...


class SqliteTrainingJobStore:
    def __init__(self, path: Path):
        self._conn = open_sqlite(path)
        self._lock = threading.Lock()
        with self._lock, self._conn:
            self._conn.execute(
                "CREATE TABLE IF NOT EXISTS training_jobs ("
                " id TEXT PRIMARY KEY, state TEXT NOT NULL, created REAL NOT NULL, record TEXT NOT NULL)")

    def load_all(self) -> list[TrainingJobRecord]:
        with self._lock:
            rows = self._conn.execute("SELECT record FROM training_jobs ORDER BY created, id").fetchall()
        return [TrainingJobRecord(**json.loads(r[0])) for r in rows]

    def put(self, record: TrainingJobRecord) -> None:
        with self._lock, self._conn:
            self._conn.execute("INSERT OR REPLACE INTO training_jobs VALUES (?, ?, ?, ?)",
                               (record.id, record.state, record.created, json.dumps(record.as_dict())))

    def delete(self, job_id: str) -> None:
        with self._lock, self._conn:
            self._conn.execute("DELETE FROM training_jobs WHERE id = ?", (job_id,))

    def close(self) -> None:
        with self._lock:
            self._conn.close()

