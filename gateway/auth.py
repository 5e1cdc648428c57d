"""Who may send what, decided before any byte of a request body is read.

``AccessGuard`` is ASGI middleware in front of every route. For each HTTP request it:

1. picks the area from the path: open probes and docs (``OPEN_PATHS``) and the console's page and
   sign-in form, ``/admin``, ``/v1/files``, ``/v1/fine_tuning`` and ``/console/api`` (admin key),
   everything else (inference keys, when any are configured) — unknown paths are guarded too;
   a request without a bearer key but with a signed-in console session cookie counts as the
   admin everywhere, and needs the session's CSRF token for any state-changing method (403);
2. checks the bearer key (401 in OpenAI's shape; past ``max_failed_key_attempts`` wrong keys a
   minute from one client address, 429 for any key from there), then the key's concurrency and
   request-rate limits (429 with Retry-After); nothing of the body has been read at that point, so a client
   without a key costs the server a header parse, whatever it sends;
3. only then lets the body through, under the area's size limit (413 past it).

The matched inference key is left in ``request.state.api_key`` for the routes (token limits,
feedback binding); its request slot is released when the route's response has been sent.
"""

from __future__ import annotations

import hmac
import logging
import math

from fastapi import Request
from fastapi.security import HTTPBearer
from starlette.types import ASGIApp, Receive, Scope, Send

from adapters.sql import DatabaseUnavailableError
from gateway.console.security import console_session, csrf_ok, is_console_api, is_open_console_path
from gateway.errors import (
    APIError, AuthenticationError, PermissionDeniedError, RateLimitError, ServiceUnavailableError, error_response,
)
from gateway.keys import ApiKey
from gateway.limits import declared_too_large, is_upload, limited_receive, timed_receive
from gateway.rate_limits import Refusal
from gateway.throttle import FailureThrottle

log = logging.getLogger(__name__)
OPEN_PATHS = frozenset({"/healthz", "/readyz", "/metrics", "/openapi.json"})
ADMIN_PREFIX = "/admin"
# OpenAI-shaped routes that change what is served (uploads for training, fine-tuning jobs on the
# resident model): they take the admin key, as /admin does
ADMIN_V1_PREFIXES = ("/v1/files", "/v1/fine_tuning")
OPEN_BODY_BYTES = 64 * 1024  # an open route's body (the sign-in form) holds at most this much,
OPEN_BODY_SECONDS = 20.0  # all in within this time (the header timeout's default)

# for OpenAPI only (the guard does the checking): lets generated clients and fuzzers send keys
admin_key_scheme = HTTPBearer(scheme_name="AdminKey", auto_error=False,
                              description="The admin key (GATEWAY_ADMIN_KEY, or DATA_DIR/admin_key).")
inference_key_scheme = HTTPBearer(scheme_name="InferenceKey", auto_error=False,
                                  description="An inference key (GATEWAY_API_KEYS), when any is configured.")


def bearer_token(headers: dict[bytes, bytes]) -> str | None:
    header = headers.get(b"authorization", b"").decode("latin-1")
    scheme, _, token = header.partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


def key_matches(token: str | None, key: str) -> bool:
    return token is not None and hmac.compare_digest(token.encode(), key.encode())


def is_admin_path(path: str) -> bool:
    return any(path == prefix or path.startswith(prefix + "/") for prefix in (ADMIN_PREFIX, *ADMIN_V1_PREFIXES))


def rate_limit_error(refusal: Refusal) -> RateLimitError:
    header = refusal.retry_after_header
    return RateLimitError(refusal.message, headers={"Retry-After": header} if header else None)


WIDENED = "api_key_widened"  # request state: sequences beyond the first counted against max_concurrent


def count_sequences(request: Request, key: ApiKey, sequences: int) -> None:
    """Count a request's ``sequences`` (prompts × n) against its key's ``max_concurrent`` (the
    guard counted one when it admitted the request, and releases them all when it ends); 429 past
    the limit."""
    refusal = key.limiter.widen(sequences - 1)
    if refusal is not None:
        raise rate_limit_error(refusal)
    setattr(request.state, WIDENED, sequences - 1)


def request_key(request: Request) -> ApiKey | None:
    """The inference key the guard matched for this request (None: keys are not configured)."""
    return getattr(request.state, "api_key", None)


class AccessGuard:
    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        gateway = getattr(scope["app"].state, "gateway", None)
        path = scope["path"]
        if path in OPEN_PATHS or is_open_console_path(path):  # probes, docs, the console page: small bodies
            await self.app(scope, limited_receive(timed_receive(receive, OPEN_BODY_SECONDS), OPEN_BODY_BYTES), send)
            return
        if gateway is None:  # not started: no keys to check against yet
            await self._refuse(ServiceUnavailableError("the gateway is starting"), scope, receive, send)
            return
        headers = dict(scope["headers"])
        settings = gateway.settings
        key: ApiKey | None = None
        token = bearer_token(headers)
        # a bearer key always wins; the cookie is only looked at when none was sent
        try:
            session = await console_session(gateway.console.sessions if gateway.console else None, headers) \
                if token is None else None
        except DatabaseUnavailableError as exc:  # sessions shared in PostgreSQL, which cannot be reached
            # the caller is not known yet: the database's address and error stay in the log
            log.warning("a console session could not be checked: %s", exc)
            await self._refuse(ServiceUnavailableError(
                "console sessions cannot be checked now (the database is unreachable); retry shortly",
                code="database_unavailable", headers={"Retry-After": "5"}), scope, receive, send)
            return
        if session is not None and not csrf_ok(session, scope["method"], headers):
            await self._refuse(PermissionDeniedError(
                "missing or incorrect CSRF token: send the console session's token in X-CSRF-Token",
                code="csrf_token_invalid"), scope, receive, send)
            return
        client = scope["client"][0] if scope.get("client") else "unknown"
        guesses = gateway.key_guesses if token is not None else None  # None: no limit, or no key to count
        if guesses is not None and (wait := guesses.retry_after(client)) is not None:
            await self._refuse(too_many_failed_keys(wait), scope, receive, send)
            return
        if is_admin_path(path) or is_console_api(path):
            if session is None and not key_matches(token, gateway.admin_key):
                count_guess(guesses, client)
                await self._refuse(_auth_error(headers, "admin key"), scope, receive, send)
                return
            max_bytes = settings.max_upload_bytes if is_upload(scope) else settings.max_admin_json_bytes
        else:
            if gateway.keys.enabled and session is None:  # a console session is the admin: no key limits
                key = gateway.keys.authenticate(token)
                if key is None:
                    count_guess(guesses, client)
                    await self._refuse(_auth_error(headers, "API key"), scope, receive, send)
                    return
            max_bytes = settings.max_body_bytes
        too_large = declared_too_large(scope, max_bytes)
        if too_large is not None:
            await self._refuse(too_large, scope, receive, send)
            return
        if not is_upload(scope):  # a JSON body trickled in held its connection (and a key's slot) for good
            receive = timed_receive(receive, settings.body_timeout_seconds)
        if key is None:
            await self.app(scope, limited_receive(receive, max_bytes), send)
            return
        refusal = key.limiter.admit()
        if refusal is not None:
            gateway.metrics.key_refused(key.name, refusal.limit)
            await self._refuse(rate_limit_error(refusal), scope, receive, send)
            return
        gateway.metrics.key_admitted(key.name)
        scope.setdefault("state", {})["api_key"] = key
        try:
            await self.app(scope, limited_receive(receive, max_bytes), send)
        finally:  # with the sequences beyond the first the route counted (``widen``)
            key.limiter.release(1 + scope["state"].get(WIDENED, 0))

    @staticmethod
    async def _refuse(error: APIError, scope: Scope, receive: Receive, send: Send) -> None:
        response = error_response(error)
        if _declares_body(scope):
            # the body is never read; left open, uvicorn went on reading and dropping it (100 MiB
            # in five seconds) until its header timeout: closed after this answer instead
            response.headers["connection"] = "close"
        await response(scope, receive, send)


def _declares_body(scope: Scope) -> bool:
    headers = dict(scope["headers"])
    return b"transfer-encoding" in headers or headers.get(b"content-length", b"0").lstrip(b"0") != b""


def too_many_failed_keys(wait: float) -> RateLimitError:
    """The answer to any key from an address past ``max_failed_key_attempts`` wrong ones."""
    seconds = math.ceil(wait)
    return RateLimitError(f"too many wrong keys from this address; retry in {seconds} s", code="too_many_failed_keys",
                          headers={"Retry-After": str(seconds)})


def key_guess_throttle(max_failed_key_attempts: int) -> FailureThrottle | None:
    """The per-address throttle on wrong bearer keys (a minute's window); None for 0, no limit."""
    return FailureThrottle(max_failed_key_attempts) if max_failed_key_attempts else None


def count_guess(guesses: FailureThrottle | None, client: str) -> None:
    """A wrong bearer key from ``client``; logged once when it reaches the throttle's limit."""
    if guesses is None:
        return
    guesses.failed(client)
    if guesses.failures(client) == guesses.max_failures:
        log.warning("%d wrong keys from %s within %.0f s: its requests with a key get 429 for a while",
                    guesses.max_failures, client, guesses.window)


def _auth_error(headers: dict[bytes, bytes], what: str) -> AuthenticationError:
    if bearer_token(headers) is None:
        return AuthenticationError(f"missing {what}: send 'Authorization: Bearer <{what}>'")
    return AuthenticationError(f"incorrect {what} provided")
