"""A client that goes away frees its engine row within one step, streaming or not, running or
still queued; and GatewayServer's drain through a real socket. A real uvicorn server runs in a
thread on the tiny model (TestClient cannot disconnect mid-request).

The engine thread is held inside the request's first event (or inside a task) while the client
disconnects, so the test decides the order of events instead of racing the model."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import gc
import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from types import SimpleNamespace

import httpx
import pytest
import uvicorn
from fastapi import FastAPI
from fastapi.responses import StreamingResponse
from fastapi.testclient import TestClient
from support import build_tokenizer

from gateway.app import create_app
from gateway.engine import Engine, EngineRequest, SequenceEvent
from gateway.shutdown import GatewayServer, HandlersInFlight
from loadtest.server import free_port
from test_api import make_base, make_settings

TIMEOUT = 60
MAX_TOKENS = 64


def wait_until(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + TIMEOUT
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        time.sleep(0.005)


@dataclass
class LiveServer:
    server: uvicorn.Server
    thread: threading.Thread
    port: int

    @property
    def engine(self) -> Engine:
        return self.server.config.app.state.gateway.engine

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(TIMEOUT)


@contextlib.contextmanager
def live_server(root, drain_seconds: float | None = None, last_seconds: float = 5) -> Iterator[LiveServer]:
    """uvicorn's own server, or with ``drain_seconds`` the gateway's draining one; ``last_seconds``
    is uvicorn's wait for handlers still running after it (``timeout_graceful_shutdown``)."""
    settings = make_settings(root, None, max_tokens_limit=MAX_TOKENS)
    app = create_app(settings, base=make_base(build_tokenizer()))
    port = free_port()
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning",
                            timeout_graceful_shutdown=last_seconds)
    if drain_seconds is None:
        server = uvicorn.Server(config)
    else:
        server = GatewayServer(config, lambda: getattr(app.state, "gateway", None), drain_seconds)
    thread = threading.Thread(target=server.run, name="uvicorn", daemon=True)
    thread.start()
    live = LiveServer(server, thread, port)
    try:
        wait_until(lambda: server.started, "the server listens")
        yield live
    finally:
        live.stop()


@dataclass
class Captured:
    """Requests the engine receives; the first event of each holds the engine thread until
    ``release`` (the event itself is delivered first)."""

    requests: list[EngineRequest] = field(default_factory=list)
    events: list[SequenceEvent] = field(default_factory=list)
    reached: threading.Event = field(default_factory=threading.Event)
    gate: threading.Event = field(default_factory=threading.Event)

    def install(self, engine: Engine, monkeypatch, hold: bool = True) -> None:
        submit = engine.submit

        def capture(request: EngineRequest) -> None:
            deliver = request.sink

            def sink(event: SequenceEvent) -> None:
                self.events.append(event)
                deliver(event)
                if hold and not self.reached.is_set():
                    self.reached.set()
                    self.gate.wait(TIMEOUT)

            request.sink = sink
            self.requests.append(request)
            submit(request)

        monkeypatch.setattr(engine, "submit", capture)


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[LiveServer]:
    with live_server(tmp_path_factory.mktemp("disconnect")) as live:
        yield live


def raw_request(port: int, path: str, body: dict) -> socket.socket:
    """Send one HTTP request on a plain socket, which the test can close at any moment."""
    data = json.dumps(body).encode()
    sock = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)
    sock.sendall(f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                 f"Content-Length: {len(data)}\r\n\r\n".encode() + data)
    return sock


PROMPT = {"model": "tiny", "prompt": "the quick brown fox", "temperature": 0, "max_tokens": MAX_TOKENS}


def test_prompt_runs_long_enough_alone(server):
    """Precondition of the tests below: undisturbed, this request runs many steps."""
    body = httpx.post(server.url + "/v1/completions", json=PROMPT, timeout=TIMEOUT).json()
    assert body["usage"]["completion_tokens"] > 8, body


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_disconnect_while_running_frees_the_row_within_one_step(server, monkeypatch, stream):
    engine = server.engine
    captured = Captured()
    captured.install(engine, monkeypatch)
    sock = raw_request(server.port, "/v1/completions", {**PROMPT, "stream": stream})
    try:
        assert captured.reached.wait(TIMEOUT), "the request produced no event"
        if stream:
            assert sock.recv(65536).startswith(b"HTTP/1.1 200")  # the stream had begun
        (request,) = captured.requests
        assert engine.running == 1 and not request.cancelled
    finally:
        sock.close()
    try:
        wait_until(lambda: request.cancelled, "the server notices the disconnect")
        steps_at_cancel = engine.steps
    finally:
        captured.gate.set()
    wait_until(lambda: not engine.busy, "the engine lets the row go")
    # nothing waits for nobody: the request's handler ends too
    wait_until(lambda: not server.server.server_state.tasks, "the request handler returns")
    assert engine.running == 0
    assert engine.steps - steps_at_cancel <= 1
    assert all(e.finish_reason is None for e in captured.events)  # it was dropped, not finished
    assert max(e.completion_tokens for e in captured.events) < MAX_TOKENS


def test_disconnect_while_queued_never_takes_a_row(server, monkeypatch):
    engine = server.engine
    captured = Captured()
    captured.install(engine, monkeypatch, hold=False)
    gate, inside = threading.Event(), threading.Event()
    held = engine.call(lambda: (inside.set(), gate.wait(TIMEOUT)))
    assert inside.wait(TIMEOUT)
    try:
        sock = raw_request(server.port, "/v1/completions", PROMPT)
        wait_until(lambda: engine.queue_depth == 1, "the request waits")
        steps_before = engine.steps
        sock.close()
        (request,) = captured.requests
        wait_until(lambda: request.cancelled, "the server notices the disconnect")
    finally:
        gate.set()
        held.result(TIMEOUT)
    wait_until(lambda: not engine.busy, "the engine drops the waiting request")
    wait_until(lambda: not server.server.server_state.tasks, "the request handler returns")
    assert engine.queue_depth == 0 and engine.queued_tokens == 0
    assert engine.steps == steps_before and captured.events == []  # it was never prefilled


def test_gateway_server_drains_before_exiting(tmp_path, monkeypatch):
    """The drain a shutdown signal starts (requested directly: signals only reach the main thread)."""
    with live_server(tmp_path, drain_seconds=TIMEOUT) as live:
        gateway = live.server.config.app.state.gateway
        captured = Captured()
        captured.install(live.engine, monkeypatch)
        with httpx.Client(base_url=live.url, timeout=TIMEOUT) as client:
            with client.stream("POST", "/v1/completions", json={**PROMPT, "max_tokens": 12, "stream": True}) as stream:
                lines = stream.iter_lines()
                assert captured.reached.wait(TIMEOUT)
                live.server.request_shutdown_threadsafe()
                wait_until(lambda: gateway.draining, "the drain starts")
                assert client.get("/readyz").status_code == 503
                refused = client.post("/v1/completions", json=PROMPT)
                assert refused.status_code == 503 and refused.json()["error"]["code"] == "shutting_down"
                assert live.thread.is_alive()  # still serving while the stream runs
                captured.gate.set()
                payloads = [line[6:] for line in lines if line.startswith("data: ")]
        assert payloads[-1] == "[DONE]"
        assert json.loads(payloads[-2])["choices"][0]["finish_reason"] in ("stop", "length")
        live.thread.join(TIMEOUT)
        assert not live.thread.is_alive()  # the server stopped by itself once drained


def test_the_drain_waits_for_an_admin_handler_too(tmp_path, monkeypatch):
    """An adapter delete (any admin handler: an upload, a registration) in flight when the drain
    starts finishes and is answered, though the engine is idle; the drain ended at once and uvicorn
    cancelled it after its last second."""
    with live_server(tmp_path, drain_seconds=TIMEOUT, last_seconds=1) as live:
        gateway = live.server.config.app.state.gateway
        reached, gate = threading.Event(), threading.Event()

        async def slow_delete(adapter_id: str) -> None:
            reached.set()
            await asyncio.to_thread(gate.wait, TIMEOUT)

        monkeypatch.setattr(gateway.registry, "delete", slow_delete)
        with httpx.Client(base_url=live.url, timeout=TIMEOUT,
                          headers={"Authorization": f"Bearer {gateway.admin_key}"}) as client, \
                concurrent.futures.ThreadPoolExecutor(1) as pool:
            deleting = pool.submit(client.delete, "/admin/adapters/some-adapter")
            assert reached.wait(TIMEOUT)
            assert gateway.handlers_in_flight == 1
            live.server.request_shutdown_threadsafe()
            wait_until(lambda: gateway.draining, "the drain starts")
            time.sleep(2)  # past uvicorn's last second
            assert live.thread.is_alive() and not live.server.should_exit
            gate.set()
            answer = deleting.result(TIMEOUT)
        assert answer.status_code == 200 and answer.json()["deleted"] is True
        live.thread.join(TIMEOUT)
        assert not live.thread.is_alive()  # the server stopped by itself once drained
        assert gateway.handlers_in_flight == 0


def test_an_event_stream_stops_counting_as_a_handler_once_it_starts():
    """What an event stream sends after its start is engine work (the drain waits for the engine)
    or a watch (a training job's events) that no drain should wait for; a JSON answer counts until
    it is sent."""
    app = FastAPI()
    app.state.gateway = SimpleNamespace(handlers_in_flight=0)
    seen: dict[str, int] = {}

    @app.get("/events")
    async def events() -> StreamingResponse:
        seen["events handler"] = app.state.gateway.handlers_in_flight

        async def lines():
            seen["events body"] = app.state.gateway.handlers_in_flight
            yield "data: 1\n\n"
        return StreamingResponse(lines(), media_type="text/event-stream")

    @app.get("/json")
    async def answer() -> dict:
        seen["json handler"] = app.state.gateway.handlers_in_flight
        return {}

    app.add_middleware(HandlersInFlight)
    with TestClient(app) as client:
        assert client.get("/events").text == "data: 1\n\n"
        assert client.get("/json").status_code == 200
    assert seen == {"events handler": 1, "events body": 0, "json handler": 1}
    assert app.state.gateway.handlers_in_flight == 0


def test_gateway_server_freezes_what_startup_built(tmp_path):
    """The serving process's startup objects leave the collector's full passes (gc.freeze), which
    otherwise stall the engine thread ~140 ms each on a real model; uvicorn's plain server does not."""
    gc.unfreeze()
    with live_server(tmp_path):
        assert gc.get_freeze_count() == 0
    try:
        with live_server(tmp_path / "draining", drain_seconds=TIMEOUT) as live:
            assert live.server.started
            assert gc.get_freeze_count() > 0
    finally:
        gc.unfreeze()  # back to normal collection for the rest of the test session


@pytest.mark.parametrize("route, block_at", [("chat", 1), ("chat", 3), ("completions", 1)])
def test_a_stream_given_up_inside_a_send_cancels_its_work(tmp_path, route, block_at):
    """The client stops reading (the ``block_at``-th body write waits for good), then goes away:
    the stream's task is cancelled inside ``send``, its generators suspended at a ``yield``. The
    request's work is cancelled once the handler returns. At a chat stream's first write (the
    role chunk, before any engine event is read) nothing cancelled it: it ran to max_tokens. The
    collector is off: the cancel must not wait for a collection to finalize the suspended body
    (it did, and a busy test session's late collection let the work run to its end)."""
    settings = make_settings(tmp_path, None, max_tokens_limit=200)
    with TestClient(create_app(settings, base=make_base(build_tokenizer()))) as client:
        engine = client.app.state.gateway.engine
        submitted: list[EngineRequest] = []
        submit = engine.submit

        def slowed(*requests: EngineRequest) -> None:
            for request in requests:
                deliver = request.sink

                def sink(event: SequenceEvent, deliver=deliver) -> None:  # 200 tokens take seconds
                    time.sleep(0.02)
                    deliver(event)

                request.sink = sink
                submitted.append(request)
            submit(*requests)

        engine.submit = slowed
        never_stop = {"0": -100, "1": -100, "2": -100}  # no end-of-text: the work lasts max_tokens
        body = {"model": "tiny", "max_tokens": 200, "stream": True, "logit_bias": never_stop}
        if route == "chat":
            path, body = "/v1/chat/completions", {**body, "messages": [{"role": "user", "content": "hi"}]}
        else:
            path, body = "/v1/completions", {**body, "prompt": "hello"}
        data = json.dumps(body).encode()

        async def give_up() -> None:
            gone = asyncio.Event()
            writes, given = [0], [False]

            async def receive():
                if not given[0]:
                    given[0] = True
                    return {"type": "http.request", "body": data, "more_body": False}
                await gone.wait()
                return {"type": "http.disconnect"}

            async def send(message):
                if message["type"] == "http.response.body":
                    writes[0] += 1
                    if writes[0] == block_at:  # the socket's buffer is full: this write waits...
                        gone.set()  # ... and the client goes away
                        await asyncio.Event().wait()

            scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
                     "method": "POST", "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": b"",
                     "root_path": "", "headers": [(b"content-type", b"application/json"),
                                                  (b"content-length", str(len(data)).encode())],
                     "client": ("127.0.0.1", 5000), "server": ("testserver", 80), "state": {}}
            await asyncio.wait_for(client.app(scope, receive, send), TIMEOUT)

        gc.disable()
        try:
            client.portal.call(give_up)
            (request,) = submitted
            wait_until(lambda: request.cancelled or not engine.busy, "the work was cancelled or ended")
        finally:
            gc.enable()
        assert request.cancelled
        wait_until(lambda: not engine.busy, "the engine let the row go")
