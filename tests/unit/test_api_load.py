"""The HTTP side of load: 429 when the queue holds too many prompt tokens, 503 ``queue_timeout``
for a request that waited too long (JSON and stream), draining for shutdown, and concurrent
requests on every adapter kind batched together giving the answers each gives alone (greedy).

The engine thread is held still with a task that waits on an event, so what is queued when is
decided by the test, never by timing."""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest
from fastapi.testclient import TestClient
from support import build_tokenizer

from gateway.app import create_app
from gateway.engine import Engine
from gateway.shutdown import drain
from gateway.step_budget import StepBudget
from test_api import ADAPTERS, MESSAGES, make_adapters, make_base, make_settings

TIMEOUT = 60


def wait_until(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + TIMEOUT
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        time.sleep(0.005)


@contextlib.contextmanager
def engine_held(engine: Engine) -> Iterator[None]:
    """Keep the engine thread inside a task: nothing is admitted or decoded until the block ends."""
    gate, inside = threading.Event(), threading.Event()

    def hold() -> None:
        inside.set()
        gate.wait(TIMEOUT)

    task = engine.call(hold)
    assert inside.wait(TIMEOUT)
    try:
        yield
    finally:
        gate.set()
        task.result(TIMEOUT)


def sse_payloads(text: str) -> list:
    out = []
    for line in text.splitlines():
        if line.startswith("data: "):
            payload = line[len("data: "):]
            out.append(payload if payload == "[DONE]" else json.loads(payload))
    return out


@pytest.fixture(scope="module")
def adapters_dir(tmp_path_factory):
    return make_adapters(tmp_path_factory.mktemp("load-adapters"), len(build_tokenizer()))


@pytest.fixture
def make_client(tmp_path_factory, adapters_dir):
    stack = contextlib.ExitStack()

    def make(**overrides) -> TestClient:
        settings = make_settings(tmp_path_factory.mktemp("data"), adapters_dir, **overrides)
        return stack.enter_context(TestClient(create_app(settings, base=make_base(build_tokenizer()))))

    with stack:
        yield make


def gateway_of(client: TestClient):
    return client.app.state.gateway


def chat_body(model: str = "tiny", **extra) -> dict:
    return {"model": model, "messages": MESSAGES, "temperature": 0, "max_tokens": 6, **extra}


def warm(client: TestClient, *models: str) -> None:
    """Bring adapters into device slots first: installing one needs the engine thread, which the
    tests below hold still."""
    for model in models:
        assert client.post("/v1/chat/completions", json=chat_body(model, max_tokens=1)).status_code == 200


# ---- backpressure on prompt tokens ----------------------------------------------------------------
def test_queued_prompt_tokens_over_the_limit_get_429(make_client):
    client = make_client(max_queued_tokens=1)  # one waiting request fills the queue, whatever its size
    engine = gateway_of(client).engine
    with ThreadPoolExecutor(1) as pool:
        with engine_held(engine):
            first = pool.submit(client.post, "/v1/chat/completions", json=chat_body())
            wait_until(lambda: engine.queue_depth == 1, "the first request waits")
            refused = client.post("/v1/completions", json={"model": "tiny", "prompt": "hello", "max_tokens": 2})
        assert first.result(TIMEOUT).status_code == 200
    assert refused.status_code == 429
    assert refused.headers["retry-after"] == "1"
    error = refused.json()["error"]
    assert (error["type"], error["code"]) == ("rate_limit_error", "overloaded")
    assert "prompt tokens" in error["message"]
    assert engine.queued_tokens == 0
    assert client.post("/v1/chat/completions", json=chat_body()).status_code == 200  # room again


# ---- queue timeout ----------------------------------------------------------------------------------
@pytest.fixture
def expiring_client(make_client, monkeypatch):
    """Every request is submitted as if it had already waited an hour (no sleeping in tests)."""
    client = make_client(max_queue_wait_seconds=60)
    engine = gateway_of(client).engine
    submit = engine.submit

    def submit_late(*requests) -> None:
        for request in requests:
            request.submitted -= 3600
        submit(*requests)

    monkeypatch.setattr(engine, "submit", submit_late)
    return client


@pytest.mark.parametrize("route", ["chat", "completions"])
def test_queue_timeout_is_503_with_retry_after(expiring_client, route):
    if route == "chat":
        response = expiring_client.post("/v1/chat/completions", json=chat_body("lora-a", n=2))
    else:
        response = expiring_client.post("/v1/completions", json={"model": "ia3-a", "prompt": ["hello", "the dog"]})
    assert response.status_code == 503, response.text
    assert response.headers["retry-after"] == "1"
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert (error["type"], error["code"]) == ("server_error", "queue_timeout")
    assert "waited" in error["message"] and "limit 60 s" in error["message"]
    # a prompt submitted after the engine's sweep failed the first is cancelled, and dropped by
    # the engine's next sweep: the 503 may arrive just before that
    engine = gateway_of(expiring_client).engine
    wait_until(lambda: not engine.busy, "the request's other prompts are dropped")


def test_queue_timeout_ends_a_stream_with_an_error_event(expiring_client):
    response = expiring_client.post("/v1/chat/completions", json=chat_body("pt-a", stream=True))
    assert response.status_code == 200  # the stream had started before the engine could answer
    events = sse_payloads(response.text)
    assert events[-1] == "[DONE]"
    error = events[-2]["error"]
    assert (error["type"], error["code"]) == ("server_error", "queue_timeout")
    assert all("error" not in e for e in events[:-2])


# ---- a sent answer is a counted answer ------------------------------------------------------------
@pytest.mark.parametrize("stream", [False, True])
def test_an_answer_is_sent_only_once_its_request_is_counted(make_client, monkeypatch, stream):
    """The engine tells the request it is done just after the last event; here that comes late on
    purpose, and the answer still waits for it, so the request is in /metrics when the client has
    its answer (and an experiment's feedback on it finds it)."""
    client = make_client()
    engine = gateway_of(client).engine
    submit = engine.submit

    def submit_with_late_release(*requests) -> None:
        for request in requests:
            on_done = request.on_done
            request.on_done = lambda on_done=on_done: threading.Timer(0.3, on_done).start()
        submit(*requests)

    monkeypatch.setattr(engine, "submit", submit_with_late_release)
    registry = gateway_of(client).metrics.registry

    def counted() -> float:
        return registry.get_sample_value("gateway_requests_total", {"adapter": "lora-a"}) or 0.0

    for round_ in range(2):
        response = client.post("/v1/chat/completions", json=chat_body("lora-a", stream=stream))
        assert response.status_code == 200
        assert counted() == round_ + 1


# ---- draining ---------------------------------------------------------------------------------------
def test_draining_refuses_new_requests_and_readyz(make_client):
    client = make_client()
    gateway = gateway_of(client)
    assert client.get("/readyz").status_code == 200
    gateway.draining = True
    ready = client.get("/readyz")
    assert ready.status_code == 503 and ready.json()["status"] == "shutting down"
    for path, body in [("/v1/chat/completions", chat_body()), ("/v1/completions", {"model": "tiny", "prompt": "x"})]:
        response = client.post(path, json=body)
        assert response.status_code == 503
        error = response.json()["error"]
        assert (error["type"], error["code"]) == ("server_error", "shutting_down")
    assert client.get("/healthz").status_code == 200  # alive, only not taking work


def test_drain_lets_requests_in_flight_finish(make_client):
    client = make_client()
    gateway = gateway_of(client)
    warm(client, "lora-a")
    with ThreadPoolExecutor(1) as pool:
        with engine_held(gateway.engine):
            in_flight = pool.submit(client.post, "/v1/chat/completions", json=chat_body("lora-a", stream=True))
            wait_until(lambda: gateway.engine.queue_depth == 1, "the request waits")
            drained = client.portal.start_task_soon(drain, gateway, TIMEOUT)
            wait_until(lambda: gateway.draining, "draining starts")
            assert client.get("/readyz").status_code == 503
        assert drained.result(TIMEOUT) is True
        events = sse_payloads(in_flight.result(TIMEOUT).text)
    assert events[-1] == "[DONE]"
    assert events[-2]["choices"][0]["finish_reason"] in ("stop", "length")
    assert all("error" not in e for e in events)


def test_drain_grace_over_ends_requests_with_shutting_down(make_client):
    client = make_client()
    gateway = gateway_of(client)
    warm(client, "ia3-a")
    with ThreadPoolExecutor(2) as pool:
        with engine_held(gateway.engine):
            plain = pool.submit(client.post, "/v1/completions", json={"model": "ia3-a", "prompt": "hello"})
            streamed = pool.submit(client.post, "/v1/chat/completions", json=chat_body("tiny", stream=True))
            wait_until(lambda: gateway.engine.queue_depth == 2, "both requests wait")
            drained = client.portal.start_task_soon(drain, gateway, 0.0)  # no grace: end them now
        assert drained.result(TIMEOUT) is False
        plain_response, stream_response = plain.result(TIMEOUT), streamed.result(TIMEOUT)
    assert plain_response.status_code == 503
    assert plain_response.json()["error"]["code"] == "shutting_down"
    events = sse_payloads(stream_response.text)
    assert events[-1] == "[DONE]" and events[-2]["error"]["code"] == "shutting_down"
    assert not gateway.engine.busy


# ---- outputs under load equal outputs alone -----------------------------------------------------------
def _ask(client: TestClient, job: tuple[str, str, str, bool]) -> list[str]:
    """The choices' texts of one request (chat or completion, streamed or not)."""
    route, model, text, stream = job
    if route == "chat":
        body = {"model": model, "messages": [{"role": "user", "content": text}], "temperature": 0,
                "max_tokens": 10, "stream": stream}
        response = client.post("/v1/chat/completions", json=body)
    else:
        body = {"model": model, "prompt": text, "temperature": 0, "max_tokens": 10, "stream": stream, "n": 2}
        response = client.post("/v1/completions", json=body)
    assert response.status_code == 200, response.text
    if not stream:
        return [c["message"]["content"] if route == "chat" else c["text"] for c in response.json()["choices"]]
    texts: dict[int, str] = {}
    for event in sse_payloads(response.text)[:-1]:
        choice = event["choices"][0]
        texts[choice["index"]] = texts.get(choice["index"], "") + (
            choice["delta"].get("content") or "" if route == "chat" else choice["text"])
    return [texts[i] for i in sorted(texts)]


def test_concurrent_requests_on_every_kind_equal_each_alone(make_client):
    client = make_client(max_batch_size=32)
    engine = gateway_of(client).engine
    models = ["tiny", *ADAPTERS]
    prompts = ["hello world, how are you?", "the quick brown fox", "What is two plus two?"]
    combos = [(route, model, stream) for route in ("chat", "completions") for model in models
              for stream in (False, True)]
    jobs = [(route, model, prompts[i % len(prompts)], stream) for i, (route, model, stream) in enumerate(combos)]
    alone = [_ask(client, job) for job in jobs]
    with ThreadPoolExecutor(len(jobs)) as pool:
        with engine_held(engine):  # every request waits, then all are admitted in one step
            futures = [pool.submit(_ask, client, job) for job in jobs]
            wait_until(lambda: engine.queue_depth == sum(2 if j[0] == "completions" else 1 for j in jobs),
                       "every request waits")
        together = [f.result(TIMEOUT) for f in futures]
    assert together == alone
    assert len({tuple(a) for a in alone}) > len(prompts)  # the adapters changed some outputs


@pytest.mark.parametrize("kv_cache", ["paged", "padded"])
def test_waiting_requests_hold_no_device_slot(make_client, kv_cache):
    """One device slot, three adapters, all requests queued at once: a request claims its
    adapter's slot only when it enters the batch, so none gets a 429 for a slot that another
    request is merely waiting with; they run one adapter after the other."""
    client = make_client(max_device_adapters=1, slot_wait_seconds=0.2, max_batch_size=1, kv_cache=kv_cache)
    engine = gateway_of(client).engine
    models = list(ADAPTERS) * 2
    with ThreadPoolExecutor(len(models)) as pool:
        with engine_held(engine):
            futures = [pool.submit(client.post, "/v1/chat/completions", json=chat_body(m)) for m in models]
            wait_until(lambda: engine.queue_depth == len(models), "every request is queued")
            time.sleep(0.5)  # more than slot_wait_seconds: a request holding the slot would 429 the others
        responses = [f.result(TIMEOUT) for f in futures]
    assert [r.status_code for r in responses] == [200] * len(models), [r.text for r in responses]
    registry = gateway_of(client).registry
    assert all(registry.get(m).device_users == 0 for m in ADAPTERS)  # every claim went back


def metric(text: str, name: str) -> float:
    line = next(line for line in text.splitlines() if line.startswith(name + " "))
    return float(line.split()[1])


def test_kv_cache_metrics_and_prefix_hits_over_http(make_client):
    """The same long prompt twice on one adapter: the second request reuses the first one's full
    blocks (counted in /metrics), gives the same answer, and every block goes back after."""
    client = make_client(kv_block_size=4)
    body = chat_body("lora-a", messages=[{"role": "system", "content": "the quick brown fox " * 12}, *MESSAGES])
    first = client.post("/v1/chat/completions", json=body)
    second = client.post("/v1/chat/completions", json=body)
    assert first.status_code == second.status_code == 200
    assert first.json()["choices"][0]["message"] == second.json()["choices"][0]["message"]
    text = client.get("/metrics").text
    assert metric(text, "gateway_kv_blocks_total") > 0 and metric(text, "gateway_kv_block_size_tokens") == 4
    assert metric(text, "gateway_prefix_cache_hit_tokens_total") >= 40  # the long system prompt
    assert metric(text, "gateway_kv_blocks_used") == 0 and metric(text, "gateway_kv_live_tokens") == 0
    assert metric(text, "gateway_kv_blocks_cached") > 0
    assert metric(text, "gateway_kv_bytes_per_token") > 0
    assert metric(text, "gateway_kv_gather_workspace_bytes") > 0  # prompts were gathered for attention


def test_prompt_budget_gauge_fixed_and_adaptive(make_client):
    """``gateway_step_prompt_budget_tokens``: max_step_tokens when fixed; with max_decode_slowdown,
    the probe's 16 once decode-only steps have been timed (no mixed step yet to price a token)."""
    fixed = make_client(max_step_tokens=48)
    assert metric(fixed.get("/metrics").text, "gateway_step_prompt_budget_tokens") == 48
    adaptive = make_client(max_step_tokens=48, max_decode_slowdown=1.2)
    assert metric(adaptive.get("/metrics").text, "gateway_step_prompt_budget_tokens") == 48  # nothing timed yet
    assert adaptive.post("/v1/chat/completions", json=chat_body("lora-a")).status_code == 200
    assert metric(adaptive.get("/metrics").text, "gateway_step_prompt_budget_tokens") == StepBudget.PROBE_TOKENS
