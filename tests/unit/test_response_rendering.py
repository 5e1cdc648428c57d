"""A response that is not streamed is built and serialized off the event loop, and the logprob
values it may hold are capped at validation time (400 naming the field), so one large answer
cannot stall every other client. Streams are not capped: they send values as they come."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from types import SimpleNamespace

import httpx
import pytest
from fastapi.testclient import TestClient
from support import build_tokenizer

from gateway.api import openai as api
from gateway.app import create_app
from test_api import MESSAGES, make_base, make_settings, sse_events
from test_api_errors import assert_error
from test_disconnect import TIMEOUT, live_server, wait_until

NO_END = {"2": -100}  # the end token (<|im_end|>) banned: every choice runs its whole max_tokens


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    app = create_app(make_settings(tmp_path_factory.mktemp("rendering"), None), base=make_base(build_tokenizer()))
    with TestClient(app) as c:
        yield c


def chat(client, **extra):
    body = {"model": "tiny", "messages": MESSAGES, "temperature": 0, "logit_bias": NO_END, **extra}
    return client.post("/v1/chat/completions", json=body)


def complete(client, **extra):
    body = {"model": "tiny", "prompt": "the quick brown fox", "temperature": 0, "logit_bias": NO_END, **extra}
    return client.post("/v1/completions", json=body)


# n 2 x 10 tokens x (top_logprobs 4 + 1)
CHAT_AT_100 = {"n": 2, "max_tokens": 10, "logprobs": True, "top_logprobs": 4}


def test_chat_over_the_cap_is_a_400_naming_top_logprobs(client, monkeypatch):
    monkeypatch.setattr(api, "MAX_CHAT_LOGPROB_VALUES", 99)
    response = chat(client, **CHAT_AT_100)
    assert_error(response, 400, param="top_logprobs")
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error"
    message = error["message"]
    assert "100 log-probabilities" in message and "the limit without streaming is 99" in message
    for advice in ("n", "max_tokens", "top_logprobs", "stream: true"):
        assert advice in message


def test_chat_logprobs_without_top_is_a_400_naming_logprobs(client, monkeypatch):
    monkeypatch.setattr(api, "MAX_CHAT_LOGPROB_VALUES", 19)
    response = chat(client, n=2, max_tokens=10, logprobs=True)  # 2 x 10 x 1
    assert_error(response, 400, param="logprobs")


def test_chat_at_the_cap_renders_every_value(client, monkeypatch):
    monkeypatch.setattr(api, "MAX_CHAT_LOGPROB_VALUES", 100)
    response = chat(client, **CHAT_AT_100)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert body["object"] == "chat.completion" and body["usage"]["completion_tokens"] == 20
    for i, choice in enumerate(body["choices"]):
        assert choice["index"] == i and choice["finish_reason"] == "length"
        entries = choice["logprobs"]["content"]
        assert len(entries) == 10
        assert all(len(e["top_logprobs"]) == 4 for e in entries)
        text = b"".join(bytes(e["bytes"]) for e in entries).decode("utf-8", errors="replace")
        assert text == choice["message"]["content"]


def test_a_stream_is_not_capped(client, monkeypatch):
    monkeypatch.setattr(api, "MAX_CHAT_LOGPROB_VALUES", 1)
    response = chat(client, **CHAT_AT_100, stream=True)
    assert response.status_code == 200
    events = sse_events(response)
    assert events[-1] == "[DONE]" and not any("error" in e for e in events[:-1])
    values = sum(1 + len(e["top_logprobs"]) for chunk in events[:-1] for c in chunk["choices"]
                 if c["logprobs"] for e in c["logprobs"]["content"])
    assert values == 100


def test_a_request_without_logprobs_is_not_capped(client, monkeypatch):
    monkeypatch.setattr(api, "MAX_CHAT_LOGPROB_VALUES", 1)
    monkeypatch.setattr(api, "MAX_COMPLETION_LOGPROB_VALUES", 1)
    assert chat(client, n=2, max_tokens=10).status_code == 200
    assert complete(client, n=2, max_tokens=10).status_code == 200


def test_completions_with_echo_count_the_prompt(client, monkeypatch):
    prompt_tokens = complete(client, max_tokens=1).json()["usage"]["prompt_tokens"]
    values = 2 * (prompt_tokens + 3) * (2 + 1)  # n 2 x (prompt + max_tokens) x (logprobs 2 + 1)
    body = {"n": 2, "max_tokens": 3, "logprobs": 2, "echo": True}
    monkeypatch.setattr(api, "MAX_COMPLETION_LOGPROB_VALUES", values - 1)
    refused = complete(client, **body)
    assert_error(refused, 400, param="logprobs")
    message = refused.json()["error"]["message"]
    assert f"{values} log-probabilities" in message and "prompt and generated tokens" in message
    assert "stream: true" in message
    monkeypatch.setattr(api, "MAX_COMPLETION_LOGPROB_VALUES", values)
    response = complete(client, **body)
    assert response.status_code == 200, response.text
    for choice in response.json()["choices"]:
        logprobs = choice["logprobs"]
        assert len(logprobs["tokens"]) == len(logprobs["token_logprobs"]) == prompt_tokens + 3
        assert logprobs["token_logprobs"][0] is None and logprobs["top_logprobs"][0] is None
        assert all(1 <= len(top) <= 3 for top in logprobs["top_logprobs"][1:])
        assert "".join(logprobs["tokens"][:prompt_tokens]) == "the quick brown fox"
        assert choice["text"].startswith("the quick brown fox")


def test_the_caps_let_ordinary_requests_through():
    """The real values: n 1 x 4,096 tokens x top 20 passes for chat, n 2 does not; an echoed
    batch of 8 prompts x 8,192 tokens with logprobs 1 (lm-evaluation-harness) passes."""
    params = SimpleNamespace(logprobs=20, max_tokens=4096)
    api._check_chat_logprobs(SimpleNamespace(n=1, top_logprobs=20), params, room=8192)
    with pytest.raises(api.BadRequestError) as refused:
        api._check_chat_logprobs(SimpleNamespace(n=2, top_logprobs=20), params, room=8192)
    assert refused.value.param == "top_logprobs"
    api._check_chat_logprobs(SimpleNamespace(n=2, top_logprobs=20), params, room=2000)  # the window cuts it
    scoring = SimpleNamespace(n=1, echo=True)
    api._check_completion_logprobs(scoring, SimpleNamespace(logprobs=1, max_tokens=0), [[5] * 8192] * 8, 8192)
    with pytest.raises(api.BadRequestError):
        api._check_completion_logprobs(scoring, SimpleNamespace(logprobs=5, max_tokens=0), [[5] * 8192] * 8, 8192)


def test_rendering_runs_off_the_event_loop(client, monkeypatch):
    """The logprob entries and the JSON are both built in a thread with no running event loop."""
    seen: list[tuple[str, bool]] = []

    def on_loop() -> bool:
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return False
        return True

    chat_logprobs, render_body = api.chat_logprobs, api._render_body

    def recording_chat_logprobs(*args, **kwargs):
        seen.append(("chat_logprobs", on_loop()))
        return chat_logprobs(*args, **kwargs)

    def recording_render_body(*args, **kwargs):
        seen.append(("render_body", on_loop()))
        return render_body(*args, **kwargs)

    monkeypatch.setattr(api, "chat_logprobs", recording_chat_logprobs)
    monkeypatch.setattr(api, "_render_body", recording_render_body)
    assert chat(client, **CHAT_AT_100).status_code == 200
    assert seen == [("render_body", False), ("chat_logprobs", False), ("chat_logprobs", False)]


def test_the_server_answers_others_while_a_response_renders(tmp_path, monkeypatch):
    """A real server: while one answer renders (held for a second in its worker thread), /healthz
    answers at once. On the event loop, the render would hold the health check back."""
    inside, hold = threading.Event(), 1.0
    render_body = api._render_body

    def slow_render_body(*args, **kwargs):
        inside.set()
        time.sleep(hold)
        return render_body(*args, **kwargs)

    monkeypatch.setattr(api, "_render_body", slow_render_body)
    with live_server(tmp_path) as live:
        answer: dict = {}

        def ask() -> None:
            answer["response"] = httpx.post(live.url + "/v1/chat/completions", timeout=TIMEOUT, json={
                "model": "tiny", "messages": MESSAGES, "logit_bias": NO_END, **CHAT_AT_100})

        asker = threading.Thread(target=ask)
        asker.start()
        assert inside.wait(TIMEOUT), "the response was never rendered"
        start = time.monotonic()
        health = httpx.get(live.url + "/healthz", timeout=TIMEOUT)
        waited = time.monotonic() - start
        asker.join(TIMEOUT)
        wait_until(lambda: "response" in answer, "the answer arrives")
    assert health.status_code == 200
    assert waited < hold / 2, f"/healthz took {waited:.3f}s while a response rendered"
    response = answer["response"]
    assert response.status_code == 200, response.text
    assert [len(c["logprobs"]["content"]) for c in response.json()["choices"]] == [10, 10]


@pytest.mark.parametrize("ensure_ascii", [False, True])
def test_json_pieces_write_what_json_dumps_writes(monkeypatch, ensure_ascii):
    """The body is written in slices (so the GIL is let go between them), and must read the same."""
    monkeypatch.setattr(api, "JSON_SLICE", 3)
    entry = {"token": "é\n\"x", "logprob": -0.5, "bytes": [195, 169],
             "top_logprobs": [{"token": "a", "logprob": -1.0}]}
    body = {"id": "x", "choices": [
        {"index": 0, "logprobs": {"content": [entry] * 7, "refusal": None}, "text": "ü"},
        {"index": 1, "logprobs": {"tokens": list("abcdefg"), "text_offset": list(range(7)),
                                  "top_logprobs": [None, {}]}},
        {"index": 2, "logprobs": None, "empty": [], "nested": [[[[[1, 2, 3, 4, 5]]]]]},
    ], "usage": {"prompt_tokens": 1}, "list": [1, 2, 3], "long": [{"a": [1] * 5}] * 4}
    expected = json.dumps(body, ensure_ascii=ensure_ascii, allow_nan=False, separators=(",", ":"))
    assert "".join(api._json_pieces(body, ensure_ascii=ensure_ascii)) == expected
    with pytest.raises(ValueError):  # JSON has no NaN: a bug, never a broken body
        "".join(api._json_pieces({"choices": [{"logprob": float("nan")}] * 5}, ensure_ascii=False))


def test_a_lone_surrogate_is_escaped_not_an_error():
    body = api._render_body(lambda _: {"text": "a\ud800b"}, None, {"total_tokens": 1})
    assert json.loads(body) == {"text": "a\ud800b", "usage": {"total_tokens": 1}}
