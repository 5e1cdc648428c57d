"""One small SQL surface over SQLite (the embedded default) and PostgreSQL (many replicas sharing
one registry), so each store is written once.

Stores write their SQL with ``?`` placeholders and the subset both engines read alike: ``INSERT
... ON CONFLICT (key) DO UPDATE`` upserts, ``RETURNING`` (both SQLite ≥ 3.35), ``CASE`` rather than
summed booleans.
A store calls ``db.run(fn)``: ``fn(tx)`` runs inside one transaction, committed when it returns,
rolled back when it raises. What differs between the engines stays here: placeholders, taking
the write lock, row locking (``tx.lock_rows``), change notifications (``tx.notify``; PostgreSQL's
NOTIFY, delivered to every listening replica at commit, a no-op on SQLite where one process owns
the file), and how a lost connection is reported (``DatabaseUnavailableError``).
"""

from __future__ import annotations

import json
import logging
import random
import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

log = logging.getLogger(__name__)
T = TypeVar("T")
MIN_SQLITE = (3, 35)  # RETURNING (experiments' request rows)
CHANGES_CHANNEL = "gateway_changes"  # the one NOTIFY channel; payload: {"topic": ..., ...}
ROLLBACK_RETRIES = 3  # a transaction PostgreSQL rolled back (a deadlock broken, a serialization conflict) runs again


class DatabaseUnavailableError(Exception):
    """The database server cannot be reached (or dropped the connection); nothing was written."""


def redact_url(url: str) -> str:
    """The database URL without its password, for logs and messages."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)
    user = parts.username or ""
    return urlunsplit(parts._replace(netloc=f"{user}:***@{netloc[-1]}"))


class Transaction:
    """What ``fn`` receives from ``SqlDatabase.run``: statements of one transaction."""

    def __init__(self, cursor: Any, dialect: str):
        self._cursor = cursor
        self.dialect = dialect
        self.notifications: list[dict[str, Any]] = []

    def execute(self, sql: str, params: tuple | list = ()) -> list[tuple]:
        """Run one statement; its rows (an empty list for a statement that returns none)."""
        if self.dialect == "postgresql":
            sql = sql.replace("?", "%s")
        self._cursor.execute(sql, params)
        return self._cursor.fetchall() if self._cursor.description is not None else []

    def one(self, sql: str, params: tuple | list = ()) -> tuple | None:
        rows = self.execute(sql, params)
        return rows[0] if rows else None

    @property
    def lock_rows(self) -> str:
        """The clause that locks the selected rows against other writers and skips rows others hold
        (PostgreSQL); SQLite needs none, its write lock is taken at BEGIN IMMEDIATE."""
        return " FOR UPDATE SKIP LOCKED" if self.dialect == "postgresql" else ""

    def lock_name(self, name: str) -> None:
        """Hold a lock on ``name`` until this transaction ends (PostgreSQL: an advisory lock; SQLite's
        write lock already serializes writers). For a check that no row exists in another table:
        two writers of the same name in two tables would otherwise both see none and both insert."""
        if self.dialect == "postgresql":
            self.execute("SELECT pg_advisory_xact_lock(hashtextextended(?, 0))", (name,))

    @property
    def lock_for_update(self) -> str:
        """The clause that locks the selected rows until this transaction ends (PostgreSQL; SQLite's
        write lock, taken at BEGIN IMMEDIATE, already serializes writers)."""
        return " FOR UPDATE" if self.dialect == "postgresql" else ""

    @property
    def lock_for_share(self) -> str:
        """Rows read here may not be deleted or changed by another writer until this transaction ends."""
        return " FOR SHARE" if self.dialect == "postgresql" else ""

    def notify(self, topic: str, **details: Any) -> None:
        """Tell every replica that ``topic`` changed, once this transaction commits."""
        if self.dialect == "postgresql":
            payload = json.dumps({"topic": topic, **details})
            self._cursor.execute("SELECT pg_notify(%s, %s)", (CHANGES_CHANNEL, payload))


def upsert_sql(table: str, columns: tuple[str, ...], key: str = "id", keep: tuple[str, ...] = ()) -> str:
    """``INSERT`` of one row, updating every other column when a row with its ``key`` exists (a
    column not listed, or listed in ``keep``, keeps its value, unlike SQLite's INSERT OR REPLACE)."""
    updates = ", ".join(f"{c} = excluded.{c}" for c in columns if c != key and c not in keep)
    return (f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({', '.join('?' for _ in columns)}) "
            f"ON CONFLICT ({key}) DO UPDATE SET {updates}")


class SqlDatabase:
    """A connection shared by threads; calls are serialized."""

    dialect: str
    integrity_errors: tuple[type[Exception], ...]

    def run(self, fn: Callable[[Transaction], T]) -> T:
        raise NotImplementedError

    def read(self, fn: Callable[[Transaction], T]) -> T:
        """``run`` for a transaction that only reads (SQLite then takes no write lock)."""
        return self.run(fn)

    def close(self) -> None:
        raise NotImplementedError


def open_sqlite(path: Path, synchronous: str = "FULL") -> sqlite3.Connection:
    """A connection in WAL mode (fsync per commit unless ``synchronous`` says otherwise), usable
    from the event loop and worker threads."""
    if sqlite3.sqlite_version_info < MIN_SQLITE:  # said once, not as a syntax error at the first write
        raise RuntimeError(f"SQLite {sqlite3.sqlite_version} is too old: the gateway needs "
                           f"{'.'.join(map(str, MIN_SQLITE))} or newer (RETURNING)")
    path.parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(path, check_same_thread=False, isolation_level=None, timeout=30)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute(f"PRAGMA synchronous={synchronous}")
    conn.execute("PRAGMA busy_timeout=30000")
    return conn


class SqliteDatabase(SqlDatabase):
    dialect = "sqlite"
    integrity_errors = (sqlite3.IntegrityError,)

    def __init__(self, path: Path, synchronous: str = "FULL"):
        self._conn = open_sqlite(path, synchronous)
        self._lock = threading.Lock()

    def run(self, fn: Callable[[Transaction], T]) -> T:
        # IMMEDIATE takes the write lock up front, so a read-then-write cannot be overtaken
        return self._transaction(fn, "BEGIN IMMEDIATE")

    def read(self, fn: Callable[[Transaction], T]) -> T:
        return self._transaction(fn, "BEGIN")  # one snapshot, no write lock

    def _transaction(self, fn: Callable[[Transaction], T], begin: str) -> T:
        with self._lock:
            self._conn.execute(begin)
            try:
                result = fn(Transaction(self._conn.cursor(), self.dialect))
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            self._conn.execute("COMMIT")
            return result

    def close(self) -> None:
        with self._lock:
            self._conn.close()


class PostgresDatabase(SqlDatabase):
    """One psycopg connection, opened on first use and again after it broke. A server that cannot
    be reached answers ``DatabaseUnavailableError`` within ``timeout`` seconds; a transaction that
    failed on a connection the server had dropped meanwhile (a restart) is tried once more on a
    fresh one, since nothing of it was committed; one the server rolled back to break a deadlock
    (or a serialization conflict) is run again, up to ``ROLLBACK_RETRIES`` times, after a short
    random pause, since the other transaction it met has then gone on."""

    dialect = "postgresql"

    def __init__(self, url: str, timeout: float = 5.0):
        import psycopg

        self._psycopg = psycopg
        self.integrity_errors = (psycopg.IntegrityError,)
        self.url = url
        self.timeout = timeout
        self._conn: Any = None
        self._lock = threading.Lock()
        self._closed = False

    def connect(self, **extra: Any) -> Any:
        """A new autocommit connection (its owner closes it); raises ``DatabaseUnavailableError``."""
        try:
            return self._psycopg.connect(
                self.url, autocommit=True, connect_timeout=max(1, round(self.timeout)),
                keepalives=1, keepalives_idle=5, keepalives_interval=2, keepalives_count=2, **extra)
        except self._psycopg.OperationalError as exc:
            raise DatabaseUnavailableError(f"the database at {redact_url(self.url)} cannot be reached: "
                                           f"{_first_line(exc)}") from None

    def run(self, fn: Callable[[Transaction], T]) -> T:
        psycopg = self._psycopg
        with self._lock:
            if self._closed:
                raise DatabaseUnavailableError("the database connection is closed (shutting down)")
            reconnected, rolled_back = False, 0
            while True:
                fresh = self._conn is None or self._conn.closed
                if fresh:
                    self._conn = self.connect()
                committing = False
                try:
                    with self._conn.transaction():
                        with self._conn.cursor() as cursor:
                            result = fn(Transaction(cursor, self.dialect))
                        committing = True
                    return result
                except (psycopg.errors.DeadlockDetected, psycopg.errors.SerializationFailure) as exc:  # none committed
                    rolled_back += 1
                    if rolled_back > ROLLBACK_RETRIES:
                        raise DatabaseUnavailableError(f"the database is unavailable: {_first_line(exc)}") from None
                    log.info("the database rolled a transaction back (%s); running it again", _first_line(exc))
                    time.sleep(random.uniform(0.01, 0.05) * rolled_back)
                except (psycopg.OperationalError, psycopg.InterfaceError) as exc:
                    broken = self._conn.broken or self._conn.closed
                    if broken:
                        self._discard()
                    if broken and not reconnected and not fresh and not committing:
                        log.info("the database connection was lost (%s); trying once more", _first_line(exc))
                        reconnected = True
                        continue
                    raise DatabaseUnavailableError(f"the database is unavailable: {_first_line(exc)}") from None

    def read(self, fn: Callable[[Transaction], T]) -> T:
        def snapshot(tx: Transaction) -> T:  # every statement of ``fn`` sees the same committed state
            tx.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            return fn(tx)
        return self.run(snapshot)

    def _discard(self) -> None:
        try:
            self._conn.close()
        except Exception:  # noqa: BLE001 - a broken connection may fail to close; it is gone either way
            pass
        self._conn = None

    def close(self) -> None:
        with self._lock:
            self._closed = True
            if self._conn is not None:
                self._discard()


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
