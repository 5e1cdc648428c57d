"""Experiment persistence behind a small interface; SQLite (WAL) is the embedded implementation.

What is kept: each experiment's definition and state, one row per finished request an experiment
routed (its arm, timings, tokens, error), and at most one feedback row per such request. For an
experiment created with ``capture`` on, also the prompt (chat messages) and the answer text of each
request that received feedback (``experiment_captures``), for preference files. Every
write is one transaction, so a crash leaves the old or the new state, never half of a change.
The tables share the gateway's database file with the adapter registry; their names start with
``experiment``.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Protocol

from adapters import faults
from adapters.store import open_sqlite
from gateway.experiments.assignment import Arm

State = Literal["running", "stopped", "promoted"]
Stickiness = Literal["user", "header", "request"]
Thumbs = Literal["up", "down"]
CANCELLED = "cancelled"  # the error type of a request its client abandoned


@dataclass
class Experiment:
    """An experiment's definition; the first arm is the control every other arm is compared with."""

    name: str
    salt: str
    arms: list[Arm]
    stickiness: Stickiness
    subject_header: str | None  # the request header naming the subject when stickiness is "header"
    state: State
    created: float
    updated: float
    winner: str | None = None
    capture: bool = False  # keep the prompt and answer of requests that receive feedback

    @property
    def control(self) -> str:
        return self.arms[0].name

    def serving_arms(self) -> list[str]:
        """The arms that receive traffic now: all while running, the control once stopped, the
        winner once promoted."""
        if self.state == "running":
            return [arm.name for arm in self.arms]
        return [self.winner if self.state == "promoted" and self.winner else self.control]


@dataclass
class RequestRow:
    """One finished request an experiment routed."""

    completion_id: str
    experiment: str
    arm: str
    subject: str | None  # a hash of the sticky subject, never its raw value
    endpoint: str
    ttft_s: float | None
    latency_s: float | None
    prompt_tokens: int
    completion_tokens: int
    error_type: str | None
    created: float
    api_key_id: str | None = None  # the inference key that made it (a hash prefix, never the key)


@dataclass
class FeedbackRow:
    completion_id: str
    score: float | None
    thumbs: Thumbs | None
    created: float
    api_key_id: str | None = None  # the key sending it: must be the one that made the request


@dataclass
class ArmData:
    """Everything the results of one arm are computed from."""

    requests: int = 0
    errors: int = 0  # failed requests, cancelled ones not included
    cancelled: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    ttft_s: list[float] = field(default_factory=list)  # requests that produced text
    latency_s: list[float] = field(default_factory=list)  # requests that completed without error
    feedback: int = 0
    scores: list[float] = field(default_factory=list)
    thumbs_up: int = 0
    thumbs_down: int = 0


@dataclass
class CaptureRow:
    """The prompt and answer of a request that received feedback, in an experiment with capture on."""

    completion_id: str
    experiment: str
    messages: list[dict]  # the chat messages of the request, as the template saw them
    completion: str  # the answer's text
    created: float


@dataclass
class CapturedAnswer:
    """A captured answer with its arm and feedback (what preference pairs are made of)."""

    completion_id: str
    arm: str
    messages: list[dict]
    completion: str
    score: float | None
    thumbs: Thumbs | None


class UnknownCompletionError(LookupError):
    """No request an experiment routed has this completion id."""


class ExperimentStore(Protocol):
    def load_experiments(self) -> list[Experiment]: ...

    def insert_experiment(self, experiment: Experiment) -> None:
        """Add a new experiment; raises ``ValueError`` when the name exists."""

    def update_experiment(self, experiment: Experiment) -> None:
        """Write an existing experiment's weights, state, winner and update time."""

    def delete_experiment(self, name: str) -> None:
        """Remove the experiment with its requests and feedback, in one transaction."""

    def add_request(self, row: RequestRow) -> None: ...

    def put_feedback(self, row: FeedbackRow) -> tuple[RequestRow, bool]:
        """Store feedback for a recorded request, replacing earlier feedback for it. Returns the
        request and whether feedback was replaced; raises ``UnknownCompletionError`` when no request
        has the id, or the request was made with another key than the feedback's."""

    def arm_data(self, name: str) -> dict[str, ArmData]: ...

    def put_capture(self, row: CaptureRow) -> None:
        """Keep (or replace) the prompt and answer of a request."""

    def captured_answers(self, name: str) -> list[CapturedAnswer]:
        """Every captured answer of the experiment that has feedback, oldest first."""

    def close(self) -> None: ...


_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS experiments ("
    " name TEXT PRIMARY KEY, salt TEXT NOT NULL, arms TEXT NOT NULL, stickiness TEXT NOT NULL,"
    " subject_header TEXT, state TEXT NOT NULL, winner TEXT, created REAL NOT NULL, updated REAL NOT NULL)",
    "CREATE TABLE IF NOT EXISTS experiment_requests ("
    " completion_id TEXT PRIMARY KEY, experiment TEXT NOT NULL, arm TEXT NOT NULL, subject TEXT,"
    " endpoint TEXT NOT NULL, ttft_s REAL, latency_s REAL, prompt_tokens INTEGER NOT NULL,"
    " completion_tokens INTEGER NOT NULL, error_type TEXT, created REAL NOT NULL)",
    "CREATE INDEX IF NOT EXISTS experiment_requests_by_arm ON experiment_requests (experiment, arm)",
    "CREATE TABLE IF NOT EXISTS experiment_feedback ("
    " completion_id TEXT PRIMARY KEY, experiment TEXT NOT NULL, score REAL,"
    " thumbs TEXT CHECK (thumbs IN ('up', 'down')), created REAL NOT NULL)",
    "CREATE INDEX IF NOT EXISTS experiment_feedback_by_experiment ON experiment_feedback (experiment)",
    "CREATE TABLE IF NOT EXISTS experiment_captures ("
    " completion_id TEXT PRIMARY KEY, experiment TEXT NOT NULL, messages TEXT NOT NULL, completion TEXT NOT NULL,"
    " created REAL NOT NULL)",
    "CREATE INDEX IF NOT EXISTS experiment_captures_by_experiment ON experiment_captures (experiment)",
)
_REQUEST_COLUMNS = ("completion_id, experiment, arm, subject, endpoint, ttft_s, latency_s, prompt_tokens, "
                    "completion_tokens, error_type, created, api_key_id")
# columns added after the first release: (table, column, type), added to an older database at open
_ADDED_COLUMNS = (("experiment_requests", "api_key_id", "TEXT"),
                  ("experiments", "capture", "INTEGER NOT NULL DEFAULT 0"))


class SqliteExperimentStore:
    """``ExperimentStore`` on one SQLite connection shared by threads (calls are serialized)."""

    def __init__(self, path: Path):
        # autocommit mode: transactions are opened explicitly in ``_transaction``. NORMAL in WAL
        # mode: a commit survives a crash of the process (not necessarily of the OS) without one
        # fsync per request row
        self._conn = open_sqlite(path, synchronous="NORMAL")
        self._lock = threading.Lock()
        with self._transaction() as conn:
            for statement in _SCHEMA:
                conn.execute(statement)
            for table, column, type_ in _ADDED_COLUMNS:
                if column not in {r[1] for r in conn.execute(f"PRAGMA table_info({table})")}:
                    conn.execute(f"ALTER TABLE {table} ADD COLUMN {column} {type_}")

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            # IMMEDIATE takes the write lock up front, so a read-then-write cannot be overtaken
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                yield self._conn
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            self._conn.execute("COMMIT")

    # ---- experiments ----------------------------------------------------------------------------
    def load_experiments(self) -> list[Experiment]:
        with self._lock:
            rows = self._conn.execute(
                "SELECT name, salt, arms, stickiness, subject_header, state, created, updated, winner, capture "
                "FROM experiments ORDER BY created, name").fetchall()
        return [Experiment(name=r[0], salt=r[1], arms=[Arm(a["name"], a["weight"]) for a in json.loads(r[2])],
                           stickiness=r[3], subject_header=r[4], state=r[5], created=r[6], updated=r[7],
                           winner=r[8], capture=bool(r[9])) for r in rows]

    def insert_experiment(self, experiment: Experiment) -> None:
        e = experiment
        with self._transaction() as conn:
            if conn.execute("SELECT 1 FROM experiments WHERE name = ?", (e.name,)).fetchone():
                raise ValueError(f"an experiment named {e.name!r} exists")
            conn.execute("INSERT INTO experiments (name, salt, arms, stickiness, subject_header, state, winner, "
                         "created, updated, capture) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                         (e.name, e.salt, _arms_json(e.arms), e.stickiness, e.subject_header, e.state,
                          e.winner, e.created, e.updated, int(e.capture)))

    def update_experiment(self, experiment: Experiment) -> None:
        e = experiment
        with self._transaction() as conn:
            conn.execute("UPDATE experiments SET arms = ?, state = ?, winner = ?, updated = ? WHERE name = ?",
                         (_arms_json(e.arms), e.state, e.winner, e.updated, e.name))
            faults.hit("experiment-db.update")

    def delete_experiment(self, name: str) -> None:
        with self._transaction() as conn:
            conn.execute("DELETE FROM experiment_captures WHERE experiment = ?", (name,))
            conn.execute("DELETE FROM experiment_feedback WHERE experiment = ?", (name,))
            conn.execute("DELETE FROM experiment_requests WHERE experiment = ?", (name,))
            conn.execute("DELETE FROM experiments WHERE name = ?", (name,))

    # ---- requests and feedback ------------------------------------------------------------------
    def add_request(self, row: RequestRow) -> None:
        with self._transaction() as conn:
            conn.execute(f"INSERT OR REPLACE INTO experiment_requests ({_REQUEST_COLUMNS}) "
                         "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                         (row.completion_id, row.experiment, row.arm, row.subject, row.endpoint, row.ttft_s,
                          row.latency_s, row.prompt_tokens, row.completion_tokens, row.error_type, row.created,
                          row.api_key_id))

    def put_feedback(self, row: FeedbackRow) -> tuple[RequestRow, bool]:
        with self._transaction() as conn:
            found = conn.execute(f"SELECT {_REQUEST_COLUMNS} FROM experiment_requests WHERE completion_id = ?",
                                 (row.completion_id,)).fetchone()
            # a request made with another key is as unknown as a missing one: ids cannot be probed
            if found is None or found[-1] != row.api_key_id:
                raise UnknownCompletionError(row.completion_id)
            request = RequestRow(*found)
            replaced = conn.execute("SELECT 1 FROM experiment_feedback WHERE completion_id = ?",
                                    (row.completion_id,)).fetchone() is not None
            conn.execute("INSERT OR REPLACE INTO experiment_feedback VALUES (?, ?, ?, ?, ?)",
                         (row.completion_id, request.experiment, row.score, row.thumbs, row.created))
        return request, replaced

    def arm_data(self, name: str) -> dict[str, ArmData]:
        arms: dict[str, ArmData] = {}
        with self._lock:  # one read transaction: counts and samples agree
            self._conn.execute("BEGIN")
            try:
                counts = self._conn.execute(
                    "SELECT arm, COUNT(*), SUM(error_type IS NOT NULL AND error_type != ?),"
                    " SUM(error_type IS ?), SUM(prompt_tokens), SUM(completion_tokens)"
                    " FROM experiment_requests WHERE experiment = ? GROUP BY arm",
                    (CANCELLED, CANCELLED, name)).fetchall()
                timings = self._conn.execute(
                    "SELECT arm, ttft_s, CASE WHEN error_type IS NULL THEN latency_s END FROM experiment_requests"
                    " WHERE experiment = ?", (name,)).fetchall()
                feedback = self._conn.execute(
                    "SELECT r.arm, f.score, f.thumbs FROM experiment_feedback f"
                    " JOIN experiment_requests r ON r.completion_id = f.completion_id WHERE f.experiment = ?",
                    (name,)).fetchall()
            finally:
                self._conn.execute("COMMIT")
        for arm, requests, errors, cancelled, prompt, completion in counts:
            arms[arm] = ArmData(requests=requests, errors=errors or 0, cancelled=cancelled or 0,
                                prompt_tokens=prompt or 0, completion_tokens=completion or 0)
        for arm, ttft, latency in timings:
            if ttft is not None:
                arms[arm].ttft_s.append(ttft)
            if latency is not None:
                arms[arm].latency_s.append(latency)
        for arm, score, thumbs in feedback:
            data = arms[arm]
            data.feedback += 1
            if score is not None:
                data.scores.append(score)
            data.thumbs_up += thumbs == "up"
            data.thumbs_down += thumbs == "down"
        return arms

    def put_capture(self, row: CaptureRow) -> None:
        with self._transaction() as conn:
            conn.execute("INSERT OR REPLACE INTO experiment_captures VALUES (?, ?, ?, ?, ?)",
                         (row.completion_id, row.experiment, json.dumps(row.messages), row.completion, row.created))

    def captured_answers(self, name: str) -> list[CapturedAnswer]:
        with self._lock:
            rows = self._conn.execute(
                "SELECT c.completion_id, r.arm, c.messages, c.completion, f.score, f.thumbs"
                " FROM experiment_captures c"
                " JOIN experiment_requests r ON r.completion_id = c.completion_id"
                " JOIN experiment_feedback f ON f.completion_id = c.completion_id"
                " WHERE c.experiment = ? ORDER BY c.created, c.completion_id", (name,)).fetchall()
        return [CapturedAnswer(r[0], r[1], json.loads(r[2]), r[3], r[4], r[5]) for r in rows]

    def close(self) -> None:
        with self._lock:
            self._conn.close()


def _arms_json(arms: list[Arm]) -> str:
    return json.dumps([{"name": a.name, "weight": a.weight} for a in arms])
