"""A client that stops reading a stream cannot make the server hold its events without limit: past
``gateway.generation.MAX_UNREAD_BYTES`` unread, its request is cancelled (engine rows freed) and
its stream ends with a ``client_not_reading`` error; a client that reads is never cut off.

A real uvicorn server runs in a thread on the tiny model (as in ``test_disconnect``), and the
client is a raw socket with a small receive buffer that never reads, so the server's sends block
once the socket buffers are full, as with a stalled client on a real network."""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import threading
from collections.abc import Iterator

import httpx
import pytest
import uvicorn
from support import build_tokenizer

from gateway import generation as generation_module
from gateway.app import create_app
from gateway.generation import CLIENT_NOT_READING, ChoiceEvent, Generation, GenerationService, held_bytes
from gateway.logprobs import TokenLogprob
from test_api import make_base, make_settings
from test_disconnect import TIMEOUT, Captured, LiveServer, wait_until

N = 8
MAX_TOKENS = 200  # the tiny model's context window is 256
# small enough that an unread stream passes it long before it ends (the whole stream holds
# ~N x MAX_TOKENS x 3 KB), large enough that a client reading on localhost never meets it
BOUND = 512 * 1024
# the end token (<|im_end|>, id 2) banned: every choice runs its whole max_tokens
STREAM = {"model": "tiny", "messages": [{"role": "user", "content": "hello world, how are you?"}],
          "max_tokens": MAX_TOKENS, "n": N, "logprobs": True, "top_logprobs": 20, "stream": True,
          "logit_bias": {"2": -100}, "seed": 1}


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[LiveServer]:
    settings = make_settings(tmp_path_factory.mktemp("backpressure"), None, max_tokens_limit=MAX_TOKENS, max_n=N,
                             kv_cache_tokens=4 * N * 256)  # room for all N choices at once
    app = create_app(settings, base=make_base(build_tokenizer()))
    # a small send buffer on the listening socket (accepted sockets inherit it): the kernel would
    # otherwise take megabytes of a stream its client does not read, on localhost
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 16384)
    listener.bind(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    config = uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=5)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [listener]}, name="uvicorn", daemon=True)
    live = LiveServer(server, thread, port)
    thread.start()
    try:
        wait_until(lambda: live.server.started, "the server listens")
        yield live
    finally:
        live.stop()


@pytest.fixture
def generations(monkeypatch) -> list[Generation]:
    """Every Generation the service starts, and the small bound in force."""
    monkeypatch.setattr(generation_module, "MAX_UNREAD_BYTES", BOUND)
    started: list[Generation] = []
    start = GenerationService.start

    async def recording(self, *args, **kwargs):
        generation = await start(self, *args, **kwargs)
        started.append(generation)
        return generation

    monkeypatch.setattr(GenerationService, "start", recording)
    return started


def stalled_request(port: int, body: dict) -> socket.socket:
    """POST ``body`` from a socket with a tiny receive buffer that the test does not read."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connect: sets the window
    sock.settimeout(TIMEOUT)
    sock.connect(("127.0.0.1", port))
    data = json.dumps(body).encode()
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                 + f"Content-Length: {len(data)}\r\n\r\n".encode() + data)
    return sock


def read_to_end(sock: socket.socket) -> bytes:
    """Everything the server sends, up to the chunked body's last (empty) chunk."""
    received = b""
    while not received.endswith(b"\r\n0\r\n\r\n"):
        part = sock.recv(65536)
        assert part, "the server closed the connection before the end of the stream"
        received += part
    return received


def dechunk(response: bytes) -> bytes:
    """The body of a chunked HTTP/1.1 response."""
    rest = response.split(b"\r\n\r\n", 1)[1]
    body = b""
    while True:
        size, rest = rest.split(b"\r\n", 1)
        if int(size, 16) == 0:
            return body
        body, rest = body + rest[:int(size, 16)], rest[int(size, 16) + 2:]


def test_a_client_that_stops_reading_is_cancelled(server, generations, monkeypatch, caplog):
    engine = server.engine
    captured = Captured()
    captured.install(engine, monkeypatch, hold=False)
    caplog.set_level(logging.WARNING, logger="gateway.generation")
    sock = stalled_request(server.port, STREAM)
    try:
        wait_until(lambda: generations and generations[0].overflowed, "the server gives up on the client")
        (generation,) = generations
        (request,) = captured.requests
        assert request.cancelled
        # the rows are freed while the client still holds its connection open, unread
        wait_until(lambda: not engine.busy, "the engine lets the rows go")
        assert engine.running == 0
        assert len(captured.events) < N * MAX_TOKENS  # dropped, not run to the end
        assert all(e.finish_reason is None for e in captured.events)
        # what waits for the client is the error event alone, not the engine's output
        assert generation.queue.qsize() <= 1 and generation.unread_bytes <= BOUND
        assert generation.record.error_type == CLIENT_NOT_READING
        warnings = [r for r in caplog.records if "stopped reading" in r.getMessage()]
        assert len(warnings) == 1 and warnings[0].levelno == logging.WARNING
        # once the client reads again, its stream ends with the error in the usual style
        received = read_to_end(sock)
    finally:
        sock.close()
    assert received.startswith(b"HTTP/1.1 200")
    payloads = [event[6:] for event in dechunk(received).split(b"\n\n") if event.startswith(b"data: ")]
    assert payloads[-1] == b"[DONE]"
    error = json.loads(payloads[-2])["error"]
    assert error["code"] == CLIENT_NOT_READING and error["type"] == "invalid_request_error"
    assert error["param"] is None and "stopped reading" in error["message"]
    wait_until(lambda: not server.server.server_state.tasks, "the request handler returns")


def test_a_reading_client_gets_its_whole_stream(server, generations):
    finished: dict[int, str] = {}
    with httpx.Client(base_url=server.url, timeout=TIMEOUT) as client:
        with client.stream("POST", "/v1/chat/completions", json=STREAM) as response:
            assert response.status_code == 200
            for line in response.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                assert "error" not in chunk, chunk
                for choice in chunk["choices"]:
                    if choice["finish_reason"] is not None:
                        finished[choice["index"]] = choice["finish_reason"]
    assert finished == {i: "length" for i in range(N)}
    (generation,) = generations
    assert not generation.overflowed and generation.record.error_type is None


def test_a_request_not_streamed_has_no_bound(server, generations):
    """Its events are taken off the queue on the event loop, never waiting on the client."""
    body = {**STREAM, "stream": False, "n": 1, "top_logprobs": 5}
    response = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=TIMEOUT)
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["finish_reason"] == "length"
    (generation,) = generations
    assert generation.max_unread_bytes is None and not generation.overflowed


def test_the_bound_counts_queued_bytes_and_ends_the_stream_once():
    """Generation.deliver alone: under the bound events queue; past it the queue is emptied, the
    work cancelled, one error queued, and later events dropped."""
    async def scenario() -> None:
        entry = TokenLogprob(5, -0.5, tuple((t, -1.0) for t in range(20)))
        event = ChoiceEvent(0, "ab", None, logprobs=(entry,))
        size = held_bytes(event)
        generation = Generation(prompt_tokens=1, choices=1, max_unread_bytes=3 * size)
        for _ in range(3):
            generation.deliver(event)
        assert generation.queue.qsize() == 3 and generation.unread_bytes == 3 * size
        taken = generation.events()
        assert await anext(taken) is event  # reading frees room
        assert generation.unread_bytes == 2 * size
        generation.deliver(event)
        generation.deliver(event)  # 4 unread: past the bound
        assert generation.overflowed and generation.cancelled and generation.queue.qsize() == 1
        generation.deliver(event)  # the engine's late events go nowhere
        assert generation.queue.qsize() == 1
        error = await anext(taken)
        assert error.error_code == CLIENT_NOT_READING and error.finish_reason is None
        await taken.aclose()

    asyncio.run(scenario())
