"""Training job records behind a small interface; SQLite (WAL, in the gateway database) by default,
PostgreSQL when replicas share one registry.

A record is one JSON document keyed by job id; each write is one transaction, so after a crash
the database holds the previous or the new version of a record, never half of one. A job is run by
the process holding its lease (``claim``), so in a fleet each job runs once.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

from adapters.sql import SqlDatabase, SqliteDatabase, Transaction, upsert_sql
from adapters.stored_rows import RowReader, known_fields
from gateway.training.errors import TooManyTrainingJobsError

QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELLED = "queued", "running", "succeeded", "failed", "cancelled"
ACTIVE_JOBS_LOCK = "training-jobs-active"  # new jobs count the active ones under it (Transaction.lock_name)
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


def _record(row: tuple) -> TrainingJobRecord:
    record = TrainingJobRecord(**known_fields(TrainingJobRecord, json.loads(row[1])))
    if record.id != row[0] or record.state not in (QUEUED, RUNNING, *TERMINAL) or not isinstance(record.config, dict):
        raise ValueError("its id, state or config is not what a job's record holds")
    return record


class TrainingJobStore(Protocol):
    def load_all(self) -> list[TrainingJobRecord]:
        """Every record that reads; the ids of those that do not are in ``unreadable`` (adapters.stored_rows)."""

    @property
    def unreadable(self) -> set[str]: ...

    def put(self, record: TrainingJobRecord, owner: str | None = None, max_active: int | None = None) -> bool:
        """Insert, or replace the record with the same id, atomically; an ended job's record is
        final (a late write of another process never brings it back to life). With ``owner``
        (the process running the job): written only while ``owner`` holds the job's claim, so a
        replica whose lease lapsed and was taken over cannot overwrite its successor's record.
        With ``max_active`` (a new job's first write): ``TooManyTrainingJobsError`` when that many
        other jobs are queued or running, every replica's counted. Returns whether the record was
        written."""

    def delete(self, job_id: str) -> None: ...

    def claim(self, owner: str, lease_seconds: float, now: float) -> TrainingJobRecord | None:
        """Take the oldest job that is queued, or running under an expired (or released) lease, for
        ``owner`` until ``now + lease_seconds``; None when there is none. One job, one claimer."""

    def renew(self, owner: str, job_id: str, lease_seconds: float, now: float) -> bool:
        """Extend ``owner``'s lease on the job; False when it is no longer ``owner``'s to run (its
        lease was taken over, or the job ended elsewhere: cancelled on another replica)."""

    def release(self, owner: str, job_id: str) -> None:
        """Give up ``owner``'s lease at once (a shutdown): any process may claim the job now."""

    def release_all(self) -> None:
        """Forget every lease (one process owning the database, at its start)."""

    def close(self) -> None: ...


_COLUMNS = ("id", "state", "created", "record")
_PUT = upsert_sql("training_jobs", _COLUMNS) + " WHERE training_jobs.state NOT IN ({})".format(
    ", ".join(f"'{s}'" for s in TERMINAL))


class SqlTrainingJobStore:
    """``TrainingJobStore`` on SQLite or PostgreSQL (``adapters.sql``). A lease is two columns
    beside the record (``claimed_by``, ``lease_until``), so record writes never touch it; every
    change notifies the topic ``training``."""

    def __init__(self, db: SqlDatabase):
        self.db = db
        self.rows = RowReader("training_jobs", "Fix or delete the row in the database; it is not run.")

    def load_all(self) -> list[TrainingJobRecord]:
        rows = self.db.read(lambda tx: tx.execute("SELECT id, record FROM training_jobs ORDER BY created, id"))
        return self.rows.parse_all(rows, _record)

    @property
    def unreadable(self) -> set[str]:
        return self.rows.unreadable

    def put(self, record: TrainingJobRecord, owner: str | None = None, max_active: int | None = None) -> bool:
        def write(tx: Transaction) -> bool:
            if max_active is not None:  # counted here: replicas creating at once see each other's jobs
                tx.lock_name(ACTIVE_JOBS_LOCK)
                active = tx.one("SELECT COUNT(*) FROM training_jobs WHERE state IN (?, ?) AND id <> ?",
                                (QUEUED, RUNNING, record.id))[0]
                if active >= max_active:
                    raise TooManyTrainingJobsError(f"{active} training jobs are queued or running (limit "
                                                   f"{max_active}); wait for one to finish")
            values = (record.id, record.state, record.created, json.dumps(record.as_dict()))
            if owner is None:
                written = tx.execute(_PUT + " RETURNING id", values)
            else:
                written = tx.execute(_PUT + " AND training_jobs.claimed_by = ? RETURNING id", (*values, owner))
            if written:
                tx.notify("training", id=record.id)
            return bool(written)
        return self.db.run(write)

    def delete(self, job_id: str) -> None:
        def write(tx: Transaction) -> None:
            tx.execute("DELETE FROM training_jobs WHERE id = ?", (job_id,))
            tx.notify("training", id=job_id)
        self.db.run(write)

    def claim(self, owner: str, lease_seconds: float, now: float) -> TrainingJobRecord | None:
        def take(tx: Transaction) -> TrainingJobRecord | None:
            while True:  # past rows that do not read: they are never claimed (nor changed)
                skipped = sorted(self.rows.unreadable)
                row = tx.one("SELECT id, record FROM training_jobs WHERE state IN (?, ?)"
                             " AND (lease_until IS NULL OR lease_until < ?)"
                             + "".join(" AND id <> ?" for _ in skipped)
                             + " ORDER BY created, id LIMIT 1" + tx.lock_rows, (QUEUED, RUNNING, now, *skipped))
                if row is None:
                    return None
                record = self.rows.parse(row, _record)
                if record is not None:
                    break
            tx.execute("UPDATE training_jobs SET claimed_by = ?, lease_until = ? WHERE id = ?",
                       (owner, now + lease_seconds, row[0]))
            return record
        return self.db.run(take)

    def renew(self, owner: str, job_id: str, lease_seconds: float, now: float) -> bool:
        def extend(tx: Transaction) -> bool:
            row = tx.one("SELECT claimed_by, state FROM training_jobs WHERE id = ?", (job_id,))
            if row is None or row[0] != owner or row[1] in TERMINAL:
                return False
            tx.execute("UPDATE training_jobs SET lease_until = ? WHERE id = ?", (now + lease_seconds, job_id))
            return True
        return self.db.run(extend)

    def release(self, owner: str, job_id: str) -> None:
        self.db.run(lambda tx: tx.execute(
            "UPDATE training_jobs SET claimed_by = NULL, lease_until = NULL WHERE id = ? AND claimed_by = ?",
            (job_id, owner)))

    def release_all(self) -> None:
        self.db.run(lambda tx: tx.execute("UPDATE training_jobs SET claimed_by = NULL, lease_until = NULL"))

    def close(self) -> None:
        self.db.close()


class SqliteTrainingJobStore(SqlTrainingJobStore):
    def __init__(self, path: Path):
        super().__init__(SqliteDatabase(path))

        def schema(tx: Transaction) -> None:
            tx.execute("CREATE TABLE IF NOT EXISTS training_jobs ("
                       " id TEXT PRIMARY KEY, state TEXT NOT NULL, created REAL NOT NULL, record TEXT NOT NULL)")
            columns = {r[1] for r in tx.execute("PRAGMA table_info(training_jobs)")}
            for column, type_ in (("claimed_by", "TEXT"), ("lease_until", "REAL")):  # added with leases
                if column not in columns:
                    tx.execute(f"ALTER TABLE training_jobs ADD COLUMN {column} {type_}")
        self.db.run(schema)
