"""What an experiment keeps is bounded while its results stay exact: request rows past the latest
``MAX_STORED_REQUESTS`` are deleted as new ones are written, the per-arm totals keep counting
them (and the feedback they had), feedback on a deleted request is refused as unknown, captures
outlive their request rows, replicas writing at once count exactly, and a database from before
the totals is upgraded with its results unchanged. On SQLite and PostgreSQL alike; the bounds are
made small so that a test writes a few times past them in seconds."""

from __future__ import annotations

import json
import threading
import time

import pytest
from postgres_support import migrated_database

import gateway.experiments.store as store_module
from adapters.sql import PostgresDatabase, SqliteDatabase
from gateway.database.migrations import MIGRATIONS, migrate
from gateway.experiments.assignment import Arm
from gateway.experiments.stats import Moments
from gateway.experiments.store import (
    ArmData, CapturedAnswer, CaptureRow, Experiment, FeedbackRow, RequestRow, SqlExperimentStore,
    SqliteExperimentStore, UnknownCompletionError,
)

KEEP, EVERY, BATCH = 40, 10, 25  # the bounds these tests run under
ARMS = ("base", "lora-a")
OUTCOMES = (None, None, None, "generation_failed", "cancelled")  # error_type, by request number


@pytest.fixture
def small_bounds(monkeypatch):
    monkeypatch.setattr(store_module, "MAX_STORED_REQUESTS", KEEP)
    monkeypatch.setattr(store_module, "PRUNE_EVERY", EVERY)
    monkeypatch.setattr(store_module, "PRUNE_BATCH", BATCH)


@pytest.fixture
def open_store(store_backend):
    return lambda: store_backend.open(SqliteExperimentStore, SqlExperimentStore)


def experiment(name: str, capture: bool = False) -> Experiment:
    return Experiment(name=name, salt="s", arms=[Arm(arm, 1.0) for arm in ARMS], stickiness="request",
                      subject_header=None, state="running", created=1.0, updated=1.0, capture=capture)


def routed(name: str, i: int, created: float | None = None) -> RequestRow:
    """The i-th request of experiment ``name``: arm, outcome, timings and tokens vary with i."""
    return RequestRow(completion_id=f"{name}-{i}", experiment=name, arm=ARMS[i % 2], subject=None, endpoint="chat",
                      ttft_s=0.01 * (i % 13), latency_s=0.1 * (i % 17), prompt_tokens=10 + i % 7,
                      completion_tokens=i % 5, error_type=OUTCOMES[i % len(OUTCOMES)],
                      created=float(i) if created is None else created)


def rating(name: str, i: int) -> FeedbackRow:
    """Feedback on the i-th request: a score, a thumbs, or both, far from 0 (the shift matters)."""
    score = None if i % 3 == 0 else 1e6 + (i % 11) * 0.25
    thumbs = (None, "up", "down")[i % 3] if score is not None else ("up", "down")[i % 2]
    return FeedbackRow(f"{name}-{i}", score, thumbs, float(i))


def write_traffic(store, name: str, count: int) -> None:
    """``count`` requests, each rated at once; every fourth one's rating replaced three requests later."""
    for i in range(count):
        store.add_request(routed(name, i))
        store.put_feedback(rating(name, i))
        if i >= 3 and (i - 3) % 4 == 0:
            store.put_feedback(FeedbackRow(f"{name}-{i - 3}", -5.5, "down", float(i)))


def rows(store, table: str, name: str) -> int:
    return store.db.run(lambda tx: tx.one(f"SELECT COUNT(*) FROM {table} WHERE experiment = ?", (name,)))[0]


def expected(requests: list[RequestRow], ratings: dict[str, FeedbackRow]) -> dict[str, ArmData]:
    """What results must count, from every request and the last rating of each."""
    arms: dict[str, ArmData] = {}
    for r in requests:
        data = arms.setdefault(r.arm, ArmData())
        data.requests += 1
        data.errors += r.error_type not in (None, "cancelled")
        data.cancelled += r.error_type == "cancelled"
        data.prompt_tokens += r.prompt_tokens
        data.completion_tokens += r.completion_tokens
    arm_of = {r.completion_id: r.arm for r in requests}
    for arm, data in arms.items():
        rated = [f for cid, f in ratings.items() if arm_of[cid] == arm]
        data.feedback = len(rated)
        data.thumbs_up = sum(f.thumbs == "up" for f in rated)
        data.thumbs_down = sum(f.thumbs == "down" for f in rated)
        data.scores = Moments.of([f.score for f in rated if f.score is not None])
    return arms


def assert_counts(got: dict[str, ArmData], want: dict[str, ArmData]) -> None:
    """Counts exactly; score moments to rounding (sums taken in another order)."""
    assert set(got) == set(want)
    for arm, data in want.items():
        have = got[arm]
        assert (have.requests, have.errors, have.cancelled, have.prompt_tokens, have.completion_tokens,
                have.feedback, have.thumbs_up, have.thumbs_down) == \
            (data.requests, data.errors, data.cancelled, data.prompt_tokens, data.completion_tokens,
             data.feedback, data.thumbs_up, data.thumbs_down), arm
        assert have.scores.count == data.scores.count
        if data.scores.count:
            assert have.scores.mean == pytest.approx(data.scores.mean, rel=1e-12)
            assert have.scores.variance == pytest.approx(data.scores.variance, rel=1e-9)


# ---- pruning ----------------------------------------------------------------------------------------
def test_results_are_the_same_with_three_times_the_kept_rows_pruned(open_store, small_bounds, monkeypatch):
    store = open_store()
    try:
        monkeypatch.setattr(store_module, "MAX_STORED_REQUESTS", 10**9)  # the same traffic, nothing pruned
        write_traffic(store, "kept", 3 * KEEP)
        monkeypatch.setattr(store_module, "MAX_STORED_REQUESTS", KEEP)
        write_traffic(store, "pruned", 3 * KEEP)

        assert rows(store, "experiment_requests", "kept") == 3 * KEEP
        assert KEEP <= rows(store, "experiment_requests", "pruned") <= KEEP + EVERY
        assert rows(store, "experiment_feedback", "pruned") == rows(store, "experiment_requests", "pruned")
        # every count, token, rating and score moment, and the latest timings: identical
        assert store.arm_data("pruned", timing_sample=5) == store.arm_data("kept", timing_sample=5)
        everything = [routed("pruned", i) for i in range(3 * KEEP)]
        ratings = {f.completion_id: f for f in (rating("pruned", i) for i in range(3 * KEEP))}
        ratings.update({f"pruned-{i}": FeedbackRow(f"pruned-{i}", -5.5, "down", 0.0)
                        for i in range(0, 3 * KEEP - 3, 4)})
        assert_counts(store.arm_data("pruned"), expected(everything, ratings))
    finally:
        store.close()


def test_feedback_on_a_pruned_request_is_refused_and_earlier_feedback_still_counts(open_store, small_bounds):
    store = open_store()
    try:
        store.add_request(routed("exp", 0))
        store.put_feedback(FeedbackRow("exp-0", 3.0, "up", 0.0))  # before its row goes
        for i in range(1, 3 * KEEP):
            store.add_request(routed("exp", i))
        with pytest.raises(UnknownCompletionError):
            store.put_feedback(FeedbackRow("exp-0", 1.0, "down", 1.0))  # its row was pruned
        _, replaced = store.put_feedback(FeedbackRow(f"exp-{3 * KEEP - 2}", 2.0, None, 1.0))  # a kept one
        assert replaced is False
        base = store.arm_data("exp")["base"]
        assert (base.requests, base.feedback, base.thumbs_up, base.thumbs_down) == (3 * KEEP // 2, 2, 1, 0)
        assert base.scores == Moments.of([3.0, 2.0])
    finally:
        store.close()


def test_a_captured_answer_outlives_its_request_row(open_store, small_bounds):
    store = open_store()
    try:
        store.insert_experiment(experiment("exp", capture=True))
        messages = [{"role": "user", "content": "hi"}]
        for i in range(3 * KEEP):
            store.add_request(routed("exp", i))
            if i < 2:  # the two oldest are captured, with feedback: a preference pair
                store.put_feedback(FeedbackRow(f"exp-{i}", None, ("up", "down")[i], float(i)))
                store.put_capture(CaptureRow(f"exp-{i}", "exp", json.dumps(messages), f"answer {i}", float(i)))
            elif i < 4:  # rated, not captured: their feedback rows go with their request rows
                store.put_feedback(FeedbackRow(f"exp-{i}", 1.0, None, float(i)))
        gone = store.db.run(lambda tx: tx.execute(
            "SELECT completion_id FROM experiment_requests WHERE completion_id IN ('exp-0', 'exp-1', 'exp-2')"))
        assert gone == []
        assert store.db.run(lambda tx: tx.execute(
            "SELECT completion_id FROM experiment_feedback WHERE experiment = 'exp' ORDER BY completion_id")) == \
            [("exp-0",), ("exp-1",)]
        want = [CapturedAnswer("exp-0", "base", messages, "answer 0", None, "up"),
                CapturedAnswer("exp-1", "lora-a", messages, "answer 1", None, "down")]
        assert store.captured_answers("exp") == want
        assert [(r.completion_id, r.arm, r.thumbs) for r in store.capture_page("exp", None, 10)] == \
            [("exp-0", "base", "up"), ("exp-1", "lora-a", "down")]
        assert store.arm_data("exp")["base"].feedback == 2  # exp-0 and exp-2, both pruned
        store.delete_experiment("exp")
        for table in ("experiment_requests", "experiment_feedback", "experiment_captures", "experiment_arm_totals"):
            assert rows(store, table, "exp") == 0
    finally:
        store.close()


# ---- replicas ---------------------------------------------------------------------------------------
def test_two_replicas_writing_at_once_count_exactly(postgres_url, small_bounds, monkeypatch):
    keep = 100  # rows a replica writes between its request and its rating stay far below it
    monkeypatch.setattr(store_module, "MAX_STORED_REQUESTS", keep)
    stores = [SqlExperimentStore(migrated_database(postgres_url)) for _ in range(2)]
    shared = [routed("exp", 10_000 + i, created=1e12 + i) for i in range(6)]  # the newest: never pruned
    for store in stores:  # each replica writes them (a repeat): counted once
        for row in shared:
            store.add_request(row)
    per_replica, errors = 150, []
    barrier = threading.Barrier(2)

    def replica(n: int) -> None:
        store = stores[n]
        try:
            barrier.wait()
            for i in range(n, 2 * per_replica, 2):  # replica 0 the even requests, 1 the odd
                store.add_request(routed("exp", i, created=time.time()))  # rows as replicas write them
                store.put_feedback(rating("exp", i))
                # both replicas rate (and re-rate) the shared requests: each rating replaces the last
                target = shared[i // 2 % len(shared)].completion_id  # the same one at the same step
                store.put_feedback(FeedbackRow(target, float(i), ("up", "down")[n], float(i)))
        except BaseException as exc:  # noqa: BLE001 - reported by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=replica, args=(n,)) for n in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    try:
        assert errors == []
        ratings = {f.completion_id: f for f in (rating("exp", i) for i in range(2 * per_replica))}
        for cid, score, thumbs in stores[0].db.run(lambda tx: tx.execute(
                "SELECT completion_id, score, thumbs FROM experiment_feedback WHERE completion_id IN"
                f" ({', '.join('?' for _ in shared)})", [r.completion_id for r in shared])):
            ratings[cid] = FeedbackRow(cid, score, thumbs, 0.0)  # the last rating of each, whichever replica
        assert len(ratings) == 2 * per_replica + len(shared)
        assert_counts(stores[1].arm_data("exp"), expected([routed("exp", i) for i in range(2 * per_replica)]
                                                          + shared, ratings))
        assert rows(stores[0], "experiment_requests", "exp") <= keep + 2 * EVERY
    finally:
        for store in stores:
            store.close()


# ---- upgrade ----------------------------------------------------------------------------------------
# the SQLite tables as the release before the totals created them
OLD_SQLITE_SCHEMA = (
    "CREATE TABLE experiments (name TEXT PRIMARY KEY, salt TEXT NOT NULL, arms TEXT NOT NULL,"
    " stickiness TEXT NOT NULL, subject_header TEXT, state TEXT NOT NULL, winner TEXT, created REAL NOT NULL,"
    " updated REAL NOT NULL, capture INTEGER NOT NULL DEFAULT 0)",
    "CREATE TABLE experiment_requests (completion_id TEXT PRIMARY KEY, experiment TEXT NOT NULL, arm TEXT NOT NULL,"
    " subject TEXT, endpoint TEXT NOT NULL, ttft_s REAL, latency_s REAL, prompt_tokens INTEGER NOT NULL,"
    " completion_tokens INTEGER NOT NULL, error_type TEXT, created REAL NOT NULL, api_key_id TEXT)",
    "CREATE INDEX experiment_requests_by_arm ON experiment_requests (experiment, arm)",
    "CREATE INDEX experiment_requests_by_arm_time ON experiment_requests (experiment, arm, created)",
    "CREATE TABLE experiment_feedback (completion_id TEXT PRIMARY KEY, experiment TEXT NOT NULL, score REAL,"
    " thumbs TEXT CHECK (thumbs IN ('up', 'down')), created REAL NOT NULL)",
    "CREATE INDEX experiment_feedback_by_experiment ON experiment_feedback (experiment)",
    "CREATE TABLE experiment_captures (completion_id TEXT PRIMARY KEY, experiment TEXT NOT NULL,"
    " messages TEXT NOT NULL, completion TEXT NOT NULL, created REAL NOT NULL)",
)


def old_database(backend: str, request, tmp_path):
    """A database with the schema of the release before the totals (no rows); a function opening
    the store on it the way the gateway does (on PostgreSQL: migrate first)."""
    if backend == "sqlite":
        path = tmp_path / "gateway.sqlite3"
        db = SqliteDatabase(path)
        db.run(lambda tx: [tx.execute(statement) for statement in OLD_SQLITE_SCHEMA])
        return db, lambda: SqliteExperimentStore(path)
    url = request.getfixturevalue("postgres_url")
    db = PostgresDatabase(url)
    assert migrate(db, MIGRATIONS[:1]) == [1]

    def open_upgraded():
        upgraded = PostgresDatabase(url)
        migrate(upgraded)
        return SqlExperimentStore(upgraded)
    return db, open_upgraded


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_an_older_database_is_upgraded_with_its_results_unchanged(backend, request, tmp_path, small_bounds):
    db, open_upgraded = old_database(backend, request, tmp_path)
    old = [routed("exp", i) for i in range(30)]
    ratings = {f.completion_id: f for f in (rating("exp", i) for i in range(0, 30, 2))}
    messages = json.dumps([{"role": "user", "content": "hi"}])

    def fill(tx) -> None:
        tx.execute("INSERT INTO experiments (name, salt, arms, stickiness, state, created, updated, capture)"
                   " VALUES ('exp', 's', ?, 'request', 'running', 1, 1, 1)",
                   (json.dumps([{"name": arm, "weight": 1} for arm in ARMS]),))
        for r in old:
            tx.execute("INSERT INTO experiment_requests VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                       (r.completion_id, r.experiment, r.arm, r.subject, r.endpoint, r.ttft_s, r.latency_s,
                        r.prompt_tokens, r.completion_tokens, r.error_type, r.created, r.api_key_id))
        for f in [*ratings.values(), FeedbackRow("orphan", 9.0, "up", 0.0)]:  # orphan: no request row
            tx.execute("INSERT INTO experiment_feedback VALUES (?, 'exp', ?, ?, ?)",
                       (f.completion_id, f.score, f.thumbs, f.created))
        tx.execute("INSERT INTO experiment_captures VALUES ('exp-0', 'exp', ?, 'answer', 0)", (messages,))
    db.run(fill)
    db.close()
    want = expected(old, ratings)

    store = open_upgraded()
    try:
        assert_counts(store.arm_data("exp"), want)
    finally:
        store.close()
    store = open_upgraded()  # a second start changes nothing
    try:
        assert_counts(store.arm_data("exp"), want)
        # new traffic pushes every old row out: what they counted stays
        new = [routed("exp", i) for i in range(100, 100 + 3 * KEEP)]
        for row in new:
            store.add_request(row)
        assert rows(store, "experiment_requests", "exp") <= KEEP + EVERY
        assert_counts(store.arm_data("exp"), expected(old + new, ratings))
        with pytest.raises(UnknownCompletionError):
            store.put_feedback(FeedbackRow("exp-2", 1.0, None, 0.0))
        # the captured answer kept its arm and feedback with its request row gone
        assert store.captured_answers("exp") == [
            CapturedAnswer("exp-0", "base", json.loads(messages), "answer", ratings["exp-0"].score,
                           ratings["exp-0"].thumbs)]
    finally:
        store.close()

