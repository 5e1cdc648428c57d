"""Experiment persistence behind a small interface; SQLite (WAL) is the embedded implementation.

What is kept: each experiment's definition and state, one row per finished request an experiment
routed (its arm, timings, tokens, error), and at most one feedback row per such request. For an
experiment created with ``capture`` on, also the prompt (chat messages) and the answer text of each
request that received feedback (``experiment_captures``), for preference files, at most
``MAX_STORED_CAPTURES`` per experiment (more are refused, not stored: what a preference file was
made from stays). Every write is one transaction, so a crash leaves the old or the new state,
never half of a change.
The tables share the gateway's database file with the adapter registry; their names start with
``experiment``.

What a read costs is bounded, not proportional to the rows kept: ``arm_data`` aggregates counts,
sums and score moments in SQL and reads only the latest ``TIMING_SAMPLE`` timings per arm;
preference files read captures a page at a time (``capture_page``, ``capture_texts``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Protocol

from adapters import faults
from adapters.sql import SqlDatabase, SqliteDatabase, Transaction, upsert_sql
from gateway.experiments.assignment import Arm
from gateway.experiments.stats import Moments

State = Literal["running", "stopped", "promoted"]
Stickiness = Literal["user", "header", "request"]
Thumbs = Literal["up", "down"]
CANCELLED = "cancelled"  # the error type of a request its client abandoned
# Latency and time-to-first-token percentiles come from each arm's latest requests, this many:
# enough for a p95 within about a percent, and a results call reads at most this many rows per arm
# however long the experiment ran.
TIMING_SAMPLE = 10_000
# Captured prompts and answers kept per experiment; feedback on more answers is still recorded,
# their text is not (each is at most GATEWAY_EXPERIMENT_CAPTURE_MAX_CHARS characters, so this
# bounds an experiment's captures on disk and what a preference file reads).
MAX_STORED_CAPTURES = 10_000


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
    # of the arm's latest TIMING_SAMPLE requests (timing_sample of them), those that produced text
    ttft_s: list[float] = field(default_factory=list)
    latency_s: list[float] = field(default_factory=list)  # ... and those that completed without error
    timing_sample: int = 0
    feedback: int = 0
    scores: Moments = field(default_factory=Moments)  # count, mean and spread of every score
    thumbs_up: int = 0
    thumbs_down: int = 0


@dataclass
class CaptureRow:
    """The prompt and answer of a request that received feedback, in an experiment with capture on."""

    completion_id: str
    experiment: str
    messages_json: str  # the request's chat messages as the template saw them, JSON (UTF-8, not escaped)
    completion: str  # the answer's text
    created: float


@dataclass
class CapturePageRow:
    """A captured answer with feedback as a preference file's first pass reads it (page by page)."""

    completion_id: str
    arm: str
    messages_json: str
    completion: str
    score: float | None
    thumbs: Thumbs | None
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

    def arm_data(self, name: str, timing_sample: int = TIMING_SAMPLE) -> dict[str, ArmData]: ...

    def put_capture(self, row: CaptureRow, max_stored: int = MAX_STORED_CAPTURES) -> bool:
        """Keep (or replace) the prompt and answer of a request; False (nothing written) when the
        experiment already holds ``max_stored`` captures."""

    def capture_count(self, name: str) -> int: ...

    def capture_page(self, name: str, after: tuple[float, str] | None, limit: int) -> list[CapturePageRow]:
        """At most ``limit`` captured answers with feedback, oldest first, after (created, id) ``after``."""

    def capture_texts(self, completion_ids: list[str]) -> dict[str, tuple[str, str]]:
        """completion id -> (messages JSON, answer) of the captures among ``completion_ids``."""

    def captured_answers(self, name: str) -> list[CapturedAnswer]:
        """Every captured answer of the experiment that has feedback, oldest first, parsed (at most
        MAX_STORED_CAPTURES; preference files read ``capture_page`` instead, a page at a time)."""

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
    # the latest TIMING_SAMPLE rows of an arm without reading the others (results)
    "CREATE INDEX IF NOT EXISTS experiment_requests_by_arm_time ON experiment_requests (experiment, arm, created)",
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

    def __init__(self, db: SqlDatabase, reader: SqlDatabase | None = None):
        self.db = db
        # long reads (results) go through ``reader`` when it is another connection, so they do not
        # hold up the writes of requests and feedback on ``db``
        self.reader = reader or db

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

    def arm_data(self, name: str, timing_sample: int = TIMING_SAMPLE) -> dict[str, ArmData]:
        """Per-arm counts and sums, score moments (all in SQL: no row reaches Python) and the timings
        of each arm's latest ``timing_sample`` requests."""
        def read(tx: Transaction) -> dict[str, ArmData]:  # one transaction: counts and samples agree
            arms: dict[str, ArmData] = {}
            for arm, requests, errors, cancelled, prompt, completion in tx.execute(
                    "SELECT arm, COUNT(*),"
                    " SUM(CASE WHEN error_type IS NOT NULL AND error_type <> ? THEN 1 ELSE 0 END),"
                    " SUM(CASE WHEN error_type = ? THEN 1 ELSE 0 END), SUM(prompt_tokens), SUM(completion_tokens)"
                    " FROM experiment_requests WHERE experiment = ? GROUP BY arm", (CANCELLED, CANCELLED, name)):
                arms[arm] = ArmData(requests=int(requests), errors=int(errors or 0), cancelled=int(cancelled or 0),
                                    prompt_tokens=int(prompt or 0), completion_tokens=int(completion or 0))
            for arm, data in arms.items():
                rows = tx.execute(
                    "SELECT ttft_s, CASE WHEN error_type IS NULL THEN latency_s END FROM experiment_requests"
                    " WHERE experiment = ? AND arm = ? ORDER BY created DESC LIMIT ?", (name, arm, timing_sample))
                data.timing_sample = len(rows)
                data.ttft_s = [ttft for ttft, _ in rows if ttft is not None]
                data.latency_s = [latency for _, latency in rows if latency is not None]
            # scores in one pass: sums of (score - shift) and its square, shift being one of the
            # scores, so the variance does not cancel away even for scores far from 0 (up to 1e6)
            shift = tx.one("SELECT score FROM experiment_feedback WHERE experiment = ? AND score IS NOT NULL LIMIT 1",
                           (name,))
            c = float(shift[0]) if shift else 0.0
            for arm, feedback, scored, total, squares, up, down in tx.execute(
                    "SELECT r.arm, COUNT(*), COUNT(f.score), SUM(f.score - ?), SUM((f.score - ?) * (f.score - ?)),"
                    " SUM(CASE WHEN f.thumbs = 'up' THEN 1 ELSE 0 END),"
                    " SUM(CASE WHEN f.thumbs = 'down' THEN 1 ELSE 0 END)"
                    " FROM experiment_feedback f JOIN experiment_requests r ON r.completion_id = f.completion_id"
                    " WHERE f.experiment = ? GROUP BY r.arm", (c, c, c, name)):
                data = arms.setdefault(arm, ArmData())
                data.feedback, data.thumbs_up, data.thumbs_down = int(feedback), int(up or 0), int(down or 0)
                data.scores = Moments.from_sums(int(scored), float(total or 0.0), float(squares or 0.0), c)
            return arms

        return self.reader.read(read)

    def put_capture(self, row: CaptureRow, max_stored: int = MAX_STORED_CAPTURES) -> bool:
        def write(tx: Transaction) -> bool:
            replacing = tx.one("SELECT 1 FROM experiment_captures WHERE completion_id = ?", (row.completion_id,))
            if replacing is None and _count_captures(tx, row.experiment) >= max_stored:
                return False
            tx.execute(_PUT_CAPTURE, (row.completion_id, row.experiment, row.messages_json, row.completion,
                                      row.created))
            return True
        return self.db.run(write)

    def capture_count(self, name: str) -> int:
        return self.reader.read(lambda tx: _count_captures(tx, name))

    def capture_page(self, name: str, after: tuple[float, str] | None, limit: int) -> list[CapturePageRow]:
        created, completion_id = after if after is not None else (float("-inf"), "")
        rows = self.db.read(lambda tx: tx.execute(
            "SELECT c.completion_id, r.arm, c.messages, c.completion, f.score, f.thumbs, c.created"
            " FROM experiment_captures c"
            " JOIN experiment_requests r ON r.completion_id = c.completion_id"
            " JOIN experiment_feedback f ON f.completion_id = c.completion_id"
            " WHERE c.experiment = ? AND (c.created > ? OR (c.created = ? AND c.completion_id > ?))"
            " ORDER BY c.created, c.completion_id LIMIT ?", (name, created, created, completion_id, limit)))
        return [CapturePageRow(*r) for r in rows]

    def capture_texts(self, completion_ids: list[str]) -> dict[str, tuple[str, str]]:
        if not completion_ids:
            return {}
        marks = ", ".join("?" for _ in completion_ids)
        rows = self.db.read(lambda tx: tx.execute(
            f"SELECT completion_id, messages, completion FROM experiment_captures WHERE completion_id IN ({marks})",
            tuple(completion_ids)))
        return {r[0]: (r[1], r[2]) for r in rows}

    def captured_answers(self, name: str) -> list[CapturedAnswer]:
        rows = self.db.read(lambda tx: tx.execute(
            "SELECT c.completion_id, r.arm, c.messages, c.completion, f.score, f.thumbs"
            " FROM experiment_captures c"
            " JOIN experiment_requests r ON r.completion_id = c.completion_id"
            " JOIN experiment_feedback f ON f.completion_id = c.completion_id"
            " WHERE c.experiment = ? ORDER BY c.created, c.completion_id", (name,)))
        return [CapturedAnswer(r[0], r[1], json.loads(r[2]), r[3], r[4], r[5]) for r in rows]

    def close(self) -> None:
        if self.reader is not self.db:
            self.reader.close()
        self.db.close()


class SqliteExperimentStore(SqlExperimentStore):
    def __init__(self, path: Path):
        # NORMAL in WAL mode: a commit survives a crash of the process (not necessarily of the OS)
        # without one fsync per request row. A second connection reads results: in WAL mode a
        # reader never blocks the writer
        super().__init__(SqliteDatabase(path, synchronous="NORMAL"), SqliteDatabase(path, synchronous="NORMAL"))

        def schema(tx: Transaction) -> None:
            for statement in _SCHEMA:
                tx.execute(statement)
            for table, column, type_ in _ADDED_COLUMNS:
                if column not in {r[1] for r in tx.execute(f"PRAGMA table_info({table})")}:
                    tx.execute(f"ALTER TABLE {table} ADD COLUMN {column} {type_}")
        self.db.run(schema)


def _count_captures(tx: Transaction, name: str) -> int:
    return int(tx.one("SELECT COUNT(*) FROM experiment_captures WHERE experiment = ?", (name,))[0])


def _arms_json(arms: list[Arm]) -> str:
    return json.dumps([{"name": a.name, "weight": a.weight} for a in arms])
