"""The loop over HTTP on a tiny random Llama: two adapters A/B tested with capture on, feedback,
a preference file from the experiment, a DPO job on it (SFT then DPO), and its result as a new
arm. Also: what is (not) captured, the 409s, and that deleting the experiment deletes captures."""

from __future__ import annotations

import contextlib
import json
import sqlite3

import pytest
from test_training_api import ADMIN, jsonl, make_client, rows, submit, wait_for

from gateway.app import DATABASE_FILE
from gateway.experiments.preferences import PAIRS_PER_ANSWER, preference_records
from gateway.experiments.store import CapturedAnswer

PROMPT = [{"role": "system", "content": "answer briefly"}, {"role": "user", "content": "the quick fox?"}]
OTHER = [{"role": "user", "content": "the lazy dog?"}]


def ask(client, model: str, messages, i: int, **extra):
    response = client.post("/v1/chat/completions", headers=ADMIN, json={
        "model": model, "messages": messages, "max_tokens": 4, "temperature": 1.0, "seed": i, "user": f"user-{i}",
        **extra})
    assert response.status_code == 200, response.text
    body = response.json()
    return body["id"], body["experiment"]["arm"], body["choices"][0]["message"]["content"]


def feedback(client, completion_id: str, **values):
    response = client.post("/v1/feedback", headers=ADMIN, json={"id": completion_id, **values})
    assert response.status_code == 200, response.text


def error_of(response, status: int) -> str:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    return error["message"]


@pytest.fixture
def client(tmp_path):
    with make_client(tmp_path) as c:
        yield c


def train_arm(client, adapter_id: str, seed: int) -> None:
    job = submit(client, jsonl(rows()), max_steps=1, adapter_id=adapter_id, seed=seed, r=4)
    assert job.status_code == 201, job.text
    assert wait_for(client, job.json()["id"], lambda j: j["state"] in ("succeeded", "failed"))["state"] == "succeeded"


def test_ab_feedback_preference_file_dpo_new_arm(client):
    train_arm(client, "arm-a", 1)
    train_arm(client, "arm-b", 2)
    created = client.post("/admin/experiments", headers=ADMIN, json={
        "name": "ab", "arms": [{"name": "arm-a", "weight": 1}, {"name": "arm-b", "weight": 1}], "capture": True})
    assert created.status_code == 201 and created.json()["capture"] is True
    answers = {"arm-a": [], "arm-b": []}
    for i in range(40):
        completion_id, arm, text = ask(client, "ab", PROMPT, i)
        answers[arm].append((completion_id, text))
    assert answers["arm-a"] and answers["arm-b"]
    for completion_id, _ in answers["arm-a"]:
        feedback(client, completion_id, thumbs="up")
    for completion_id, _ in answers["arm-b"]:
        feedback(client, completion_id, thumbs="down")
    ask(client, "ab", OTHER, 99)  # answered, but no feedback: never stored
    two_choices, _, _ = ask(client, "ab", PROMPT, 98, n=2)
    feedback(client, two_choices, thumbs="down")  # not captured: feedback could not say which choice it meant
    database = client.app.state.gateway.settings.data_dir / DATABASE_FILE
    with contextlib.closing(sqlite3.connect(database)) as db:
        stored = db.execute("SELECT messages, completion FROM experiment_captures WHERE experiment = 'ab'").fetchall()
    assert len(stored) == len(answers["arm-a"]) + len(answers["arm-b"])
    assert {json.dumps(PROMPT)} == {messages for messages, _ in stored}

    made = client.post("/admin/experiments/ab/preference-file", headers=ADMIN)
    assert made.status_code == 201, made.text
    file = made.json()
    assert file["object"] == "file" and file["purpose"] == "fine-tune" and file["filename"] == "ab-preferences.jsonl"
    content = client.get(f"/v1/files/{file['id']}/content", headers=ADMIN).content
    lines = [json.loads(line) for line in content.decode().splitlines()]
    good = {text for _, text in answers["arm-a"]}
    bad = {text for _, text in answers["arm-b"]}
    made = [(r["preferred_output"][0]["content"], r["non_preferred_output"][0]["content"]) for r in lines]
    assert file["records"] == len(lines) > 0 and file["skipped"] == 0
    assert len(set(made)) == len(made) and set(made) <= {(g, b) for g in good for b in bad if g != b}
    # each distinct good answer is preferred to PAIRS_PER_ANSWER bad ones (all, when there are fewer):
    # pairs grow with the answers, not with their square
    for g in good:
        assert sum(preferred == g for preferred, _ in made) == min(PAIRS_PER_ANSWER, len(bad - {g}))
    assert all(r["input"]["messages"] == PROMPT for r in lines)  # the other prompt had no feedback
    assert file["answers"] == len(answers["arm-a"]) + len(answers["arm-b"]) and file["prompts"] == 1

    # SFT then DPO: start from arm-a (the reference), trained on the file, then the result joins as an arm
    job = client.post("/v1/fine_tuning/jobs", headers=ADMIN, json={
        "model": "arm-a", "training_file": file["id"], "suffix": "dpo",
        "method": {"type": "dpo", "dpo": {"hyperparameters": {"beta": 0.1, "n_epochs": 1}}}})
    assert job.status_code == 200, job.text
    done = wait_for(client, job.json()["id"], lambda j: j["state"] in ("succeeded", "failed", "cancelled"))
    assert done["state"] == "succeeded", done.get("error")
    new_arm = done["adapter_id"]
    challenger = client.post("/admin/experiments", headers=ADMIN, json={
        "name": "ab-2", "arms": [{"name": "arm-a", "weight": 1}, {"name": new_arm, "weight": 1}]})
    assert challenger.status_code == 201, challenger.text
    served = {ask(client, "ab-2", PROMPT, i)[1] for i in range(20)}
    assert served == {"arm-a", new_arm}

    # deleting the experiment deletes what it captured
    assert client.delete("/admin/experiments/ab", headers=ADMIN).status_code == 200
    assert client.app.state.gateway.experiments.store.captured_answers("ab") == []


def test_preference_file_refusals(client):
    train_arm(client, "arm-a", 1)
    for name, capture in (("plain", False), ("captures", True)):
        response = client.post("/admin/experiments", headers=ADMIN, json={
            "name": name, "arms": [{"name": "tiny", "weight": 1}, {"name": "arm-a", "weight": 1}], "capture": capture})
        assert response.status_code == 201, response.text
    assert "capture: true" in error_of(client.post("/admin/experiments/plain/preference-file", headers=ADMIN), 409)
    completion_id, _, _ = ask(client, "captures", PROMPT, 0)
    assert "no preference pair yet: 0 captured answer(s)" in error_of(
        client.post("/admin/experiments/captures/preference-file", headers=ADMIN), 409)
    feedback(client, completion_id, score=1.0)
    message = error_of(client.post("/admin/experiments/captures/preference-file", headers=ADMIN), 409)
    assert "1 captured answer(s) with feedback over 1 prompt(s)" in message
    error_of(client.post("/admin/experiments/nope/preference-file", headers=ADMIN), 404)
    assert client.post("/admin/experiments/captures/preference-file").status_code == 401
    assert client.get("/v1/files", headers=ADMIN).json()["data"] == []  # no file was made


def answer(arm: str, text: str, messages=PROMPT, score=None, thumbs=None) -> CapturedAnswer:
    return CapturedAnswer(f"id-{arm}-{text}", arm, messages, text, score, thumbs)


def test_pairs_come_from_different_arms_and_comparable_feedback():
    answers = [
        answer("a", "x", thumbs="up"), answer("b", "y", thumbs="down"),  # a pair: x over y
        answer("b", "y2", thumbs="up"),  # equal thumbs with x: no pair; beats y, but on the same arm
        answer("a", "s1", score=3.0), answer("b", "s2", score=1.0),  # scores: s1 over s2
        answer("b", "s3", score=2.0, thumbs="down"),  # its score ranks it: s1 over s3; a score never meets a thumbs
        answer("a", "z", messages=OTHER, thumbs="up"),  # another prompt: pairs with nothing
        answer("b", "x", thumbs="down"),  # the same text as a's x: no pair with it
    ]
    records, summary = preference_records(answers)
    pairs = {(r["preferred_output"][0]["content"], r["non_preferred_output"][0]["content"]) for r in records}
    assert pairs == {("x", "y"), ("s1", "s2"), ("s1", "s3")}
    assert summary.answers == len(answers) and summary.prompts == 2 and summary.pairs == len(records)


def test_what_a_request_capture_keeps():
    from gateway.generation import Capture
    from gateway.protocol import ChatCompletionRequest

    def body(messages, **extra):
        return ChatCompletionRequest(model="m", messages=messages, **extra)

    ok = Capture.of(body([{"role": "developer", "content": "be brief"}, {"role": "user", "content": "hi"}]), 100)
    assert ok.messages == [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    ok.add("hel")
    ok.add("lo")
    assert ok.complete and "".join(ok.text) == "hello"
    tight = Capture.of(body([{"role": "user", "content": "hi"}]), 4)  # 2 characters left for the answer
    tight.add("abc")
    assert not tight.complete
    refused = {
        "two choices": body([{"role": "user", "content": "hi"}], n=2),
        "tools": body([{"role": "user", "content": "hi"}],
                      tools=[{"type": "function", "function": {"name": "f", "parameters": {}}}]),
        "a tool message": body([{"role": "user", "content": "hi"}, {"role": "tool", "content": "x", "tool_call_id": "1"},
                                {"role": "user", "content": "and?"}]),
        "blank content": body([{"role": "user", "content": "  "}]),
        "a lone surrogate": body([{"role": "user", "content": "\ud800"}]),
        "ends with the assistant": body([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]),
        "too long": body([{"role": "user", "content": "x" * 101}]),
        "image parts": body([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]),
    }
    for why, request in refused.items():
        assert Capture.of(request, 100) is None, why
