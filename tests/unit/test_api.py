"""The OpenAI-compatible HTTP surface, end to end on a tiny random Llama with three PEFT adapters
(LoRA, IA3, prompt tuning), through FastAPI's TestClient (which runs the lifespan)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient

from gateway.app import create_app
from gateway.base_model import LoadedBase
from gateway.settings import Settings
from support import build_tiny_llama, build_tokenizer, make_peft_adapter

ADAPTERS = {"lora-a": "lora", "ia3-a": "ia3", "pt-a": "prompt_tuning"}
MESSAGES = [{"role": "user", "content": "hello world, how are you?"}]


def make_adapters(root: Path, vocab_size: int) -> Path:
    folder = root / "adapters"
    folder.mkdir(parents=True, exist_ok=True)
    base = build_tiny_llama(vocab_size)
    for seed, (name, kind) in enumerate(ADAPTERS.items(), start=1):
        make_peft_adapter(base, kind, folder / name, seed=seed)
    return folder


def make_settings(root: Path, adapters_dir: Path | None, **overrides) -> Settings:
    values = dict(quantization="none", device="cpu", adapters_dir=adapters_dir, data_dir=root, max_n=4,
                  max_tokens_limit=64, default_max_tokens=8, max_body_bytes=4096)
    return Settings(**{**values, **overrides})


def make_base(tokenizer) -> LoadedBase:
    model = build_tiny_llama(len(tokenizer))  # a fresh model per app: the app wraps it
    return LoadedBase(model=model, tokenizer=tokenizer, name="tiny", device=torch.device("cpu"),
                      dtype=torch.float32, context_window=256, load_seconds=0.0)


@pytest.fixture(scope="module")
def adapters_dir(tmp_path_factory) -> Path:
    return make_adapters(tmp_path_factory.mktemp("api"), len(build_tokenizer()))


@pytest.fixture(scope="module")
def client(adapters_dir, tmp_path_factory):
    tokenizer = build_tokenizer()
    app = create_app(make_settings(tmp_path_factory.mktemp("data"), adapters_dir), base=make_base(tokenizer))
    with TestClient(app) as c:
        yield c


def chat(client, model="tiny", **extra):
    body = {"model": model, "messages": MESSAGES, "temperature": 0, **extra}
    return client.post("/v1/chat/completions", json=body)


def complete(client, prompt="the quick brown fox", model="tiny", **extra):
    body = {"model": model, "prompt": prompt, "temperature": 0, **extra}
    return client.post("/v1/completions", json=body)


def sse_events(response) -> list:
    """Every ``data:`` payload in order; ``[DONE]`` kept as the string."""
    assert response.headers["content-type"].startswith("text/event-stream")
    events = []
    for line in response.text.splitlines():
        if not line.strip():
            continue
        assert line.startswith("data: "), line
        payload = line[len("data: "):]
        events.append(payload if payload == "[DONE]" else json.loads(payload))
    return events


def check_usage(usage: dict, max_tokens: int) -> None:
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert usage["prompt_tokens"] > 0
    assert 0 <= usage["completion_tokens"] <= max_tokens


# ---- probes and models --------------------------------------------------------------------------
def test_probes(client):
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200
    assert ready.json()["status"] == "ready" and ready.json()["model"] == "tiny"
    assert ready.json()["adapters"] == 3


def test_models_list(client):
    response = client.get("/v1/models")
    assert response.status_code == 200
    body = response.json()
    assert body["object"] == "list"
    cards = {card["id"]: card for card in body["data"]}
    assert set(cards) == {"tiny", *ADAPTERS}
    assert cards["tiny"]["parent"] is None
    for name in ADAPTERS:
        assert cards[name]["parent"] == "tiny" and cards[name]["root"] == "tiny"
        assert cards[name]["object"] == "model"


def test_models_retrieve_each_listed_card(client):
    for card in client.get("/v1/models").json()["data"]:
        response = client.get(f"/v1/models/{card['id']}")
        assert response.status_code == 200, response.text
        assert response.json() == card


@pytest.mark.parametrize("name", ["no-such-adapter", "tiny/extra", "x" * 5000])
def test_models_retrieve_unknown_is_a_404_in_openai_shape(client, name):
    response = client.get(f"/v1/models/{name}")
    assert response.status_code == 404
    error = response.json()["error"]
    assert error["type"] == "not_found_error" and error["code"] == "model_not_found" and error["param"] == "model"
    assert len(error["message"]) < 400  # a long name is cut in the message, not echoed whole


# ---- chat completions ---------------------------------------------------------------------------
@pytest.mark.parametrize("model", ["tiny", *ADAPTERS])
def test_chat_completion_per_model(client, model):
    response = chat(client, model, max_tokens=6)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["object"] == "chat.completion" and body["model"] == model
    assert body["id"].startswith("chatcmpl-")
    assert len(body["choices"]) == 1
    choice = body["choices"][0]
    assert choice["index"] == 0
    assert choice["message"]["role"] == "assistant"
    assert isinstance(choice["message"]["content"], str)
    assert choice["finish_reason"] in ("stop", "length")
    check_usage(body["usage"], 6)


def test_max_completion_tokens_honoured(client):
    body = chat(client, max_completion_tokens=3).json()  # with max_tokens too it is a 400, as OpenAI's
    assert body["usage"]["completion_tokens"] <= 3
    if body["choices"][0]["finish_reason"] == "length":
        assert body["usage"]["completion_tokens"] == 3


def test_default_max_tokens(client):
    body = chat(client).json()
    assert body["usage"]["completion_tokens"] <= 8  # default_max_tokens


def test_greedy_is_deterministic(client):
    for model in ("tiny", *ADAPTERS):
        first = chat(client, model, max_tokens=10).json()["choices"][0]["message"]["content"]
        second = chat(client, model, max_tokens=10).json()["choices"][0]["message"]["content"]
        assert first == second, model


def test_adapters_change_the_output(client):
    def greedy(model):
        return complete(client, model=model, max_tokens=12).json()["choices"][0]["text"]

    base = greedy("tiny")
    outputs = {name: greedy(name) for name in ADAPTERS}
    assert any(text != base for text in outputs.values()), (base, outputs)


# ---- text completions ---------------------------------------------------------------------------
def test_completion_string_prompt(client):
    response = complete(client, max_tokens=5)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["object"] == "text_completion" and body["id"].startswith("cmpl-")
    assert [c["index"] for c in body["choices"]] == [0]
    assert body["choices"][0]["finish_reason"] in ("stop", "length")
    check_usage(body["usage"], 5)


def test_completion_list_of_prompts(client):
    prompts = ["the quick brown fox", "What is two plus two?"]
    body = complete(client, prompts, max_tokens=4).json()
    assert [c["index"] for c in body["choices"]] == [0, 1]
    # each choice is the same as asking for that prompt alone (greedy)
    for i, prompt in enumerate(prompts):
        alone = complete(client, prompt, max_tokens=4).json()["choices"][0]["text"]
        assert body["choices"][i]["text"] == alone
    check_usage(body["usage"], 8)

    four = complete(client, prompts, max_tokens=4, n=2).json()
    assert sorted(c["index"] for c in four["choices"]) == [0, 1, 2, 3]
    # greedy: both choices of one prompt equal that prompt's single answer
    texts = {c["index"]: c["text"] for c in four["choices"]}
    assert texts[0] == texts[1] == body["choices"][0]["text"]
    assert texts[2] == texts[3] == body["choices"][1]["text"]


# ---- streaming ----------------------------------------------------------------------------------
@pytest.mark.parametrize("model", ["tiny", "lora-a", "pt-a"])
def test_chat_stream_matches_non_stream(client, model):
    expected = chat(client, model, max_tokens=10).json()["choices"][0]
    events = sse_events(chat(client, model, max_tokens=10, stream=True))
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)
    assert text == expected["message"]["content"]
    finishes = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"][0]["finish_reason"]]
    assert finishes == [expected["finish_reason"]]
    assert all("usage" not in c for c in chunks)
    assert len({c["id"] for c in chunks}) == 1


def test_chat_stream_include_usage(client):
    events = sse_events(chat(client, max_tokens=6, stream=True, stream_options={"include_usage": True}))
    assert events[-1] == "[DONE]"
    last = events[-2]
    assert last["choices"] == []
    check_usage(last["usage"], 6)
    assert all(c["usage"] is None for c in events[:-2])


def test_completion_stream(client):
    expected = complete(client, max_tokens=10).json()["choices"][0]
    events = sse_events(complete(client, max_tokens=10, stream=True))
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert all(c["object"] == "text_completion" for c in chunks)
    assert "".join(c["choices"][0]["text"] for c in chunks) == expected["text"]
    assert chunks[-1]["choices"][0]["finish_reason"] == expected["finish_reason"]
    assert all("usage" not in c for c in chunks)

    with_usage = sse_events(complete(client, max_tokens=10, stream=True, stream_options={"include_usage": True}))
    assert with_usage[-1] == "[DONE]"
    assert with_usage[-2]["choices"] == []
    check_usage(with_usage[-2]["usage"], 10)


def test_chat_stream_n2(client):
    events = sse_events(chat(client, max_tokens=5, n=2, stream=True))
    chunks = events[:-1]
    for index in (0, 1):
        mine = [c["choices"][0] for c in chunks if c["choices"][0]["index"] == index]
        assert mine[0]["delta"]["role"] == "assistant"
        assert mine[-1]["finish_reason"] in ("stop", "length")


# ---- sampling -----------------------------------------------------------------------------------
def test_n_with_seed_is_reproducible(client):
    def ask():
        response = chat(client, n=3, seed=1234, temperature=1.0, max_tokens=10)
        assert response.status_code == 200, response.text
        return response.json()["choices"]

    first, second = ask(), ask()
    assert [c["index"] for c in first] == [0, 1, 2]
    texts = [c["message"]["content"] for c in first]
    assert texts == [c["message"]["content"] for c in second]
    assert len(set(texts)) > 1  # the choices are sampled independently


def test_seed_reproducible_completions(client):
    def ask():
        return [c["text"] for c in complete(client, n=2, seed=7, temperature=1.0, max_tokens=8).json()["choices"]]

    assert ask() == ask()


def test_null_sampling_fields_are_their_defaults_and_seeds_may_be_negative(client):
    """OpenAI takes null for temperature, top_p, n, stream (and echo); its client sends an explicit
    None as null, and these were 400s. A seed is any 64-bit integer."""
    nulls = {"temperature": None, "top_p": None, "n": None, "stream": None, "max_tokens": 3}
    response = client.post("/v1/chat/completions", json={"model": "tiny", "messages": MESSAGES, **nulls})
    assert response.status_code == 200, response.text
    assert len(response.json()["choices"]) == 1
    response = client.post("/v1/completions", json={"model": "tiny", "prompt": "the fox", "echo": None, **nulls})
    assert response.status_code == 200, response.text
    seeded = [complete(client, seed=-(2**63), temperature=1.0, max_tokens=6).json()["choices"][0]["text"]
              for _ in range(2)]
    assert seeded[0] == seeded[1]
    assert complete(client, seed=-(2**63) - 1).status_code == 400


def test_stop_string(client):
    full = complete(client, max_tokens=16).json()["choices"][0]["text"]
    # a two-character window past the start, free of U+FFFD (a partial UTF-8 byte sequence)
    windows = [full[i:i + 2] for i in range(1, len(full) - 1) if "\ufffd" not in full[i:i + 2]]
    assert windows, f"the fixed-seed model's greedy output has no clean stop string: {full!r}"
    stop = windows[len(windows) // 2]
    expected = full[:full.index(stop)]
    body = complete(client, max_tokens=16, stop=[stop]).json()
    assert body["choices"][0]["text"] == expected
    assert body["choices"][0]["finish_reason"] == "stop"
    assert stop not in body["choices"][0]["text"]

    streamed = sse_events(complete(client, max_tokens=16, stop=stop, stream=True))[:-1]
    assert "".join(c["choices"][0]["text"] for c in streamed) == expected
    assert streamed[-1]["choices"][0]["finish_reason"] == "stop"
