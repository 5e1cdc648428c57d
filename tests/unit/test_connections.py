"""gateway.connections over real sockets: uvicorn serving a tiny ASGI app through the guarded
httptools protocol (no model), so the limits are what a client meets."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import resource
import socket
import threading
import time
from collections.abc import Iterator

import httpx
import pytest
import uvicorn

from gateway import connections
from gateway.connections import (ConnectionBook, ConnectionCollector, ConnectionLimits, ShortRequestTargets,
                                 guarded_protocol)
from loadtest.server import free_port

HEADER_TIMEOUT = 1.0
SLOW_SECONDS = 2.5  # the /slow route answers after this, longer than the header timeout


async def app(scope, receive, send) -> None:
    if scope["type"] != "http":
        return
    size = 0
    while True:
        message = await receive()
        size += len(message.get("body", b""))
        if not message.get("more_body"):
            break
    if scope["path"] == "/slow":
        await asyncio.sleep(SLOW_SECONDS)
    body = json.dumps({"path": scope["path"], "body_bytes": size}).encode()
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


@contextlib.contextmanager
def guarded_server(**overrides) -> Iterator[tuple[int, ConnectionBook]]:
    limits = ConnectionLimits(**{"max_connections": 64, "max_connections_per_address": 32,
                                 "header_timeout_seconds": HEADER_TIMEOUT, "max_header_bytes": 8192, **overrides})
    book = ConnectionBook(limits)
    port = free_port()
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="off",
                            http=guarded_protocol(book), ws="none")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    try:
        yield port, book
    finally:
        server.should_exit = True
        thread.join(30)


def connect(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    return sock


def read_reply(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes (or 10 s pass)."""
    chunks = []
    with contextlib.suppress(ConnectionResetError, socket.timeout):
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def error_of(reply: bytes) -> dict:
    head, _, body = reply.partition(b"\r\n\r\n")
    return json.loads(body)["error"]


def wait_for(condition, what: str) -> None:
    deadline = time.monotonic() + 10
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.01)


def test_an_endless_header_line_gets_431_and_is_not_read_on():
    with guarded_server() as (port, book):
        with connect(port) as sock:
            sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: ")
            sent = 0
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                for _ in range(64):  # 64 MiB offered; the server stops after about 8 KiB and one read
                    sock.sendall(b"a" * (1 << 20))
                    sent += 1 << 20
            reply = read_reply(sock)
        assert reply.startswith(b"HTTP/1.1 431 "), reply[:100]
        assert error_of(reply) == {"message": "the request line and headers exceed 8192 bytes",
                                   "type": "invalid_request_error", "param": None, "code": "headers_too_large"}
        assert sent < 64 << 20
        assert book.refusals["header_too_large"] == 1
        assert httpx.get(f"http://127.0.0.1:{port}/after").json()["path"] == "/after"


def test_many_headers_and_a_long_url_count_together():
    with guarded_server() as (port, _):
        headers = {f"x-h{i}": "v" * 100 for i in range(60)}  # about 6.6 KiB: under the limit
        assert httpx.get(f"http://127.0.0.1:{port}/ok", headers=headers).status_code == 200
        with connect(port) as sock:
            sock.sendall(b"GET /" + b"u" * 4000 + b" HTTP/1.1\r\n" + b"".join(
                f"x-h{i}: {'v' * 100}\r\n".encode() for i in range(60)) + b"\r\n")
            assert read_reply(sock).startswith(b"HTTP/1.1 431 ")


def test_a_large_body_behind_small_headers_is_not_counted_as_headers():
    with guarded_server() as (port, _):
        with connect(port) as sock:  # headers and 900 KB of body in one write: reads mix them
            body = b"x" * 900_000
            sock.sendall(b"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
            reply = read_reply_once(sock)
        assert reply.startswith(b"HTTP/1.1 200 "), reply[:100]
        assert json.loads(reply.partition(b"\r\n\r\n")[2])["body_bytes"] == 900_000


def read_reply_once(sock: socket.socket) -> bytes:
    """One response on a kept-alive connection (headers plus content-length bytes)."""
    data = b""
    while b"\r\n\r\n" not in data:
        data += sock.recv(65536)
    head, _, body = data.partition(b"\r\n\r\n")
    length = int(next(line.split(b":")[1] for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")))
    while len(body) < length:
        body += sock.recv(65536)
    return head + b"\r\n\r\n" + body


def test_unfinished_headers_get_408_after_the_timeout():
    with guarded_server() as (port, book):
        with connect(port) as sock:
            sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n")  # never the blank line
            started = time.monotonic()
            reply = read_reply(sock)
            waited = time.monotonic() - started
        assert reply.startswith(b"HTTP/1.1 408 "), reply[:100]
        assert error_of(reply)["code"] == "header_timeout"
        assert HEADER_TIMEOUT * 0.9 <= waited < HEADER_TIMEOUT + 5
        assert book.refusals["header_timeout"] == 1


def test_a_trickle_does_not_extend_the_timeout():
    with guarded_server() as (port, _):
        with connect(port) as sock:
            started = time.monotonic()
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                for piece in b"GET / HTTP/1.1\r\nHost: x\r\nX-Slow: abcdefghijklmnopqrstuvwxyz":
                    sock.sendall(bytes([piece]))
                    time.sleep(0.05)
                    if time.monotonic() - started > HEADER_TIMEOUT * 3:
                        break
            assert read_reply(sock).startswith(b"HTTP/1.1 408 ")
            assert time.monotonic() - started < HEADER_TIMEOUT * 3


@pytest.mark.parametrize("request_bytes", [
    b"POST /x HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n",
    b"POST /x HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab",
    b"POST /x HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
    b"get /x HTTP/1.1\r\nHost: x\r\n\r\n",
], ids=["content-length-abc", "two-content-lengths", "bad-chunk-size", "lowercase-method"])
def test_malformed_http_gets_a_400_in_openais_shape_and_the_connection_closes(request_bytes):
    with guarded_server() as (port, _):
        with connect(port) as sock:
            sock.sendall(request_bytes)
            reply = read_reply(sock)  # until the server closes
    assert reply.startswith(b"HTTP/1.1 400 ") and b"connection: close" in reply.lower()
    assert error_of(reply)["code"] == "invalid_http_request"


def test_an_idle_connection_is_closed_without_a_reply():
    with guarded_server() as (port, book):
        with connect(port) as sock:
            assert read_reply(sock) == b""
        wait_for(lambda: book.open == 0, "the connection left the book")
        assert book.refusals["header_timeout"] == 0  # nothing was begun: not counted as a refusal


def test_a_request_served_longer_than_the_timeout_is_not_cut_and_the_next_one_gets_the_timeout_again():
    with guarded_server() as (port, _):
        with connect(port) as sock:
            sock.sendall(b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n")
            assert read_reply_once(sock).startswith(b"HTTP/1.1 200 ")
            sock.sendall(b"GET /second HTTP/1.1\r\nHost: x\r\n\r\n")  # kept alive
            assert b'"/second"' in read_reply_once(sock)
            sock.sendall(b"GET /third HTTP/1.1\r\n")  # begun, never finished
            started = time.monotonic()
            assert read_reply(sock).startswith(b"HTTP/1.1 408 ")
            assert time.monotonic() - started < HEADER_TIMEOUT + 5


def test_connections_past_the_per_address_limit_get_503_and_the_book_balances():
    with guarded_server(max_connections_per_address=4) as (port, book):
        held = [connect(port) for _ in range(4)]
        wait_for(lambda: book.open == 4, "four connections counted")
        with connect(port) as extra:
            reply = read_reply(extra)
        assert reply.startswith(b"HTTP/1.1 503 ")
        assert b"retry-after: 1" in reply.lower()
        assert error_of(reply) == {"message": "too many open connections from this address", "type": "server_error",
                                   "param": None, "code": "too_many_connections"}
        for sock in held:
            sock.close()
        wait_for(lambda: book.open == 0 and not book.per_address, "every connection released")
        assert httpx.get(f"http://127.0.0.1:{port}/again").status_code == 200
        assert book.refusals["per_address"] == 1


def test_connections_count_by_address_group(monkeypatch):
    """The per-address count is kept by ``address_group`` (an IPv6 client's /64), here every
    address in one group: the limit holds across them."""
    monkeypatch.setattr(connections, "address_group", lambda address: "one-group")
    with guarded_server(max_connections_per_address=2) as (port, book):
        held = [connect(port) for _ in range(2)]
        wait_for(lambda: book.per_address == {"one-group": 2}, "two connections counted in the group")
        with connect(port) as extra:
            assert read_reply(extra).startswith(b"HTTP/1.1 503 ")
        for sock in held:
            sock.close()
        wait_for(lambda: not book.per_address, "every connection released")


def test_connections_past_the_total_limit_get_503():
    with guarded_server(max_connections=3) as (port, book):
        held = [connect(port) for _ in range(3)]
        wait_for(lambda: book.open == 3, "three connections counted")
        with connect(port) as extra:
            reply = read_reply(extra)
        assert error_of(reply)["message"] == "the server has too many open connections"
        assert book.refusals["max_connections"] == 1
        for sock in held:
            sock.close()
        wait_for(lambda: book.open == 0, "every connection released")


def test_collector_reports_open_connections_and_refusals():
    book = ConnectionBook(ConnectionLimits(2, 1, 1.0, 1024))
    assert book.admit("10.0.0.1") is None
    assert book.admit("10.0.0.1") == "per_address"
    families = {f.name: f for f in ConnectionCollector(book).collect()}
    assert families["gateway_connections_open"].samples[0].value == 1
    refused = {s.labels["reason"]: s.value for s in families["gateway_connections_refused"].samples}
    assert refused == {"max_connections": 0, "per_address": 1, "header_timeout": 0, "header_too_large": 0}
    book.release("10.0.0.1")
    assert book.open == 0 and not book.per_address


def test_the_open_files_limit_is_raised_to_fit_max_connections(monkeypatch, caplog):
    calls = []
    monkeypatch.setattr(resource, "getrlimit", lambda _: (1024, 8192))
    monkeypatch.setattr(resource, "setrlimit", lambda _, value: calls.append(value))
    connections.ensure_file_descriptors(4096)
    assert calls == [(4096 + connections.RESERVED_FILE_DESCRIPTORS, 8192)]
    calls.clear()
    monkeypatch.setattr(resource, "getrlimit", lambda _: (1024, 2048))
    with caplog.at_level("WARNING", logger="gateway.connections"):
        connections.ensure_file_descriptors(4096)
    assert calls == [(2048, 2048)]
    assert "below max_connections" in caplog.text


@pytest.mark.parametrize("soft", [100_000, resource.RLIM_INFINITY])
def test_a_large_enough_open_files_limit_is_left_alone(monkeypatch, soft):
    monkeypatch.setattr(resource, "getrlimit", lambda _: (soft, resource.RLIM_INFINITY))
    monkeypatch.setattr(resource, "setrlimit", lambda *_: pytest.fail("the limit was changed"))
    connections.ensure_file_descriptors(4096)


def test_headers_pipelined_behind_a_running_request_are_bounded_too():
    with guarded_server() as (port, book):
        with connect(port) as sock:
            sock.sendall(b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\nGET /next HTTP/1.1\r\nX-Big: ")
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                for _ in range(16):
                    sock.sendall(b"a" * (1 << 20))
            assert b"HTTP/1.1 431 " in read_reply(sock)
        assert book.refusals["header_too_large"] == 1


def test_a_request_target_past_8_kib_gets_414():
    with guarded_server(max_header_bytes=65536) as (port, book):
        with connect(port) as sock:
            sock.sendall(b"GET /" + b"p" * 9000 + b" HTTP/1.1\r\nHost: x\r\n\r\n")
            reply = read_reply(sock)
        assert reply.startswith(b"HTTP/1.1 414 "), reply[:100]
        assert error_of(reply)["code"] == "uri_too_long"
        assert httpx.get(f"http://127.0.0.1:{port}/" + "p" * 8000).status_code == 200


def test_access_log_lines_show_at_most_256_characters_of_the_target():
    record = logging.LogRecord("uvicorn.access", logging.INFO, __file__, 1, '%s - "%s %s HTTP/%s" %d',
                               ("127.0.0.1:5", "GET", "/v1/" + "A" * 32000, "1.1", 401), None)
    assert ShortRequestTargets().filter(record)
    line = record.getMessage()
    assert len(line) < 400 and line.endswith('...(32004 chars) HTTP/1.1" 401')
    short = logging.LogRecord("uvicorn.access", logging.INFO, __file__, 1, '%s - "%s %s HTTP/%s" %d',
                              ("127.0.0.1:5", "GET", "/healthz", "1.1", 200), None)
    assert ShortRequestTargets().filter(short) and "/healthz HTTP/1.1" in short.getMessage()
