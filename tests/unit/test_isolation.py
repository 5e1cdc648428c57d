"""Isolation in one batch (tiny model): hostile sampling values and an adapter whose finite
weights overflow to non-finite logits join the same batch as greedy requests on every adapter
kind; each hostile request is served or fails alone, every other gives the text it gives alone.

The engine is held still while everything is queued, so all requests are admitted into one batch
by construction, not by timing. (The slow twin on SmolLM2 with streams is
tests/integration/test_isolation_smollm2.py.)"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from fastapi.testclient import TestClient

from gateway.app import create_app
from support import build_tiny_llama, build_tokenizer, peft_config
from test_api import ADAPTERS, make_adapters, make_base, make_settings
from test_api_load import chat_body, engine_held, gateway_of, wait_until, warm

BROKEN = "broken-lora"


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    from peft import get_peft_model

    root = tmp_path_factory.mktemp("isolation")
    adapters_dir = make_adapters(root, len(build_tokenizer()))
    model = get_peft_model(build_tiny_llama(len(build_tokenizer())),
                           peft_config("lora", target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for _, param in model.named_parameters():
            if param.requires_grad:
                param.fill_(1e19)  # finite in every file; (x @ A) @ B overflows float32
    model.save_pretrained(adapters_dir / BROKEN)
    settings = make_settings(root / "data", adapters_dir)
    with TestClient(create_app(settings, base=make_base(build_tokenizer()))) as c:
        assert BROKEN in gateway_of(c).registry  # it passed validation
        yield c


def test_hostile_requests_fail_alone_in_one_batch(client):
    models = ["tiny", *ADAPTERS]
    warm(client, *models)
    # alone, the broken adapter fails too (this also installs it, which needs the engine thread)
    assert client.post("/v1/chat/completions", json=chat_body(BROKEN)).status_code == 500
    bodies = [chat_body(m, max_tokens=16) for m in models]
    alone = [client.post("/v1/chat/completions", json=b).json()["choices"][0]["message"]["content"] for b in bodies]
    hostile = [chat_body(temperature=1e-300), chat_body(temperature=1.0, top_p=5e-324), chat_body(BROKEN)]
    engine = gateway_of(client).engine
    with ThreadPoolExecutor(len(bodies) + len(hostile)) as pool:
        with engine_held(engine):
            futures = [pool.submit(client.post, "/v1/chat/completions", json=b) for b in bodies + hostile]
            wait_until(lambda: engine.queue_depth == len(futures), "every request is queued")
        responses = [f.result() for f in futures]
    together, (poison_temperature, poison_top_p, broken) = responses[:len(bodies)], responses[len(bodies):]
    for response in together + [poison_temperature, poison_top_p]:
        assert response.status_code == 200, response.text
    assert [r.json()["choices"][0]["message"]["content"] for r in together] == alone
    assert broken.status_code == 500, broken.text
    assert broken.json()["error"]["code"] == "generation_failed"
    assert "non-finite" in broken.json()["error"]["message"]
    # the engine goes on serving
    assert client.post("/v1/chat/completions", json=bodies[0]).json()["choices"][0]["message"]["content"] == alone[0]
