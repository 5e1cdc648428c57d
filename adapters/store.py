"""Registry metadata persistence behind a small interface; SQLite (WAL) is the embedded default.

Each write is one transaction, so after a crash the database holds the old or the new row, never
half of one. ``SqlAdapterStore`` runs on SQLite or PostgreSQL (``adapters.sql``).
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from adapters import faults
from adapters.blobs import _DIGEST
from adapters.errors import AdapterConflictError
from adapters.sql import SqlDatabase, SqliteDatabase, Transaction, upsert_sql
from adapters.stored_rows import RowReader


# checks a write of an adapter row against other tables, inside the writing transaction
RowGuard = Callable[[Transaction], "str | None"]
# adapters and experiments share one namespace (a request's model): a writer of either name takes
# this lock (``Transaction.lock_name``) before it checks the other table, so two replicas never
# both take one name
MODEL_NAME_LOCK = "model-name:"


@dataclass
class AdapterRecord:
    """What survives a restart about one registered adapter."""

    id: str
    content_hash: str
    kind: str
    size_bytes: int
    created: float
    pinned: bool = False
    info: dict[str, Any] = field(default_factory=dict)  # AdapterWeights.describe() + virtual tokens


class AdapterStore(Protocol):
    def load_all(self) -> list[AdapterRecord]:
        """Every row that reads; the ids of those that do not are in ``unreadable`` (adapters.stored_rows)."""

    @property
    def unreadable(self) -> set[str]: ...

    def put(self, record: AdapterRecord, *, replace: bool = False, guard: RowGuard | None = None) -> bool:
        """Insert the row atomically; with ``replace``, replace the row with the same id, whose pin
        stays (a pin another replica set meanwhile is not undone). Returns the row's pin; raises
        ``AdapterConflictError`` when the id is taken and ``replace`` is false (another replica
        registered it first), or when ``guard`` (reading other tables in the same transaction, the
        id's name locked: ``MODEL_NAME_LOCK``) gives a reason."""

    def delete(self, adapter_id: str, guard: RowGuard | None = None) -> None:
        """Delete the row; ``guard`` (reading other tables in the same transaction, with the row
        locked) may refuse it with a reason: ``AdapterConflictError``."""

    def set_pinned(self, adapter_id: str, pinned: bool) -> None: ...

    def refers_to(self, content_hash: str) -> bool:
        """Whether any row (of any replica sharing the store) names these adapter files."""

    def close(self) -> None: ...


class DatabaseUnusableError(Exception):
    """The database file is damaged, or missing while files it described remain: starting on it would
    drop data silently. The message names the file and the operator's options."""


def check_database(path: Path, described: tuple[Path, ...] = ()) -> None:
    """Refuse a damaged database (``PRAGMA quick_check``), and a missing one while any folder of
    ``described`` (files the rows point to) still holds something. Never creates a database, and
    never writes to a damaged one."""
    if not path.exists():
        left = [str(p) for p in described if p.is_dir() and any(p.iterdir())]
        if left:
            raise DatabaseUnusableError(
                f"the database {path} is missing, but {', '.join(left)} still hold(s) files it described; "
                f"starting without it would forget (and later remove) them. Restore {path} from a backup; or, to "
                f"start empty on purpose, move {', '.join(left)} aside first")
        return
    problem = None
    try:
        conn = sqlite3.connect(f"file:{path}?mode=rw", uri=True)  # rw, not rwc: never create it
        try:
            rows = conn.execute("PRAGMA quick_check").fetchall()
        finally:
            conn.close()
        if rows != [("ok",)]:
            problem = "; ".join(str(r[0]) for r in rows[:5])
    except sqlite3.DatabaseError as exc:
        problem = str(exc)
    if problem is not None:
        raise DatabaseUnusableError(
            f"the database {path} is damaged ({problem}); the gateway will not start on it, so that no "
            f"registered adapter, job or experiment is dropped silently. Restore it from a backup (with its "
            f"-wal file, if any), or move it aside (mv {path} {path}.damaged, and its -wal and -shm files) to "
            f"start with an empty database (the stored files it described must then be moved aside too)")


_COLUMNS = ("id", "content_hash", "kind", "size_bytes", "created", "pinned", "info")
_INSERT = (f"INSERT INTO registry_adapters ({', '.join(_COLUMNS)}) VALUES ({', '.join('?' for _ in _COLUMNS)}) "
           "ON CONFLICT (id) DO NOTHING RETURNING pinned")
_REPLACE = upsert_sql("registry_adapters", _COLUMNS, keep=("pinned",)) + " RETURNING pinned"


def _record(row: tuple) -> AdapterRecord:
    """One row, checked: the registry builds paths from the content hash, and views from ``info``."""
    adapter_id, digest, kind, size, created, pinned, info = row
    if not (isinstance(adapter_id, str) and isinstance(kind, str) and isinstance(digest, str)
            and _DIGEST.fullmatch(digest)):
        raise ValueError("its id, kind or content hash is not what a registration writes")
    info = json.loads(info)
    if not isinstance(info, dict):
        raise ValueError("its info is not a JSON object")
    return AdapterRecord(adapter_id, digest, kind, int(size), float(created), bool(pinned), info)


class SqlAdapterStore:
    """``AdapterStore`` on SQLite or PostgreSQL (``adapters.sql``); every change notifies the
    topic ``adapters``, which other replicas follow."""

    def __init__(self, db: SqlDatabase):
        self.db = db
        self.rows = RowReader("registry_adapters", "Register the adapter again with replace=true, or delete it "
                                                   "(DELETE /admin/adapters/{id}).")

    def load_all(self) -> list[AdapterRecord]:
        rows = self.db.read(lambda tx: tx.execute(f"SELECT {', '.join(_COLUMNS)} FROM registry_adapters ORDER BY id"))
        return self.rows.parse_all(rows, _record)

    @property
    def unreadable(self) -> set[str]:
        return self.rows.unreadable

    def put(self, record: AdapterRecord, *, replace: bool = False, guard: RowGuard | None = None) -> bool:
        def write(tx: Transaction) -> bool:
            if guard is not None:
                tx.lock_name(MODEL_NAME_LOCK + record.id)
                if (reason := guard(tx)) is not None:
                    raise AdapterConflictError(reason)
            row = tx.one(_REPLACE if replace else _INSERT, (
                record.id, record.content_hash, record.kind, record.size_bytes, record.created, int(record.pinned),
                json.dumps(record.info, sort_keys=True)))
            if row is None:  # the id was free when this replica looked; another one took it since
                raise AdapterConflictError(f"the adapter {record.id!r} is already registered; ask for replace")
            tx.notify("adapters", id=record.id)
            return bool(row[0])
        pinned = self.db.run(write)
        self.rows.unreadable.discard(record.id)  # written whole again
        return pinned

    def delete(self, adapter_id: str, guard: RowGuard | None = None) -> None:
        faults.hit("adapter-db.delete")

        def write(tx: Transaction) -> None:
            if guard is not None:
                # the row locked first: a writer that checks it exists (an experiment naming it as
                # an arm, on another replica) commits before this reads its table, or waits for this
                tx.execute("SELECT 1 FROM registry_adapters WHERE id = ?" + tx.lock_for_update, (adapter_id,))
                if (reason := guard(tx)) is not None:
                    raise AdapterConflictError(reason)
            tx.execute("DELETE FROM registry_adapters WHERE id = ?", (adapter_id,))
            tx.notify("adapters", id=adapter_id)
        self.db.run(write)
        self.rows.unreadable.discard(adapter_id)

    def set_pinned(self, adapter_id: str, pinned: bool) -> None:
        def write(tx: Transaction) -> None:
            tx.execute("UPDATE registry_adapters SET pinned = ? WHERE id = ?", (int(pinned), adapter_id))
            tx.notify("adapters", id=adapter_id)
        self.db.run(write)

    def refers_to(self, content_hash: str) -> bool:
        return self.db.read(lambda tx: tx.one(
            "SELECT 1 FROM registry_adapters WHERE content_hash = ? LIMIT 1", (content_hash,))) is not None

    def close(self) -> None:
        self.db.close()


class SqliteAdapterStore(SqlAdapterStore):
    def __init__(self, path: Path):
        super().__init__(SqliteDatabase(path))
        self.db.run(lambda tx: tx.execute(
            "CREATE TABLE IF NOT EXISTS registry_adapters ("
            " id TEXT PRIMARY KEY, content_hash TEXT NOT NULL, kind TEXT NOT NULL,"
            " size_bytes INTEGER NOT NULL, created REAL NOT NULL, pinned INTEGER NOT NULL DEFAULT 0,"
            " info TEXT NOT NULL)"))
