"""End to end: the fleet (2 replicas on Ray Serve, SmolLM2-135M-Instruct in NF4 on CPU) as one
system (one PostgreSQL registry, one shared store folder), driven through the ingress: adapters of
two kinds registered with the admin API (multipart upload), then the official ``openai`` client
chats with each on both replicas (``x-gateway-replica``; plain routing, asked until each replica
answered), plain and streamed, and the OpenAI error for an unknown model. One fleet start."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from gateway.settings import Settings

ray = pytest.importorskip("ray")
from ray import serve  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.ray]
API_KEY = "fleet-e2e-inference-key-0123456789"
ADMIN_KEY = "fleet-e2e-admin-key-0123456789"
ADAPTERS = ("lora-x", "ia3-x")
REPLICA = "x-gateway-replica"
WAIT = 300.0  # a generous bound on what holds within about a second when things work
MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def fleet_url(ray_cluster: str, postgres_cluster, smollm2_dir: Path, tmp_path_factory) -> Iterator[str]:
    from gateway.fleet.app import build_fleet
    from loadtest.bench_adapters import make_adapter_set

    root = tmp_path_factory.mktemp("fleet-e2e")
    (root / "shared").mkdir()
    settings = Settings(model=str(smollm2_dir), device="cpu", data_dir=root / "data", api_keys=[API_KEY],
                        admin_key=ADMIN_KEY, replicas=2, replica_num_cpus=0.5, max_device_adapters=2,
                        fleet_routing="plain", database_url=postgres_cluster.create_database(),
                        shared_store_url=str(root / "shared"))
    serve.run(build_fleet(settings), name="gateway", route_prefix="/")
    # registered through the ingress: one replica takes the upload, the registry and store share it
    folders = make_adapter_set(smollm2_dir, root / "sources", ["lora8", "ia3"], "e2e")
    for folder, name in zip(folders, ADAPTERS, strict=True):
        files = [("files", (p.name, p.read_bytes())) for p in sorted(folder.iterdir()) if p.is_file()]
        response = httpx.post(f"{ray_cluster}/admin/adapters", files=files, data={"id": name}, timeout=300,
                              headers={"Authorization": f"Bearer {ADMIN_KEY}"})
        assert response.status_code == 201, response.text
    yield ray_cluster
    serve.delete("gateway")


@pytest.fixture
def client(fleet_url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{fleet_url}/v1", api_key=API_KEY, max_retries=0, timeout=300)


def answers_by_replica(client: openai.OpenAI, model: str) -> dict[str, str]:
    """Chat with ``model`` until both replicas answered: replica name -> the (greedy) text."""
    texts: dict[str, str] = {}
    deadline = time.monotonic() + WAIT
    while len(texts) < 2:
        assert time.monotonic() < deadline, f"{model}: only {sorted(texts)} answered"
        raw = client.chat.completions.with_raw_response.create(model=model, messages=MESSAGES, max_tokens=8,
                                                               temperature=0)
        completion = raw.parse()
        assert completion.model == model and completion.usage.completion_tokens <= 8
        assert completion.choices[0].message.content
        texts[raw.headers[REPLICA]] = completion.choices[0].message.content
    return texts


def test_models_and_chat_on_both_replicas(client: openai.OpenAI):
    names = {m.id for m in client.models.list()}
    assert set(ADAPTERS) <= names
    base = next(n for n in names if n not in ADAPTERS)
    answers = {model: answers_by_replica(client, model) for model in (*ADAPTERS, base)}
    for model, texts in answers.items():
        assert len(set(texts.values())) == 1, (model, texts)  # greedy: the same text on every replica


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
