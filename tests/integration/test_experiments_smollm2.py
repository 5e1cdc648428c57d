"""End to end: an A/B experiment between a LoRA and an IA3 adapter at SmolLM2's shapes, on the real
server (a subprocess, NF4 on CPU), driven with the official ``openai`` client. Every response names
its arm; feedback is posted for each; the results count requests and feedback per arm exactly."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import httpx
import openai
import pytest
import torch

from gateway.experiments.assignment import Arm, assign_arm

pytestmark = pytest.mark.slow

ADMIN_KEY = "integration-admin-key-0123"
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
ARMS = {"sql-lora": 1.0, "tone-ia3": 1.0}
EXPERIMENT = "support-bot"
SALT = "integration"
MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]


def write_random_adapter(model_dir: Path, folder: Path, kind: str, seed: int) -> None:
    """A PEFT adapter at the base's shapes with random weights. The shapes come from PEFT itself on a
    weightless (meta) copy of the model, so nothing of the 135M parameters is loaded."""
    from peft import IA3Config, LoraConfig, get_peft_model, get_peft_model_state_dict
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModelForCausalLM

    config = (LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
              if kind == "lora" else IA3Config(task_type="CAUSAL_LM"))
    with torch.device("meta"):
        model = get_peft_model(AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir)), config)
    generator = torch.Generator().manual_seed(seed)
    center = 1.0 if kind == "ia3" else 0.0  # IA3 vectors scale activations: random around 1
    tensors = {name: center + 0.05 * torch.randn(meta.shape, generator=generator)
               for name, meta in get_peft_model_state_dict(model).items()}
    folder.mkdir(parents=True)
    save_file(tensors, folder / "adapter_model.safetensors")
    model.peft_config["default"].save_pretrained(folder)


@pytest.fixture(scope="module")
def server(smollm2_dir: Path, tmp_path_factory, launch_server):
    root = tmp_path_factory.mktemp("smollm2-experiments")
    write_random_adapter(smollm2_dir, root / "adapters" / "sql-lora", "lora", seed=1)
    write_random_adapter(smollm2_dir, root / "adapters" / "tone-ia3", "ia3", seed=2)
    return launch_server(["--model", str(smollm2_dir), "--adapters-dir", str(root / "adapters"),
                          "--data-dir", str(root / "data"), "--device", "cpu", "--admin-key", ADMIN_KEY])


@pytest.fixture(scope="module")
def admin(server):
    with httpx.Client(base_url=server.url, headers=ADMIN, timeout=60) as client:
        yield client


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=120)


def test_experiment_between_lora_and_ia3(admin: httpx.Client, client: openai.OpenAI):
    created = admin.post("/admin/experiments", json={
        "name": EXPERIMENT, "arms": [{"name": k, "weight": v} for k, v in ARMS.items()],
        "stickiness": "user", "salt": SALT})
    assert created.status_code == 201, created.text
    assert EXPERIMENT in {m.id for m in client.models.list()}

    arms = [Arm(k, v) for k, v in ARMS.items()]
    users = [f"customer-{i}" for i in range(6)]
    expected = {user: assign_arm(EXPERIMENT, SALT, user, arms).name for user in users}
    assert set(expected.values()) == set(ARMS)  # both arms get traffic from these users

    served: dict[str, list[str]] = defaultdict(list)  # arm -> completion ids
    tokens: dict[str, int] = defaultdict(int)
    for user in users:
        raw = client.chat.completions.with_raw_response.create(
            model=EXPERIMENT, messages=MESSAGES, max_tokens=4, temperature=0, user=user)
        completion = raw.parse()
        arm = raw.headers["x-gateway-experiment-arm"]
        assert arm == expected[user] == completion.model_extra["experiment"]["arm"]
        assert completion.model == EXPERIMENT and completion.choices[0].message.content
        served[arm].append(completion.id)
        tokens[arm] += completion.usage.completion_tokens

    stream_user = users[0]
    stream = client.chat.completions.create(model=EXPERIMENT, messages=MESSAGES, max_tokens=4, temperature=0,
                                            user=stream_user, stream=True)
    chunks = list(stream)
    assert {chunk.model_extra["experiment"]["arm"] for chunk in chunks} == {expected[stream_user]}
    served[expected[stream_user]].append(chunks[0].id)

    text = client.completions.create(model=EXPERIMENT, prompt="The capital of France is", max_tokens=4,
                                     temperature=0, user=users[1])
    assert text.model_extra["experiment"]["arm"] == expected[users[1]]
    served[expected[users[1]]].append(text.id)

    # feedback: every sql-lora answer liked with a score of 5, every tone-ia3 answer disliked with 2
    for arm, ids in served.items():
        for completion_id in ids:
            thumbs, score = ("up", 5) if arm == "sql-lora" else ("down", 2)
            posted = httpx.post(f"{client.base_url}feedback", json={"id": completion_id, "thumbs": thumbs,
                                                                    "score": score}, timeout=30)
            assert posted.status_code == 200, posted.text
            assert (posted.json()["arm"], posted.json()["replaced"]) == (arm, False)
    assert httpx.post(f"{client.base_url}feedback", json={"id": "chatcmpl-nope", "thumbs": "up"},
                      timeout=30).status_code == 404

    results = admin.get(f"/admin/experiments/{EXPERIMENT}/results").json()
    by_arm = {arm["arm"]: arm for arm in results["arms"]}
    for arm, ids in served.items():
        summary = by_arm[arm]
        assert (summary["requests"], summary["errors"], summary["feedback"]["count"]) == (len(ids), 0, len(ids))
        thumbs = summary["feedback"]["thumbs"]
        assert (thumbs["up"], thumbs["down"]) == ((len(ids), 0) if arm == "sql-lora" else (0, len(ids)))
        assert summary["feedback"]["score"]["mean"] == (5 if arm == "sql-lora" else 2)
        assert summary["latency_seconds"]["p95"] >= summary["latency_seconds"]["p50"] > 0
        assert summary["tokens"]["completion"] >= tokens[arm]  # plus the streamed and text completions
    (comparison,) = results["comparisons"]
    assert (comparison["arm"], comparison["control"]) == ("tone-ia3", "sql-lora")
    assert comparison["thumbs"]["verdict"].startswith("not enough data yet")

    # an adapter serving a running experiment cannot be deleted
    refused = admin.delete("/admin/adapters/tone-ia3")
    assert refused.status_code == 409 and EXPERIMENT in refused.json()["error"]["message"]
