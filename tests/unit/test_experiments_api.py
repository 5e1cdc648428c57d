"""A/B experiments through HTTP on a tiny random Llama with three PEFT adapters (TestClient runs
the lifespan): the admin API, routing by experiment name, stickiness, feedback, results, guard
rails, metrics, and persistence across a restart on the same data folder."""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient

from gateway.app import create_app
from gateway.base_model import LoadedBase
from gateway.experiments.assignment import Arm, assign_arm
from gateway.generation import RequestRecord
from gateway.settings import Settings
from support import build_tiny_llama, build_tokenizer, make_peft_adapter

ADMIN_KEY = "test-admin-key-0123456789"
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
ADAPTERS = {"lora-a": "lora", "ia3-a": "ia3", "pt-a": "prompt_tuning"}
MESSAGES = [{"role": "user", "content": "hello world"}]


def make_app(data_dir: Path, adapters_dir: Path):
    tokenizer = build_tokenizer()
    base = LoadedBase(model=build_tiny_llama(len(tokenizer)), tokenizer=tokenizer, name="tiny",
                      device=torch.device("cpu"), dtype=torch.float32, context_window=256, load_seconds=0.0)
    settings = Settings(quantization="none", device="cpu", adapters_dir=adapters_dir, data_dir=data_dir,
                        admin_key=ADMIN_KEY, max_tokens_limit=16, default_max_tokens=2, max_body_bytes=4096,
                        experiment_min_samples=5)
    return create_app(settings, base=base)


@pytest.fixture(scope="module")
def adapters_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("experiment-adapters")
    base = build_tiny_llama(len(build_tokenizer()))
    for seed, (name, kind) in enumerate(ADAPTERS.items(), start=1):
        make_peft_adapter(base, kind, folder / name, seed=seed)
    return folder


@pytest.fixture(scope="module")
def client(adapters_dir, tmp_path_factory):
    with TestClient(make_app(tmp_path_factory.mktemp("experiment-data"), adapters_dir)) as c:
        yield c


def create(client, name: str, arms: dict[str, float], **extra):
    body = {"name": name, "arms": [{"name": k, "weight": v} for k, v in arms.items()], **extra}
    return client.post("/admin/experiments", json=body, headers=ADMIN)


def chat(client, model: str, **extra):
    headers = extra.pop("headers", {})
    return client.post("/v1/chat/completions", headers=headers,
                       json={"model": model, "messages": MESSAGES, "max_tokens": 2, "temperature": 0, **extra})


def feedback(client, completion_id: str, **values):
    return client.post("/v1/feedback", json={"id": completion_id, **values})


def arm_of(response) -> str:
    assert response.status_code == 200, response.text
    arm = response.headers["x-gateway-experiment-arm"]
    assert response.json()["experiment"]["arm"] == arm
    return arm


def assert_openai_error(response, status: int, param: str | None = None) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    if param is not None:
        assert error["param"] == param
    return error


# ---- admin API ------------------------------------------------------------------------------------
def test_create_list_get_and_models(client):
    response = create(client, "exp-crud", {"lora-a": 70, "tiny": 30}, stickiness="header", salt="s1")
    assert response.status_code == 201, response.text
    created = response.json()
    assert created["id"] == "exp-crud" and created["object"] == "experiment" and created["state"] == "running"
    assert created["arms"] == [{"name": "lora-a", "weight": 70, "share": 0.7}, {"name": "tiny", "weight": 30,
                                                                                 "share": 0.3}]
    assert (created["control"], created["serving"], created["winner"]) == ("lora-a", ["lora-a", "tiny"], None)
    assert (created["stickiness"], created["subject_header"], created["salt"]) == ("header", "x-session-id", "s1")
    assert client.get("/admin/experiments/exp-crud", headers=ADMIN).json() == created
    listed = client.get("/admin/experiments", headers=ADMIN).json()
    assert listed["object"] == "list" and created in listed["data"]
    models = {card["id"] for card in client.get("/v1/models").json()["data"]}
    assert {"exp-crud", "tiny", *ADAPTERS} <= models
    assert client.delete("/admin/experiments/exp-crud", headers=ADMIN).json() == {
        "id": "exp-crud", "object": "experiment", "deleted": True}
    assert_openai_error(client.get("/admin/experiments/exp-crud", headers=ADMIN), 404)
    assert_openai_error(chat(client, "exp-crud"), 404, "model")


@pytest.mark.parametrize("name, arms, extra, status", [
    ("exp-bad", {"lora-a": 1, "nope": 1}, {}, 400),  # not a registered adapter
    ("exp-bad", {"lora-a": 1}, {}, 400),  # one arm
    ("exp-bad", {"lora-a": 0, "ia3-a": 0}, {}, 400),  # weights sum to zero
    ("exp-bad", {"lora-a": -1, "ia3-a": 2}, {}, 400),  # negative weight
    ("exp-bad", {"lora-a": 1, "ia3-a": float("inf")}, {}, 400),
    ("exp-bad", {"lora-a": 1, "ia3-a": 1}, {"stickiness": "cookie"}, 400),
    ("exp-bad", {"lora-a": 1, "ia3-a": 1}, {"subject_header": "x session"}, 400),
    ("exp-bad", {"lora-a": 1, "ia3-a": 1}, {"unknown": 1}, 400),  # unknown fields are refused
    ("bad name!", {"lora-a": 1, "ia3-a": 1}, {}, 400),
    ("x" * 65, {"lora-a": 1, "ia3-a": 1}, {}, 400),
    ("lora-a", {"tiny": 1, "ia3-a": 1}, {}, 409),  # an adapter's name
    ("tiny", {"lora-a": 1, "ia3-a": 1}, {}, 409),  # the base model's name
])
def test_create_refusals(client, name, arms, extra, status):
    if any(math.isinf(v) for v in arms.values()):  # JSON has no infinity: send a number that overflows
        body = ('{"name": "exp-bad", "arms": [{"name": "lora-a", "weight": 1}, '
                '{"name": "ia3-a", "weight": 1e999}]}')
        response = client.post("/admin/experiments", content=body,
                               headers={**ADMIN, "Content-Type": "application/json"})
    else:
        response = create(client, name, arms, **extra)
    assert_openai_error(response, status)
    assert client.get(f"/admin/experiments/{name}", headers=ADMIN).status_code == 404


def test_duplicate_arm_and_duplicate_experiment(client):
    body = {"name": "exp-dup", "arms": [{"name": "lora-a", "weight": 1}, {"name": "lora-a", "weight": 1}]}
    assert_openai_error(client.post("/admin/experiments", json=body, headers=ADMIN), 400, "arms")
    assert create(client, "exp-dup", {"lora-a": 1, "ia3-a": 1}).status_code == 201
    error = assert_openai_error(create(client, "exp-dup", {"lora-a": 1, "pt-a": 1}), 409, "name")
    assert error["type"] == "conflict_error"
    client.delete("/admin/experiments/exp-dup", headers=ADMIN)


def test_admin_routes_need_the_admin_key(client):
    assert_openai_error(client.get("/admin/experiments"), 401)
    assert_openai_error(client.get("/admin/experiments", headers={"Authorization": "Bearer wrong-key"}), 401)
    assert_openai_error(client.post("/admin/experiments", json={}), 401)


def test_patch_weights_stop_and_promote(client):
    assert create(client, "exp-life", {"lora-a": 70, "ia3-a": 30}, salt="s").status_code == 201
    patched = client.patch("/admin/experiments/exp-life", json={"weights": {"ia3-a": 70}}, headers=ADMIN)
    assert [a["share"] for a in patched.json()["arms"]] == [0.5, 0.5]
    assert_openai_error(client.patch("/admin/experiments/exp-life", json={"weights": {"nope": 1}},
                                     headers=ADMIN), 400, "weights")
    assert_openai_error(client.patch("/admin/experiments/exp-life", json={"weights": {"lora-a": 0, "ia3-a": 0}},
                                     headers=ADMIN), 400)
    assert_openai_error(client.patch("/admin/experiments/exp-life", json={"weights": {}}, headers=ADMIN), 400)

    stopped = client.post("/admin/experiments/exp-life/stop", headers=ADMIN).json()
    assert (stopped["state"], stopped["serving"]) == ("stopped", ["lora-a"])
    assert {arm_of(chat(client, "exp-life", user=f"u{i}")) for i in range(4)} == {"lora-a"}  # the control
    assert_openai_error(client.post("/admin/experiments/exp-life/stop", headers=ADMIN), 409)
    assert_openai_error(client.patch("/admin/experiments/exp-life", json={"weights": {"lora-a": 1}},
                                     headers=ADMIN), 409)

    assert_openai_error(client.post("/admin/experiments/exp-life/promote", json={"arm": "pt-a"}, headers=ADMIN),
                        400, "arm")
    promoted = client.post("/admin/experiments/exp-life/promote", json={"arm": "ia3-a"}, headers=ADMIN).json()
    assert (promoted["state"], promoted["winner"], promoted["serving"]) == ("promoted", "ia3-a", ["ia3-a"])
    assert {arm_of(chat(client, "exp-life", user=f"u{i}")) for i in range(4)} == {"ia3-a"}
    assert_openai_error(client.post("/admin/experiments/exp-life/promote", json={"arm": "lora-a"},
                                    headers=ADMIN), 409)
    # only the randomized phase is recorded: nothing after the stop
    results = client.get("/admin/experiments/exp-life/results", headers=ADMIN).json()
    assert sum(arm["requests"] for arm in results["arms"]) == 0
    client.delete("/admin/experiments/exp-life", headers=ADMIN)


def test_unknown_experiment_is_404_everywhere(client):
    for method, path in [("get", ""), ("patch", ""), ("post", "/stop"), ("post", "/promote"), ("delete", ""),
                         ("get", "/results")]:
        body = {"patch": {"weights": {"a": 1}}, "post": {"arm": "a"}}.get(method)
        response = client.request(method.upper(), f"/admin/experiments/nope{path}", json=body, headers=ADMIN)
        assert assert_openai_error(response, 404)["code"] == "experiment_not_found"


# ---- routing ----------------------------------------------------------------------------------------
def test_response_names_the_arm_in_header_and_body(client):
    assert create(client, "exp-route", {"lora-a": 1, "ia3-a": 0}).status_code == 201
    response = chat(client, "exp-route")
    assert arm_of(response) == "lora-a"
    body = response.json()
    assert body["model"] == "exp-route" and body["id"].startswith("chatcmpl-")
    assert body["experiment"] == {"name": "exp-route", "arm": "lora-a"}
    assert response.headers["x-gateway-experiment"] == "exp-route"

    completion = client.post("/v1/completions", json={"model": "exp-route", "prompt": "the quick", "max_tokens": 2})
    assert arm_of(completion) == "lora-a" and completion.json()["id"].startswith("cmpl-")

    stream = chat(client, "exp-route", stream=True, stream_options={"include_usage": True})
    assert stream.headers["x-gateway-experiment-arm"] == "lora-a"
    chunks = [json.loads(line[6:]) for line in stream.text.splitlines() if line.startswith("data: {")]
    assert chunks and all(c["experiment"] == {"name": "exp-route", "arm": "lora-a"} for c in chunks)

    plain = chat(client, "lora-a")  # no experiment: no extension field, no header
    assert "experiment" not in plain.json() and "x-gateway-experiment-arm" not in plain.headers
    client.delete("/admin/experiments/exp-route", headers=ADMIN)


def test_user_stickiness_follows_the_assignment_hash(client):
    arms = {"lora-a": 1, "ia3-a": 1}
    assert create(client, "exp-user", arms, stickiness="user", salt="fixed").status_code == 201
    expected = {f"user-{i}": assign_arm("exp-user", "fixed", f"user-{i}", [Arm(k, v) for k, v in arms.items()]).name
                for i in range(8)}
    assert set(expected.values()) == set(arms)  # the users below cover both arms
    for user, arm in expected.items():
        assert arm_of(chat(client, "exp-user", user=user)) == arm
        assert arm_of(chat(client, "exp-user", user=user)) == arm  # again: the same arm
    client.delete("/admin/experiments/exp-user", headers=ADMIN)


def test_header_stickiness(client):
    arms = {"ia3-a": 1, "pt-a": 1}
    assert create(client, "exp-header", arms, stickiness="header", subject_header="X-Team",
                  salt="h").status_code == 201
    for team in ("red", "green", "blue", "black"):
        arm = assign_arm("exp-header", "h", team, [Arm(k, v) for k, v in arms.items()]).name
        assert arm_of(chat(client, "exp-header", headers={"x-team": team}, user="ignored")) == arm
    client.delete("/admin/experiments/exp-header", headers=ADMIN)


def test_per_request_assignment_follows_the_weights(client):
    assert create(client, "exp-random", {"lora-a": 7, "tiny": 3}, stickiness="request").status_code == 201
    service = client.app.state.gateway.experiments
    counts = Counter(service.resolve("exp-random", None) for _ in range(4000))
    assert abs(counts["lora-a"] / 4000 - 0.7) < 0.05  # 7 standard deviations: cannot fail by chance
    assert {arm_of(chat(client, "exp-random", user="same")) for _ in range(2)} <= {"lora-a", "tiny"}
    client.delete("/admin/experiments/exp-random", headers=ADMIN)


# ---- feedback and results ---------------------------------------------------------------------------
def test_results_count_requests_tokens_and_feedback_per_arm(client):
    assert create(client, "exp-results", {"lora-a": 1, "pt-a": 1}, salt="r").status_code == 201
    served: dict[str, list[dict]] = {"lora-a": [], "pt-a": []}
    for i in range(10):
        response = chat(client, "exp-results", user=f"person-{i}")
        served[arm_of(response)].append(response.json())
    assert all(served.values())
    for body in served["lora-a"]:
        assert feedback(client, body["id"], thumbs="up", score=4).json()["replaced"] is False
    for body in served["pt-a"][:-1]:
        assert feedback(client, body["id"], thumbs="down").status_code == 200
    last = feedback(client, served["pt-a"][-1]["id"], score=1.5)
    assert last.json() == {"id": served["pt-a"][-1]["id"], "object": "feedback", "experiment": "exp-results",
                           "arm": "pt-a", "score": 1.5, "thumbs": None, "replaced": False}

    results = client.get("/admin/experiments/exp-results/results", headers=ADMIN).json()
    assert results["experiment"] == "exp-results" and results["control"] == "lora-a"
    by_arm = {arm["arm"]: arm for arm in results["arms"]}
    for name, bodies in served.items():
        arm = by_arm[name]
        assert (arm["requests"], arm["errors"], arm["cancelled"]) == (len(bodies), 0, 0)
        assert arm["tokens"] == {"prompt": sum(b["usage"]["prompt_tokens"] for b in bodies),
                                 "completion": sum(b["usage"]["completion_tokens"] for b in bodies)}
        assert arm["feedback"]["count"] == len(bodies)
        assert arm["latency_seconds"]["p50"] > 0 and arm["ttft_seconds"]["p95"] > 0
    lora, pt = by_arm["lora-a"]["feedback"], by_arm["pt-a"]["feedback"]
    assert (lora["thumbs"]["up"], lora["thumbs"]["down"], lora["thumbs"]["positive_rate"]) == (
        len(served["lora-a"]), 0, 1.0)
    assert lora["score"]["mean"] == 4.0 and lora["score"]["count"] == len(served["lora-a"])
    assert (pt["thumbs"]["up"], pt["thumbs"]["down"], pt["score"]["count"]) == (0, len(served["pt-a"]) - 1, 1)
    (comparison,) = results["comparisons"]
    assert comparison["arm"] == "pt-a" and comparison["score"]["verdict"].startswith("not enough data yet")
    client.delete("/admin/experiments/exp-results", headers=ADMIN)


def test_feedback_rules(client):
    assert create(client, "exp-feedback", {"lora-a": 1, "ia3-a": 1}).status_code == 201
    completion_id = chat(client, "exp-feedback").json()["id"]
    assert feedback(client, completion_id, thumbs="up").json()["replaced"] is False
    again = feedback(client, completion_id, thumbs="down", score=-2)
    assert again.status_code == 200 and again.json()["replaced"] is True  # replaces, documented
    results = client.get("/admin/experiments/exp-feedback/results", headers=ADMIN).json()
    rated = [arm["feedback"] for arm in results["arms"] if arm["feedback"]["count"]]
    assert len(rated) == 1 and rated[0]["thumbs"]["down"] == 1 and rated[0]["score"]["mean"] == -2

    assert assert_openai_error(feedback(client, "chatcmpl-unknown", thumbs="up"), 404, "id")["code"] == \
        "completion_not_found"
    plain_id = chat(client, "lora-a").json()["id"]  # not routed by an experiment
    assert_openai_error(feedback(client, plain_id, thumbs="up"), 404)
    for bad in ({}, {"thumbs": "sideways"}, {"score": True}, {"score": "3"}, {"score": 1e7},
                {"thumbs": "up", "comment": "x"}):
        assert_openai_error(feedback(client, completion_id, **bad), 400)
    assert_openai_error(feedback(client, "x" * 129, thumbs="up"), 400, "id")
    client.delete("/admin/experiments/exp-feedback", headers=ADMIN)
    assert_openai_error(feedback(client, completion_id, thumbs="up"), 404)  # deleted with the experiment


def test_feedback_on_a_pruned_completion_is_a_clear_404_and_earlier_feedback_counts(client, monkeypatch):
    import gateway.experiments.store as store_module

    monkeypatch.setattr(store_module, "MAX_STORED_REQUESTS", 2)  # each experiment keeps its latest two rows
    monkeypatch.setattr(store_module, "PRUNE_EVERY", 1)
    assert create(client, "exp-pruned", {"lora-a": 1, "ia3-a": 1}).status_code == 201
    ids = [chat(client, "exp-pruned").json()["id"]]
    assert feedback(client, ids[0], thumbs="up").status_code == 200  # rated while its row is kept
    ids += [chat(client, "exp-pruned").json()["id"] for _ in range(3)]
    error = assert_openai_error(feedback(client, ids[0], thumbs="down"), 404, "id")
    assert error["code"] == "completion_not_found" and "too old" in error["message"]
    assert feedback(client, ids[-1], thumbs="down").status_code == 200
    results = client.get("/admin/experiments/exp-pruned/results", headers=ADMIN).json()
    assert sum(arm["requests"] for arm in results["arms"]) == 4
    assert sum(arm["feedback"]["thumbs"]["up"] for arm in results["arms"]) == 1  # its row is gone, not its vote
    assert sum(arm["feedback"]["thumbs"]["down"] for arm in results["arms"]) == 1
    client.delete("/admin/experiments/exp-pruned", headers=ADMIN)


def test_prometheus_series_by_experiment_and_arm(client):
    assert create(client, "exp-metrics", {"ia3-a": 1, "lora-a": 0}).status_code == 201
    completion_id = chat(client, "exp-metrics").json()["id"]
    feedback(client, completion_id, thumbs="up")
    registry = client.app.state.gateway.metrics.registry
    labels = {"experiment": "exp-metrics", "arm": "ia3-a"}
    assert registry.get_sample_value("gateway_experiment_requests_total", {**labels, "outcome": "ok"}) == 1
    assert registry.get_sample_value("gateway_experiment_latency_seconds_count", labels) == 1
    assert registry.get_sample_value("gateway_experiment_feedback_total", {**labels, "thumbs": "up"}) == 1
    assert 'gateway_experiment_requests_total{arm="ia3-a",experiment="exp-metrics",outcome="ok"} 1.0' in \
        client.get("/metrics").text
    client.delete("/admin/experiments/exp-metrics", headers=ADMIN)
    assert registry.get_sample_value("gateway_experiment_requests_total", {**labels, "outcome": "ok"}) is None


# ---- guard rails ------------------------------------------------------------------------------------
def test_adapter_in_an_experiment_cannot_be_deleted(client):
    assert create(client, "exp-guard", {"tiny": 1, "pt-a": 1}).status_code == 201
    error = assert_openai_error(client.delete("/admin/adapters/pt-a", headers=ADMIN), 409)
    assert "exp-guard" in error["message"]
    assert client.get("/admin/adapters/pt-a", headers=ADMIN).status_code == 200
    client.post("/admin/experiments/exp-guard/promote", json={"arm": "tiny"}, headers=ADMIN)
    service = client.app.state.gateway.experiments
    assert service.delete_guard("pt-a") is None  # a promoted experiment only needs its winner
    client.delete("/admin/experiments/exp-guard", headers=ADMIN)


def test_adapter_ids_and_experiment_names_do_not_collide(client):
    assert create(client, "exp-name", {"tiny": 1, "lora-a": 1}).status_code == 201
    service = client.app.state.gateway.experiments
    assert service.name_taken("exp-name") and not service.name_taken("lora-a")
    assert "experiment" in service.name_guard("exp-name") and service.name_guard("new-adapter") is None
    client.delete("/admin/experiments/exp-name", headers=ADMIN)
    assert not service.name_taken("exp-name")


# ---- the per-request record -------------------------------------------------------------------------
def test_observers_get_one_record_per_request(client, tiny_tokenizer):
    records: list[RequestRecord] = []
    observers = client.app.state.gateway.service.observers
    observers.append(records.append)
    try:
        body = chat(client, "ia3-a", user="someone").json()
        long_prompt = "hello " * 400
        ids = tiny_tokenizer.encode(long_prompt)
        # the plain check passes; the prompt-tuning adapter's 5 virtual tokens push it over the limit
        prompt = tiny_tokenizer.decode(ids[:254])
        assert 252 <= len(tiny_tokenizer.encode(prompt)) <= 256
        refused = client.post("/v1/completions", json={"model": "pt-a", "prompt": prompt, "max_tokens": 2})
    finally:
        observers.remove(records.append)
    assert refused.status_code == 400
    ok, failed = records
    assert (ok.completion_id, ok.endpoint, ok.requested_model, ok.adapter_id) == (body["id"], "chat", "ia3-a", "ia3-a")
    assert (ok.experiment, ok.arm, ok.subject, ok.error_type) == (None, None, None, None)
    assert (ok.prompt_tokens, ok.completion_tokens) == (body["usage"]["prompt_tokens"],
                                                        body["usage"]["completion_tokens"])
    assert 0 < ok.ttft_s <= ok.latency_s
    assert (failed.endpoint, failed.adapter_id, failed.error_type) == ("completions", "pt-a",
                                                                       "context_length_exceeded")
    assert failed.latency_s is not None and failed.ttft_s is None


# ---- persistence ------------------------------------------------------------------------------------
def test_experiments_and_results_survive_a_restart(adapters_dir, tmp_path):
    arms = {"lora-a": 1, "ia3-a": 1}
    with TestClient(make_app(tmp_path, adapters_dir)) as first:
        assert create(first, "exp-restart", arms, salt="keep").status_code == 201
        before = {f"u{i}": arm_of(chat(first, "exp-restart", user=f"u{i}")) for i in range(4)}
        completion_id = chat(first, "exp-restart", user="u0").json()["id"]
        feedback(first, completion_id, score=3)
        results_before = first.get("/admin/experiments/exp-restart/results", headers=ADMIN).json()
        described = first.get("/admin/experiments/exp-restart", headers=ADMIN).json()
    with TestClient(make_app(tmp_path, adapters_dir)) as second:
        assert second.get("/admin/experiments/exp-restart", headers=ADMIN).json() == described
        results_after = second.get("/admin/experiments/exp-restart/results", headers=ADMIN).json()
        results_after.pop("computed"), results_before.pop("computed")  # when (whole seconds), not what
        assert results_after == results_before
        assert sum(arm["requests"] for arm in results_before["arms"]) == 5
        assert {user: arm_of(chat(second, "exp-restart", user=user)) for user in before} == before
        assert feedback(second, completion_id, score=4).json()["replaced"] is True


def test_preference_file_past_the_files_limit_is_a_clean_409(client):
    import dataclasses

    from gateway.experiments.preferences import PAIRS_PER_ANSWER
    from gateway.experiments.store import CaptureRow, FeedbackRow, RequestRow

    assert create(client, "exp-prefs", {"lora-a": 1, "pt-a": 1}, capture=True).status_code == 201
    gateway = client.app.state.gateway
    store = gateway.experiments.store
    prompt = json.dumps([{"role": "user", "content": "y" * 2000}])
    for i in range(400):  # one prompt sent 400 times: before, 200 x 200 records of it
        arm = ("lora-a", "pt-a")[i % 2]
        store.add_request(RequestRow(f"p{i}", "exp-prefs", arm, None, "chat", 0.1, 0.2, 1, 1, None, float(i)))
        store.put_capture(CaptureRow(f"p{i}", "exp-prefs", prompt, f"answer {i}", float(i)))
        store.put_feedback(FeedbackRow(f"p{i}", None, "up" if arm == "lora-a" else "down", float(i)))
    files, limits = gateway.files, gateway.files.limits
    files.limits = dataclasses.replace(limits, max_bytes=100_000)
    try:
        refused = client.post("/admin/experiments/exp-prefs/preference-file", headers=ADMIN)
    finally:
        files.limits = limits
    error = assert_openai_error(refused, 409)
    assert error["code"] == "preference_file_too_large" and "100000 bytes" in error["message"]
    assert client.get("/v1/files", headers=ADMIN).json()["data"] == []  # nothing was made
    made = client.post("/admin/experiments/exp-prefs/preference-file", headers=ADMIN)
    assert made.status_code == 201, made.text
    assert (made.json()["records"], made.json()["answers"], made.json()["skipped"]) == (200 * PAIRS_PER_ANSWER, 400, 0)
    capture = client.get("/admin/experiments/exp-prefs/results", headers=ADMIN).json()["capture"]
    assert capture["stored"] == 400 and capture["refused"] == 0
    client.delete(f"/v1/files/{made.json()['id']}", headers=ADMIN)
    client.delete("/admin/experiments/exp-prefs", headers=ADMIN)
