"""Every refusal of the OpenAI routes: status, OpenAI error shape, the right ``param``/``code``,
and never the submitted value echoed back. Also API keys and a base model without chat template."""

from __future__ import annotations

import json
import re

import pytest
from fastapi.testclient import TestClient

from support import build_tokenizer
from gateway.app import create_app
from gateway.errors import (
    BadRequestError, error_response, param_path, shown, unpaired_surrogate,
)
from test_api import MESSAGES, make_adapters, make_base, make_settings

SECRET = "s3cr3t-value-xyzzy"


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    root = tmp_path_factory.mktemp("errors")
    adapters_dir = make_adapters(root, len(build_tokenizer()))
    app = create_app(make_settings(root, adapters_dir), base=make_base(build_tokenizer()))
    with TestClient(app) as c:
        yield c


def assert_error(response, status: int, *, type_: str | None = "invalid_request_error",
                 param: str | None | type(...) = ..., code: str | None | type(...) = ...) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and error["message"]
    if type_ is not None:
        assert error["type"] == type_
    if param is not ...:
        assert error["param"] == param
    if code is not ...:
        assert error["code"] == code
    assert SECRET not in response.text
    return error


def chat(client, **extra):
    return client.post("/v1/chat/completions", json={"model": "tiny", "messages": MESSAGES, **extra})


def complete(client, **extra):
    return client.post("/v1/completions", json={"model": "tiny", "prompt": "hello world", **extra})


# ---- models and bodies --------------------------------------------------------------------------
@pytest.mark.parametrize("route", ["chat", "complete"])
def test_unknown_model(client, route):
    send = chat if route == "chat" else complete
    response = send(client, model="no-such-model")
    assert_error(response, 404, type_="not_found_error", param="model", code="model_not_found")


def test_missing_messages(client):
    response = client.post("/v1/chat/completions", json={"model": "tiny"})
    error = assert_error(response, 400, param="messages")
    assert "messages" in error["message"]


def test_empty_messages(client):
    assert_error(chat(client, messages=[]), 400, param="messages")


def test_missing_model(client):
    response = client.post("/v1/chat/completions", json={"messages": MESSAGES})
    assert_error(response, 400, param="model")


def test_wrong_type_is_not_echoed(client):
    error = assert_error(chat(client, temperature="hot"), 400, param="temperature")
    assert "hot" not in error["message"]
    error = assert_error(chat(client, temperature=SECRET), 400, param="temperature")
    error = assert_error(chat(client, messages=[{"role": SECRET, "content": "x"}]), 400)


def test_out_of_range_values(client):
    assert_error(chat(client, temperature=5), 400, param="temperature")
    assert_error(chat(client, top_p=0), 400, param="top_p")
    assert_error(chat(client, max_tokens=0), 400, param="max_tokens")


def test_invalid_json(client):
    response = client.post("/v1/chat/completions", content=b'{"model": "tiny", "messages": [' + SECRET.encode(),
                           headers={"content-type": "application/json"})
    assert_error(response, 400)


def test_n_above_limit(client):
    assert_error(chat(client, n=5), 400, param="n")
    assert_error(complete(client, n=5), 400, param="n")
    # 3 prompts x n=2 = 6 choices > max_n 4
    response = client.post("/v1/completions", json={"model": "tiny", "prompt": ["a", "b", "c"], "n": 2})
    assert_error(response, 400, param="n")


def test_max_tokens_above_limit(client):
    assert_error(chat(client, max_tokens=65), 400, param="max_tokens")
    assert_error(complete(client, max_tokens=65), 400, param="max_tokens")
    assert_error(chat(client, max_completion_tokens=65), 400, param="max_completion_tokens")
    assert chat(client, max_tokens=64, temperature=0).status_code == 200


def test_stop_limits(client):
    assert_error(chat(client, stop=["a", "b", "c", "d", "e"]), 400, param="stop")
    assert_error(chat(client, stop="x" * 65), 400, param="stop")


def test_prompt_longer_than_context(client):
    long_text = " ".join(f"zq{i}x" for i in range(150))  # far more than 256 tokens, under 4096 bytes
    assert len(long_text) < 3000
    error = assert_error(complete(client, prompt=long_text), 400, param="prompt", code="context_length_exceeded")
    assert "256" in error["message"]
    error = assert_error(chat(client, messages=[{"role": "user", "content": long_text}]), 400,
                         param="messages", code="context_length_exceeded")
    assert "256" in error["message"]


def test_body_too_large(client):
    big = {"model": "tiny", "prompt": "x" * 5000}
    assert_error(client.post("/v1/completions", json=big), 413, code="payload_too_large")


def test_body_too_large_without_content_length(client):
    def chunks():
        yield b'{"model": "tiny", "prompt": "'
        for _ in range(5):
            yield b"x" * 1000
        yield b'"}'

    response = client.post("/v1/completions", content=chunks(), headers={"content-type": "application/json"})
    assert_error(response, 413, code="payload_too_large")


@pytest.mark.parametrize("extra, param_hint", [
    ({"tools": [{"type": "code_interpreter"}]}, "function"),  # only function tools exist here
])
def test_unsupported_features(client, extra, param_hint):
    error = assert_error(chat(client, **extra), 400)
    assert param_hint in error["message"]


def test_unsupported_completion_features(client):
    assert_error(complete(client, max_tokens=0), 400, param="echo")  # without echo there is nothing to return
    assert_error(complete(client, suffix="x"), 400, param="suffix")
    assert_error(complete(client, best_of=3), 400, param="best_of")
    assert_error(complete(client, response_format={"type": "xml"}), 400)
    assert_error(complete(client, prompt=""), 400, param="prompt")


TEXT = {"type": "text", "text": "hi"}


@pytest.mark.parametrize("extra, param", [
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x"}}]}]},
     "messages[0].content[0].type"),
    ({"messages": [{"role": "user", "content": [TEXT, {"type": "input_audio", "input_audio": {
        "data": "AAAA", "format": "wav"}}]}]}, "messages[0].content[1].type"),
    ({"messages": [*MESSAGES, {"role": "user", "content": [TEXT, 2]}]}, "messages[1].content[1]"),
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]}, "messages[0].content[0].text"),
    ({"messages": [{"role": "user", "content": {"type": "text", "text": "hi"}}]}, "messages[0].content"),
    ({"tool_choice": []}, "tool_choice"),
    ({"tool_choice": 5, "tools": [{"type": "function", "function": {"name": "f"}}]}, "tool_choice"),
    # the request models' own validation errors: indexes in brackets, no union member ("stop.str")
    ({"messages": [*MESSAGES, {"role": "robot", "content": "hi"}]}, "messages[1].role"),
    ({"stop": 5}, "stop"),
    ({"messages": [{"role": "user", "content": "hi", "name": "n" * 65}]}, "messages[0].name"),
])
def test_refusals_name_the_field_as_openai_does(client, extra, param):
    """Not the models' union members ("tool_choice.str", "messages.0.content.str"), nor all of "messages"."""
    assert_error(chat(client, **extra), 400, param=param)


@pytest.mark.parametrize("extra, param, hint", [
    ({"functions": [{"name": "f", "parameters": {"type": "object"}}]}, "functions", "tools"),
    ({"function_call": "auto"}, "function_call", "tool_choice"),
    ({"modalities": ["text", "audio"]}, "modalities", "text"),
    ({"audio": {"voice": "alloy", "format": "wav"}}, "audio", "audio"),
    ({"stream_options": {"include_usage": True}}, "stream_options", "stream"),
    ({"max_tokens": 100_000, "max_completion_tokens": 5}, "max_tokens", "max_completion_tokens"),
    ({"max_tokens": 5, "max_completion_tokens": 5}, "max_tokens", "max_completion_tokens"),  # OpenAI refuses any pair
    ({"reasoning_effort": "high"}, "reasoning_effort", "not supported"),
    ({"prediction": {"type": "content", "content": "x"}}, "prediction", "not supported"),
    ({"web_search_options": {}}, "web_search_options", "not supported"),
    ({"verbosity": "low"}, "verbosity", "not supported"),
])
def test_unimplemented_fields_are_refused_not_ignored(client, extra, param, hint):
    error = assert_error(chat(client, **extra), 400, param=param)
    assert hint in error["message"]


def test_fields_clients_send_as_defaults_are_accepted(client):
    """What OpenAI SDKs and clients send without asking for anything this server lacks."""
    messages = [{"role": "user", "content": "hi", "name": "ann"}]  # a participant's name: accepted, not shown
    for extra in ({"messages": messages}, {"modalities": ["text"]}, {"audio": None, "functions": None},
                  {"reasoning_effort": None, "prediction": None, "web_search_options": None, "verbosity": None},
                  {"stream": True, "stream_options": {"include_usage": True}}, {"stream_options": None},
                  {"max_completion_tokens": 3}):
        response = chat(client, max_tokens=None, temperature=0, **extra)
        assert response.status_code == 200, (extra, response.text)


def test_unknown_route_is_openai_shaped(client):
    assert_error(client.get("/v1/nope"), 404, type_="not_found_error")


# ---- a base model without chat template ---------------------------------------------------------
def test_no_chat_template(tmp_path):
    tokenizer = build_tokenizer(None)
    app = create_app(make_settings(tmp_path, None), base=make_base(tokenizer))
    with TestClient(app) as c:
        error = assert_error(c.post("/v1/chat/completions", json={"model": "tiny", "messages": MESSAGES}), 400)
        assert "chat template" in error["message"]
        response = c.post("/v1/completions", json={"model": "tiny", "prompt": "hello", "max_tokens": 3})
        assert response.status_code == 200, response.text
        assert c.get("/v1/models").json()["data"][0]["id"] == "tiny"


# ---- API keys -----------------------------------------------------------------------------------
def test_api_keys(tmp_path):
    app = create_app(make_settings(tmp_path, None, api_keys=["k1"]), base=make_base(build_tokenizer()))
    body = {"model": "tiny", "prompt": "hello", "max_tokens": 2}
    with TestClient(app) as c:
        assert c.get("/healthz").status_code == 200
        assert c.get("/readyz").status_code == 200
        assert_error(c.post("/v1/completions", json=body), 401, type_="authentication_error")
        assert_error(c.get("/v1/models"), 401, type_="authentication_error")
        wrong = c.post("/v1/completions", json=body, headers={"Authorization": f"Bearer {SECRET}"})
        assert_error(wrong, 401, type_="authentication_error")
        assert_error(c.post("/v1/completions", json=body, headers={"Authorization": "Basic k1"}), 401,
                     type_="authentication_error")
        right = c.post("/v1/completions", json=body, headers={"Authorization": "Bearer k1"})
        assert right.status_code == 200, right.text
        assert c.get("/v1/models", headers={"Authorization": "Bearer k1"}).status_code == 200


# ---- strings that are not Unicode, and long values --------------------------------------------
LONE = "\ud800"  # JSON can spell a lone UTF-16 surrogate ("\ud800"); it is not valid Unicode
TOOLS = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]


def post_raw(client, path: str, body: dict):
    """``body`` as JSON with non-ASCII escaped, as a client's encoder writes a lone surrogate."""
    return client.post(path, content=json.dumps(body).encode(), headers={"content-type": "application/json"})


def assert_surrogate(response, param: str) -> None:
    error = assert_error(response, 400, param=param, code="invalid_value")
    assert "unpaired" in error["message"] and "surrogate" in error["message"]


CALL = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": '{"a": "\\ud800"}'}}


@pytest.mark.parametrize("path, body, param", [
    ("/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": f"hi {LONE} there"}]},
     "messages[0].content"),
    ("/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": [
        {"type": "text", "text": LONE}]}]}, "messages[0].content[0].text"),
    ("/v1/chat/completions", {"model": f"x{LONE}", "messages": MESSAGES}, "model"),
    ("/v1/completions", {"model": "tiny", "prompt": f"hi {LONE}"}, "prompt"),
    ("/v1/completions", {"model": "tiny", "prompt": ["ok", LONE]}, "prompt[1]"),
    ("/v1/completions", {"model": "tiny", "prompt": "hi", "stop": LONE}, "stop"),
    ("/tokenize", {"model": "tiny", "prompt": f"hi {LONE}"}, "prompt"),
    ("/tokenize", {"model": "tiny", "messages": [{"role": "user", "content": LONE}]}, "messages[0].content"),
    ("/detokenize", {"model": f"x{LONE}", "tokens": [1]}, "model"),
    ("/v1/chat/completions", {"model": "tiny", "messages": MESSAGES, "tools": [
        {"type": "function", "function": {"name": "f", "description": LONE}}]}, "tools[0].function.description"),
    ("/v1/chat/completions", {"model": "tiny", "messages": MESSAGES, "tools": TOOLS,
                              "tool_choice": {"type": "function", "function": {"name": LONE}}},
     "tool_choice.function.name"),
    ("/v1/chat/completions", {"model": "tiny", "messages": [
        *MESSAGES, {"role": "tool", "tool_call_id": LONE, "content": "x"}]}, "messages[1].tool_call_id"),
    ("/v1/chat/completions", {"model": "tiny", "messages": MESSAGES, "response_format": {
        "type": "json_schema", "json_schema": {"name": "a", "schema": {"type": "object", LONE: 1}}}},
     "response_format.json_schema.schema"),  # a bad key: its object is named
    ("/v1/chat/completions", {"model": "tiny", "messages": MESSAGES, "logit_bias": {LONE: 1}}, "logit_bias"),
    ("/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": "\udfff"}]},
     "messages[0].content"),  # a lone low surrogate too
])
def test_unpaired_surrogate_refused(client, path, body, param):
    assert_surrogate(post_raw(client, path, body), param)


def test_raw_utf8_surrogate_bytes_refused(client):
    """UTF-8 bytes of a surrogate (invalid UTF-8) decode to one too: Python's JSON parser passes them."""
    raw = b'{"model": "tiny", "prompt": "hi \xed\xa0\x80"}'
    response = client.post("/v1/completions", content=raw, headers={"content-type": "application/json"})
    assert_surrogate(response, "prompt")


def test_surrogate_in_tool_call_arguments_refused(client):
    """Arguments are JSON inside a string: the escape becomes a surrogate only once they are parsed."""
    messages = [*MESSAGES, {"role": "assistant", "tool_calls": [CALL]},
                {"role": "tool", "tool_call_id": "c1", "content": "x"}]
    response = post_raw(client, "/v1/chat/completions", {"model": "tiny", "messages": messages, "tools": TOOLS})
    assert_surrogate(response, "messages[1].tool_calls[0].function.arguments")


def test_valid_escapes_still_served(client):
    """A surrogate pair is one character, and escaped non-ASCII is ordinary text: both are served."""
    body = {"model": "tiny", "max_tokens": 2, "messages": [{"role": "user", "content": "caf\u00e9 \U0001F600"}]}
    assert post_raw(client, "/v1/chat/completions", body).status_code == 200
    response = post_raw(client, "/tokenize", {"model": "tiny", "prompt": "\U0001F600"})
    assert response.status_code == 200, response.text


def test_every_json_route_checks_unicode(client):
    """The check is an app dependency: every route that takes JSON, admin ones included, inherits it."""
    admin = {"Authorization": f"Bearer {client.app.state.gateway.admin_key}"}
    checked = set()
    for path, operations in client.app.openapi()["paths"].items():
        for method, operation in operations.items():
            if "application/json" not in operation.get("requestBody", {}).get("content", {}):
                continue
            url = re.sub(r"\{[^}]+\}", "p", path)
            response = client.request(method, url, content=json.dumps({"x": ["ok", LONE]}).encode(),
                                      headers={"content-type": "application/json", **admin})
            assert_surrogate(response, "x[1]")
            checked.add(path)
    assert {"/v1/chat/completions", "/v1/completions", "/tokenize", "/detokenize", "/admin/experiments"} <= checked


def test_long_numbers_not_echoed(client):
    big = "9" * 400
    for path, prompt in (("/v1/chat/completions", '"messages": [{"role": "user", "content": "hi"}]'),
                         ("/v1/completions", '"prompt": "hi"')):
        for field in ("max_tokens", "n"):
            raw = f'{{"model": "tiny", {prompt}, "{field}": {big}}}'.encode()
            response = client.post(path, content=raw, headers={"content-type": "application/json"})
            error = assert_error(response, 400, param=field)
            assert "9" * 65 not in error["message"] and "…" in error["message"], error["message"]


def test_shown_bounds_values():
    assert shown(12) == "12"
    assert shown("x" * 64) == "x" * 64
    assert shown("x" * 65) == "x" * 64 + "…"
    assert shown(10 ** 5000) == "a number too long to show"  # past str()'s digit limit


def test_unpaired_surrogate_paths():
    assert unpaired_surrogate({"a": [1, "ok", {"b": "\ud800"}]}) == ["a", 2, "b"]
    assert unpaired_surrogate({"a": {"\udc00": 1}}) == ["a"]
    assert unpaired_surrogate(["\ud83d\ude00", "\U0001F600"]) == [0]  # two separate surrogates are no pair in a str
    assert unpaired_surrogate({"a": ["\U0001F600", 1, None, 2.5]}) is None
    assert unpaired_surrogate("\ud800") == []
    assert param_path(["messages", 0, "content"]) == "messages[0].content"
    assert param_path([]) is None


def test_error_rendering_escapes_surrogates():
    """Defence in depth: an error quoting a lone surrogate renders (escaped), never raises."""
    response = error_response(BadRequestError(f"tool '{LONE}' is unknown", param=f"x.{LONE}"))
    assert json.loads(response.body)["error"]["message"] == f"tool '{LONE}' is unknown"
    ok = error_response(BadRequestError("caf\u00e9"))
    assert "caf\u00e9".encode() in ok.body  # valid text keeps its UTF-8
