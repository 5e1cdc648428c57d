"""What one client can make an experiment hold or cost stays bounded: preference pairs of a prompt
sent many times (records, bytes, time, and a clean refusal past the files' limits), results over many
requests (SQL aggregates, a bounded timing sample, off the event loop, one computation shared),
captures awaiting feedback (bytes as well as count), stored captures (a cap, refusals counted), and
the feedback counter (a resend is not counted again)."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import threading
import time

import pytest
from prometheus_client import CollectorRegistry

import gateway.experiments.service as service_module
from gateway.experiments.assignment import Arm
from gateway.experiments.errors import PreferenceFileTooLargeError
from gateway.experiments.metrics import ExperimentMetrics
from gateway.experiments.preferences import (
    FETCH_BATCH, PAIRS_PER_ANSWER, Rated, preference_records, select_pairs, write_jsonl,
)
from gateway.experiments.service import ExperimentService
from gateway.experiments.stats import Moments
from gateway.experiments.store import (
    CapturedAnswer, CaptureRow, FeedbackRow, RequestRow, SqliteExperimentStore,
)
from gateway.generation import Capture, RequestRecord

PROMPT = [{"role": "user", "content": "x" * 2000}]
LIMITS = {"max_bytes": 32 * 1024 * 1024, "max_lines": 100_000, "max_line_bytes": 1 << 20}


def same_prompt(k: int, prompt=PROMPT) -> list[CapturedAnswer]:
    """k answers to one prompt, arms a/b alternating, a's thumbed up, b's down: every (a, b) ranks."""
    return [CapturedAnswer(f"c{i}", "ab"[i % 2], prompt, f"answer {i}", None, "up" if i % 2 == 0 else "down")
            for i in range(k)]


def pairs_of(records) -> list[tuple[str, str]]:
    return [(r["preferred_output"][0]["content"], r["non_preferred_output"][0]["content"]) for r in records]


# ---- preference pairs -----------------------------------------------------------------------------
def test_a_prompt_sent_many_times_makes_pairs_linear_in_its_answers():
    records, summary = preference_records(same_prompt(400))  # before: 200 x 200 = 40,000 records
    made = pairs_of(records)
    assert summary.pairs == len(made) == 200 * PAIRS_PER_ANSWER
    assert len(set(made)) == len(made)
    good = {f"answer {i}" for i in range(0, 400, 2)}
    assert all(p in good and o not in good for p, o in made)
    # every good answer gets PAIRS_PER_ANSWER, and the bad ones are spread over them, not all on one
    per_good = {g: sum(p == g for p, _ in made) for g in good}
    per_bad = [sum(o == f"answer {i}" for _, o in made) for i in range(1, 400, 2)]
    assert set(per_good.values()) == {PAIRS_PER_ANSWER} and max(per_bad) <= PAIRS_PER_ANSWER + 1


def test_few_answers_per_prompt_keep_every_pair_in_a_stable_order():
    answers = same_prompt(6)  # 3 up on a, 3 down on b: 9 pairs, under the bound
    records, _ = preference_records(answers)
    assert set(pairs_of(records)) == {(f"answer {g}", f"answer {b}") for g in (0, 2, 4) for b in (1, 3, 5)}
    assert preference_records(list(answers))[0] == records


def test_pairing_costs_no_square_when_nothing_pairs():
    rated = [Rated(f"c{i}", "ab"[i % 2], b"p", str(i).encode(), "thumbs", 1.0) for i in range(40_000)]
    started = time.monotonic()
    pairs, answers, prompts = select_pairs(rated)  # before: 1.6e9 comparisons
    assert (pairs, answers, prompts) == ([], 40_000, 1)
    assert time.monotonic() - started < 10


def test_the_same_text_rated_many_ways_is_one_pair():
    answers = [CapturedAnswer(f"a{i}", "a", PROMPT, "good", float(i + 1000), None) for i in range(500)]
    answers += [CapturedAnswer(f"b{i}", "b", PROMPT, "bad", float(i), None) for i in range(500)]
    records, summary = preference_records(answers)
    assert pairs_of(records) == [("good", "bad")] and (summary.answers, summary.prompts) == (1000, 1)


def texts_for(answers: list[CapturedAnswer], fetched: list[str]):
    by_id = {a.completion_id: a for a in answers}

    def texts(ids: list[str]) -> dict[str, tuple[str, str]]:
        fetched.extend(ids)
        return {i: (json.dumps(by_id[i].messages), by_id[i].completion) for i in ids}
    return texts


def test_the_file_stops_at_the_byte_limit_without_building_the_rest():
    answers = same_prompt(1200)
    rated = [Rated(a.completion_id, a.arm, b"p", a.completion.encode(), "thumbs", 1.0 if a.thumbs == "up" else 0.0)
             for a in answers]
    pairs, _, _ = select_pairs(rated)
    fetched: list[str] = []
    with pytest.raises(PreferenceFileTooLargeError) as refused:
        write_jsonl(pairs, texts_for(answers, fetched), max_bytes=100_000, max_lines=100_000,
                    max_line_bytes=1 << 20)
    message = str(refused.value)
    assert "100000 bytes" in message and f"of {len(pairs)} pairs fit" in message and "no file was made" in message
    fit = 100_000 // 2100  # each record is about 2,100 bytes (the 2,000-character prompt and two answers)
    assert len(fetched) <= 2 * (fit + FETCH_BATCH)  # read no further than the batch that passed the limit

    with pytest.raises(PreferenceFileTooLargeError, match="10 records"):
        write_jsonl(pairs, texts_for(answers, []), max_bytes=10**9, max_lines=10, max_line_bytes=1 << 20)
    data, written, skipped = write_jsonl(pairs[:5], texts_for(answers, []), max_bytes=10**9, max_lines=10,
                                         max_line_bytes=1000)  # every line is over 1000 bytes: skipped
    assert (data, written, skipped) == (b"", 0, 5)


# ---- the service on a real store --------------------------------------------------------------------
def make_service(tmp_path, **overrides) -> tuple[ExperimentService, CollectorRegistry]:
    registry = CollectorRegistry()
    values = dict(is_model=lambda name: name in ("a", "b"), max_experiments=8, min_samples=5,
                  default_subject_header="x-session-id")
    store = SqliteExperimentStore(tmp_path / "gateway.sqlite3")
    return ExperimentService(store, ExperimentMetrics(registry), **{**values, **overrides}), registry


def fill(service: ExperimentService, answers: list[CapturedAnswer]) -> None:
    store = service.store
    for i, a in enumerate(answers):
        store.add_request(RequestRow(a.completion_id, "exp", a.arm, None, "chat", 0.1, 0.2, 1, 1, None, float(i)))
        store.put_capture(CaptureRow(a.completion_id, "exp", json.dumps(a.messages), a.completion, float(i)))
        store.put_feedback(FeedbackRow(a.completion_id, a.score, a.thumbs, float(i)))


def test_preference_file_of_many_same_prompt_answers_is_bounded_and_built_off_the_loop(tmp_path, monkeypatch):
    service, _ = make_service(tmp_path)
    threads = []
    real = service_module.select_pairs
    monkeypatch.setattr(service_module, "select_pairs",
                        lambda rated: threads.append(threading.current_thread()) or real(rated))

    async def run():
        await service.create("exp", [Arm("a", 1), Arm("b", 1)], "request", capture=True)
        fill(service, same_prompt(1200))  # before: 360,000 records, 793 MB, the loop stalled 16 s
        data, summary = await service.preference_data("exp", **LIMITS)
        assert (summary.pairs, summary.answers, summary.prompts) == (600 * PAIRS_PER_ANSWER, 1200, 1)
        assert len(data.splitlines()) == summary.pairs and len(data) < 6_000_000
        with pytest.raises(PreferenceFileTooLargeError):
            await service.preference_data("exp", **{**LIMITS, "max_bytes": 1_000_000})
    try:
        asyncio.run(run())
    finally:
        service.close()
    assert threads and all(t is not threading.main_thread() for t in threads)


def test_results_aggregate_in_sql_sample_the_latest_timings_and_run_off_the_loop(tmp_path, monkeypatch):
    service, _ = make_service(tmp_path)
    store = service.store
    scores = [float(i % 7) for i in range(50)]
    threads = []
    real_results = service_module.experiment_results
    monkeypatch.setattr(service_module, "experiment_results",
                        lambda *a: threads.append(threading.current_thread()) or real_results(*a))
    reads = []
    real_arm_data = store.arm_data
    monkeypatch.setattr(store, "arm_data", lambda name: reads.append(name) or real_arm_data(name, timing_sample=5))

    async def run():
        await service.create("exp", [Arm("a", 1), Arm("b", 1)], "request")
        for i in range(50):
            store.add_request(RequestRow(f"c{i}", "exp", "a", None, "chat", 0.1, float(i), 1, 1, None, float(i)))
            store.put_feedback(FeedbackRow(f"c{i}", scores[i], None, 0.0))
        together = await asyncio.gather(*(service.results("exp") for _ in range(5)))
        assert len(reads) == 1 and all(r == together[0] for r in together)  # one computation for all
        return together[0]
    try:
        results = asyncio.run(run())
    finally:
        service.close()
    arm = results["arms"][0]
    assert arm["requests"] == 50 and arm["timing_sample"] == 5
    assert arm["latency_seconds"]["p50"] == 47.0  # of the latest five (45..49), not of all fifty
    expected = Moments.of(scores)
    assert arm["feedback"]["score"]["count"] == 50
    assert arm["feedback"]["score"]["mean"] == pytest.approx(expected.mean)
    assert threads and all(t is not threading.main_thread() for t in threads)


def test_score_moments_from_sql_match_the_values(tmp_path):
    store = SqliteExperimentStore(tmp_path / "gateway.sqlite3")
    scores = [1e6 - 0.5 + (i % 3) * 0.25 for i in range(300)]  # far from 0, small spread: no cancellation
    for i, score in enumerate(scores):
        store.add_request(RequestRow(f"c{i}", "exp", "a", None, "chat", 0.1, 0.2, 1, 1, None, float(i)))
        store.put_feedback(FeedbackRow(f"c{i}", score, None, 0.0))
    got, want = store.arm_data("exp")["a"].scores, Moments.of(scores)
    store.close()
    assert got.count == want.count and got.mean == pytest.approx(want.mean, rel=1e-12)
    assert got.variance == pytest.approx(want.variance, rel=1e-6)


# ---- captures -------------------------------------------------------------------------------------
def finished(completion_id: str, messages: list[dict], answer: str) -> RequestRecord:
    record = RequestRecord(completion_id=completion_id, endpoint="chat", requested_model="exp", experiment="exp",
                           arm="a", end=time.monotonic())
    record.capture = Capture(messages, 10**6)
    record.capture.add(answer)
    return record


def test_pending_captures_are_bounded_in_bytes_and_held_compactly(tmp_path, monkeypatch):
    monkeypatch.setattr(service_module, "PENDING_CAPTURE_BYTES", 400_000)
    service, registry = make_service(tmp_path, capture_pending=1024)
    many = [{"role": "user" if i % 2 == 0 else "assistant", "content": "a"} for i in range(1023)]
    many.append({"role": "user", "content": "a"})

    async def run():
        await service.create("exp", [Arm("a", 1), Arm("b", 1)], "request", capture=True)
        service.observe(finished("one", many, "x"))
        one = service._pending_bytes
        assert one < 60_000  # 1,024 one-character messages: ~30 KB of JSON (as dicts they held ~200 KB)
        for i in range(100):
            service.observe(finished(f"id{i}", many, "x"))
        assert service._pending_bytes <= 400_000 and len(service._pending) == 400_000 // one
        results = await service.results("exp")
        assert results["capture"]["evicted"] == 101 - len(service._pending)
        assert results["capture"]["pending"] == len(service._pending)
    try:
        asyncio.run(run())
    finally:
        service.close()
    assert registry.get_sample_value("gateway_experiment_captures_dropped_total",
                                     {"experiment": "exp", "reason": "evicted"}) == 101 - len(service._pending)


def test_stored_captures_are_capped_counted_and_kept_unescaped(tmp_path, monkeypatch):
    monkeypatch.setattr(service_module, "MAX_STORED_CAPTURES", 2)
    service, registry = make_service(tmp_path)
    hello = [{"role": "user", "content": "Привет мир"}]

    async def run():
        await service.create("exp", [Arm("a", 1), Arm("b", 1)], "request", capture=True)
        for i in range(3):
            record = finished(f"c{i}", hello, "ответ")
            service.observe(record)
            await service._run(lambda: None)  # its request row is written
            await service.feedback(f"c{i}", None, "up")
        return await service.results("exp")
    try:
        results = asyncio.run(run())
    finally:
        service.close()
    assert results["capture"] == {"stored": 2, "max_stored": 2, "refused": 1, "pending": 0, "evicted": 0}
    assert registry.get_sample_value("gateway_experiment_captures_dropped_total",
                                     {"experiment": "exp", "reason": "limit"}) == 1
    with sqlite3.connect(tmp_path / "gateway.sqlite3") as db:
        stored = db.execute("SELECT messages FROM experiment_captures ORDER BY completion_id").fetchall()
    assert stored == [(json.dumps(hello, ensure_ascii=False),)] * 2  # 2 bytes a Cyrillic letter, not 6


def test_store_refuses_captures_past_its_cap_but_replaces_one_it_has(tmp_path):
    store = SqliteExperimentStore(tmp_path / "gateway.sqlite3")
    try:
        rows = [CaptureRow(f"c{i}", "exp", "[]", "answer", float(i)) for i in range(3)]
        assert [store.put_capture(row, max_stored=2) for row in rows] == [True, True, False]
        assert store.put_capture(CaptureRow("c0", "exp", "[]", "again", 9.0), max_stored=2)
        assert store.capture_count("exp") == 2 and store.capture_count("other") == 0
    finally:
        store.close()


# ---- metrics --------------------------------------------------------------------------------------
def test_feedback_sent_again_is_counted_once(tmp_path):
    service, registry = make_service(tmp_path)

    async def run():
        await service.create("exp", [Arm("a", 1), Arm("b", 1)], "request")
        service.observe(RequestRecord(completion_id="c1", endpoint="chat", requested_model="exp", experiment="exp",
                                      arm="a", end=time.monotonic()))
        await service._run(lambda: None)
        for _ in range(200):
            await service.feedback("c1", None, "up")
        await service.feedback("c1", None, "down")
    try:
        asyncio.run(run())
    finally:
        service.close()
    labels = {"experiment": "exp", "arm": "a"}
    assert registry.get_sample_value("gateway_experiment_feedback_total", {**labels, "thumbs": "up"}) == 1
    assert registry.get_sample_value("gateway_experiment_feedback_total", {**labels, "thumbs": "down"}) is None
