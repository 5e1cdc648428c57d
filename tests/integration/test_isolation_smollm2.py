"""A hostile request inside a busy mixed batch fails alone (the real server on SmolLM2, float32).

Four greedy streams (the base model, a LoRA, an IA3 and a prompt-tuning adapter) run together;
while every one of them is generating, three hostile requests join the batch: temperature 1e-300
(0 in float32), top_p 5e-324 (a denormal), and a request through a LoRA whose weights are finite,
pass validation, and overflow float32 in the forward pass (non-finite logits for that row).
Each hostile request is served (the sampling values are normalized: greedy, top token) or fails
with its own error; every stream still completes with exactly the text it gives alone.

The base runs unquantized (float32) here: on CPU, bitsandbytes computes an NF4 layer for a single
row on another kernel path (a matrix-vector product) than for several rows, so under NF4 a lone
stream and the same stream in any batch part ways after a few dozen tokens, hostile neighbours or
not (measured: four greedy streams together differ from each alone with no other request at all).
In float32 a row's text does not depend on its batch (measured: 64 tokens, equal), so any
difference here is the hostile requests' doing."""

from __future__ import annotations

import json
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import torch

pytestmark = pytest.mark.slow

STREAMS = {"base": None, "iso-lora": "lora", "iso-ia3": "ia3", "iso-pt": "prompt_tuning"}
BROKEN = "iso-broken"
MESSAGES = [{"role": "user", "content": "Write a short story about a lighthouse keeper."}]
MAX_TOKENS = 32


def write_adapters(model_dir: Path, folder: Path) -> None:
    """PEFT adapters for SmolLM2's shapes, made on a randomly initialised copy of its config (the
    weights of the base do not matter to the files)."""
    from peft import IA3Config, LoraConfig, PromptTuningConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_dir)
    configs = {
        "iso-lora": LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", task_type="CAUSAL_LM"),
        "iso-ia3": IA3Config(task_type="CAUSAL_LM"),
        "iso-pt": PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=8),
        BROKEN: LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"),
    }
    for seed, (name, peft_config) in enumerate(configs.items(), start=1):
        torch.manual_seed(seed)
        model = get_peft_model(AutoModelForCausalLM.from_config(config), peft_config)
        with torch.no_grad():
            for pname, param in model.named_parameters():
                if not param.requires_grad:
                    continue
                if name == BROKEN:
                    # each tensor is finite (float32 holds 1e19), (x @ A) @ B is ~1e41: inf, then NaN
                    param.fill_(1e19)
                elif "lora_" in pname:
                    param.copy_(torch.randn_like(param) * 0.04)
                elif "ia3_" in pname:
                    param.mul_(1 + 0.3 * torch.randn_like(param))
        model.save_pretrained(folder / name)


@pytest.fixture(scope="module")
def server(smollm2_dir: Path, tmp_path_factory, launch_server):
    root = tmp_path_factory.mktemp("isolation")
    adapters, data = root / "adapters", root / "data"
    adapters.mkdir()
    data.mkdir()
    write_adapters(smollm2_dir, adapters)
    return launch_server(["--model", str(smollm2_dir), "--adapters-dir", str(adapters), "--data-dir", str(data),
                          "--device", "cpu", "--quantization", "none"])


def base_name(url: str) -> str:
    cards = httpx.get(f"{url}/v1/models", timeout=30).json()["data"]
    return next(card["id"] for card in cards if card.get("parent") is None)


def stream_text(url: str, model: str, started: threading.Event | None = None) -> str:
    """A greedy chat stream's text; ``started`` is set once its first token has arrived."""
    body = {"model": model, "messages": MESSAGES, "max_tokens": MAX_TOKENS, "temperature": 0, "stream": True}
    text = []
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=300) as response:
        assert response.status_code == 200, response.read()
        for line in response.iter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[len("data: "):])
            assert "error" not in chunk, f"{model}: {chunk['error']}"
            delta = chunk["choices"][0]["delta"].get("content") if chunk["choices"] else None
            if delta:
                text.append(delta)
                if started is not None:
                    started.set()
    return "".join(text)


def chat_requests(url: str, bodies: list[dict]) -> list[httpx.Response]:
    chat = f"{url}/v1/chat/completions"
    with ThreadPoolExecutor(len(bodies)) as pool:
        return list(pool.map(lambda body: httpx.post(chat, json={"max_tokens": 8, **body}, timeout=300), bodies))


def streams_joined_by(url: str, models: dict[str, str], bodies: list[dict]) -> tuple[dict[str, str], list[httpx.Response]]:
    """Run the streams together; once each is generating, send ``bodies`` into their batch."""
    started = {name: threading.Event() for name in models}
    with ThreadPoolExecutor(len(models)) as pool:
        futures = {name: pool.submit(stream_text, url, model, started[name]) for name, model in models.items()}
        for name, event in started.items():
            assert event.wait(300), f"{name} never started"
        responses = chat_requests(url, bodies)
        return {name: future.result() for name, future in futures.items()}, responses


def test_hostile_requests_fail_alone_in_a_busy_mixed_batch(server):
    base = base_name(server.url)
    models = {name: (base if kind is None else name) for name, kind in STREAMS.items()}
    hi = [{"role": "user", "content": "hi"}]
    hostile = [{"model": base, "messages": hi, "temperature": 1e-300},
               {"model": base, "messages": hi, "top_p": 5e-324, "temperature": 1.0},
               {"model": BROKEN, "messages": hi}]

    alone = {name: stream_text(server.url, model) for name, model in models.items()}
    assert len(set(alone.values())) == len(alone), alone  # the adapters change the text, or this proves little

    together, (poison_temperature, poison_top_p, broken) = streams_joined_by(server.url, models, hostile)
    for response in (poison_temperature, poison_top_p):
        assert response.status_code in (200, 400), response.text  # normalized, or refused alone
    assert broken.status_code == 500, broken.text
    assert broken.json()["error"]["code"] == "generation_failed"
    assert together == alone
    # and the server goes on serving
    assert httpx.get(f"{server.url}/readyz", timeout=30).status_code == 200
    assert stream_text(server.url, base) == alone["base"]
