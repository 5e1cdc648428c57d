"""End to end: the fleet (2 replicas on Ray Serve, SmolLM2-135M-Instruct in NF4 on CPU) driven by
the official ``openai`` client through the ingress: adapters of two kinds and the base model,
plain and streamed, and the OpenAI error for an unknown model."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from gateway.settings import Settings

ray = pytest.importorskip("ray")
from ray import serve  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.ray]
API_KEY = "fleet-e2e-inference-key-0123456789"
MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def fleet_url(ray_cluster: str, smollm2_dir: Path, tmp_path_factory) -> Iterator[str]:
    from gateway.fleet.app import build_fleet
    from loadtest.bench_adapters import make_adapter_set

    root = tmp_path_factory.mktemp("fleet-e2e")
    folders = make_adapter_set(smollm2_dir, root / "adapters", ["lora8", "ia3"], "e2e")
    for folder, name in zip(folders, ("lora-x", "ia3-x"), strict=True):
        folder.rename(root / "adapters" / name)
    settings = Settings(model=str(smollm2_dir), device="cpu", data_dir=root / "data", adapters_dir=root / "adapters",
                        api_keys=[API_KEY], admin_key="fleet-e2e-admin-key-0123456789", replicas=2,
                        replica_num_cpus=0.5, max_device_adapters=2)
    serve.run(build_fleet(settings), name="gateway", route_prefix="/")
    yield ray_cluster
    serve.delete("gateway")


@pytest.fixture
def client(fleet_url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{fleet_url}/v1", api_key=API_KEY, max_retries=0, timeout=300)


def test_models_and_chat_through_the_fleet(client: openai.OpenAI):
    names = {m.id for m in client.models.list()}
    assert {"lora-x", "ia3-x"} <= names
    base = next(n for n in names if n not in ("lora-x", "ia3-x"))
    answers = {}
    for model in ("lora-x", "ia3-x", base):
        completion = client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=8, temperature=0)
        assert completion.model == model
        assert completion.choices[0].message.content
        assert completion.usage.completion_tokens <= 8
        answers[model] = completion.choices[0].message.content
    again = client.chat.completions.create(model="lora-x", messages=MESSAGES, max_tokens=8, temperature=0)
    assert again.choices[0].message.content == answers["lora-x"]  # greedy: the same text, whichever replica


def test_streaming_through_the_fleet(client: openai.OpenAI):
    plain = client.chat.completions.create(model="ia3-x", messages=MESSAGES, max_tokens=8, temperature=0)
    chunks = list(client.chat.completions.create(model="ia3-x", messages=MESSAGES, max_tokens=8, temperature=0,
                                                 stream=True))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert len(chunks) > 2 and text == plain.choices[0].message.content


def test_unknown_model_is_openais_not_found(client: openai.OpenAI):
    with pytest.raises(openai.NotFoundError) as caught:
        client.chat.completions.create(model="no-such-adapter", messages=MESSAGES, max_tokens=2)
    assert caught.value.body["code"] == "model_not_found"
