"""The fleet's pure parts, without Ray: the in-process ASGI bridge a replica serves through, the
ingress's key check and body limits, the model a body asks for, and the route cache."""

from __future__ import annotations

import asyncio
import json

import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from gateway.fleet.asgi_bridge import AppFailedError, ForwardedRequest, ResponseStart, call_app
from gateway.fleet.routing import IngressGuard, ModelRequest, ModelRoutes, Route, model_request
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
    assert guard.refusal("/admin/adapters", headers(cookie="session=x")) is None  # the replica checks the session


def test_ingress_body_limits_follow_the_area():
    s = settings(max_body_bytes=2048, max_admin_json_bytes=4096, max_upload_bytes=8192)
    guard = IngressGuard(s, ADMIN_KEY)

    def scope(method, path, content_type=b"application/json"):
        return {"method": method, "path": path, "headers": [(b"content-type", content_type)]}

    assert guard.body_limit(scope("POST", "/v1/chat/completions")) == 2048
    assert guard.body_limit(scope("PATCH", "/admin/adapters/x")) == 4096
    assert guard.body_limit(scope("POST", "/admin/adapters", b"multipart/form-data; boundary=x")) == 8192
    assert guard.body_limit(scope("GET", "/healthz")) == 64 * 1024


@pytest.mark.parametrize(("path", "body", "expected"), [
    ("/v1/chat/completions", b'{"model": "a", "user": "u"}', ModelRequest("a", "u")),
    ("/v1/completions", b'{"model": "b", "user": 5}', ModelRequest("b", None)),
    ("/v1/chat/completions", b'{"model": 3}', None),
    ("/v1/chat/completions", b'{"model": ""}', None),
    ("/v1/chat/completions", b"[1, 2]", None),
    ("/v1/chat/completions", b"{not json", None),
    ("/v1/chat/completions", b"\xff\xfe", None),
    ("/admin/adapters", b'{"model": "a"}', None),
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
    assert len(routes._cache) <= 8  # noqa: SLF001 - the bound is the point


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
    assert resolve_route(service, "nope", None, {}) == Route(None, True)
    for subject in ("s1", "s2", "s3", "s4"):
        expected = assign_arm("exp", "salt", subject, [Arm("a", 1.0), Arm("b", 1.0)]).name
        # the ingress passes lower-cased header names; the router's lookup is case-insensitive
        assert resolve_route(service, "exp", None, {"x-session-id": subject}) == Route(expected, False)
    assert resolve_route(service, "exp-broken", None, {}) == Route(None, False)  # its arm is gone: not cached
