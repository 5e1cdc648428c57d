"""Every refusal of the OpenAI routes: status, OpenAI error shape, the right ``param``/``code``,
and never the submitted value echoed back. Also API keys and a base model without chat template."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from support import build_tokenizer
from gateway.app import create_app
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
    assert_error(complete(client, max_tokens=0), 400)  # without echo there is nothing to return
    assert_error(complete(client, suffix="x"), 400)
    assert_error(complete(client, response_format={"type": "xml"}), 400)
    assert_error(complete(client, prompt=""), 400, param="prompt")


def test_image_content_part_refused(client):
    messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x"}}]}]
    assert_error(chat(client, messages=messages), 400, param="messages")


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
