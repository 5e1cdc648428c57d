"""Persistence of experiments, request outcomes and feedback, on SQLite and on PostgreSQL alike:
round trips, reopening the database, replaced feedback, deletes that take everything with them,
and rolled-back transactions."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gateway.experiments.assignment import Arm
from gateway.experiments.store import (
    CapturedAnswer, CaptureRow, Experiment, FeedbackRow, RequestRow, SqlExperimentStore, SqliteExperimentStore,
    UnknownCompletionError,
)
from gateway.experiments.stats import Moments


def experiment(name: str = "exp", **overrides) -> Experiment:
    values = dict(name=name, salt="s1", arms=[Arm("base", 70.0), Arm("lora-a", 30.0)], stickiness="user",
                  subject_header=None, state="running", created=100.0, updated=100.0)
    return Experiment(**{**values, **overrides})


def request_row(completion_id: str, arm: str, *, experiment_name: str = "exp", error: str | None = None,
                ttft: float | None = 0.1, latency: float = 0.5, tokens: tuple[int, int] = (10, 5)) -> RequestRow:
    return RequestRow(completion_id=completion_id, experiment=experiment_name, arm=arm, subject="abc",
                      endpoint="chat", ttft_s=ttft, latency_s=latency, prompt_tokens=tokens[0],
                      completion_tokens=tokens[1], error_type=error, created=200.0)


@pytest.fixture
def db(tmp_path) -> Path:
    return tmp_path / "gateway.sqlite3"


@pytest.fixture
def open_store(store_backend):
    return lambda: store_backend.open(SqliteExperimentStore, SqlExperimentStore)


@pytest.fixture
def store(open_store):
    store = open_store()
    yield store
    store.close()


def test_experiments_survive_reopening(open_store):
    first = open_store()
    first.insert_experiment(experiment("a", stickiness="header", subject_header="x-session-id"))
    first.insert_experiment(experiment("b", created=50.0))
    changed = experiment("a", arms=[Arm("base", 50.0), Arm("lora-a", 50.0)], state="promoted", winner="lora-a",
                         updated=300.0, stickiness="header", subject_header="x-session-id")
    assert first.update_experiment(changed, read_at=100.0)
    first.close()

    second = open_store()
    loaded = {e.name: e for e in second.load_experiments()}
    assert [e.name for e in second.load_experiments()] == ["b", "a"]  # by creation time
    assert loaded["a"] == changed
    assert loaded["b"] == experiment("b", created=50.0)
    second.close()


def test_an_update_from_a_stale_read_writes_nothing(store):
    """Two replicas read version 100; the first write wins, the second (from its stale copy) is
    refused, not silently undoing the first (a promotion reverted by a weights change)."""
    store.insert_experiment(experiment())
    promoted = experiment(state="promoted", winner="lora-a", updated=200.0)
    assert store.update_experiment(promoted, read_at=100.0)
    assert not store.update_experiment(experiment(arms=[Arm("base", 10.0), Arm("lora-a", 90.0)], updated=201.0),
                                       read_at=100.0)
    assert store.load_experiments() == [promoted]
    assert not store.update_experiment(experiment("gone", updated=300.0), read_at=100.0)  # no such row


def test_inserting_an_existing_name_is_refused(store):
    store.insert_experiment(experiment())
    with pytest.raises(ValueError, match="exists"):
        store.insert_experiment(experiment(salt="other"))
    assert store.load_experiments()[0].salt == "s1"


def test_arm_data_counts_errors_timings_tokens_and_feedback(store):
    store.insert_experiment(experiment())
    store.add_request(request_row("c1", "base", ttft=0.1, latency=1.0))
    store.add_request(request_row("c2", "base", ttft=0.3, latency=2.0, tokens=(7, 3)))
    store.add_request(request_row("c3", "base", error="generation_failed", ttft=None, latency=0.2, tokens=(4, 0)))
    store.add_request(request_row("c4", "lora-a", error="cancelled", ttft=0.2, latency=5.0, tokens=(6, 2)))
    store.put_feedback(FeedbackRow("c1", 4.0, "up", 300.0))
    store.put_feedback(FeedbackRow("c2", None, "down", 300.0))
    store.put_feedback(FeedbackRow("c4", 2.5, None, 300.0))

    data = store.arm_data("exp")
    base, lora = data["base"], data["lora-a"]
    assert (base.requests, base.errors, base.cancelled) == (3, 1, 0)
    assert (base.prompt_tokens, base.completion_tokens) == (21, 8)
    assert sorted(base.ttft_s) == [0.1, 0.3]
    assert sorted(base.latency_s) == [1.0, 2.0]  # the failed request's time is not a latency
    assert (base.feedback, base.scores, base.thumbs_up, base.thumbs_down) == (2, Moments(1, 4.0, 0.0), 1, 1)
    assert (lora.requests, lora.errors, lora.cancelled) == (1, 0, 1)
    assert lora.latency_s == [] and lora.ttft_s == [0.2]
    assert (lora.feedback, lora.scores, lora.thumbs_up, lora.thumbs_down) == (1, Moments(1, 2.5, 0.0), 0, 0)


def test_feedback_on_an_unknown_id_is_refused(store):
    store.insert_experiment(experiment())
    with pytest.raises(UnknownCompletionError):
        store.put_feedback(FeedbackRow("nope", 1.0, None, 300.0))


def test_second_feedback_replaces_the_first(store):
    store.insert_experiment(experiment())
    store.add_request(request_row("c1", "lora-a"))
    request, replaced = store.put_feedback(FeedbackRow("c1", 1.0, "up", 300.0))
    assert (request.experiment, request.arm, replaced) == ("exp", "lora-a", False)
    _, replaced = store.put_feedback(FeedbackRow("c1", None, "down", 301.0))
    assert replaced
    lora = store.arm_data("exp")["lora-a"]
    assert (lora.feedback, lora.scores, lora.thumbs_up, lora.thumbs_down) == (1, Moments(), 0, 1)


def test_delete_removes_requests_and_feedback_of_that_experiment_only(store):
    store.insert_experiment(experiment("a"))
    store.insert_experiment(experiment("b"))
    store.add_request(request_row("a1", "base", experiment_name="a"))
    store.add_request(request_row("b1", "base", experiment_name="b"))
    store.put_feedback(FeedbackRow("a1", 1.0, None, 300.0))
    store.put_feedback(FeedbackRow("b1", 2.0, None, 300.0))
    store.delete_experiment("a")
    assert [e.name for e in store.load_experiments()] == ["b"]
    assert store.arm_data("a") == {}
    with pytest.raises(UnknownCompletionError):
        store.put_feedback(FeedbackRow("a1", 1.0, None, 300.0))
    assert store.arm_data("b")["base"].scores == Moments(1, 2.0, 0.0)


def test_a_failed_transaction_leaves_no_trace(store):
    store.insert_experiment(experiment())
    def crash(tx):
        tx.execute("DELETE FROM experiments")
        raise RuntimeError("crash in the middle")

    with pytest.raises(RuntimeError):
        store.db.run(crash)
    assert [e.name for e in store.load_experiments()] == ["exp"]


def test_tables_share_the_file_with_other_tables(db):
    import sqlite3

    other = sqlite3.connect(db)
    other.execute("CREATE TABLE registry_adapters (id TEXT PRIMARY KEY)")
    other.execute("INSERT INTO registry_adapters VALUES ('lora-a')")
    other.commit()
    store = SqliteExperimentStore(db)
    store.insert_experiment(experiment())
    store.close()
    tables = {row[0] for row in other.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert tables == {"registry_adapters", "experiments", "experiment_requests", "experiment_feedback",
                      "experiment_captures", "experiment_arm_totals"}
    assert other.execute("SELECT id FROM registry_adapters").fetchall() == [("lora-a",)]
    other.close()


def test_feedback_only_from_the_key_that_made_the_request(store):
    store.insert_experiment(experiment())
    row = request_row("c1", "lora-a")
    row.api_key_id = "key-a-hash"
    store.add_request(row)
    for other in ("key-b-hash", None):  # another key, or none, is told the id does not exist
        with pytest.raises(UnknownCompletionError):
            store.put_feedback(FeedbackRow("c1", 1.0, None, 300.0, api_key_id=other))
    request, _ = store.put_feedback(FeedbackRow("c1", 1.0, None, 300.0, api_key_id="key-a-hash"))
    assert request.api_key_id == "key-a-hash"


def test_a_database_from_before_key_binding_is_upgraded(db):
    import sqlite3

    conn = sqlite3.connect(db)  # the experiment_requests table as the first release created it
    conn.execute("CREATE TABLE experiment_requests (completion_id TEXT PRIMARY KEY, experiment TEXT NOT NULL,"
                 " arm TEXT NOT NULL, subject TEXT, endpoint TEXT NOT NULL, ttft_s REAL, latency_s REAL,"
                 " prompt_tokens INTEGER NOT NULL, completion_tokens INTEGER NOT NULL, error_type TEXT,"
                 " created REAL NOT NULL)")
    conn.execute("INSERT INTO experiment_requests VALUES ('old', 'exp', 'base', NULL, 'chat', 0.1, 0.2, 1, 1, NULL, 1)")
    conn.commit()
    conn.close()
    store = SqliteExperimentStore(db)
    try:
        store.insert_experiment(experiment())
        request, _ = store.put_feedback(FeedbackRow("old", 1.0, None, 300.0))  # unbound rows: keyless feedback
        assert request.api_key_id is None
        store.add_request(request_row("new", "base"))
    finally:
        store.close()
    SqliteExperimentStore(db).close()  # opening an upgraded database again changes nothing


def test_captures_round_trip_with_feedback_and_go_with_the_experiment(open_store):
    store = open_store()
    store.insert_experiment(experiment(capture=True))
    store.insert_experiment(experiment("other"))
    messages = [{"role": "user", "content": "hi"}]
    for completion_id, arm in (("c1", "base"), ("c2", "lora-a"), ("c3", "lora-a")):
        store.add_request(request_row(completion_id, arm))
        store.put_capture(CaptureRow(completion_id, "exp", json.dumps(messages), f"answer {completion_id}", 200.0))
    store.put_feedback(FeedbackRow("c1", None, "up", 300.0))
    store.put_feedback(FeedbackRow("c2", 2.0, None, 300.0))  # c3: captured, no feedback
    store.close()

    reopened = open_store()
    assert {e.name: e.capture for e in reopened.load_experiments()} == {"exp": True, "other": False}
    assert reopened.captured_answers("exp") == [
        CapturedAnswer("c1", "base", messages, "answer c1", None, "up"),
        CapturedAnswer("c2", "lora-a", messages, "answer c2", 2.0, None)]
    reopened.delete_experiment("exp")
    assert reopened.captured_answers("exp") == []
    assert reopened.db.run(lambda tx: tx.one("SELECT COUNT(*) FROM experiment_captures")) == (0,)
    reopened.close()


def test_an_older_database_gains_the_capture_column(db):
    import sqlite3

    with sqlite3.connect(db) as conn:  # the experiments table as it was before capture
        conn.execute("CREATE TABLE experiments (name TEXT PRIMARY KEY, salt TEXT NOT NULL, arms TEXT NOT NULL,"
                     " stickiness TEXT NOT NULL, subject_header TEXT, state TEXT NOT NULL, winner TEXT,"
                     " created REAL NOT NULL, updated REAL NOT NULL)")
        conn.execute("INSERT INTO experiments VALUES ('old', 's', '[{\"name\": \"base\", \"weight\": 1}]',"
                     " 'user', NULL, 'running', NULL, 1.0, 1.0)")
    store = SqliteExperimentStore(db)
    assert [(e.name, e.capture) for e in store.load_experiments()] == [("old", False)]
    store.close()


def test_capture_pages_texts_and_the_cap_per_experiment(store):
    store.insert_experiment(experiment(capture=True))
    for i in range(5):
        store.add_request(request_row(f"c{i}", "base"))
        assert store.put_capture(CaptureRow(f"c{i}", "exp", json.dumps([{"role": "user", "content": "é"}],
                                                                        ensure_ascii=False), f"a{i}", float(i % 2)),
                                 max_stored=4) is (i < 4)
        store.put_feedback(FeedbackRow(f"c{i}", None, "up", 300.0))
    assert store.capture_count("exp") == 4
    first = store.capture_page("exp", None, 3)  # by (created, id): c0, c2 (created 0) then c1
    assert [row.completion_id for row in first] == ["c0", "c2", "c1"]
    rest = store.capture_page("exp", (first[-1].created, first[-1].completion_id), 3)
    assert [row.completion_id for row in rest] == ["c3"]
    assert store.capture_texts(["c3", "c4", "nope"]) == {"c3": ('[{"role": "user", "content": "é"}]', "a3")}
    assert store.capture_texts([]) == {}


def test_results_read_the_latest_timings_and_exact_score_moments(store):
    from gateway.experiments.stats import Moments

    store.insert_experiment(experiment())
    scores = [1e6 - (i % 3) * 0.5 for i in range(30)]
    for i, score in enumerate(scores):
        row = request_row(f"c{i}", "base", latency=float(i))
        row.created = float(i)
        store.add_request(row)
        store.put_feedback(FeedbackRow(f"c{i}", score, None, 300.0))
    base = store.arm_data("exp", timing_sample=4)["base"]
    assert base.requests == 30 and base.timing_sample == 4 and sorted(base.latency_s) == [26.0, 27.0, 28.0, 29.0]
    want = Moments.of(scores)
    assert base.scores.count == 30 and base.scores.mean == pytest.approx(want.mean, rel=1e-12)
    assert base.scores.variance == pytest.approx(want.variance, rel=1e-6)
