"""A request whose choices could fill more than half the KV pool is refused with a 400 through
the API, streamed or not, before anything is queued; a smaller one is served."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient
from support import build_tokenizer

from gateway.app import create_app
from test_api import make_base, make_settings


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    # context window 256; the CPU pool is four windows (1,024 positions), one request may need 512
    settings = make_settings(tmp_path_factory.mktemp("data"), None, max_tokens_limit=256, max_n=4)
    with TestClient(create_app(settings, base=make_base(build_tokenizer()))) as c:
        yield c


@pytest.mark.parametrize("stream", [False, True])
def test_choices_that_could_fill_the_pool_get_a_400(client, stream):
    response = client.post("/v1/completions", json={"model": "tiny", "prompt": "hello there", "n": 4,
                                                    "max_tokens": 250, "stream": stream})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and error["code"] == "kv_cache_exceeded"
    assert error["param"] == "max_tokens"
    assert "more than one request may hold (512); lower n or max_tokens" in error["message"]
    assert client.app.state.gateway.engine.queue_depth == 0


def test_the_same_choices_with_fewer_tokens_are_served(client):
    response = client.post("/v1/completions", json={"model": "tiny", "prompt": "hello there", "n": 4,
                                                    "max_tokens": 4})
    assert response.status_code == 200, response.text
    assert len(response.json()["choices"]) == 4


def test_a_list_of_prompts_is_held_to_the_same_share(client):
    """Four prompts of one request, one choice each, could need what n 4 of one prompt could: the
    whole list is refused before any of it is queued (it was checked prompt by prompt, and passed)."""
    response = client.post("/v1/completions", json={"model": "tiny", "prompt": ["hello there"] * 4,
                                                    "max_tokens": 250})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["code"] == "kv_cache_exceeded"
    assert "4 sequences" in error["message"] and "send fewer prompts" in error["message"]
    assert client.app.state.gateway.engine.queue_depth == 0
    served = client.post("/v1/completions", json={"model": "tiny", "prompt": ["hello there"] * 2, "max_tokens": 250})
    assert served.status_code == 200, served.text
    assert len(served.json()["choices"]) == 2
