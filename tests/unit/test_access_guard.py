"""Keys and limits before any body byte: the access guard in front of every route, per-key limits
(429 + Retry-After in OpenAI's shape, counted by key name), body limits enforced while streaming
(one 413 path), feedback bound to the key that made the request, and the OpenAPI document.

Body consumption is measured exactly: requests are sent as raw ASGI calls whose ``receive`` counts
the bytes it hands over, so "not read" means zero bytes, not a memory estimate."""

from __future__ import annotations

import asyncio
import json
import re
import time
from pathlib import Path

import pytest
import torch
from fastapi.routing import APIRoute
from fastapi.testclient import TestClient

from gateway.app import create_app
from gateway.auth import is_admin_path
from gateway.base_model import LoadedBase
from gateway.limits import UPLOAD_ROUTES
from gateway.settings import Settings
from support import build_tiny_llama, build_tokenizer, make_peft_adapter
from test_api_errors import assert_error

ADMIN_KEY = "guard-admin-key-0123456789"
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
KEYS = [{"key": "key-alpha-000", "name": "alpha"},
        {"key": "key-beta-0000", "name": "beta", "rpm": 2},
        {"key": "key-gamma-000", "name": "gamma", "max_concurrent": 1},
        {"key": "key-delta-000", "name": "delta", "tpm": 40}]
ALPHA, BETA, GAMMA, DELTA = ({"Authorization": f"Bearer {k['key']}"} for k in KEYS)
MB = 1 << 20
JSON_LIMIT, UPLOAD_LIMIT, ADAPTER_LIMIT = 2048, 65536, 30000


def make_app(data_dir: Path, adapters_dir: Path, **overrides):
    tokenizer = build_tokenizer()
    base = LoadedBase(model=build_tiny_llama(len(tokenizer)), tokenizer=tokenizer, name="tiny",
                      device=torch.device("cpu"), dtype=torch.float32, context_window=256, load_seconds=0.0)
    settings = Settings(quantization="none", device="cpu", adapters_dir=adapters_dir, data_dir=data_dir,
                        admin_key=ADMIN_KEY, api_keys=json.dumps(KEYS), max_tokens_limit=64, default_max_tokens=2,
                        max_body_bytes=4096, max_admin_json_bytes=JSON_LIMIT, max_upload_bytes=UPLOAD_LIMIT,
                        max_training_dataset_bytes=6000, max_adapter_bytes=ADAPTER_LIMIT, **overrides)
    return create_app(settings, base=base)


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    adapters = tmp_path_factory.mktemp("guard-adapters")
    make_peft_adapter(build_tiny_llama(len(build_tokenizer())), "lora", adapters / "lora-a")
    # these tests send hundreds of wrong keys from one address: the guess throttle is tested apart
    with TestClient(make_app(tmp_path_factory.mktemp("guard-data"), adapters, max_failed_key_attempts=0)) as c:
        yield c


# ---- raw ASGI with a counting body ---------------------------------------------------------------
class CountingBody:
    """A body of ``total`` bytes in ``chunk``-sized messages, counting what the app pulled."""

    def __init__(self, total: int, chunk: int = MB):
        self.total, self.chunk, self.consumed = total, chunk, 0
        self.block = b"[" + b"1," * (chunk // 2)  # starts like a JSON array, as in the reported attack
        self.block = self.block[:chunk]

    async def receive(self) -> dict:
        if self.consumed >= self.total:
            await asyncio.Event().wait()  # the client sent everything: wait (a disconnect comes by cancel)
        size = min(self.chunk, self.total - self.consumed)
        self.consumed += size
        return {"type": "http.request", "body": self.block[:size], "more_body": self.consumed < self.total}


async def raw_call(app, method: str, path: str, headers: dict[str, str], body: CountingBody,
                   declare_length: bool = True) -> tuple[int, dict[str, str], bytes]:
    header_list = [(k.lower().encode(), v.encode()) for k, v in headers.items()]
    if declare_length:
        header_list.append((b"content-length", str(body.total).encode()))
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method, "scheme": "http",
             "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "", "headers": header_list,
             "client": ("127.0.0.1", 5000), "server": ("testserver", 80), "state": {}}
    sent: list[dict] = []

    async def send(message: dict) -> None:
        sent.append(message)

    await asyncio.wait_for(app(scope, body.receive, send), 60)
    start = next(m for m in sent if m["type"] == "http.response.start")
    content = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return start["status"], {k.decode(): v.decode() for k, v in start["headers"]}, content


def call(client, *args, **kwargs):
    return client.portal.call(lambda: raw_call(client.app, *args, **kwargs))


def declared_routes() -> set[tuple[str, str]]:
    """(method, path) of every route of every router module under gateway/api."""
    import importlib
    import pkgutil

    import gateway.api

    found = set()
    for module in pkgutil.iter_modules(gateway.api.__path__):
        router = getattr(importlib.import_module(f"gateway.api.{module.name}"), "router", None)
        for route in getattr(router, "routes", []):
            if isinstance(route, APIRoute):  # a converter ({model:path}) is not in the OpenAPI path
                path = re.sub(r"\{(\w+):\w+\}", r"{\1}", route.path)
                found |= {(method, path) for method in route.methods}
    return found


def api_routes(client, prefix: str, admin: bool | None = None) -> list[tuple[str, str]]:
    """Routes under ``prefix``; with ``admin``, only those in (True) or out of (False) the admin area."""
    return sorted((method, re.sub(r"\{[^}]+\}", "x", path)) for method, path in declared_routes()
                  if path.startswith(prefix) and (admin is None or is_admin_path(path) == admin))


# ---- auth before body ------------------------------------------------------------------------------
@pytest.mark.parametrize("declare_length", [True, False], ids=["content-length", "chunked"])
@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong-key-xyz"}, ALPHA],
                         ids=["no-key", "wrong-key", "inference-key"])
def test_600mb_to_any_admin_route_without_the_admin_key_is_never_read(client, headers, declare_length):
    routes = api_routes(client, "/", admin=True)  # /admin, and /v1/files + /v1/fine_tuning
    assert len(routes) >= 25 and ("POST", "/v1/fine_tuning/jobs") in routes
    for method, path in routes:
        body = CountingBody(600 * MB)
        sent_headers = {**headers, "content-type": "application/json"}
        if not declare_length:  # as a server passes a chunked body on
            sent_headers["transfer-encoding"] = "chunked"
        status, answer, content = call(client, method, path, sent_headers, body, declare_length)
        assert status == 401, (method, path, content)
        assert json.loads(content)["error"]["type"] == "authentication_error"
        assert body.consumed == 0, (method, path)
        assert answer.get("connection") == "close"  # uvicorn drops the unread body with the connection


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong-key-xyz"}, ADMIN],
                         ids=["no-key", "wrong-key", "admin-key"])
def test_600mb_to_any_v1_route_without_an_inference_key_is_never_read(client, headers):
    routes = api_routes(client, "/v1", admin=False) + [("POST", "/v1/no-such-route"), ("POST", "/not-a-route")]
    for method, path in routes:
        body = CountingBody(600 * MB)
        status, _, content = call(client, method, path, {**headers, "content-type": "application/json"}, body,
                                  declare_length=False)
        assert status == 401, (method, path, content)
        assert body.consumed == 0, (method, path)


def test_admin_json_body_limit_is_enforced_while_streaming(client):
    declared = CountingBody(3 * JSON_LIMIT)
    status, _, content = call(client, "POST", "/admin/experiments", {**ADMIN, "content-type": "application/json"},
                              declared)
    assert (status, declared.consumed) == (413, 0)  # refused on its Content-Length, before reading
    chunked = CountingBody(50 * MB, chunk=1024)
    status, answer, content = call(client, "POST", "/admin/experiments",
                                   {**ADMIN, "content-type": "application/json"}, chunked, declare_length=False)
    assert status == 413 and json.loads(content)["error"]["code"] == "payload_too_large"
    assert chunked.consumed <= JSON_LIMIT + 1024  # stopped at the limit, not after reading it all
    # the rest of the body is still coming: closing the connection stops it (uvicorn read and
    # dropped an endless chunked body until its header timeout, gigabytes)
    assert answer.get("connection") == "close"


@pytest.mark.parametrize("length, status", [("0" * 5000, 200), ("0" * 5000 + "9" * 12, 413), ("9" * 5000, 413)],
                         ids=["zero-padded-zero", "zero-padded-huge", "5000-digits"])
def test_a_content_length_of_thousands_of_digits_is_read_not_a_500(client, length, status):
    """httptools takes a zero-padded Content-Length of any length; past 4,300 digits Python's int()
    refused the text, and every such request was a 500."""
    got, _, content = call(client, "GET", "/v1/models", {**ALPHA, "content-length": length}, CountingBody(0),
                           declare_length=False)
    assert got == status, content
    if status == 413:
        assert json.loads(content)["error"]["code"] == "payload_too_large"


def test_json_registration_and_upload_limits(client):
    # the JSON form of adapter registration gets the admin JSON limit...
    response = client.post("/admin/adapters", headers=ADMIN, json={"source_path": "x" * 4000})
    assert_error(response, 413, code="payload_too_large")
    # ...the multipart form the upload limit: past the JSON limit it reaches the route
    files = [("files", ("adapter_config.json", b"{" + b" " * (3 * JSON_LIMIT) + b"}"))]
    error = assert_error(client.post("/admin/adapters", headers=ADMIN, files=files), 400, code="invalid_adapter")
    assert "adapter_model.safetensors" in error["message"]
    # a file over its own limit, within the upload limit: the same 413
    files = [("files", ("adapter_config.json", b"{}")), ("files", ("adapter_model.safetensors", b"\0" * 40000))]
    error = assert_error(client.post("/admin/adapters", headers=ADMIN, files=files), 413, code="payload_too_large",
                         param="files")
    assert "adapter_model.safetensors" in error["message"] and str(ADAPTER_LIMIT) in error["message"]
    # past the upload limit, while the multipart parser reads: 413, not "the form could not be read"
    big = [("files", ("adapter_model.safetensors", b"\0" * (2 * UPLOAD_LIMIT)))]

    def chunks():
        body, content_type = _multipart(big)
        for i in range(0, len(body), 1000):
            yield body[i:i + 1000]

    response = client.post("/admin/adapters", content=chunks(),
                           headers={**ADMIN, "content-type": _multipart(big)[1]})
    assert_error(response, 413, code="payload_too_large")


def _multipart(files) -> tuple[bytes, str]:
    import httpx

    request = httpx.Request("POST", "http://x", files=files)
    return request.read(), request.headers["content-type"]


def test_training_dataset_over_its_limit_is_413(client):
    response = client.post("/admin/training-jobs", headers=ADMIN, files={"dataset": ("d.jsonl", b"x" * 7000)})
    error = assert_error(response, 413, code="payload_too_large", param="dataset")
    assert "6000" in error["message"]


def test_upload_routes_exist():
    assert UPLOAD_ROUTES <= declared_routes()


def test_probes_and_docs_are_open(client):
    assert client.get("/healthz").status_code == 200
    assert client.get("/readyz").status_code == 200
    assert client.get("/openapi.json").status_code == 200


# ---- per-key limits --------------------------------------------------------------------------------
def test_requests_per_minute_per_key(client):
    assert client.get("/v1/models", headers=BETA).status_code == 200
    assert client.get("/v1/models", headers=BETA).status_code == 200
    response = client.get("/v1/models", headers=BETA)
    error = assert_error(response, 429, type_="rate_limit_error", code="rate_limit_exceeded")
    assert "2 requests per minute" in error["message"]
    assert 1 <= int(response.headers["retry-after"]) <= 30
    assert client.get("/v1/models", headers=ALPHA).status_code == 200  # another key is not affected
    metrics = client.get("/metrics").text
    assert 'gateway_key_rate_limited_total{key="beta",limit="requests"} 1.0' in metrics
    assert 'gateway_key_requests_total{key="beta"} 2.0' in metrics
    assert all(k["key"] not in metrics for k in KEYS)  # names, never keys


def test_concurrent_requests_per_key(client):
    async def scenario():
        held = CountingBody(3000, chunk=100)  # under the body limit
        gate = asyncio.Event()
        real_receive = held.receive

        async def slow_receive():  # the first request's body trickles: it stays in flight
            if held.consumed:
                await gate.wait()
            return await real_receive()

        held.receive = slow_receive
        first = asyncio.create_task(raw_call(client.app, "POST", "/v1/completions",
                                             {**GAMMA, "content-type": "application/json"}, held, True))
        while not held.consumed and not first.done():
            await asyncio.sleep(0)
        assert not first.done()
        second = await raw_call(client.app, "POST", "/v1/completions", {**GAMMA, "content-type": "application/json"},
                                CountingBody(10, chunk=10))
        other_key = await raw_call(client.app, "GET", "/v1/models", ALPHA, CountingBody(0), False)
        first.cancel()
        return second, other_key, first

    (status, headers, content), other, first = client.portal.call(scenario)
    assert status == 429 and headers["retry-after"] == "1"
    assert json.loads(content)["error"]["code"] == "rate_limit_exceeded"
    assert other[0] == 200
    # the first request's slot came back when it ended
    response = client.post("/v1/completions", headers=GAMMA, json={"model": "tiny", "prompt": "hi", "max_tokens": 2})
    assert response.status_code == 200, response.text
    # gamma's limit of 1 counts sequences: n 2 can never run, and refusing it leaks no slot
    response = client.post("/v1/completions", headers=GAMMA, json={"model": "tiny", "prompt": "hi", "max_tokens": 2,
                                                                     "n": 2})
    assert response.status_code == 429 and "lower n" in response.json()["error"]["message"]
    response = client.post("/v1/completions", headers=GAMMA, json={"model": "tiny", "prompt": ["a", "b"],
                                                                     "max_tokens": 2})
    assert response.status_code == 429
    response = client.post("/v1/completions", headers=GAMMA, json={"model": "tiny", "prompt": "hi", "max_tokens": 2})
    assert response.status_code == 200, response.text


def test_tokens_per_minute_reserve_and_settle(client):
    body = {"model": "tiny", "prompt": "hello", "max_tokens": 64}
    error = assert_error(client.post("/v1/completions", headers=DELTA, json=body), 429, type_="rate_limit_error",
                         code="rate_limit_exceeded")
    assert "40 tokens per minute" in error["message"]
    response = client.post("/v1/completions", headers=DELTA, json={**body, "max_tokens": 3})
    assert response.status_code == 200, response.text
    usage = response.json()["usage"]
    gateway = client.app.state.gateway
    # settled by the request's observers, which run on the event loop once the engine released the
    # request: possibly just after the response was sent
    deadline = time.monotonic() + 30
    while gateway.keys._reserved and time.monotonic() < deadline:
        time.sleep(0.01)
    assert gateway.keys._reserved == {}
    metrics = client.get("/metrics").text
    assert f'gateway_key_tokens_total{{key="delta",kind="prompt"}} {float(usage["prompt_tokens"])}' in metrics
    assert f'gateway_key_tokens_total{{key="delta",kind="completion"}} {float(usage["completion_tokens"])}' in metrics


# ---- feedback bound to the key ---------------------------------------------------------------------
def test_feedback_only_from_the_key_that_made_the_request(client):
    body = {"name": "exp-keys", "arms": [{"name": "tiny", "weight": 1}, {"name": "lora-a", "weight": 1}]}
    assert client.post("/admin/experiments", json=body, headers=ADMIN).status_code == 201
    response = client.post("/v1/chat/completions", headers=ALPHA, json={
        "model": "exp-keys", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "user": "u1"})
    assert response.status_code == 200, response.text
    completion_id = response.json()["id"]
    other = client.post("/v1/feedback", headers=DELTA, json={"id": completion_id, "thumbs": "up"})
    error = assert_error(other, 404, type_="not_found_error", code="completion_not_found")
    assert error["message"] == client.post("/v1/feedback", headers=DELTA, json={
        "id": "chatcmpl-nope", "thumbs": "up"}).json()["error"]["message"].replace("chatcmpl-nope", completion_id)
    own = client.post("/v1/feedback", headers=ALPHA, json={"id": completion_id, "thumbs": "up"})
    assert own.status_code == 200, own.text
    assert own.json()["arm"] in ("tiny", "lora-a")


# ---- OpenAPI ---------------------------------------------------------------------------------------
def test_openapi_is_valid_and_describes_every_body(client):
    from openapi_spec_validator import validate

    schema = client.get("/openapi.json").json()
    validate(schema)
    operations = {(method.upper(), path): op for path, item in schema["paths"].items()
                  for method, op in item.items()}
    assert declared_routes() <= set(operations)
    for method, path in UPLOAD_ROUTES:
        content = operations[(method, path)]["requestBody"]["content"]
        properties = content["multipart/form-data"]["schema"]["properties"]
        assert any(p.get("format") == "binary" or p.get("items", {}).get("format") == "binary"
                   for p in properties.values())
    assert set(operations[("POST", "/admin/adapters")]["requestBody"]["content"]) == {
        "multipart/form-data", "application/json"}
    for (method, path), op in operations.items():
        if method in ("POST", "PATCH") and not path.endswith(("/stop", "/pin", "/unpin", "/load", "/cancel",
                                                              "/preference-file")):
            assert "requestBody" in op, (method, path)
        if is_admin_path(path):
            assert op["security"] == [{"AdminKey": []}], (method, path)
        elif path.startswith("/v1"):
            assert op["security"] == [{"InferenceKey": []}], (method, path)


def test_tokenize_routes_need_an_inference_key(client):
    body = {"model": "tiny", "prompt": "hello"}
    assert client.post("/tokenize", json=body).status_code == 401
    assert client.post("/detokenize", json={"model": "tiny", "tokens": [5]}).status_code == 401
    assert client.post("/tokenize", json=body, headers=ALPHA).json()["count"] > 0
    schema = client.get("/openapi.json").json()
    assert schema["paths"]["/tokenize"]["post"]["security"] == [{"InferenceKey": []}]


# ---- key guesses ----------------------------------------------------------------------------------
def test_wrong_keys_past_the_limit_get_429_for_any_key_from_that_address(tmp_path):
    adapters = tmp_path / "adapters"
    adapters.mkdir()
    with TestClient(make_app(tmp_path / "data", adapters, max_failed_key_attempts=3)) as guessing:
        wrong = [guessing.get("/admin/adapters", headers={"Authorization": "Bearer wrong-admin-key-000000"}),
                 guessing.get("/v1/models", headers={"Authorization": "Bearer wrong-inference-key"}),
                 guessing.get("/admin/adapters", headers={"Authorization": "Bearer wrong-admin-key-111111"})]
        assert [r.status_code for r in wrong] == [401, 401, 401]
        for headers in (ADMIN, ALPHA, {"Authorization": "Bearer wrong-admin-key-222222"}):
            refused = guessing.get("/admin/adapters" if headers is ADMIN else "/v1/models", headers=headers)
            # even the right key: a guess must not be confirmed
            assert_error(refused, 429, type_="rate_limit_error", code="too_many_failed_keys")
            assert 55 <= int(refused.headers["retry-after"]) <= 60
        assert guessing.get("/healthz").status_code == 200  # no key sent: nothing to throttle
        missing = guessing.get("/v1/models")  # no key is not a guess either: the usual 401
        assert missing.status_code == 401
        # another address is not affected
        other = TestClient(guessing.app, client=("198.51.100.7", 50000))
        assert other.get("/admin/adapters", headers=ADMIN).status_code == 200


def test_wrong_keys_from_fresh_ipv6_addresses_of_one_slash_64_are_throttled_together(tmp_path):
    """A host picks any address of its /64: one address per guess got a fresh allowance each time."""
    adapters = tmp_path / "adapters"
    adapters.mkdir()
    app = make_app(tmp_path / "data", adapters, max_failed_key_attempts=3)
    wrong = {"Authorization": "Bearer wrong-admin-key-000000"}
    with TestClient(app):
        for host in range(1, 4):
            guess = TestClient(app, client=(f"2001:db8:7:7::{host:x}", 50000)).get("/admin/adapters", headers=wrong)
            assert guess.status_code == 401
        refused = TestClient(app, client=("2001:db8:7:7:abcd::1", 50000)).get("/admin/adapters", headers=ADMIN)
        assert_error(refused, 429, type_="rate_limit_error", code="too_many_failed_keys")
        other = TestClient(app, client=("2001:db8:7:8::1", 50000))  # the next /64: another client
        assert other.get("/admin/adapters", headers=ADMIN).status_code == 200


def test_failures_age_out_of_the_window():
    from gateway.throttle import FailureThrottle

    now = [1000.0]
    throttle = FailureThrottle(2, window_seconds=60, clock=lambda: now[0])
    throttle.failed("a")
    now[0] += 30
    throttle.failed("a")
    assert throttle.retry_after("a") == pytest.approx(30)
    now[0] += 30.5
    assert throttle.retry_after("a") is None and throttle.failures("a") == 1


class StalledBody(CountingBody):
    """Sends its first bytes, then nothing more (a client trickling its body, or gone quiet)."""

    async def receive(self) -> dict:
        if self.consumed:
            await asyncio.Event().wait()
        self.consumed = 10
        return {"type": "http.request", "body": b'{"model": ', "more_body": True}


def test_a_json_body_that_stops_arriving_is_a_408_and_frees_the_keys_slot(tmp_path):
    """A key holder's JSON body sent a byte now and then held its connection (and the key's
    request slot) for good: the header timeout stands down once a request is being served."""
    (tmp_path / "adapters").mkdir()
    app = make_app(tmp_path / "data", tmp_path / "adapters", body_timeout_seconds=0.3)
    with TestClient(app) as c:
        for path, headers in (("/v1/chat/completions", GAMMA), ("/admin/experiments", ADMIN)):
            status, answer, content = call(c, "POST", path, {**headers, "content-type": "application/json"},
                                           StalledBody(1000))
            assert status == 408 and answer.get("connection") == "close", (path, content)
            assert json.loads(content)["error"]["code"] == "body_timeout"
        # gamma may run one request at a time: the stalled one gave its slot back
        assert c.post("/v1/chat/completions", headers=GAMMA, json={
            "model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}).status_code == 200
