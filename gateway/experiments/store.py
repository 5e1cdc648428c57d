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

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Protocol

from adapters import faults
from adapters.sql import SqlDatabase, SqliteDatabase, Transaction, upsert_sql
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


_EXPERIMENT_COLUMNS = "name, salt, arms, stickiness, subject_header, state, created, updated, winner, capture"
_PUT_REQUEST = upsert_sql("experiment_requests", tuple(_REQUEST_COLUMNS.split(", ")), key="completion_id")
_PUT_FEEDBACK = upsert_sql("experiment_feedback", ("completion_id", "experiment", "score", "thumbs", "created"),
                           key="completion_id")
_PUT_CAPTURE = upsert_sql("experiment_captures", ("completion_id", "experiment", "messages", "completion", "created"),
                          key="completion_id")


class SqlExperimentStore:
    """``ExperimentStore`` on SQLite or PostgreSQL (``adapters.sql``). A change of definitions
    notifies the topic ``experiments``; request and feedback rows notify nothing (results are read
    from the database, so they aggregate over every replica)."""

    def __init__(self, db: SqlDatabase):
        self.db = db

    # ---- experiments ----------------------------------------------------------------------------
    def load_experiments(self) -> list[Experiment]:
        rows = self.db.read(lambda tx: tx.execute(
            f"SELECT {_EXPERIMENT_COLUMNS} FROM experiments ORDER BY created, name"))
        return [Experiment(name=r[0], salt=r[1], arms=[Arm(a["name"], a["weight"]) for a in json.loads(r[2])],
                           stickiness=r[3], subject_header=r[4], state=r[5], created=r[6], updated=r[7],
                           winner=r[8], capture=bool(r[9])) for r in rows]

    def insert_experiment(self, experiment: Experiment) -> None:
        e = experiment

        def write(tx: Transaction) -> None:
            if tx.one("SELECT 1 FROM experiments WHERE name = ?", (e.name,)):
                raise ValueError(f"an experiment named {e.name!r} exists")
            tx.execute(f"INSERT INTO experiments ({_EXPERIMENT_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                       (e.name, e.salt, _arms_json(e.arms), e.stickiness, e.subject_header, e.state,
                        e.created, e.updated, e.winner, int(e.capture)))
            tx.notify("experiments", name=e.name)
        try:
            self.db.run(write)
        except self.db.integrity_errors:  # another replica inserted it between the check and the insert
            raise ValueError(f"an experiment named {e.name!r} exists") from None

    def update_experiment(self, experiment: Experiment) -> None:
        e = experiment

        def write(tx: Transaction) -> None:
            tx.execute("UPDATE experiments SET arms = ?, state = ?, winner = ?, updated = ? WHERE name = ?",
                       (_arms_json(e.arms), e.state, e.winner, e.updated, e.name))
            faults.hit("experiment-db.update")
            tx.notify("experiments", name=e.name)
        self.db.run(write)

    def delete_experiment(self, name: str) -> None:
        def write(tx: Transaction) -> None:
            for table in ("experiment_captures", "experiment_feedback", "experiment_requests"):
                tx.execute(f"DELETE FROM {table} WHERE experiment = ?", (name,))
            tx.execute("DELETE FROM experiments WHERE name = ?", (name,))
            tx.notify("experiments", name=name)
        self.db.run(write)

    # ---- requests and feedback ------------------------------------------------------------------
    def add_request(self, row: RequestRow) -> None:
        self.db.run(lambda tx: tx.execute(_PUT_REQUEST, (
            row.completion_id, row.experiment, row.arm, row.subject, row.endpoint, row.ttft_s, row.latency_s,
            row.prompt_tokens, row.completion_tokens, row.error_type, row.created, row.api_key_id)))

    def put_feedback(self, row: FeedbackRow) -> tuple[RequestRow, bool]:
        def write(tx: Transaction) -> tuple[RequestRow, bool]:
            found = tx.one(f"SELECT {_REQUEST_COLUMNS} FROM experiment_requests WHERE completion_id = ?",
                           (row.completion_id,))
            # a request made with another key is as unknown as a missing one: ids cannot be probed
            if found is None or found[-1] != row.api_key_id:
                raise UnknownCompletionError(row.completion_id)
            request = RequestRow(*found)
            replaced = tx.one("SELECT 1 FROM experiment_feedback WHERE completion_id = ?",
                              (row.completion_id,)) is not None
            tx.execute(_PUT_FEEDBACK, (row.completion_id, request.experiment, row.score, row.thumbs, row.created))
            return request, replaced
        return self.db.run(write)

    def arm_data(self, name: str) -> dict[str, ArmData]:
        def read(tx: Transaction) -> tuple[list, list, list]:  # one transaction: counts and samples agree
            counts = tx.execute(
                "SELECT arm, COUNT(*),"
                " SUM(CASE WHEN error_type IS NOT NULL AND error_type <> ? THEN 1 ELSE 0 END),"
                " SUM(CASE WHEN error_type = ? THEN 1 ELSE 0 END), SUM(prompt_tokens), SUM(completion_tokens)"
                " FROM experiment_requests WHERE experiment = ? GROUP BY arm", (CANCELLED, CANCELLED, name))
            timings = tx.execute(
                "SELECT arm, ttft_s, CASE WHEN error_type IS NULL THEN latency_s END FROM experiment_requests"
                " WHERE experiment = ?", (name,))
            feedback = tx.execute(
                "SELECT r.arm, f.score, f.thumbs FROM experiment_feedback f"
                " JOIN experiment_requests r ON r.completion_id = f.completion_id WHERE f.experiment = ?", (name,))
            return counts, timings, feedback

        counts, timings, feedback = self.db.read(read)
        arms: dict[str, ArmData] = {}
        for arm, requests, errors, cancelled, prompt, completion in counts:
            arms[arm] = ArmData(requests=int(requests), errors=int(errors or 0), cancelled=int(cancelled or 0),
                                prompt_tokens=int(prompt or 0), completion_tokens=int(completion or 0))
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
        self.db.run(lambda tx: tx.execute(_PUT_CAPTURE, (row.completion_id, row.experiment, json.dumps(row.messages),
                                                         row.completion, row.created)))

    def captured_answers(self, name: str) -> list[CapturedAnswer]:
        rows = self.db.read(lambda tx: tx.execute(
            "SELECT c.completion_id, r.arm, c.messages, c.completion, f.score, f.thumbs"
            " FROM experiment_captures c"
            " JOIN experiment_requests r ON r.completion_id = c.completion_id"
            " JOIN experiment_feedback f ON f.completion_id = c.completion_id"
            " WHERE c.experiment = ? ORDER BY c.created, c.completion_id", (name,)))
        return [CapturedAnswer(r[0], r[1], json.loads(r[2]), r[3], r[4], r[5]) for r in rows]

    def close(self) -> None:
        self.db.close()


class SqliteExperimentStore(SqlExperimentStore):
    def __init__(self, path: Path):
        # NORMAL in WAL mode: a commit survives a crash of the process (not necessarily of the OS)
        # without one fsync per request row
        super().__init__(SqliteDatabase(path, synchronous="NORMAL"))

        def schema(tx: Transaction) -> None:
            for statement in _SCHEMA:
                tx.execute(statement)
            for table, column, type_ in _ADDED_COLUMNS:
                if column not in {r[1] for r in tx.execute(f"PRAGMA table_info({table})")}:
                    tx.execute(f"ALTER TABLE {table} ADD COLUMN {column} {type_}")
        self.db.run(schema)


def _arms_json(arms: list[Arm]) -> str:
    return json.dumps([{"name": a.name, "weight": a.weight} for a in arms])
