"""HTTP routes of the console: the page and its static files, sign-in and sign-out, the session's
CSRF token, and two read-only helpers the page needs (live status, training defaults).

The page and sign-in are open (gateway/auth.py ``is_open_console_path``); ``/console/api/*`` is
admin-only like ``/admin`` (a session cookie or the admin key), and the guard checks the CSRF token
of every state-changing call before it gets here."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

from fastapi import APIRouter, FastAPI, Request, Security
from fastapi.responses import FileResponse, JSONResponse, RedirectResponse
from fastapi.staticfiles import StaticFiles
from pydantic_core import PydanticUndefined

from adapters.sql import PostgresDatabase
from adapters.training.config import TrainingConfig
from gateway.auth import admin_key_scheme, key_matches
from gateway.console.security import (
    CONSOLE_PREFIX, cleared_cookie, console_session, cookie_value, same_origin, session_cookie,
)
from gateway.console.sessions import ConsoleSessions, SessionStore
from gateway.console.shared_sessions import SharedConsoleSessions
from gateway.throttle import FailureThrottle
from gateway.console.status import TokenRate, gateway_status, per_adapter_latency
from gateway.errors import BadRequestError, BodyTimeoutError, PayloadTooLargeError, ServiceUnavailableError
from gateway.settings import Settings

log = logging.getLogger(__name__)
STATIC_DIR = Path(__file__).parent / "static"
MAX_KEY_CHARS = 1024


@dataclass
class ConsoleState:
    """What the console keeps per gateway: sessions, the sign-in throttle, the token-rate samples."""

    sessions: SessionStore
    throttle: FailureThrottle
    rate: TokenRate = field(default_factory=TokenRate)


def attach_console(settings: Settings, shared: PostgresDatabase | None = None) -> ConsoleState:
    """The console's state; its sessions in ``shared`` (the replicas' database, a connection of the
    console's own) when given, else in this process's memory."""
    lifetime = settings.console_session_seconds
    sessions = SharedConsoleSessions(shared, lifetime) if shared is not None else ConsoleSessions(lifetime)
    return ConsoleState(sessions, FailureThrottle(settings.console_sign_in_failures, window_seconds=60.0))


page = APIRouter(prefix=CONSOLE_PREFIX, include_in_schema=False)
# admin-only, checked by AccessGuard (a session cookie with its CSRF token, or the admin key); the
# page's own helpers, documented in the README rather than in the OpenAPI document
api = APIRouter(prefix=CONSOLE_PREFIX + "/api", dependencies=[Security(admin_key_scheme)], include_in_schema=False)


def _secure(request: Request) -> bool:
    return request.url.scheme == "https"


def _back_to_page(**query: str) -> RedirectResponse:
    # 303: the browser follows with a GET, so a reload never re-posts the key
    return RedirectResponse(f"{CONSOLE_PREFIX}/?{urlencode(query)}" if query else f"{CONSOLE_PREFIX}/#/overview",
                            status_code=303)


@page.get("")
@page.get("/")
async def console_page() -> FileResponse:
    return FileResponse(STATIC_DIR / "index.html", media_type="text/html")


@page.post("/sign-in")
async def sign_in(request: Request) -> RedirectResponse:
    """The sign-in form posts the admin key here; the answer sets the session cookie and sends the
    browser back to the page, which never sees the key again."""
    gateway = getattr(request.app.state, "gateway", None)
    if gateway is None:  # the page is open while the model loads; sign-in waits for the gateway
        raise ServiceUnavailableError("the gateway is starting")
    console: ConsoleState = gateway.console
    client = request.client.host if request.client else "unknown"
    if not same_origin(request.scope, {k.lower(): v for k, v in request.headers.raw}):
        log.warning("console sign-in from a foreign origin refused (%s)", client)
        return _back_to_page(signin="foreign-origin")
    if (throttled := _throttled(console, client)) is not None:
        return throttled
    try:
        form = await request.form(max_files=0, max_fields=2)
    except (PayloadTooLargeError, BodyTimeoutError):  # past the open paths' size or time limit: 413, 408
        raise
    except Exception:  # noqa: BLE001 - starlette raises plain HTTP/multipart errors
        raise BadRequestError("send the sign-in form (application/x-www-form-urlencoded, field 'key')") from None
    # again, now that the body is read: many sign-ins sent at once all passed the first check
    # before any failure was counted (one guess per connection, not five a minute). From here to
    # the failure's count nothing awaits, so each guess sees those counted before it.
    if (throttled := _throttled(console, client)) is not None:
        return throttled
    key = form.get("key")
    if not isinstance(key, str) or len(key) > MAX_KEY_CHARS or not key_matches(key, gateway.admin_key):
        console.throttle.failed(client)
        log.warning("console sign-in with a wrong key from %s", client)
        return _back_to_page(signin="failed")
    console.throttle.succeeded(client)
    session_id, session = await console.sessions.create()
    log.info("console session started for %s", client)
    response = _back_to_page()
    response.headers["set-cookie"] = session_cookie(session_id, int(console.sessions.lifetime), _secure(request))
    return response


def _throttled(console: ConsoleState, client: str) -> RedirectResponse | None:
    wait = console.throttle.retry_after(client)
    if wait is None:
        return None
    log.warning("console sign-in throttled for %s", client)
    return _back_to_page(signin="throttled", retry=str(math.ceil(wait)))


@api.get("/session")
async def session_info(request: Request) -> dict[str, Any]:
    """The signed-in session: its CSRF token (send it as X-CSRF-Token on every call that is not a
    GET) and when it expires. With the admin key instead of a cookie there is no session."""
    console: ConsoleState = request.app.state.gateway.console
    session = await console_session(console.sessions, {k.lower(): v for k, v in request.headers.raw})
    if session is None:
        return {"object": "console.session", "signed_in": False, "csrf_token": None, "expires": None}
    return {"object": "console.session", "signed_in": True, "csrf_token": session.csrf_token,
            "expires": int(session.expires)}


@api.post("/sign-out")
async def sign_out(request: Request) -> JSONResponse:
    """End the session (the guard checked its CSRF token) and clear the cookie."""
    console: ConsoleState = request.app.state.gateway.console
    await console.sessions.end(cookie_value({k.lower(): v for k, v in request.headers.raw}))
    response = JSONResponse({"object": "console.session", "signed_in": False})
    response.headers["set-cookie"] = cleared_cookie(_secure(request))
    return response


@api.get("/status")
async def status(request: Request) -> dict[str, Any]:
    """Everything the Overview page shows, in one JSON document."""
    gateway = request.app.state.gateway
    return gateway_status(gateway, gateway.console.rate)


@api.get("/traffic")
async def traffic(request: Request) -> dict[str, Any]:
    """Requests finished and their summed duration (seconds), by adapter (and the base model's
    name), since the start: the Adapters page draws traffic and latency sparklines from them."""
    return {"object": "console.traffic", "data": per_adapter_latency(request.app.state.gateway.metrics.latency)}


def _default(info: Any) -> Any:
    value = info.get_default(call_default_factory=True) if info.default is PydanticUndefined else info.default
    return value.value if hasattr(value, "value") else value


@api.get("/training-defaults")
async def training_defaults() -> dict[str, Any]:
    """Every training setting with its default and description (the Training page's form)."""
    fields = [{"name": info.alias or name, "default": _default(info), "description": info.description or ""}
              for name, info in TrainingConfig.model_fields.items()]
    return {"object": "list", "data": fields}


def install_console(app: FastAPI) -> None:
    app.include_router(page)
    app.include_router(api)
    app.mount(CONSOLE_PREFIX + "/static", StaticFiles(directory=STATIC_DIR), name="console-static")
