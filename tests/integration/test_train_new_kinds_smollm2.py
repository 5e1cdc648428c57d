"""New kinds trained on the real SmolLM2 in NF4 through the HTTP jobs API: DoRA (magnitudes
over dequantized 4-bit weights), VeRA and prefix tuning, each trained briefly, registered, served,
and its exported files loaded by PEFT on its own NF4 copy of the base: the gateway's greedy text
equals PEFT's."""

from __future__ import annotations

import json
import shutil
import time
import warnings

import pytest
from fastapi.testclient import TestClient
from test_serving_smollm2 import chat_ids, greedy

from gateway.app import create_app
from gateway.base_model import load_base
from gateway.settings import Settings

pytestmark = pytest.mark.slow
ADMIN_KEY = "a" * 32
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
MESSAGES = [{"role": "user", "content": "Extract the person as JSON: Dana is 52 years old."}]
ROWS = [{"prompt": f"Extract the person as JSON: {n} is {a} years old.",
         "completion": json.dumps({"name": n, "age": a})} for n, a in (("Alice", 31), ("Bruno", 47), ("Chen", 25))]
JOBS = {
    "dora": {"learning_rate": 1e-3, "target_modules": ["q_proj", "v_proj"], "lora_dropout": 0.0},
    "vera": {"learning_rate": 3e-2, "r": 32, "target_modules": ["q_proj", "v_proj"]},
    "prefix_tuning": {"learning_rate": 3e-2, "num_virtual_tokens": 4, "prefix_projection": True,
                      "encoder_hidden_size": 64},
}


@pytest.fixture(scope="module")
def settings(smollm2_dir, tmp_path_factory) -> Settings:
    return Settings(model=str(smollm2_dir), device="cpu", data_dir=tmp_path_factory.mktemp("data"),
                    admin_key=ADMIN_KEY)


@pytest.fixture(scope="module")
def client(settings):
    with TestClient(create_app(settings)) as c:
        # keep a copy of each exported folder (registering moves it into the blob store)
        jobs = c.app.state.gateway.training
        register = jobs._register

        async def register_and_keep(adapter_id, folder):
            shutil.copytree(folder, settings.data_dir / "kept" / adapter_id)
            return await register(adapter_id, folder)

        jobs._register = register_and_keep
        yield c


@pytest.mark.parametrize("kind", list(JOBS))
def test_job_trains_serves_and_peft_agrees(kind, client, settings):
    from peft import PeftModel

    config = {"kind": kind, "adapter_id": f"smol-{kind}".replace("_", "-"), "max_steps": 2, "batch_size": 3,
              "eval_fraction": 0, **JOBS[kind]}
    response = client.post("/admin/training-jobs", headers=ADMIN, data={"config": json.dumps(config)},
                           files={"dataset": ("d.jsonl", "\n".join(json.dumps(r) for r in ROWS).encode())})
    assert response.status_code == 201, response.text
    job_id = response.json()["id"]
    for _ in range(1200):
        job = client.get(f"/admin/training-jobs/{job_id}", headers=ADMIN).json()
        if job["state"] in ("succeeded", "failed", "cancelled"):
            break
        time.sleep(0.25)
    assert job["state"] == "succeeded", job
    adapter = client.get(f"/admin/adapters/{job['adapter_id']}", headers=ADMIN).json()
    assert adapter["kind"] == kind, adapter
    reply = client.post("/v1/chat/completions", json={"model": job["adapter_id"], "messages": MESSAGES,
                                                       "max_tokens": 12, "temperature": 0})
    assert reply.status_code == 200, reply.text
    text = reply.json()["choices"][0]["message"]["content"]

    exported = settings.data_dir / "kept" / job["adapter_id"]
    base = load_base(settings)  # a fresh NF4 copy: PEFT wraps its layers its own way
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = PeftModel.from_pretrained(base.model, exported).eval()
        expected = greedy(model, base.tokenizer, chat_ids(base.tokenizer, MESSAGES))
    assert text == expected[:len(text)] and text, (text, expected)
