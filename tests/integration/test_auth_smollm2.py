"""API keys end to end: the real server with GATEWAY_API_KEYS set, driven by the openai client."""

from __future__ import annotations

from pathlib import Path

import httpx
import openai
import pytest

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server(smollm2_dir: Path, tmp_path_factory, launch_server):
    data_dir = tmp_path_factory.mktemp("auth-data")
    return launch_server(["--model", str(smollm2_dir), "--data-dir", str(data_dir), "--device", "cpu"],
                         env={"GATEWAY_API_KEYS": "secret"})


def make_client(server, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=key, max_retries=0, timeout=60)


def test_wrong_key_is_rejected(server):
    client = make_client(server, "wrong")
    with pytest.raises(openai.AuthenticationError):
        client.models.list()
    with pytest.raises(openai.AuthenticationError):
        client.chat.completions.create(model="SmolLM2-135M-Instruct", max_tokens=2,
                                       messages=[{"role": "user", "content": "hi"}])


def test_missing_key_is_rejected(server):
    response = httpx.get(f"{server.url}/v1/models", timeout=10)
    assert response.status_code == 401
    assert response.json()["error"]["type"] == "authentication_error"


def test_right_key_works(server):
    client = make_client(server, "secret")
    base = client.models.list().data[0].id
    result = client.chat.completions.create(model=base, max_tokens=2, temperature=0,
                                            messages=[{"role": "user", "content": "hi"}])
    assert result.usage.completion_tokens >= 1


def test_probes_need_no_key(server):
    assert httpx.get(f"{server.url}/healthz", timeout=10).status_code == 200
    assert httpx.get(f"{server.url}/readyz", timeout=10).status_code == 200
