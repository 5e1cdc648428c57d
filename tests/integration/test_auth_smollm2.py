"""API keys end to end: the real server with GATEWAY_API_KEYS set, driven by the openai client."""

from __future__ import annotations

from pathlib import Path

import httpx
import openai
import pytest

pytestmark = pytest.mark.slow
HEADER_TIMEOUT = 2


@pytest.fixture(scope="module")
def server(smollm2_dir: Path, tmp_path_factory, launch_server):
    data_dir = tmp_path_factory.mktemp("auth-data")
    return launch_server(["--model", str(smollm2_dir), "--data-dir", str(data_dir), "--device", "cpu"],
                         env={"GATEWAY_API_KEYS": "secret", "GATEWAY_HEADER_TIMEOUT_SECONDS": str(HEADER_TIMEOUT)})


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


def _rss_kib(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmRSS:")))


@pytest.mark.parametrize("path", ["/admin/experiments", "/admin/adapters", "/v1/chat/completions"])
def test_unauthenticated_600mb_body_is_refused_unread(server, path):
    """The reported attack over a real socket: a 600 MB JSON body without a key. The 401 comes
    back while the client is still sending (it stops after the kernel's buffers fill), and the
    server's memory does not grow by the body."""
    import select
    import socket

    total, chunk = 600 * 1024 * 1024, b"[" + b"1," * (512 * 1024 - 1)
    before = _rss_kib(server.process.pid)
    sent = 0
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        sock.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     f"Content-Length: {total}\r\n\r\n".encode())
        while sent < total:
            readable, _, _ = select.select([sock], [], [], 0)
            if readable:
                break
            try:
                sock.sendall(chunk)
            except (BrokenPipeError, ConnectionResetError):
                break
            sent += len(chunk)
        reply = sock.recv(65536).decode("latin-1")
    assert reply.startswith("HTTP/1.1 401"), reply[:200]
    assert sent < 64 * 1024 * 1024  # the server stopped taking bytes long before 600 MB
    assert _rss_kib(server.process.pid) - before < 10 * 1024
    assert httpx.get(f"{server.url}/healthz", timeout=10).status_code == 200


def test_an_endless_header_from_a_client_without_a_key_is_cut_at_the_header_limit(server):
    """Before the key check: a header line that never ends gets a 431 after 64 KiB (the httptools
    parser kept all of it, 370 MB for a 300 MB line, before gateway.connections)."""
    import socket

    before = _rss_kib(server.process.pid)
    sent = 0
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        sock.sendall(b"GET /v1/models HTTP/1.1\r\nHost: x\r\nX-Big: ")
        try:
            while sent < 256 * 1024 * 1024:
                sock.sendall(b"a" * (1 << 20))
                sent += 1 << 20
        except (BrokenPipeError, ConnectionResetError):
            pass
        reply = sock.recv(65536)
    assert reply.startswith(b"HTTP/1.1 431 "), reply[:200]
    assert sent < 64 * 1024 * 1024
    assert _rss_kib(server.process.pid) - before < 10 * 1024
    metrics = httpx.get(f"{server.url}/metrics", timeout=10).text
    assert 'gateway_connections_refused_total{reason="header_too_large"} 1.0' in metrics


def test_a_request_whose_headers_never_end_is_closed_after_the_header_timeout(server):
    import socket
    import time

    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        sock.sendall(b"GET /v1/models HTTP/1.1\r\nHost: x\r\n")  # no blank line, ever
        started = time.monotonic()
        reply = sock.recv(65536)
        waited = time.monotonic() - started
    assert reply.startswith(b"HTTP/1.1 408 "), reply[:200]
    assert HEADER_TIMEOUT * 0.9 <= waited < HEADER_TIMEOUT + 10


def test_a_forwarded_for_header_from_localhost_does_not_change_the_client_address(server):
    """No proxy is configured: X-Forwarded-For is not believed, not even from 127.0.0.1 (uvicorn's
    default), so a local process cannot pose as another address (the console's sign-in throttle)."""
    import time

    assert httpx.get(f"{server.url}/healthz?forwarded-probe", headers={"X-Forwarded-For": "203.0.113.9"},
                     timeout=10).status_code == 200
    deadline = time.monotonic() + 10
    while "forwarded-probe" not in server.log() and time.monotonic() < deadline:
        time.sleep(0.1)
    line = next(line for line in server.log().splitlines() if "forwarded-probe" in line)
    assert "127.0.0.1:" in line and "203.0.113.9" not in line
