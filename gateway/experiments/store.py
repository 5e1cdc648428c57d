"""Experiment persistence behind a small interface; SQLite (WAL) is the embedded implementation.

What is kept: each experiment's definition and state; per arm, running totals of everything
results count (``experiment_arm_totals``: requests, errors, cancelled, tokens, feedback, thumbs and
score sums), updated in the transaction that records a request or its feedback; the rows of the
experiment's latest ``MAX_STORED_REQUESTS`` finished requests (arm, timings, tokens, error: the
latency percentiles and feedback need them) and at most one feedback row per kept request. Older
request rows are deleted as new ones are written (``PRUNE_EVERY``); their totals stay, so results
count every request and feedback the experiment ever had, and feedback on a deleted request is
refused as unknown. For an experiment created with ``capture`` on, also the prompt (chat messages)
and the answer text of each request that received feedback (``experiment_captures``), for
preference files, at most ``MAX_STORED_CAPTURES`` per experiment (more are refused, not stored:
what a preference file was made from stays); a captured request's feedback row (which holds its
arm) is kept with the capture when its request row goes. Every write is one transaction, so a crash
leaves the old or the new state, never half of a change.
The tables share the gateway's database file with the adapter registry; their names start with
``experiment``.

What a read costs is bounded, not proportional to the traffic: ``arm_data`` reads one totals row per
arm and only the latest ``TIMING_SAMPLE`` timings per arm; preference files read captures a page at
a time (``capture_page``, ``capture_texts``).
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Protocol

from adapters import faults
from adapters.sql import SqlDatabase, SqliteDatabase, Transaction, upsert_sql
from adapters.store import MODEL_NAME_LOCK
from gateway.experiments.assignment import Arm
from gateway.experiments.errors import ExperimentConflictError, UnknownArmModelError
from gateway.experiments.stats import Moments

log = logging.getLogger(__name__)
State = Literal["running", "stopped", "promoted"]
Stickiness = Literal["user", "header", "request"]
Thumbs = Literal["up", "down"]
CANCELLED = "cancelled"  # the error type of a request its client abandoned
# Latency and time-to-first-token percentiles come from each arm's latest requests, this many:
# enough for a p95 within about a percent, and a results call reads at most this many rows per arm
# however long the experiment ran.
TIMING_SAMPLE = 10_000
EXPERIMENT_COUNT_LOCK = "experiments-count"  # creations count the table under it (Transaction.lock_name)
# Captured prompts and answers kept per experiment; feedback on more answers is still recorded,
# their text is not (each is at most GATEWAY_EXPERIMENT_CAPTURE_MAX_CHARS characters, so this
# bounds an experiment's captures on disk and what a preference file reads).
MAX_STORED_CAPTURES = 10_000
# Request rows kept per experiment, the latest: results count from the totals, so what these rows
# still serve is the timing sample (TIMING_SAMPLE per arm: full for any arm with 1% of the traffic)
# and feedback (accepted for a kept request only). A million rows with their indexes take about
# 220 MB on SQLite, 290 MB on PostgreSQL per experiment (the order of what MAX_STORED_CAPTURES
# captures may take) and leave clients 2.8 hours to rate an answer at 100 requests/s, a day at 10.
MAX_STORED_REQUESTS = 1_000_000
# Each store deletes an experiment's request rows past MAX_STORED_REQUESTS once every PRUNE_EVERY
# rows it writes to it (finding the cut-off reads MAX_STORED_REQUESTS index entries: amortized, 200
# per request), at most PRUNE_BATCH of the oldest in one transaction (a backlog, as after an upgrade,
# shrinks by PRUNE_BATCH - PRUNE_EVERY rows per PRUNE_EVERY requests without one long transaction).
# So an experiment holds at most MAX_STORED_REQUESTS + PRUNE_EVERY rows per replica writing to it.
PRUNE_EVERY = 5_000
PRUNE_BATCH = 20_000
_IDS_PER_STATEMENT = 10_000  # ids one statement names (SQLite allows 32,766 parameters)


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
    # of the arm's latest TIMING_SAMPLE kept requests (timing_sample of them), those that produced text
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
    """No kept request an experiment routed has this completion id (unknown, or pruned)."""


class ExperimentStore(Protocol):
    def load_experiments(self) -> list[Experiment]: ...

    def insert_experiment(self, experiment: Experiment, adapters: Sequence[str] | None = None,
                          max_experiments: int | None = None) -> None:
        """Add a new experiment; raises ``ValueError`` when the name exists. With ``adapters`` (its
        arms that are adapters; the registry's rows in this database), the API's errors when the
        name is an adapter's or one of ``adapters`` has no row; with ``max_experiments``, the API's
        error when that many exist (every replica's counted)."""

    def update_experiment(self, experiment: Experiment, read_at: float) -> bool:
        """Write an existing experiment's weights, state, winner and update time, if its row is
        still the version updated at ``read_at``; False (nothing written) otherwise."""

    def delete_experiment(self, name: str) -> None:
        """Remove the experiment with its requests, feedback, captures and totals, in one transaction."""

    def add_request(self, row: RequestRow) -> None:
        """Record a finished request and count it in its arm's totals; a second write of the same
        id changes nothing. Deletes the experiment's oldest rows past ``MAX_STORED_REQUESTS`` now
        and then (``PRUNE_EVERY``)."""

    def put_feedback(self, row: FeedbackRow) -> tuple[RequestRow, bool]:
        """Store feedback for a kept request, replacing earlier feedback for it (in the totals too).
        Returns the request and whether feedback was replaced; raises ``UnknownCompletionError``
        when no kept request has the id, or the request was made with another key than the
        feedback's."""

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

# The step from results aggregated over every request row to per-arm totals, applied as written once:
# as PostgreSQL's migration 2 and, on SQLite, at the first open of a database without the totals
# table (so never change it; a later change of schema is a step of its own). It creates the totals,
# gives feedback rows their arm (a feedback row outlives its request row when it was captured), adds
# the index pruning reads (and PostgreSQL the one the timing sample reads; ``by_arm`` is a prefix of
# it), drops feedback no request row matches (results never counted it), then counts every row there
# is. An arm's score sums are taken around its ``score_shift``, the mean of its scores at the upgrade
# (else its first score): a shift near the scores keeps the variance from cancelling away (scores go
# up to 1e6).
ARM_TOTALS_UPGRADE = (
    "CREATE TABLE experiment_arm_totals (experiment TEXT NOT NULL, arm TEXT NOT NULL,"
    " requests BIGINT NOT NULL DEFAULT 0, errors BIGINT NOT NULL DEFAULT 0, cancelled BIGINT NOT NULL DEFAULT 0,"
    " prompt_tokens BIGINT NOT NULL DEFAULT 0, completion_tokens BIGINT NOT NULL DEFAULT 0,"
    " feedback BIGINT NOT NULL DEFAULT 0, thumbs_up BIGINT NOT NULL DEFAULT 0, thumbs_down BIGINT NOT NULL DEFAULT 0,"
    " scored BIGINT NOT NULL DEFAULT 0, score_shift DOUBLE PRECISION, score_sum DOUBLE PRECISION NOT NULL DEFAULT 0,"
    " score_squares DOUBLE PRECISION NOT NULL DEFAULT 0, PRIMARY KEY (experiment, arm))",
    "ALTER TABLE experiment_feedback ADD COLUMN arm TEXT",
    "CREATE INDEX IF NOT EXISTS experiment_requests_by_arm_time ON experiment_requests (experiment, arm, created)",
    "CREATE INDEX experiment_requests_by_time ON experiment_requests (experiment, created)",
    "DROP INDEX IF EXISTS experiment_requests_by_arm",
    "UPDATE experiment_feedback SET arm = r.arm FROM experiment_requests AS r"
    " WHERE r.completion_id = experiment_feedback.completion_id",
    "DELETE FROM experiment_feedback WHERE arm IS NULL",
    "INSERT INTO experiment_arm_totals (experiment, arm, requests, errors, cancelled, prompt_tokens, completion_tokens)"
    " SELECT experiment, arm, COUNT(*),"
    f" SUM(CASE WHEN error_type IS NOT NULL AND error_type <> '{CANCELLED}' THEN 1 ELSE 0 END),"
    f" SUM(CASE WHEN error_type = '{CANCELLED}' THEN 1 ELSE 0 END), SUM(prompt_tokens), SUM(completion_tokens)"
    " FROM experiment_requests GROUP BY experiment, arm",
    "UPDATE experiment_arm_totals SET feedback = f.feedback, thumbs_up = f.up, thumbs_down = f.down,"
    " scored = f.scored, score_shift = f.mean"
    " FROM (SELECT experiment, arm, COUNT(*) AS feedback, SUM(CASE WHEN thumbs = 'up' THEN 1 ELSE 0 END) AS up,"
    " SUM(CASE WHEN thumbs = 'down' THEN 1 ELSE 0 END) AS down, COUNT(score) AS scored, AVG(score) AS mean"
    " FROM experiment_feedback GROUP BY experiment, arm) AS f"
    " WHERE experiment_arm_totals.experiment = f.experiment AND experiment_arm_totals.arm = f.arm",
    "UPDATE experiment_arm_totals SET score_sum = f.total, score_squares = f.squares"
    " FROM (SELECT t.experiment, t.arm, SUM(s.score - t.score_shift) AS total,"
    " SUM((s.score - t.score_shift) * (s.score - t.score_shift)) AS squares"
    " FROM experiment_feedback s JOIN experiment_arm_totals t ON t.experiment = s.experiment AND t.arm = s.arm"
    " WHERE s.score IS NOT NULL GROUP BY t.experiment, t.arm) AS f"
    " WHERE experiment_arm_totals.experiment = f.experiment AND experiment_arm_totals.arm = f.arm",
)

_EXPERIMENT_COLUMNS = "name, salt, arms, stickiness, subject_header, state, created, updated, winner, capture"
# A request's row is written once, when its outcome is final (the generation service runs its
# observers once per request): a second write of the same id is a repeat, which must not be counted
# again, so it changes nothing, and the totals are counted only when the row was inserted (RETURNING).
_INSERT_REQUEST = (f"INSERT INTO experiment_requests ({_REQUEST_COLUMNS})"
                   f" VALUES ({', '.join('?' for _ in _REQUEST_COLUMNS.split(', '))})"
                   " ON CONFLICT (completion_id) DO NOTHING RETURNING completion_id")
_REQUEST_COUNTERS = ("requests", "errors", "cancelled", "prompt_tokens", "completion_tokens")
# increments computed by the database, so replicas writing at once all count (never read, add, write)
_COUNT_REQUEST = (
    f"INSERT INTO experiment_arm_totals (experiment, arm, {', '.join(_REQUEST_COUNTERS)}) VALUES (?, ?, ?, ?, ?, ?, ?)"
    " ON CONFLICT (experiment, arm) DO UPDATE SET "
    + ", ".join(f"{c} = experiment_arm_totals.{c} + excluded.{c}" for c in _REQUEST_COUNTERS))
# An arm without a shift yet takes its first score as one (see ARM_TOTALS_UPGRADE); of two replicas
# setting it at once, the second waits for the first and then finds it set.
_SET_SCORE_SHIFT = ("UPDATE experiment_arm_totals SET score_shift = ? WHERE experiment = ? AND arm = ?"
                    " AND score_shift IS NULL")
# one feedback added to (sign 1) or taken back from (sign -1) its arm's totals; a None score adds nothing
_COUNT_FEEDBACK = (
    "UPDATE experiment_arm_totals SET feedback = feedback + ?, thumbs_up = thumbs_up + ?,"
    " thumbs_down = thumbs_down + ?, scored = scored + ?,"
    " score_sum = score_sum + COALESCE(? * (? - score_shift), 0),"
    " score_squares = score_squares + COALESCE(? * (? - score_shift) * (? - score_shift), 0)"
    " WHERE experiment = ? AND arm = ?")
_PUT_FEEDBACK = upsert_sql("experiment_feedback", ("completion_id", "experiment", "arm", "score", "thumbs", "created"),
                           key="completion_id")
# The oldest request rows past the experiment's latest ``keep`` (those written at the instant of the
# keep-th latest stay too), about ``batch`` of them at most (more only for rows written at one
# instant): a range of the (experiment, created) index between two cut-offs read from it, one
# statement, so replicas pruning at once never delete more than the rows past ``keep``, and no
# other experiment's rows are read.
_PRUNE_REQUESTS = (
    "DELETE FROM experiment_requests WHERE experiment = ?"
    " AND created < (SELECT created FROM experiment_requests WHERE experiment = ? ORDER BY created DESC"
    " LIMIT 1 OFFSET ?)"
    " AND created <= (SELECT MAX(created) FROM (SELECT created FROM experiment_requests WHERE experiment = ?"
    " ORDER BY created LIMIT ?) AS oldest) RETURNING completion_id")
_PUT_CAPTURE = upsert_sql("experiment_captures", ("completion_id", "experiment", "messages", "completion", "created"),
                          key="completion_id")


def experiments_in(tx: Transaction) -> list[Experiment]:
    """Every experiment definition, read in ``tx``."""
    rows = tx.execute(f"SELECT {_EXPERIMENT_COLUMNS} FROM experiments ORDER BY created, name")
    return [Experiment(name=r[0], salt=r[1], arms=[Arm(a["name"], a["weight"]) for a in json.loads(r[2])],
                       stickiness=r[3], subject_header=r[4], state=r[5], created=r[6], updated=r[7],
                       winner=r[8], capture=bool(r[9])) for r in rows]


class SqlExperimentStore:
    """``ExperimentStore`` on SQLite or PostgreSQL (``adapters.sql``). A change of definitions
    notifies the topic ``experiments``; request and feedback rows notify nothing (results are read
    from the database, so they aggregate over every replica)."""

    def __init__(self, db: SqlDatabase, reader: SqlDatabase | None = None):
        self.db = db
        # long reads (results) go through ``reader`` when it is another connection, so they do not
        # hold up the writes of requests and feedback on ``db``
        self.reader = reader or db
        self._unpruned: Counter[str] = Counter()  # experiment -> rows this store wrote since it pruned it

    # ---- experiments ----------------------------------------------------------------------------
    def load_experiments(self) -> list[Experiment]:
        return self.db.read(experiments_in)

    def insert_experiment(self, experiment: Experiment, adapters: Sequence[str] | None = None,
                          max_experiments: int | None = None) -> None:
        e = experiment

        def write(tx: Transaction) -> None:
            tx.lock_name(MODEL_NAME_LOCK + e.name)  # an adapter registration of the name waits, then sees this
            if tx.one("SELECT 1 FROM experiments WHERE name = ?", (e.name,)):
                raise ValueError(f"an experiment named {e.name!r} exists")
            if max_experiments is not None:  # counted here: replicas creating at once see each other's
                tx.lock_name(EXPERIMENT_COUNT_LOCK)
                if tx.one("SELECT COUNT(*) FROM experiments")[0] >= max_experiments:
                    raise ExperimentConflictError(f"{max_experiments} experiments exist, the limit; delete one first")
            # what this replica checked in memory, again in the database (another replica may have
            # deleted an arm, or registered the name, and this one not heard of it yet); the arms'
            # rows stay locked until the insert commits, so a delete cannot slip in between
            if adapters is not None and tx.one("SELECT 1 FROM registry_adapters WHERE id = ?", (e.name,)):
                raise ExperimentConflictError(f"'{e.name}' is already the name of a model; experiments and models "
                                              "share one namespace", param="name")
            if adapters:
                found = {r[0] for r in tx.execute(
                    f"SELECT id FROM registry_adapters WHERE id IN ({', '.join('?' for _ in adapters)})"
                    + tx.lock_for_share, list(adapters))}
                if missing := [a for a in adapters if a not in found]:
                    raise UnknownArmModelError(f"the arm '{missing[0]}' is no longer a registered adapter (deleted "
                                               "on another replica)", param="arms")
            tx.execute(f"INSERT INTO experiments ({_EXPERIMENT_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                       (e.name, e.salt, _arms_json(e.arms), e.stickiness, e.subject_header, e.state,
                        e.created, e.updated, e.winner, int(e.capture)))
            tx.notify("experiments", name=e.name)
        try:
            self.db.run(write)
        except self.db.integrity_errors:  # another replica inserted it between the check and the insert
            raise ValueError(f"an experiment named {e.name!r} exists") from None

    def update_experiment(self, experiment: Experiment, read_at: float) -> bool:
        """Write the changed definition if the row is still the version read (``updated`` ==
        ``read_at``); False when another replica changed or deleted it meanwhile (nothing written)."""
        e = experiment

        def write(tx: Transaction) -> bool:
            changed = tx.execute("UPDATE experiments SET arms = ?, state = ?, winner = ?, updated = ? "
                                 "WHERE name = ? AND updated = ? RETURNING name",
                                 (_arms_json(e.arms), e.state, e.winner, e.updated, e.name, read_at))
            faults.hit("experiment-db.update")
            if changed:
                tx.notify("experiments", name=e.name)
            return bool(changed)
        return self.db.run(write)

    def delete_experiment(self, name: str) -> None:
        def write(tx: Transaction) -> None:
            # request rows first: feedback locks its request row before it writes (``put_feedback``),
            # so taking them in the same order never deadlocks, and feedback that was waiting for one
            # finds it gone
            for table in ("experiment_requests", "experiment_feedback", "experiment_captures",
                          "experiment_arm_totals"):
                tx.execute(f"DELETE FROM {table} WHERE experiment = ?", (name,))
            tx.execute("DELETE FROM experiments WHERE name = ?", (name,))
            tx.notify("experiments", name=name)
        self.db.run(write)
        self._unpruned.pop(name, None)

    # ---- requests and feedback ------------------------------------------------------------------
    def add_request(self, row: RequestRow) -> None:
        self.db.run(lambda tx: _record_request(tx, row))
        self._unpruned[row.experiment] += 1
        if self._unpruned[row.experiment] >= PRUNE_EVERY:
            self._prune(row.experiment)

    def _prune(self, name: str) -> None:
        """Delete the experiment's oldest request rows past the bound, in a transaction of their own:
        the request just recorded stays recorded if this fails, and the next write tries again."""
        try:
            pruned = self.db.run(lambda tx: _prune_requests(tx, name, MAX_STORED_REQUESTS, PRUNE_BATCH))
        except Exception:  # noqa: BLE001 - whatever failed, the request was recorded; logged, tried again
            log.exception("experiment %s: could not delete its oldest request rows", name)
            return
        self._unpruned[name] = 0
        log.debug("experiment %s: %d request rows past the latest %d deleted", name, pruned, MAX_STORED_REQUESTS)

    def put_feedback(self, row: FeedbackRow) -> tuple[RequestRow, bool]:
        def write(tx: Transaction) -> tuple[RequestRow, bool]:
            # locked, so feedback on one request from two replicas is counted in turn, each seeing
            # what the other replaced, and pruning cannot take the row meanwhile
            found = tx.one(f"SELECT {_REQUEST_COLUMNS} FROM experiment_requests WHERE completion_id = ?"
                           f"{_lock_row(tx)}", (row.completion_id,))
            # a request made with another key is as unknown as a missing one: ids cannot be probed
            if found is None or found[-1] != row.api_key_id:
                raise UnknownCompletionError(row.completion_id)
            request = RequestRow(*found)
            earlier = tx.one("SELECT score, thumbs FROM experiment_feedback WHERE completion_id = ?",
                             (row.completion_id,))
            tx.execute(_PUT_FEEDBACK, (row.completion_id, request.experiment, request.arm, row.score, row.thumbs,
                                       row.created))
            if earlier is not None:
                _count_feedback(tx, request, *earlier, sign=-1)
            _count_feedback(tx, request, row.score, row.thumbs, sign=1)
            return request, earlier is not None
        return self.db.run(write)

    def arm_data(self, name: str, timing_sample: int = TIMING_SAMPLE) -> dict[str, ArmData]:
        """Per-arm totals (one row per arm: every request and feedback, kept or pruned) and the
        timings of each arm's latest ``timing_sample`` kept requests."""
        def read(tx: Transaction) -> dict[str, ArmData]:  # one transaction: counts and samples agree
            arms: dict[str, ArmData] = {}
            for (arm, requests, errors, cancelled, prompt, completion, feedback, up, down, scored, shift, total,
                 squares) in tx.execute(
                    "SELECT arm, requests, errors, cancelled, prompt_tokens, completion_tokens, feedback, thumbs_up,"
                    " thumbs_down, scored, score_shift, score_sum, score_squares FROM experiment_arm_totals"
                    " WHERE experiment = ?", (name,)):
                arms[arm] = ArmData(requests=int(requests), errors=int(errors), cancelled=int(cancelled),
                                    prompt_tokens=int(prompt), completion_tokens=int(completion),
                                    feedback=int(feedback), thumbs_up=int(up), thumbs_down=int(down),
                                    scores=Moments.from_sums(int(scored), float(total), float(squares),
                                                             float(shift or 0.0)))
            for arm, data in arms.items():
                rows = tx.execute(
                    "SELECT ttft_s, CASE WHEN error_type IS NULL THEN latency_s END FROM experiment_requests"
                    " WHERE experiment = ? AND arm = ? ORDER BY created DESC LIMIT ?", (name, arm, timing_sample))
                data.timing_sample = len(rows)
                data.ttft_s = [ttft for ttft, _ in rows if ttft is not None]
                data.latency_s = [latency for _, latency in rows if latency is not None]
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
            "SELECT c.completion_id, f.arm, c.messages, c.completion, f.score, f.thumbs, c.created"
            " FROM experiment_captures c JOIN experiment_feedback f ON f.completion_id = c.completion_id"
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
            "SELECT c.completion_id, f.arm, c.messages, c.completion, f.score, f.thumbs"
            " FROM experiment_captures c JOIN experiment_feedback f ON f.completion_id = c.completion_id"
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
            if tx.one("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'experiment_arm_totals'") is None:
                for statement in ARM_TOTALS_UPGRADE:
                    tx.execute(statement)
        self.db.run(schema)


def _record_request(tx: Transaction, row: RequestRow) -> None:
    inserted = tx.execute(_INSERT_REQUEST, (
        row.completion_id, row.experiment, row.arm, row.subject, row.endpoint, row.ttft_s, row.latency_s,
        row.prompt_tokens, row.completion_tokens, row.error_type, row.created, row.api_key_id))
    if inserted:
        failed = row.error_type is not None and row.error_type != CANCELLED
        tx.execute(_COUNT_REQUEST, (row.experiment, row.arm, 1, int(failed), int(row.error_type == CANCELLED),
                                    row.prompt_tokens, row.completion_tokens))


def _count_feedback(tx: Transaction, request: RequestRow, score: float | None, thumbs: Thumbs | None,
                    sign: int) -> None:
    if score is not None:
        tx.execute(_SET_SCORE_SHIFT, (score, request.experiment, request.arm))
    tx.execute(_COUNT_FEEDBACK, (sign, sign * (thumbs == "up"), sign * (thumbs == "down"), sign * (score is not None),
                                 sign, score, sign, score, score, request.experiment, request.arm))


def _prune_requests(tx: Transaction, name: str, keep: int, batch: int) -> int:
    """Delete the oldest request rows past the latest ``keep`` (at most ``batch``) with their
    feedback, except the feedback of captured requests; how many request rows went. Request rows
    first, the order feedback locks them in (see ``delete_experiment``)."""
    gone = [r[0] for r in tx.execute(_PRUNE_REQUESTS, (name, name, keep - 1, name, batch))]
    for first in range(0, len(gone), _IDS_PER_STATEMENT):
        ids = gone[first:first + _IDS_PER_STATEMENT]
        tx.execute(f"DELETE FROM experiment_feedback WHERE completion_id IN ({', '.join('?' for _ in ids)})"
                   " AND NOT EXISTS (SELECT 1 FROM experiment_captures c"
                   " WHERE c.completion_id = experiment_feedback.completion_id)", ids)
    return len(gone)


def _lock_row(tx: Transaction) -> str:
    """The clause that locks the rows a select reads until the transaction ends, waiting for other
    writers (PostgreSQL; SQLite's write lock is taken at BEGIN IMMEDIATE). ``tx.lock_rows`` skips
    locked rows instead, which would make a request being pruned or rated look unknown."""
    return " FOR UPDATE" if tx.dialect == "postgresql" else ""


def _count_captures(tx: Transaction, name: str) -> int:
    return int(tx.one("SELECT COUNT(*) FROM experiment_captures WHERE experiment = ?", (name,))[0])


def _arms_json(arms: list[Arm]) -> str:
    return json.dumps([{"name": a.name, "weight": a.weight} for a in arms])
