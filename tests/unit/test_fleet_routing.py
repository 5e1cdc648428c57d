"""The fleet's pure parts, without Ray: the in-process ASGI bridge a replica serves through, the
ingress's key check, wrong-key throttle and body limits (a console cookie's body gated on its
session), the client address it believes, the model a body asks for, and the route cache."""

from __future__ import annotations

import asyncio
import json

import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from gateway.fleet.asgi_bridge import AppFailedError, ForwardedRequest, ResponseStart, call_app
from gateway.auth import OPEN_BODY_SECONDS
from gateway.errors import AuthenticationError, BodyTimeoutError
from gateway.fleet.routing import (
    IngressGuard, ModelRequest, ModelRoutes, Route, SessionGate, believed_client, model_request, read_body,
)
from gateway.settings import Settings

ADMIN_KEY = "fleet-admin-key-0123456789abcdef"


def run(coro):
    return asyncio.run(coro)


async def collect(app, request: ForwardedRequest, extra=()) -> list:
    return [piece async for piece in call_app(app, request, extra)]


def echo_app() -> tuple[FastAPI, dict]:
    app = FastAPI()
    seen: dict = {}

    @app.post("/echo")
    async def echo(request: Request) -> JSONResponse:
        seen["query"] = request.url.query
        seen["auth"] = request.headers.get("authorization")
        return JSONResponse({"body": (await request.body()).decode()}, headers={"set-cookie": "a=1"})

    @app.get("/stream")
    async def stream(request: Request) -> StreamingResponse:
        async def pieces():
            try:
                for i in range(1000):
                    yield f"data: {i}\n\n".encode()
                    await asyncio.sleep(0)
            finally:
                seen["disconnected"] = await request.is_disconnected()

        return StreamingResponse(pieces(), media_type="text/event-stream")

    @app.get("/broken")
    async def broken() -> None:
        raise RuntimeError("boom")

    return app, seen


def test_bridge_forwards_method_path_query_headers_and_body_and_adds_headers():
    app, seen = echo_app()
    request = ForwardedRequest("POST", "/echo", b"x=1", ((b"authorization", b"Bearer k"),), b"hello")
    pieces = run(collect(app, request, ((b"x-gateway-replica", b"r1"),)))
    start = pieces[0]
    assert isinstance(start, ResponseStart) and start.status == 200
    assert (b"set-cookie", b"a=1") in start.headers and (b"x-gateway-replica", b"r1") in start.headers
    assert json.loads(b"".join(pieces[1:])) == {"body": "hello"}
    assert seen == {"query": "x=1", "auth": "Bearer k"}


def test_bridge_streams_chunks_as_sent_and_a_closed_iterator_is_a_disconnect():
    app, seen = echo_app()

    async def main():
        pieces = call_app(app, ForwardedRequest("GET", "/stream"))
        start = await pieces.__anext__()
        first = [await pieces.__anext__() for _ in range(3)]
        await pieces.aclose()  # the client went away
        for _ in range(200):
            if "disconnected" in seen:
                break
            await asyncio.sleep(0.01)
        return start, first

    start, first = run(main())
    assert start.status == 200 and first == [b"data: 0\n\n", b"data: 1\n\n", b"data: 2\n\n"]
    assert seen["disconnected"] is True


def test_bridge_reports_an_app_that_ends_without_a_response():
    async def silent(scope, receive, send):
        return None

    with pytest.raises(AppFailedError):
        run(collect(silent, ForwardedRequest("GET", "/")))
    app, _ = echo_app()
    pieces = run(collect(app, ForwardedRequest("GET", "/broken")))  # FastAPI renders its own 500
    assert pieces[0].status == 500


def settings(**overrides) -> Settings:
    return Settings(admin_key=ADMIN_KEY, **overrides)


def headers(token: str | None = None, **extra: str) -> dict[bytes, bytes]:
    out = {k.encode(): v.encode() for k, v in extra.items()}
    if token is not None:
        out[b"authorization"] = f"Bearer {token}".encode()
    return out


@pytest.mark.parametrize(("path", "token", "refused"), [
    ("/healthz", None, False),
    ("/metrics", None, False),
    ("/admin/adapters", None, True),
    ("/admin/adapters", "inference-key-0123456789", True),
    ("/admin/adapters", ADMIN_KEY, False),
    ("/v1/fine_tuning/jobs", "inference-key-0123456789", True),
    ("/v1/chat/completions", None, True),
    ("/v1/chat/completions", "wrong", True),
    ("/v1/chat/completions", "inference-key-0123456789", False),
    ("/unknown", None, True),
])
def test_ingress_guard_checks_keys_like_the_gateway(path, token, refused):
    guard = IngressGuard(settings(api_keys=["inference-key-0123456789"]), ADMIN_KEY)
    error = guard.refusal(path, headers(token))
    assert (error is not None) == refused
    if error is not None:
        assert error.status == 401


def test_ingress_guard_without_inference_keys_and_with_a_console_cookie():
    guard = IngressGuard(settings(), ADMIN_KEY)
    assert guard.refusal("/v1/chat/completions", headers()) is None  # no keys configured: open, as in one process
    # a console cookie is not judged by the ingress: refused as without it, a replica may still accept it
    with_cookie = headers(cookie="gateway_console=made-up")
    assert guard.refusal("/admin/adapters", with_cookie).status == 401
    assert guard.may_hold_session(with_cookie)
    assert not guard.may_hold_session(headers(cookie="other_app=x"))  # not the console's cookie
    assert not guard.may_hold_session(headers("wrong", cookie="gateway_console=x"))  # a bearer key is judged alone


def test_ingress_body_limits_follow_the_area():
    s = settings(max_body_bytes=2048, max_admin_json_bytes=4096, max_upload_bytes=8192)
    guard = IngressGuard(s, ADMIN_KEY)

    def scope(method, path, content_type=b"application/json"):
        return {"method": method, "path": path, "headers": [(b"content-type", content_type)]}

    assert guard.body_limit(scope("POST", "/v1/chat/completions")) == 2048
    assert guard.body_limit(scope("PATCH", "/admin/adapters/x")) == 4096
    assert guard.body_limit(scope("POST", "/admin/adapters", b"multipart/form-data; boundary=x")) == 8192
    assert guard.body_limit(scope("GET", "/healthz")) == 64 * 1024


def test_ingress_guard_throttles_wrong_keys_per_client_like_the_gateway():
    guard = IngressGuard(settings(api_keys=["inference-key-0123456789"], max_failed_key_attempts=3), ADMIN_KEY)
    for i in range(3):
        assert guard.refusal("/v1/chat/completions", headers(f"wrong-{i}"), "10.0.0.1").status == 401
    assert guard.refusal("/admin/adapters", headers("wrong-admin"), "10.0.0.1").status == 429  # any area
    throttled = guard.refusal("/v1/chat/completions", headers("inference-key-0123456789"), "10.0.0.1")
    assert throttled.status == 429 and throttled.code == "too_many_failed_keys"  # the right key too
    assert 0 < int(throttled.headers["Retry-After"]) <= 60
    # another address, a request without a key and the open paths are not held back
    assert guard.refusal("/v1/chat/completions", headers("inference-key-0123456789"), "10.0.0.2") is None
    assert guard.refusal("/v1/chat/completions", headers(), "10.0.0.1").status == 401
    assert guard.refusal("/healthz", headers("wrong"), "10.0.0.1") is None


def test_ingress_guard_without_a_failure_limit_never_throttles():
    guard = IngressGuard(settings(api_keys=["inference-key-0123456789"], max_failed_key_attempts=0), ADMIN_KEY)
    assert guard.key_guesses is None
    assert all(guard.refusal("/v1/models", headers(f"w{i}"), "10.0.0.1").status == 401 for i in range(50))


def streamed_request(chunks: list[bytes], content_length: int | None = None) -> tuple[Request, list[int]]:
    """A request whose body arrives in ``chunks``; the list counts the chunks the reader pulled."""
    pulled: list[int] = []
    pending = list(chunks)

    async def receive():
        pulled.append(1)
        body = pending.pop(0) if pending else b""
        return {"type": "http.request", "body": body, "more_body": bool(pending)}

    extra = [(b"content-length", str(content_length).encode())] if content_length is not None else []
    scope = {"type": "http", "method": "POST", "path": "/admin/adapters", "headers": extra, "query_string": b""}
    return Request(scope, receive), pulled


def session_gate(answer: bool, asked: list[int]) -> SessionGate:
    async def confirm() -> bool:
        asked.append(1)
        return answer

    return SessionGate(64 * 1024, confirm, AuthenticationError("missing admin key"))


def test_a_small_body_with_an_unconfirmed_cookie_is_read_without_asking_the_replicas():
    asked: list[int] = []
    request, _ = streamed_request([b"x" * 1000, b"y" * 1000])
    assert run(read_body(request, 10**9, session_gate(False, asked))) == b"x" * 1000 + b"y" * 1000
    assert asked == []  # the replica that gets it judges the cookie, as in one process


def test_a_large_body_with_an_unknown_session_is_refused_before_it_is_read():
    asked: list[int] = []
    chunk = b"x" * (32 * 1024)
    request, pulled = streamed_request([chunk] * 100)  # 3.2 MB sent chunked
    with pytest.raises(AuthenticationError):
        run(read_body(request, 10**9, session_gate(False, asked)))
    assert asked == [1] and len(pulled) == 3  # stopped one chunk past the 64 KiB read unconfirmed
    declared, pulled = streamed_request([chunk] * 100, content_length=len(chunk) * 100)
    with pytest.raises(AuthenticationError):
        run(read_body(declared, 10**9, session_gate(False, asked)))
    assert pulled == []  # a declared length past it: asked before any body byte


def test_a_large_body_with_a_confirmed_session_is_read_whole_under_its_limit():
    asked: list[int] = []
    chunk = b"x" * (32 * 1024)
    request, _ = streamed_request([chunk] * 10)
    assert len(run(read_body(request, 10**9, session_gate(True, asked)))) == len(chunk) * 10
    assert asked == [1]  # once
    too_big, _ = streamed_request([chunk] * 10)
    with pytest.raises(Exception, match="larger than the limit"):
        run(read_body(too_big, 200 * 1024, session_gate(True, [])))


def trickled_request(chunks: list[bytes], pause: float, path: str = "/console/login") -> Request:
    """A request whose body chunks arrive ``pause`` seconds apart (a slow or hostile sender)."""
    pending = list(chunks)

    async def receive():
        await asyncio.sleep(pause)
        body = pending.pop(0) if pending else b""
        return {"type": "http.request", "body": body, "more_body": bool(pending)}

    return Request({"type": "http", "method": "POST", "path": path, "headers": [], "query_string": b""}, receive)


def test_a_body_no_key_vouches_for_must_arrive_in_time():
    slow = trickled_request([b"x"] * 20, pause=0.05)
    with pytest.raises(BodyTimeoutError) as refused:
        run(read_body(slow, 64 * 1024, None, unvouched_seconds=0.3))
    assert refused.value.status == 408 and refused.value.headers == {"Connection": "close"}
    gated = trickled_request([b"x"] * 20, pause=0.05, path="/admin/adapters")
    with pytest.raises(BodyTimeoutError):  # a small body behind an unconfirmed cookie: as an open path's
        run(read_body(gated, 10**9, session_gate(False, []), unvouched_seconds=0.3))
    assert run(read_body(trickled_request([b"x"] * 3, pause=0.05), 64 * 1024, None, unvouched_seconds=5)) == b"xxx"


def test_a_confirmed_session_lifts_the_deadline_and_a_key_never_has_one():
    asked: list[int] = []
    chunk = b"x" * (32 * 1024)
    upload = trickled_request([chunk] * 10, pause=0.05, path="/admin/adapters")  # 0.5 s, confirmed at chunk 3
    assert len(run(read_body(upload, 10**9, session_gate(True, asked), unvouched_seconds=0.3))) == len(chunk) * 10
    assert asked == [1]
    guard = IngressGuard(Settings(), ADMIN_KEY)
    assert guard.unvouched_body_seconds("/v1/chat/completions", gated=False) is None  # the key vouches
    assert guard.unvouched_body_seconds("/admin/adapters", gated=True) == OPEN_BODY_SECONDS
    assert guard.unvouched_body_seconds("/console/login", gated=False) == OPEN_BODY_SECONDS


def client_scope(client: tuple[str, int] | None, *forwarded: str) -> dict:
    return {"client": client, "headers": [(b"x-forwarded-for", value.encode()) for value in forwarded]}


@pytest.mark.parametrize(("client", "forwarded", "trusted", "expected"), [
    (("127.0.0.1", 5000), (), [], ("127.0.0.1", 5000)),  # no header: the peer
    (("203.0.113.9", 0), ("203.0.113.9",), [], None),  # the proxy took it from the header: unknown
    (("203.0.113.9", 8080), ("10.1.1.1, 203.0.113.9:8080",), [], None),
    (("2001:db8::1", 0), ("[2001:db8::1]:443",), [], None),
    (("203.0.113.9", 0), ("203.0.113.7", "203.0.113.9"), [], None),  # one of several headers
    (("198.51.100.4", 40000), ("203.0.113.9",), [], ("198.51.100.4", 40000)),  # not believed by the proxy: the peer
    (("203.0.113.9", 0), ("203.0.113.9",), ["10.0.0.0/8"], ("203.0.113.9", 0)),  # trusted proxies: as read
    (None, ("203.0.113.9",), [], None),
])
def test_believed_client_never_takes_an_address_from_a_header_nobody_trusts(client, forwarded, trusted, expected):
    assert believed_client(client_scope(client, *forwarded), trusted) == expected


@pytest.mark.parametrize(("path", "body", "expected"), [
    ("/v1/chat/completions", b'{"model": "a", "user": "u"}', ModelRequest("a", "u")),
    ("/v1/completions", b'{"model": "b", "user": 5}', ModelRequest("b", None)),
    ("/v1/chat/completions", b'{"model": 3}', None),
    ("/v1/chat/completions", b'{"model": ""}', None),
    ("/v1/chat/completions", b"[1, 2]", None),
    ("/v1/chat/completions", b"{not json", None),
    ("/v1/chat/completions", b"\xff\xfe", None),
    ("/admin/adapters", b'{"model": "a"}', None),
    ("/v1/chat/completions", b"[" * 200_000, None),  # deeper than the parser goes: the replica answers
    ("/v1/chat/completions", b'{"model": "a", "messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", None),
    # longer than any model name a replica takes: not routed, so never remembered (256 MiB of them)
    ("/v1/chat/completions", b'{"model": "' + b"m" * 257 + b'"}', None),
    ("/v1/chat/completions", b'{"model": "' + b"m" * 256 + b'"}', ModelRequest("m" * 256, None)),
])
def test_model_request_reads_only_an_inference_bodys_model(path, body, expected):
    assert model_request(path, body) == expected


class Asked:
    def __init__(self, routes: dict[str, Route]):
        self.routes = routes
        self.calls: list[str] = []

    async def __call__(self, model, user, headers) -> Route:
        self.calls.append(model)
        return self.routes[model]


def test_model_routes_remember_names_but_ask_for_experiments_every_time():
    now = [0.0]
    ask = Asked({"a": Route("a", True), "exp": Route("b", False), "ghost": Route(None, True)})
    routes = ModelRoutes(ask, ttl=1.0, clock=lambda: now[0])

    async def main():
        return [await routes.adapter_for(ModelRequest(m, None), {}) for m in ("a", "a", "exp", "exp", "ghost",
                                                                               "ghost")]

    assert run(main()) == ["a", "a", "b", "b", None, None]
    assert ask.calls == ["a", "exp", "exp", "ghost"]
    now[0] = 1.5  # past the ttl: asked again
    run(routes.adapter_for(ModelRequest("a", None), {}))
    assert ask.calls[-1] == "a" and len(ask.calls) == 5


def test_model_routes_cache_stays_bounded():
    ask = Asked({f"m{i}": Route(f"m{i}", True) for i in range(50)})
    routes = ModelRoutes(ask, ttl=100.0, max_entries=8)

    async def main():
        for i in range(50):
            await routes.adapter_for(ModelRequest(f"m{i}", None), {})

    run(main())
    assert len(routes.known) <= 8


def test_unknown_names_never_push_served_names_out_of_the_route_cache():
    ask = Asked({"a": Route("a", True), **{f"typo{i}": Route(None, True, known=False) for i in range(5000)}})
    routes = ModelRoutes(ask, ttl=100.0, max_entries=8, max_unknown=4)

    async def main():
        assert await routes.adapter_for(ModelRequest("a", None), {}) == "a"
        for i in range(5000):
            assert await routes.adapter_for(ModelRequest(f"typo{i}", None), {}) is None
        assert await routes.adapter_for(ModelRequest("typo4999", None), {}) is None  # remembered too
        return await routes.adapter_for(ModelRequest("a", None), {})

    assert run(main()) == "a"
    assert ask.calls.count("a") == 1 and ask.calls.count("typo4999") == 1
    assert len(routes.unknown) <= 4


class FakeService:
    """The two things ``resolve_route`` asks of the generation service: its model router (an
    experiment sticky by a header, assigned with the real hash) and its name resolution."""

    def __init__(self):
        self.adapters = {"a", "b"}
        self.aliases = {"ft:a": "a"}

    def model_router(self, model, user, headers):
        from gateway.experiments.assignment import Arm, assign_arm
        from gateway.generation import Assignment

        if model == "exp":
            arms = [Arm("a", 1.0), Arm("b", 1.0)]
            return Assignment("exp", assign_arm("exp", "salt", headers.get("X-Session-Id") or "", arms).name)
        if model == "exp-broken":
            return Assignment("exp-broken", "gone")
        return None

    def resolve_model(self, model):
        from gateway.errors import ModelNotFoundError

        if model == "base":
            return None
        if model in self.adapters:
            return model
        if model in self.aliases:
            return self.aliases[model]
        raise ModelNotFoundError(f"The model '{model}' does not exist")


def test_resolve_route_names_the_adapter_and_says_what_may_be_cached():
    pytest.importorskip("ray")
    from gateway.experiments.assignment import Arm, assign_arm
    from gateway.fleet.replica import resolve_route

    service = FakeService()
    assert resolve_route(service, "a", None, {}) == Route("a", True)
    assert resolve_route(service, "ft:a", None, {}) == Route("a", True)
    assert resolve_route(service, "base", None, {}) == Route(None, True)
    assert resolve_route(service, "nope", None, {}) == Route(None, True, known=False)
    for subject in ("s1", "s2", "s3", "s4"):
        expected = assign_arm("exp", "salt", subject, [Arm("a", 1.0), Arm("b", 1.0)]).name
        # the ingress passes lower-cased header names; the router's lookup is case-insensitive
        assert resolve_route(service, "exp", None, {"x-session-id": subject}) == Route(expected, False)
    assert resolve_route(service, "exp-broken", None, {}) == Route(None, False, known=False)  # arm gone: not cached
