"""Training jobs through the admin API on a tiny random Llama: validation with line numbers,
a job from upload to a served adapter, progress events and metrics, a failing job that leaves
serving healthy, cancel, and a restart in the middle of a job (resumed, or failed with a reason)."""

from __future__ import annotations

import asyncio
import json
import threading
import time

import pytest
from fastapi.testclient import TestClient
from support import build_tokenizer
from test_api import make_base, make_settings

from adapters.training import trainer as trainer_module
from gateway.app import create_app

ADMIN = {"Authorization": "Bearer " + "k" * 24}
MESSAGES = [{"role": "user", "content": "hello world"}]


def rows(n: int = 8) -> list[dict]:
    return [{"prompt": f"the quick fox {i}", "completion": "how are you?"} for i in range(n)]


def jsonl(records) -> bytes:
    return "\n".join(r if isinstance(r, str) else json.dumps(r) for r in records).encode()


def make_client(data_dir):
    app = create_app(make_settings(data_dir, None, admin_key="k" * 24, max_body_bytes=65536),
                     base=make_base(build_tokenizer()))
    return TestClient(app)


def submit(client, data: bytes, **config):
    return client.post("/admin/training-jobs", headers=ADMIN, files={"dataset": ("data.jsonl", data)},
                       data={"config": json.dumps(config)})


def wait_for(client, job_id: str, predicate, timeout: float = 60.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = client.get(f"/admin/training-jobs/{job_id}", headers=ADMIN).json()
        if predicate(job):
            return job
        time.sleep(0.05)
    raise AssertionError(f"job never reached the expected state: {job}")


@pytest.fixture
def client(tmp_path):
    with make_client(tmp_path) as c:
        yield c


def test_bad_datasets_get_400_with_line_numbers_and_queue_nothing(client):
    cases = {
        "not json": (jsonl([rows(1)[0], "{not json"]), "line 2: not valid JSON"),
        "missing field": (jsonl([{"prompt": "hi"}]), "line 1: missing field 'completion'"),
        "wrong role": (jsonl([{"messages": [{"role": "robot", "content": "x"}]}]), "line 1: messages[0]: unknown role"),
        "empty": (jsonl([rows(1)[0], {"prompt": "hi", "completion": "  "}]), "line 2: field 'completion' is empty"),
        "too long": (jsonl([{"prompt": "fox " * 400, "completion": "ok"}]), "line 1: too long after tokenization"),
        "no lines": (b"\n\n", "dataset is empty"),
    }
    for name, (data, expected) in cases.items():
        response = submit(client, data, max_seq_len=256)
        assert response.status_code == 400, name
        error = response.json()["error"]
        assert expected in error["message"], (name, error["message"])
        assert error["param"] == "dataset" and error["code"] == "invalid_dataset"
    assert client.get("/admin/training-jobs", headers=ADMIN).json()["data"] == []


def test_an_example_larger_than_a_training_piece_is_refused(tmp_path):
    """One training forward holds at most training_piece_tokens (memory, and the time it holds the
    engine thread): a longer example gets a 400 at once, naming the limit, whatever max_seq_len says."""
    app = create_app(make_settings(tmp_path, None, admin_key="k" * 24, max_body_bytes=65536,
                                   training_piece_tokens=64), base=make_base(build_tokenizer()))
    with TestClient(app) as client:
        response = submit(client, jsonl([{"prompt": "fox " * 80, "completion": "ok"}]), max_seq_len=512)
        assert response.status_code == 400
        error = response.json()["error"]
        assert "what the gateway's training_piece_tokens allow: 64" in error["message"], error
        assert error["code"] == "invalid_dataset"
        response = submit(client, jsonl([{"prompt": "fox " * 80, "completion": "ok"}]), kind="prompt_tuning",
                          num_virtual_tokens=80)
        assert response.status_code == 400 and "training_piece_tokens" in response.json()["error"]["message"]


def test_bad_config_and_auth(client):
    response = submit(client, jsonl(rows()), kind="lora", r=0)
    assert response.status_code == 400 and response.json()["error"]["param"] == "config.r"
    response = submit(client, jsonl(rows()), kind="lora", learnin_rate=1.0)
    assert response.status_code == 400 and "learnin_rate" in response.json()["error"]["param"]
    response = submit(client, jsonl(rows()), kind="lora", sft_weight=0.5)  # a DPO setting on a supervised job
    assert response.status_code == 400 and "objective 'dpo' only" in response.json()["error"]["message"]
    response = submit(client, jsonl(rows()), kind="prompt_tuning", num_virtual_tokens=600)
    assert response.status_code == 400 and "max_virtual_tokens" in response.json()["error"]["message"]
    response = submit(client, jsonl(rows()), adapter_id="tiny")  # the base model's name
    assert response.status_code == 409
    for value in ("Infinity", "NaN", "1e999"):  # an infinite norm was queued, then its view was a 500
        response = client.post("/admin/training-jobs", headers=ADMIN, files={"dataset": ("d.jsonl", jsonl(rows()))},
                               data={"config": f'{{"kind": "lora", "max_steps": 1, "max_grad_norm": {value}}}'})
        assert response.status_code == 400 and response.json()["error"]["param"] == "config.max_grad_norm", value
    response = submit(client, jsonl(rows()), kind="lora", warmup_steps=10**38)
    assert response.status_code == 400 and response.json()["error"]["param"] == "config.warmup_steps"
    assert client.get("/admin/training-jobs", headers=ADMIN).json()["data"] == []  # nothing queued
    response = client.post("/admin/training-jobs", files={"dataset": ("d.jsonl", jsonl(rows()))})
    assert response.status_code == 401
    assert client.get("/admin/training-jobs/train-nope", headers=ADMIN).status_code == 404


def test_job_trains_registers_and_serves(client):
    response = submit(client, jsonl(rows()), kind="lora", adapter_id="fox-lora", max_steps=3, batch_size=4,
                      eval_fraction=0.25, learning_rate=0.05)
    assert response.status_code == 201, response.text
    job_id = response.json()["id"]
    with client.stream("GET", f"/admin/training-jobs/{job_id}/events", headers=ADMIN) as stream:
        events = [json.loads(line[len("data: "):]) for line in stream.iter_lines() if line.startswith("data: ")]
    assert events[-1]["state"] == "succeeded", events[-1]
    job = events[-1]
    assert job["adapter_id"] == "fox-lora" and job["progress"]["step"] == 3
    assert job["progress"]["eval_loss_before"] is not None and job["progress"]["eval_loss_after"] is not None
    assert len(job["progress"]["train_loss"]) == 3 and job["dataset"]["train_examples"] == 6

    reply = client.post("/v1/chat/completions", json={"model": "fox-lora", "messages": MESSAGES, "max_tokens": 4})
    assert reply.status_code == 200, reply.text
    metrics = client.get("/metrics").text
    assert 'gateway_training_jobs{state="succeeded"} 1.0' in metrics
    # the adapter id is taken now
    again = submit(client, jsonl(rows()), kind="ia3", adapter_id="fox-lora")
    assert again.status_code == 409


def test_progress_events_are_json_when_the_losses_are_not_finite(client):
    """A diverged run's losses (NaN, infinities) come as null in the events, as from GET: the
    console parses every event with JSON.parse, which refuses NaN (its live view stopped there)."""
    job_id = submit(client, jsonl(rows()), kind="ia3", max_steps=1).json()["id"]
    wait_for(client, job_id, lambda j: j["state"] in ("failed", "succeeded"))
    record = client.app.state.gateway.training.find(job_id)
    record.progress["train_loss"] = [[1, float("nan")], [2, float("inf")], [3, 0.5]]

    def refuse(constant):
        raise ValueError(f"{constant} is not JSON")

    with client.stream("GET", f"/admin/training-jobs/{job_id}/events", headers=ADMIN) as stream:
        events = [json.loads(line[len("data: "):], parse_constant=refuse)
                  for line in stream.iter_lines() if line.startswith("data: ")]
    assert events[-1]["progress"]["train_loss"] == [[1, None], [2, None], [3, 0.5]]
    got = client.get(f"/admin/training-jobs/{job_id}", headers=ADMIN)
    assert json.loads(got.text, parse_constant=refuse)["progress"]["train_loss"] == [[1, None], [2, None], [3, 0.5]]


def test_failing_job_is_marked_failed_and_serving_stays_healthy(client, monkeypatch):
    def explode(self):
        raise RuntimeError("simulated failure in a micro-step")

    monkeypatch.setattr(trainer_module.TrainingRun, "_train_micro_step", explode)
    job_id = submit(client, jsonl(rows()), kind="ia3", max_steps=2).json()["id"]
    job = wait_for(client, job_id, lambda j: j["state"] in ("failed", "succeeded"))
    assert job["state"] == "failed" and "simulated failure in a micro-step" in job["error"]
    assert job["adapter_id"] is None
    reply = client.post("/v1/chat/completions", json={"model": "tiny", "messages": MESSAGES, "max_tokens": 4})
    assert reply.status_code == 200
    assert client.get("/readyz").status_code == 200


def test_cancel(client):
    job_id = submit(client, jsonl(rows()), kind="lora", max_steps=100_000).json()["id"]
    wait_for(client, job_id, lambda j: j["state"] == "running")
    response = client.post(f"/admin/training-jobs/{job_id}/cancel", headers=ADMIN)
    assert response.status_code == 200 and response.json()["state"] == "cancelled"
    assert client.post(f"/admin/training-jobs/{job_id}/cancel", headers=ADMIN).status_code == 409


def _start_and_interrupt(data_dir) -> str:
    with make_client(data_dir) as first:
        job_id = submit(first, jsonl(rows()), kind="lora", max_steps=100_000, checkpoint_every=2).json()["id"]
        wait_for(first, job_id, lambda j: j["progress"].get("step", 0) >= 3)
    return job_id  # the app stopped with the job running


def test_restart_mid_job_resumes_from_the_checkpoint(tmp_path):
    job_id = _start_and_interrupt(tmp_path)
    with make_client(tmp_path) as second:
        job = wait_for(second, job_id, lambda j: j["progress"].get("resumed_from_step") is not None)
        assert job["state"] == "running" and job["progress"]["resumed_from_step"] >= 2
        assert job["progress"]["train_loss"][0][0] == 1  # the history from before the restart is kept
        second.post(f"/admin/training-jobs/{job_id}/cancel", headers=ADMIN)


def test_a_job_stopped_between_registering_and_saving_its_success_ends_succeeded_on_restart(tmp_path):
    """The process stopped after the adapter's row committed and before the job's success was
    saved: resumed, the job registers the same files again, finds them registered, and succeeds
    (it ended failed with "already registered" while its adapter was served)."""
    with make_client(tmp_path) as first:
        jobs = first.app.state.gateway.training
        real_end, registered = jobs._end, threading.Event()

        async def stop_before_success(record, state, error=None):
            if state == "succeeded":
                registered.set()
                await asyncio.Event().wait()  # never saved: the process goes down here
            await real_end(record, state, error)

        jobs._end = stop_before_success
        job_id = submit(first, jsonl(rows()), kind="ia3", max_steps=2, checkpoint_every=1,
                        adapter_id="resumed-ia3").json()["id"]
        assert registered.wait(60)
        assert first.get("/admin/adapters/resumed-ia3", headers=ADMIN).status_code == 200
    with make_client(tmp_path) as second:
        job = wait_for(second, job_id, lambda j: j["state"] in ("failed", "succeeded"))
        assert (job["state"], job["adapter_id"]) == ("succeeded", "resumed-ia3"), job


def test_restart_with_a_broken_checkpoint_fails_the_job_with_the_reason(tmp_path):
    job_id = _start_and_interrupt(tmp_path)
    for state in (tmp_path / "training" / job_id / "checkpoints").glob("checkpoint-*/state.safetensors"):
        state.unlink()
    with make_client(tmp_path) as second:
        job = wait_for(second, job_id, lambda j: j["state"] == "failed")
        assert "cannot start" in job["error"] and "checkpoint" in job["error"]


def test_dpo_objective_through_the_admin_api(client):
    """The admin jobs API takes objective 'dpo' (and beta) in its config; a preference dataset given
    to a supervised job is refused with the reason."""
    pairs = [{"prompt": f"the quick fox {i}", "chosen": "how are you?", "rejected": f"the lazy dog {i}"}
             for i in range(8)]
    wrong = submit(client, jsonl(pairs), max_steps=1)
    assert wrong.status_code == 400 and "train it with objective 'dpo'" in wrong.json()["error"]["message"]
    bad_beta = submit(client, jsonl(pairs), objective="dpo", beta=0)
    assert bad_beta.status_code == 400 and bad_beta.json()["error"]["param"] == "config.beta"
    created = submit(client, jsonl(pairs), objective="dpo", beta=0.25, max_steps=2, batch_size=4, kind="prompt_tuning",
                     num_virtual_tokens=4)
    assert created.status_code == 201, created.text
    job = wait_for(client, created.json()["id"], lambda j: j["state"] in ("succeeded", "failed"))
    assert job["state"] == "succeeded", job.get("error")
    assert job["dataset"]["format"] == "preference" and job["config"]["objective"] == "dpo"
    assert [step for step, _ in job["progress"]["train_metrics"]] == [1, 2]
    assert "preference_accuracy" in job["progress"]["eval_metrics"][-1][1]


def test_a_stored_job_whose_config_is_no_longer_valid_fails_and_the_queue_goes_on(tmp_path):
    """A job stored before a bound tightened (lora_alpha now at most 1e6): it fails with the reason
    at the next start, where the scheduler used to take it again and again, and no job after it ran."""
    import sqlite3

    job_id = _start_and_interrupt(tmp_path)
    with sqlite3.connect(tmp_path / "gateway.sqlite3") as db:
        (stored,) = db.execute("SELECT record FROM training_jobs WHERE id = ?", (job_id,)).fetchone()
        record = json.loads(stored)
        record["config"]["lora_alpha"] = 1e308
        db.execute("UPDATE training_jobs SET record = ? WHERE id = ?", (json.dumps(record), job_id))
    with make_client(tmp_path) as second:
        job = wait_for(second, job_id, lambda j: j["state"] == "failed")
        assert "no longer valid" in job["error"] and "lora_alpha" in job["error"]
        after = submit(second, jsonl(rows()), kind="lora", max_steps=2).json()["id"]
        assert wait_for(second, after, lambda j: j["state"] == "succeeded")["state"] == "succeeded"
