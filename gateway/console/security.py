"""The console's rules at the HTTP edge: which console paths are open, the session cookie, the
CSRF check, and the headers every console response carries.

The access guard (gateway/auth.py) calls ``console_session`` to accept a signed-in browser as the
admin on /admin, /v1 and /console/api, and ``csrf_refusal`` before any state-changing method goes
through: a cookie alone never changes anything. The CSRF token is the session's own (synchronizer
pattern), handed to the page by GET /console/api/session and sent back in ``X-CSRF-Token``."""

from __future__ import annotations

from starlette.requests import cookie_parser
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gateway.console.sessions import ConsoleSession, SessionStore

COOKIE_NAME = "gateway_console"
CSRF_HEADER = "X-CSRF-Token"
CONSOLE_PREFIX = "/console"
API_PREFIX = "/console/api"
SIGN_IN_PATH = "/console/sign-in"
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})

# No inline script or style anywhere (the page is static files only); frames, plugins, other
# origins and <base> rewriting are all off
CONTENT_SECURITY_POLICY = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
                           "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; "
                           "frame-ancestors 'none'")
SECURITY_HEADERS = (
    (b"content-security-policy", CONTENT_SECURITY_POLICY.encode()),
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    # same-origin, not no-referrer: under no-referrer Chrome sends "Origin: null" with the sign-in form
    (b"referrer-policy", b"same-origin"),
    (b"cross-origin-opener-policy", b"same-origin"),
)


def is_console_path(path: str) -> bool:
    return path == CONSOLE_PREFIX or path.startswith(CONSOLE_PREFIX + "/")


def is_console_api(path: str) -> bool:
    return path == API_PREFIX or path.startswith(API_PREFIX + "/")


def is_open_console_path(path: str) -> bool:
    """The page, its static files and the sign-in form: nothing secret, reachable signed out."""
    return is_console_path(path) and not is_console_api(path)


def cookie_value(headers: dict[bytes, bytes]) -> str | None:
    """The console cookie's value. Read as browsers send cookies, leniently: the standard
    library's SimpleCookie stops at the first cookie it cannot parse, so another app on this host
    (cookies ignore ports) that set ``prefs={"theme":"dark"}`` hid the session: 401 on every call."""
    raw = headers.get(b"cookie", b"").decode("latin-1")
    if not raw:
        return None
    return cookie_parser(raw).get(COOKIE_NAME) or None


async def console_session(sessions: SessionStore | None, headers: dict[bytes, bytes]) -> ConsoleSession | None:
    """The signed-in session the cookie names; None without one. Raises ``DatabaseUnavailableError``
    where the sessions are shared and the database cannot be reached."""
    return None if sessions is None else await sessions.get(cookie_value(headers))


def csrf_ok(session: ConsoleSession, method: str, headers: dict[bytes, bytes]) -> bool:
    """Safe methods need no token; every other method needs the session's token in the header."""
    if method.upper() in SAFE_METHODS:
        return True
    token = headers.get(CSRF_HEADER.lower().encode())
    return session.csrf_matches(token.decode("latin-1") if token is not None else None)


def same_origin(scope: Scope, headers: dict[bytes, bytes]) -> bool:
    """False when the browser says the request came from another origin (checked at sign-in:
    SameSite does not apply to a form that creates the cookie)."""
    origin = headers.get(b"origin")
    if origin is None:
        return True  # not a cross-origin browser request (browsers send Origin on cross-site POSTs)
    host = headers.get(b"host", b"").decode("latin-1")
    return origin.decode("latin-1") == f"{scope.get('scheme', 'http')}://{host}"


def session_cookie(session_id: str, max_age: int, secure: bool) -> str:
    # Path=/ : the page's calls to /admin and /v1 must carry it; SameSite=Strict: never sent on a
    # request another site starts; HttpOnly: page scripts cannot read it
    parts = [f"{COOKIE_NAME}={session_id}", "Path=/", f"Max-Age={max_age}", "HttpOnly", "SameSite=Strict"]
    if secure:
        parts.append("Secure")
    return "; ".join(parts)


def cleared_cookie(secure: bool) -> str:
    parts = [f"{COOKIE_NAME}=", "Path=/", "Max-Age=0", "HttpOnly", "SameSite=Strict"]
    if secure:
        parts.append("Secure")
    return "; ".join(parts)


class ConsoleHeaders:
    """ASGI middleware: every response under /console gets the security headers (refusals by the
    access guard included), and API answers are never cached."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not is_console_path(scope["path"]):
            await self.app(scope, receive, send)
            return
        extra = list(SECURITY_HEADERS)
        if is_console_api(scope["path"]) or scope["path"] in (CONSOLE_PREFIX, CONSOLE_PREFIX + "/"):
            extra.append((b"cache-control", b"no-store"))
        else:  # static files: revalidated each time (a cheap 304), so an upgrade is never half-cached
            extra.append((b"cache-control", b"no-cache"))

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                names = {name.lower() for name, _ in message.get("headers", [])}
                message["headers"] = [*message.get("headers", []), *(h for h in extra if h[0] not in names)]
            await send(message)

        await self.app(scope, receive, send_with_headers)
