"""The fleet on a local Ray cluster: two gateway replicas (a small random model, CPU) behind the
Ray Serve ingress. Chat and streaming through the ingress, admin routes and probes, adapter
affinity (an adapter's requests land on the replica holding it), the gateway's own 404 for an
unknown adapter, keys checked at the ingress (wrong ones throttled per address, X-Forwarded-For
not believed), a made-up console cookie refused before a large body is read while a signed-in
console still uploads, nested JSON answered in OpenAI's shape, and a replica killed with SIGKILL
mid-stream.

One Ray cluster per session (``ray_cluster``), one fleet for the module."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator

import httpx
import pytest
from fleet_support import ADMIN, ADMIN_KEY, API_KEY, AUTH, NO_EOS, REPLICA, kill_mid_stream
from support import build_small_llama, build_tokenizer, make_peft_adapter

from gateway.settings import Settings

ray = pytest.importorskip("ray")
from ray import serve  # noqa: E402

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def fleet(ray_cluster: str, tmp_path_factory) -> Iterator[str]:
    from gateway.fleet.app import build_fleet

    root = tmp_path_factory.mktemp("fleet")
    tokenizer = build_tokenizer()
    model = build_small_llama(len(tokenizer))
    model.save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    for seed, name in enumerate(("a", "b", "c")):
        make_peft_adapter(model, "lora", root / "adapters" / name, seed=seed, r=4, lora_alpha=8)
    settings = Settings(model=str(root / "model"), served_model_name="tiny", quantization="none", device="cpu",
                        data_dir=root / "data", adapters_dir=root / "adapters", api_keys=[API_KEY],
                        admin_key=ADMIN_KEY, replicas=2, replica_num_cpus=0.5, max_device_adapters=2,
                        max_batch_size=4)
    serve.run(build_fleet(settings), name="gateway", route_prefix="/")
    yield ray_cluster
    serve.delete("gateway")


def replica_handle():
    return serve.get_deployment_handle("GatewayReplica", app_name="gateway")


def replicas_by_name(expected: int = 2, tries: int = 200, pause: float = 0.0) -> dict[str, int]:
    """Every running replica's name -> process id, asked through a Serve handle (no adapter id:
    Serve spreads the calls) until ``expected`` different replicas answered (``pause`` between
    asks: a restarting replica needs its model loaded first)."""
    handle = replica_handle()
    seen: dict[str, int] = {}
    for _ in range(tries):
        try:
            name, pid = handle.whoami.remote().result(timeout_s=120)
        except ray.exceptions.RayError:  # a replica that just died, not yet known dead to the router
            continue
        seen[name] = pid
        if len(seen) >= expected:
            return seen
        time.sleep(pause)
    raise AssertionError(f"only {sorted(seen)} answered")


def wait_until_routed(adapter_id: str, replica: str, in_a_row: int = 5, tries: int = 400) -> None:
    """Until Serve's routers know ``replica`` holds ``adapter_id``: a handle call with that
    multiplexed id (which loads nothing) lands there ``in_a_row`` times running."""
    handle = replica_handle().options(multiplexed_model_id=adapter_id)
    streak = 0
    for _ in range(tries):
        name, _ = handle.whoami.remote().result(timeout_s=120)
        streak = streak + 1 if name == replica else 0
        if streak >= in_a_row:
            return
    raise AssertionError(f"{adapter_id} never routed to {replica}")


def chat(url: str, model: str, max_tokens: int = 4, **extra) -> httpx.Response:
    body = {"model": model, "messages": [{"role": "user", "content": "hello world"}], "max_tokens": max_tokens,
            "temperature": 0, **extra}
    return httpx.post(f"{url}/v1/chat/completions", json=body, headers=AUTH, timeout=120)


def test_probes_admin_and_metrics_pass_through(fleet):
    assert httpx.get(f"{fleet}/healthz", timeout=60).status_code == 200
    assert httpx.get(f"{fleet}/readyz", timeout=60).status_code == 200
    listed = httpx.get(f"{fleet}/admin/adapters", headers=ADMIN, timeout=60)
    assert listed.status_code == 200, listed.text
    assert {a["id"] for a in listed.json()["data"]} == {"a", "b", "c"}  # adapters_dir, on every replica
    models = httpx.get(f"{fleet}/v1/models", headers=AUTH, timeout=60)
    assert models.status_code == 200 and {"tiny", "a", "b", "c"} <= {m["id"] for m in models.json()["data"]}
    metrics = httpx.get(f"{fleet}/metrics", timeout=60)
    assert metrics.status_code == 200 and "gateway_adapter_loads" in metrics.text
    assert metrics.headers[REPLICA]  # one replica's metrics, and which one


def test_keys_are_checked_at_the_ingress_before_the_body(fleet):
    no_key = httpx.post(f"{fleet}/v1/chat/completions", content=b"{not json", timeout=60)
    assert no_key.status_code == 401
    assert no_key.json()["error"]["code"] == "invalid_api_key"
    assert REPLICA not in no_key.headers  # no replica saw it
    wrong_admin = httpx.get(f"{fleet}/admin/adapters", headers=AUTH, timeout=60)
    assert wrong_admin.status_code == 401
    too_big = httpx.post(f"{fleet}/v1/chat/completions", content=b"x" * (1024 * 1024 + 1), headers=AUTH,
                         timeout=60)
    assert too_big.status_code == 413 and too_big.json()["error"]["code"] == "payload_too_large"


def test_chat_and_streaming_through_the_ingress(fleet):
    plain = chat(fleet, "a")
    assert plain.status_code == 200, plain.text
    assert plain.json()["model"] == "a" and plain.json()["usage"]["completion_tokens"] == 4
    assert plain.headers[REPLICA]
    base = chat(fleet, "tiny")
    assert base.status_code == 200, base.text
    with httpx.stream("POST", f"{fleet}/v1/chat/completions", headers=AUTH, timeout=120,
                      json={"model": "b", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 6,
                            "stream": True, "logit_bias": NO_EOS}) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [line[len("data: "):] for line in response.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    pieces = [c["choices"][0]["delta"].get("content") for c in chunks if c["choices"]]
    assert len([p for p in pieces if p]) >= 2  # the tokens came as several chunks, not one body
    assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1] == "length"


def test_unknown_adapter_gets_the_gateways_404(fleet):
    response = chat(fleet, "no-such-adapter")
    assert response.status_code == 404
    error = response.json()["error"]
    assert error["code"] == "model_not_found" and error["type"] == "not_found_error"
    assert "no-such-adapter" in error["message"]


def test_an_adapters_requests_land_on_the_replica_holding_it(fleet):
    first = chat(fleet, "c")
    assert first.status_code == 200, first.text
    holder = first.headers[REPLICA]
    wait_until_routed("c", holder)
    served = {chat(fleet, "c").headers[REPLICA] for _ in range(8)}
    assert served == {holder}


def test_a_replica_killed_mid_stream_ends_its_stream_cleanly_and_the_fleet_recovers(fleet):
    warm = chat(fleet, "a")
    assert warm.status_code == 200
    victim = warm.headers[REPLICA]
    wait_until_routed("a", victim)
    pids = replicas_by_name()
    survivor = next(name for name in pids if name != victim)
    killed, error = kill_mid_stream(fleet, "a", pids.__getitem__)
    assert killed == victim
    assert error["code"] == "replica_unavailable" and error["type"] == "server_error"
    # the other replica serves on, while Ray brings a new replica up
    other = chat(fleet, "b")
    assert other.status_code == 200, other.text
    restarted = replicas_by_name(tries=1500, pause=0.2)
    assert survivor in restarted and victim not in restarted
    again = chat(fleet, "a")
    assert again.status_code == 200, again.text


def raw_post(url: str, head: bytes, body: bytes, wait: float = 30.0) -> tuple[int, bytes]:
    """Send a request's head and the start of its body on a raw socket, never the rest, and read
    the answer's status and head: a server that waits for the whole body times out here."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=wait) as sock:
        sock.sendall(head + b"\r\n")
        try:
            sock.sendall(body)
        except OSError:  # the server answered and closed before taking it all: what is tested
            pass
        answer = b""
        while b"\r\n\r\n" not in answer:
            piece = sock.recv(65536)
            if not piece:
                break
            answer += piece
    status = int(answer.split(b" ", 2)[1])
    return status, answer.split(b"\r\n\r\n", 1)[0].lower()


def upload_head(path: str, cookie: str, length_header: bytes, csrf: str | None = None) -> bytes:
    lines = [f"POST {path} HTTP/1.1".encode(), b"Host: fleet", f"Cookie: gateway_console={cookie}".encode(),
             b"Content-Type: multipart/form-data; boundary=b", length_header]
    if csrf is not None:
        lines.append(f"X-CSRF-Token: {csrf}".encode())
    return b"\r\n".join(lines) + b"\r\n"


def test_a_made_up_console_cookie_cannot_make_the_ingress_read_a_large_body(fleet):
    """One process answers a cookie no session has with 401 before any body byte: the ingress,
    which cannot see the replicas' sessions, asks them before it reads past 64 KiB."""
    declared = upload_head("/admin/adapters", "made-up", b"Content-Length: 419430400")  # 400 MB announced
    started = time.monotonic()
    status, head = raw_post(fleet, declared, b"x" * 65536)
    assert status == 401 and REPLICA.encode() not in head, head
    chunked = upload_head("/admin/adapters", "made-up", b"Transfer-Encoding: chunked")
    chunk = b"%x\r\n" % 32768 + b"x" * 32768 + b"\r\n"
    status, head = raw_post(fleet, chunked, chunk * 16)  # 512 KiB sent, never the end
    assert status == 401 and REPLICA.encode() not in head, head
    assert time.monotonic() - started < 30


def console_session(url: str) -> tuple[str, str]:
    """Sign in to the console with the admin key; the session cookie and its CSRF token (asked
    until the replica that signed the browser in answers: sessions live in one replica)."""
    signed = httpx.post(f"{url}/console/sign-in", data={"key": ADMIN_KEY}, headers={"Origin": url}, timeout=60)
    assert signed.status_code == 303, signed.text
    cookie = signed.cookies["gateway_console"]
    for _ in range(50):  # the other replica answers 401: the cookie is no session there
        session = httpx.get(f"{url}/console/api/session", cookies={"gateway_console": cookie}, timeout=60)
        if session.status_code == 200 and session.json()["signed_in"]:
            return cookie, session.json()["csrf_token"]
    raise AssertionError("no replica knew the session")


def test_a_signed_in_console_still_sends_large_uploads_through_the_ingress(fleet):
    cookie, csrf = console_session(fleet)
    body = b"--b\r\nContent-Disposition: form-data; name=\"files\"; filename=\"adapter_model.safetensors\"\r\n\r\n" \
        + b"x" * (256 * 1024) + b"\r\n--b--\r\n"
    headers = {"Content-Type": "multipart/form-data; boundary=b", "X-CSRF-Token": csrf}
    sent = httpx.post(f"{fleet}/admin/adapters", content=body, headers=headers, cookies={"gateway_console": cookie},
                      timeout=60)
    # past the ingress: the replica that got it judged it (its 400 for this file, or 401 when the
    # session lives in the other replica)
    assert sent.headers.get(REPLICA), sent.text
    no_csrf = upload_head("/admin/adapters", cookie, b"Content-Length: %d" % len(body))
    status, head = raw_post(fleet, no_csrf, body)  # a cookie without its token takes no large body
    assert status == 401 and REPLICA.encode() not in head, head


def test_wrong_keys_are_throttled_at_the_ingress_whatever_x_forwarded_for_says(fleet):
    """30 wrong keys a minute from one address (max_failed_key_attempts), then 429 for any key
    from there, as in one process; a local client rotating X-Forwarded-For (which Serve's proxy
    believes from 127.0.0.1) stays one address, while the same machine without it is unaffected."""
    for i in range(30):
        wrong = httpx.get(f"{fleet}/v1/models", timeout=60,
                          headers={"Authorization": f"Bearer wrong-{i}", "X-Forwarded-For": f"203.0.113.{i}"})
        assert wrong.status_code == 401, wrong.text
    throttled = httpx.get(f"{fleet}/v1/models", headers={**AUTH, "X-Forwarded-For": "198.51.100.1"}, timeout=60)
    assert throttled.status_code == 429, throttled.text
    assert throttled.json()["error"]["code"] == "too_many_failed_keys" and throttled.headers["retry-after"]
    assert REPLICA not in throttled.headers
    assert httpx.get(f"{fleet}/v1/models", headers=AUTH, timeout=60).status_code == 200


def test_deeply_nested_json_is_answered_in_openais_shape(fleet):
    for body in (b"[" * 200_000, b'{"model":"a","messages":' + b"[" * 100_000 + b"]" * 100_000 + b"}"):
        response = httpx.post(f"{fleet}/v1/chat/completions", content=body, timeout=60,
                              headers={**AUTH, "Content-Type": "application/json"})
        assert response.status_code == 400, response.text[:200]
        assert set(response.json()["error"]) == {"message", "type", "param", "code"}
