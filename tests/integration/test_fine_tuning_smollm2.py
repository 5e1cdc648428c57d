"""End to end with the official ``openai`` SDK on the real server (a subprocess, SmolLM2-135M NF4 on
CPU): upload a file, a supervised job, its events and checkpoint, chat with ``fine_tuned_model``;
then a DPO job from a preference file that starts from that result, its reward metrics, and chat
with its result."""

from __future__ import annotations

import io
import json
import time
from pathlib import Path

import openai
import pytest

pytestmark = pytest.mark.slow

ADMIN_KEY = "integration-admin-key-0123"
PEOPLE = (("Alice", 31), ("Bruno", 47), ("Chen", 25), ("Dana", 52))
MESSAGES = [{"role": "user", "content": "Extract the person as JSON: Eve is 38 years old."}]


def jsonl(records: list[dict]) -> io.BytesIO:
    return io.BytesIO("\n".join(json.dumps(r) for r in records).encode())


@pytest.fixture(scope="module")
def client(smollm2_dir: Path, tmp_path_factory, launch_server) -> openai.OpenAI:
    root = tmp_path_factory.mktemp("smollm2-fine-tuning")
    server = launch_server(["--model", str(smollm2_dir), "--data-dir", str(root / "data"), "--device", "cpu",
                            "--admin-key", ADMIN_KEY])
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=ADMIN_KEY, max_retries=0, timeout=120)


def wait_done(client: openai.OpenAI, job_id: str, timeout: float = 600.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = client.fine_tuning.jobs.retrieve(job_id)
        if job.status in ("succeeded", "failed", "cancelled"):
            return job
        time.sleep(0.5)
    raise AssertionError(f"job {job_id} did not end: {job}")


def test_supervised_then_dpo_through_the_sdk(client: openai.OpenAI):
    chats = [{"messages": [{"role": "user", "content": f"Extract the person as JSON: {n} is {a} years old."},
                           {"role": "assistant", "content": json.dumps({"name": n, "age": a})}]}
             for n, a in PEOPLE]
    training = client.files.create(file=("people.jsonl", jsonl(chats)), purpose="fine-tune")
    sft = client.fine_tuning.jobs.create(model=client.models.list().data[0].id, training_file=training.id,
                                         suffix="people", method={"type": "supervised", "supervised": {
                                             "hyperparameters": {"n_epochs": 1, "batch_size": 4}}})
    sft_done = wait_done(client, sft.id)
    assert sft_done.status == "succeeded", sft_done.error
    events = client.fine_tuning.jobs.list_events(sft.id, limit=50).data
    assert [e.data["step"] for e in events if e.type == "metrics"] == [1]
    assert [c.step_number for c in client.fine_tuning.jobs.checkpoints.list(sft.id).data] == [1]
    reply = client.chat.completions.create(model=sft_done.fine_tuned_model, messages=MESSAGES, max_tokens=8)
    assert reply.choices[0].message.content

    pairs = [{"input": {"messages": [{"role": "user", "content": f"Extract the person as JSON: {n} is {a} years old."}]},
              "preferred_output": [{"role": "assistant", "content": json.dumps({"name": n, "age": a})}],
              "non_preferred_output": [{"role": "assistant", "content": f"The person is {n}, aged {a}."}]}
             for n, a in PEOPLE]
    preferences = client.files.create(file=("prefs.jsonl", jsonl(pairs)), purpose="fine-tune")
    dpo = client.fine_tuning.jobs.create(model=sft_done.fine_tuned_model, training_file=preferences.id,
                                         method={"type": "dpo", "dpo": {"hyperparameters": {
                                             "n_epochs": 2, "batch_size": 4, "beta": 0.1}}})
    dpo_done = wait_done(client, dpo.id)
    assert dpo_done.status == "succeeded", dpo_done.error
    metrics = sorted((e.data for e in client.fine_tuning.jobs.list_events(dpo.id, limit=50).data
                      if e.type == "metrics"), key=lambda d: d["step"])
    assert [m["step"] for m in metrics] == [1, 2]
    # the reference is the SFT adapter, where the policy starts: the first loss is about log 2
    assert metrics[0]["train_loss"] == pytest.approx(0.6931, abs=0.05)
    assert all("reward_margin" in m and "preference_accuracy" in m for m in metrics)
    reply = client.chat.completions.create(model=dpo_done.fine_tuned_model, messages=MESSAGES, max_tokens=8)
    assert reply.choices[0].message.content
