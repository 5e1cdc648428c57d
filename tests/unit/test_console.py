"""The operator console without a browser: the page and its headers (CSP, nosniff, frames), the
sign-in that trades the admin key for a session cookie (flags, throttle, foreign origins), the CSRF
token every state-changing cookie call needs (admin routes and /v1 alike), sign-out, the status
and training-defaults endpoints, and the throttle on a fake clock (the session stores:
test_console_sessions.py)."""

from __future__ import annotations

import asyncio
import json
import re
import time
from html.parser import HTMLParser
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient

from gateway.app import create_app
from gateway.base_model import LoadedBase
from gateway.console.security import COOKIE_NAME, CSRF_HEADER
from gateway.throttle import FailureThrottle
from gateway.settings import Settings
from support import build_tiny_llama, build_tokenizer, make_peft_adapter
from test_api_errors import assert_error

ADMIN_KEY = "console-admin-key-0123456789"
STATIC = Path(__file__).resolve().parents[2] / "gateway" / "console" / "static"


def make_app(data_dir: Path, adapters_dir: Path, **overrides):
    tokenizer = build_tokenizer()
    base = LoadedBase(model=build_tiny_llama(len(tokenizer)), tokenizer=tokenizer, name="tiny",
                      device=torch.device("cpu"), dtype=torch.float32, context_window=256, load_seconds=0.0)
    settings = Settings(quantization="none", device="cpu", adapters_dir=adapters_dir, data_dir=data_dir,
                        admin_key=ADMIN_KEY, max_tokens_limit=16, default_max_tokens=2, **overrides)
    return create_app(settings, base=base)


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    adapters = tmp_path_factory.mktemp("console-adapters")
    make_peft_adapter(build_tiny_llama(len(build_tokenizer())), "lora", adapters / "lora-a")
    return make_app(tmp_path_factory.mktemp("console-data"), adapters, console_sign_in_failures=3)


@pytest.fixture(scope="module")
def started(app):
    with TestClient(app) as c:  # runs the lifespan once for the module
        yield app


def client(app, base_url: str = "http://testserver") -> TestClient:
    return TestClient(app, base_url=base_url, follow_redirects=False)


def sign_in(c: TestClient, key: str = ADMIN_KEY, **headers) -> "httpx.Response":  # noqa: F821
    return c.post("/console/sign-in", data={"key": key}, headers=headers)


def signed_in(app) -> tuple[TestClient, str]:
    c = client(app)
    assert sign_in(c).status_code == 303
    token = c.get("/console/api/session").json()["csrf_token"]
    return c, token


# ---- the page -----------------------------------------------------------------------------------
class InlineFinder(HTMLParser):
    def __init__(self):
        super().__init__()
        self.inline: list[str] = []
        self.scripts: list[str] = []

    def handle_starttag(self, tag, attrs):
        names = {name for name, _ in attrs}
        if tag == "style" or "style" in names or any(n.startswith("on") for n in names):
            self.inline.append(tag)
        if tag == "script":
            if "src" not in names:
                self.inline.append("script")
            self.scripts.append(dict(attrs)["src"] if "src" in names else "")


def test_page_has_strict_headers_and_no_inline_code(started):
    response = client(started).get("/console/")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/html")
    csp = response.headers["content-security-policy"]
    directives = dict(d.strip().split(" ", 1) for d in csp.split(";"))
    assert directives["default-src"] == "'self'"
    assert directives["script-src"] == "'self'" and directives["style-src"] == "'self'"
    assert directives["frame-ancestors"] == "'none'"
    assert "unsafe-inline" not in csp and "unsafe-eval" not in csp
    assert response.headers["x-content-type-options"] == "nosniff"
    assert response.headers["cache-control"] == "no-store"
    finder = InlineFinder()
    finder.feed(response.text)
    assert finder.inline == [] and finder.scripts == ["/console/static/js/main.js"]
    assert client(started).get("/console").status_code == 200


def test_static_modules_are_served_as_javascript_with_nosniff(started):
    c = client(started)
    for path in sorted((STATIC / "js").glob("*.js")):
        response = c.get(f"/console/static/js/{path.name}")
        assert response.status_code == 200, path.name
        assert response.headers["content-type"].split(";")[0] in ("text/javascript", "application/javascript")
        assert response.headers["x-content-type-options"] == "nosniff"
        assert "frame-ancestors 'none'" in response.headers["content-security-policy"]
        assert response.headers["cache-control"] == "no-cache"
    assert c.get("/console/static/console.css").headers["content-type"].startswith("text/css")
    assert c.get("/console/static/../../auth.py").status_code == 404


def test_scripts_never_parse_data_as_html():
    """Everything shown goes through textContent / DOM nodes: no HTML sinks in the page's code."""
    sinks = re.compile(r"innerHTML|outerHTML|insertAdjacentHTML|document\.write|\beval\(|new Function|"
                       r"localStorage|sessionStorage")
    for path in (STATIC / "js").glob("*.js"):
        assert not sinks.search(path.read_text()), path.name


def test_every_static_file_is_package_data():
    """A wheel (or a non-editable install) carries exactly what pyproject's package-data names:
    every file the page needs must match one of its patterns."""
    tomllib = pytest.importorskip("tomllib", reason="Python 3.11+ reads pyproject.toml")
    patterns = tomllib.loads((STATIC.parents[2] / "pyproject.toml").read_text())["tool"]["setuptools"][
        "package-data"]["gateway.console"]
    packaged = {p for pattern in patterns for p in STATIC.parent.glob(pattern)}
    shipped = {p for p in STATIC.rglob("*") if p.is_file() and "__pycache__" not in p.parts}
    assert shipped and shipped <= packaged, sorted(str(p) for p in shipped - packaged)


# ---- sign-in ------------------------------------------------------------------------------------
def test_console_api_needs_a_session(started):
    c = client(started)
    for path in ("/console/api/session", "/console/api/status", "/console/api/training-defaults"):
        response = c.get(path)
        assert_error(response, 401, type_="authentication_error")
        assert response.headers["x-content-type-options"] == "nosniff"
    assert_error(c.post("/console/api/sign-out"), 401, type_="authentication_error")
    c.cookies.set(COOKIE_NAME, "forged-session-id")
    assert_error(c.get("/console/api/status"), 401, type_="authentication_error")
    assert_error(c.get("/admin/adapters"), 401, type_="authentication_error")


def test_sign_in_sets_a_strict_http_only_expiring_cookie(started):
    response = sign_in(client(started))
    assert response.status_code == 303 and response.headers["location"] == "/console/#/overview"
    cookie = response.headers["set-cookie"]
    name, value = cookie.split(";")[0].split("=", 1)
    assert name == COOKIE_NAME and len(value) >= 43  # 32 random bytes, base64url
    flags = {part.strip().split("=")[0].lower(): part.strip() for part in cookie.split(";")[1:]}
    assert {"httponly", "samesite", "max-age", "path"} <= set(flags)
    assert flags["samesite"] == "SameSite=Strict" and flags["max-age"] == "Max-Age=28800"
    assert flags["path"] == "Path=/"
    assert "secure" not in flags  # plain http: a Secure cookie would never come back
    assert ADMIN_KEY not in response.text and ADMIN_KEY not in cookie


def test_sign_in_over_https_marks_the_cookie_secure(started):
    response = sign_in(client(started, "https://testserver"), origin="https://testserver")
    assert response.status_code == 303 and response.headers["location"] == "/console/#/overview"
    assert "Secure" in [p.strip() for p in response.headers["set-cookie"].split(";")]


def test_wrong_key_and_foreign_origin_get_no_session(started):
    response = sign_in(client(started), "not-the-admin-key-000")
    assert response.headers["location"] == "/console/?signin=failed" and "set-cookie" not in response.headers
    response = client(started).post("/console/sign-in", data={"key": ADMIN_KEY},
                                    headers={"origin": "https://evil.example"})
    assert response.headers["location"] == "/console/?signin=foreign-origin"
    assert "set-cookie" not in response.headers


def test_sign_in_before_the_gateway_started_is_a_503(tmp_path):
    (tmp_path / "none").mkdir()
    c = TestClient(make_app(tmp_path / "data", tmp_path / "none"), follow_redirects=False)  # no lifespan
    assert c.get("/console/").status_code == 200
    assert_error(sign_in(c), 503, type_="server_error")


def test_failed_sign_ins_are_throttled_per_address(tmp_path):
    (tmp_path / "none").mkdir()
    app = make_app(tmp_path / "data", tmp_path / "none", console_sign_in_failures=2)
    with TestClient(app, follow_redirects=False) as c:
        for _ in range(2):
            assert sign_in(c, "wrong-key-0000000000").headers["location"] == "/console/?signin=failed"
        response = sign_in(c)  # the right key, but too late
        assert response.headers["location"].startswith("/console/?signin=throttled&retry=")
        assert "set-cookie" not in response.headers


async def _sign_in_held(app, key: str, body_sent: asyncio.Event) -> str:
    """One sign-in straight through the ASGI app whose body comes once ``body_sent`` is set (as
    over a connection that sent its headers and holds the rest); its redirect's location."""
    body = f"key={key}".encode()
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": "/console/sign-in", "raw_path": b"/console/sign-in", "root_path": "", "query_string": b"",
             "server": ("testserver", 80), "client": ("203.0.113.9", 1234),
             "headers": [(b"host", b"testserver"), (b"content-type", b"application/x-www-form-urlencoded"),
                         (b"content-length", str(len(body)).encode())]}
    given = False

    async def receive():
        nonlocal given
        if given:
            await asyncio.Event().wait()  # no disconnect: the response ends the call
        await body_sent.wait()
        given = True
        return {"type": "http.request", "body": body, "more_body": False}

    location = []

    async def send(message):
        if message["type"] == "http.response.start":
            location.extend(v.decode() for k, v in message["headers"] if k == b"location")

    await app(scope, receive, send)
    return location[0]


def test_sign_ins_sent_at_once_are_throttled_as_one_by_one(tmp_path):
    """30 wrong keys and the right one, whose headers all arrive before any body: the throttle
    judges at most its limit of them; the rest, the right key included, are throttled (all 31
    were checked against the key, as the throttle was read before the bodies came)."""
    (tmp_path / "none").mkdir()
    app = make_app(tmp_path / "data", tmp_path / "none", console_sign_in_failures=3)
    with TestClient(app) as c:
        async def at_once():
            body_sent = asyncio.Event()
            calls = [asyncio.ensure_future(_sign_in_held(app, f"wrong-key-{i:020d}", body_sent)) for i in range(30)]
            calls.append(asyncio.ensure_future(_sign_in_held(app, ADMIN_KEY, body_sent)))
            await asyncio.sleep(0.2)  # every call is past its headers, waiting for its body
            body_sent.set()
            return await asyncio.gather(*calls)

        locations = c.portal.call(at_once)
    assert sum("signin=failed" in loc for loc in locations) == 3
    assert sum("signin=throttled" in loc for loc in locations) == 28
    assert "signin=throttled" in locations[-1]


def test_a_sign_in_body_that_never_arrives_is_a_408(tmp_path, monkeypatch):
    """An open route's body is read against a clock: a sign-in form sent a byte every few minutes
    held its connection, and its share of the connection limits, for good."""
    from gateway import auth

    monkeypatch.setattr(auth, "OPEN_BODY_SECONDS", 0.3)
    (tmp_path / "none").mkdir()
    app = make_app(tmp_path / "data", tmp_path / "none")
    never = asyncio.Event()

    async def held() -> tuple[int, dict, bytes]:
        scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
                 "scheme": "http", "path": "/console/sign-in", "raw_path": b"/console/sign-in", "root_path": "",
                 "query_string": b"", "server": ("testserver", 80), "client": ("203.0.113.7", 1234),
                 "headers": [(b"host", b"testserver"), (b"content-type", b"application/x-www-form-urlencoded"),
                             (b"content-length", b"40")]}
        sent: list[dict] = []

        async def receive():
            await never.wait()

        async def send(message):
            sent.append(message)

        await asyncio.wait_for(app(scope, receive, send), 10)
        start = next(m for m in sent if m["type"] == "http.response.start")
        body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
        return start["status"], {k.decode(): v.decode() for k, v in start["headers"]}, body

    with TestClient(app) as c:
        status, headers, body = c.portal.call(held)
    assert status == 408 and headers.get("connection") == "close"
    assert json.loads(body)["error"]["code"] == "body_timeout"


def test_a_sign_in_body_past_the_open_limit_is_a_413(started):
    c = client(started)
    assert_error(c.post("/console/sign-in", data={"key": "k" * (70 << 10)}), 413)


# ---- the session and CSRF -----------------------------------------------------------------------
@pytest.mark.parametrize("other", ['prefs={"theme":"dark"}', 'x="unterminated', "ids=[1,2]"])
def test_another_apps_odd_cookie_does_not_hide_the_session(started, other):
    """Cookies ignore ports: another app on this host may set one the standard library's parser
    gives up on; sent before the console's, it made every console call a 401."""
    c, _ = signed_in(started)
    session_id = c.cookies[COOKIE_NAME]
    header = {"cookie": f"{other}; {COOKIE_NAME}={session_id}"}
    c.cookies.clear()
    assert c.get("/console/api/session", headers=header).json()["signed_in"] is True
    assert c.get("/admin/adapters", headers=header).status_code == 200


def test_session_reaches_admin_and_console_routes(started):
    c, token = signed_in(started)
    session = c.get("/console/api/session").json()
    assert session["signed_in"] is True and session["csrf_token"] == token and len(token) >= 43
    ids = [a["id"] for a in c.get("/admin/adapters").json()["data"]]
    assert ids == ["lora-a"]
    assert c.post("/admin/adapters/lora-a/pin", headers={CSRF_HEADER: token}).json()["pinned"] is True
    assert c.post("/admin/adapters/lora-a/unpin", headers={CSRF_HEADER: token}).json()["pinned"] is False
    assert [m["id"] for m in c.get("/v1/models").json()["data"]] == ["tiny", "lora-a"]


def test_state_changing_calls_without_the_csrf_token_are_refused(started):
    c, token = signed_in(started)
    other, other_token = signed_in(started)
    chat = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
    for headers in ({}, {CSRF_HEADER: ""}, {CSRF_HEADER: token[:-1] + ("A" if token[-1] != "A" else "B")},
                    {CSRF_HEADER: other_token}):
        assert_error(c.post("/admin/adapters/lora-a/pin", headers=headers), 403, type_="permission_error",
                     code="csrf_token_invalid")
        assert_error(c.delete("/admin/adapters/lora-a", headers=headers), 403, type_="permission_error")
        assert_error(c.post("/admin/experiments", json={}, headers=headers), 403, type_="permission_error")
        assert_error(c.post("/v1/chat/completions", json=chat, headers=headers), 403, type_="permission_error")
        assert_error(c.post("/console/api/sign-out", headers=headers), 403, type_="permission_error")
    assert c.get("/admin/adapters/lora-a").json()["pinned"] is False  # nothing changed
    response = c.post("/v1/chat/completions", json=chat, headers={CSRF_HEADER: token})
    assert response.status_code == 200, response.text


def test_a_bearer_key_is_judged_alone(started):
    c, token = signed_in(started)
    # a wrong bearer key is not rescued by a valid cookie
    assert_error(c.get("/admin/adapters", headers={"Authorization": "Bearer wrong-key-00000000"}), 401,
                 type_="authentication_error")
    # the admin key needs no CSRF token (no cookie involved) and has no session
    bearer = client(started)
    headers = {"Authorization": f"Bearer {ADMIN_KEY}"}
    assert bearer.post("/admin/adapters/lora-a/unpin", headers=headers).status_code == 200
    assert bearer.get("/console/api/session", headers=headers).json()["signed_in"] is False


def test_sign_out_ends_the_session(started):
    c, token = signed_in(started)
    cookie = c.cookies.get(COOKIE_NAME)
    response = c.post("/console/api/sign-out", headers={CSRF_HEADER: token})
    assert response.status_code == 200 and response.json()["signed_in"] is False
    assert "Max-Age=0" in response.headers["set-cookie"]
    replay = client(started)
    replay.cookies.set(COOKIE_NAME, cookie)  # the old cookie, kept by an attacker
    assert_error(replay.get("/admin/adapters"), 401, type_="authentication_error")


def test_status_and_training_defaults(started):
    c, _ = signed_in(started)
    status = c.get("/console/api/status").json()
    assert status["base_model"]["name"] == "tiny" and status["base_model"]["device"] == "cpu"
    assert status["engine"]["queue_depth"] == 0 and status["engine"]["tokens_per_second"] >= 0
    assert status["tiers"]["device"]["capacity"] == 16 and status["adapters"] == 1
    assert status["memory"]["model_bytes"] > 0
    fields = {f["name"]: f for f in c.get("/console/api/training-defaults").json()["data"]}
    assert fields["kind"]["default"] == "lora" and fields["r"]["default"] == 8
    assert fields["register"]["default"] is True and fields["num_virtual_tokens"]["default"] == 20
    json.dumps(fields)  # JSON-able throughout


def test_traffic_counts_requests_and_latency_by_adapter(started):
    c, token = signed_in(started)
    before = c.get("/console/api/traffic").json()["data"].get("lora-a", {"count": 0, "sum": 0})
    chat = {"model": "lora-a", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    for _ in range(2):
        assert c.post("/v1/chat/completions", json=chat, headers={CSRF_HEADER: token}).status_code == 200
    # a request is counted when its record is closed, which may be just after its response
    deadline = time.monotonic() + 30
    while (after := c.get("/console/api/traffic").json()["data"]["lora-a"])["count"] < before["count"] + 2:
        assert time.monotonic() < deadline, after
        time.sleep(0.05)
    assert after["count"] == before["count"] + 2 and after["sum"] > before["sum"]


# ---- the pure parts -----------------------------------------------------------------------------
class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_throttle_window_slides():
    clock = Clock()
    throttle = FailureThrottle(2, window_seconds=60, clock=clock)
    throttle.failed("a")
    clock.now += 30
    throttle.failed("a")
    assert throttle.retry_after("a") == pytest.approx(30.0) and throttle.retry_after("b") is None
    clock.now += 30
    assert throttle.retry_after("a") is None  # the first failure aged out
    throttle.failed("a")
    throttle.succeeded("a")
    assert throttle.retry_after("a") is None
