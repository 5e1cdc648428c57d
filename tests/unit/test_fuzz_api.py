"""schemathesis against the live app's OpenAPI, every route, with no key, a wrong key, the
inference key and the admin key, on a tiny random model with three adapters: no 5xx, every 4xx in
OpenAI's shape, nothing left on disk, and the server healthy after. ``python -m loadtest.fuzz``
runs the same with 2,000+ requests against a real server."""

from __future__ import annotations

import pytest
import schemathesis
from fastapi.testclient import TestClient

from gateway.app import create_app
from loadtest.fuzz import (
    FuzzReport, auth_variants, check_all, fuzz, health_problems, known_ids, leftovers, response_problem, sender,
)
from support import build_tokenizer
from test_api import make_adapters, make_base, make_settings

INFERENCE_KEY = "unit-inference-key-0123456789"
ADMIN_KEY = "unit-admin-key-0123456789abcdef"
BASE_URL = "http://testserver"
CASES = 5  # per operation and run: ~180 requests, about 15 s here


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz")
    adapters_dir = make_adapters(root, len(build_tokenizer()))
    data_dir = root / "data"
    # the fuzzer sends wrong keys by the hundred: the guess throttle would answer 429 to the rest
    settings = make_settings(data_dir, adapters_dir, api_keys=[INFERENCE_KEY], admin_key=ADMIN_KEY,
                             max_tokens_limit=8, default_max_tokens=4, max_failed_key_attempts=0)
    app = create_app(settings, base=make_base(build_tokenizer()))
    # a server error must come back as a 500 response to count, not as an exception in the test
    with TestClient(app, raise_server_exceptions=False) as client:
        yield client, data_dir


def test_fuzz_every_route_with_and_without_keys(served):
    client, data_dir = served
    send = sender(client)
    schema = schemathesis.openapi.from_dict(client.get("/openapi.json").json())
    auths = auth_variants(INFERENCE_KEY, ADMIN_KEY)
    ids = known_ids(send, BASE_URL, auths)
    assert sorted(ids["adapter_id"]) == ["ia3-a", "lora-a", "pt-a"]
    assert sorted(ids["model"]) == ["ia3-a", "lora-a", "pt-a", "tiny"]
    report = fuzz(schema, send, BASE_URL, auths, cases=CASES, seed=1, known_ids=ids, report=FuzzReport())
    routes = {route for route, _ in report.counts}
    print(report.table())
    assert {"POST /v1/chat/completions", "POST /v1/completions", "GET /admin/adapters"} <= routes
    assert report.total >= 150
    # the known ids and models were reached
    assert ("POST /admin/adapters/{adapter_id}/pin", 200) in report.counts
    # generation routes were reached past the key check (whether a random body also reaches a 200
    # is luck at this count; python -m loadtest.fuzz runs thousands and counts them)
    assert any(route in ("POST /v1/chat/completions", "POST /v1/completions") and status != 401
               for route, status in report.counts)
    assert any(status == 401 for _, status in report.counts)  # the keys were exercised both ways
    assert any(status == 200 for _, status in report.counts)
    problems = check_all(report, health_problems(send, BASE_URL, auths["inference"]), leftovers(data_dir))
    assert problems == [], "\n".join(problems)


@pytest.mark.parametrize("status, content_type, text, ok", [
    (200, "application/json", "{}", True),
    (404, "application/json", '{"error": {"message": "m", "type": "t", "param": null, "code": null}}', True),
    (422, "application/json", '{"detail": [{"loc": ["body"]}]}', False),  # FastAPI's own shape
    (400, "text/plain", "bad", False),
    (400, "application/json", '{"error": {"message": "", "type": "t", "param": null, "code": null}}', False),
    (500, "application/json", '{"error": {"message": "m", "type": "t", "param": null, "code": null}}', False),
    (200, "text/event-stream", 'data: {"error": {"message": "m", "type": "server_error", "param": null, '
                               '"code": "generation_failed"}}\n\ndata: [DONE]\n\n', False),
    (200, "text/event-stream", 'data: {"choices": [{"text": "\\"error\\""}]}\n\ndata: [DONE]\n\n', True),
])
def test_response_rules(status, content_type, text, ok):
    assert (response_problem(status, content_type, text) is None) == ok


def test_leftovers_found(tmp_path):
    assert leftovers(tmp_path) == []
    (tmp_path / "staging" / "abc").mkdir(parents=True)
    (tmp_path / "jobs").mkdir()
    (tmp_path / "jobs" / "state.tmp").write_text("x")
    assert leftovers(tmp_path) == [str(tmp_path / "jobs" / "state.tmp"), str(tmp_path / "staging" / "abc")]
