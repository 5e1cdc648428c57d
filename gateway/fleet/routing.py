"""What the ingress decides before a replica sees a request, without Ray: who may send it (keys,
checked before any body byte is read, as ``gateway.auth`` does in one process, wrong keys throttled
per client address), how much of its body it may send and when a console session must be confirmed
first, which client address to believe, and which adapter id its inference body asks for (the
affinity key)."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from starlette.requests import Request

from gateway.auth import (
    OPEN_BODY_BYTES, OPEN_BODY_SECONDS, OPEN_PATHS, bearer_token, count_guess, is_admin_path, key_guess_throttle,
    key_matches, too_many_failed_keys,
)
from gateway.console.security import cookie_value, is_console_api, is_open_console_path
from gateway.errors import APIError, AuthenticationError, BodyTimeoutError, PayloadTooLargeError
from gateway.keys import KeyRing
from gateway.limits import declared_too_large, is_upload
from gateway.protocol import MAX_MODEL_CHARS
from gateway.settings import Settings

log = logging.getLogger(__name__)
# the routes whose JSON body names a model served by an adapter
INFERENCE_PATHS = frozenset({"/v1/chat/completions", "/v1/completions"})
# what the ingress reads of a body whose only credential is a console session cookie before a
# replica has confirmed the session: what anyone may send to an open path
UNCONFIRMED_SESSION_BYTES = OPEN_BODY_BYTES


class IngressGuard:
    """The keys check of ``gateway.auth.AccessGuard``, done at the ingress so that nothing of a
    body is read (or parsed for routing) for a client without a key: the one ingress is the only
    place that sees every wrong key, so it counts them (``max_failed_key_attempts``) and answers
    429 ``too_many_failed_keys`` as one process does. The replica checks again and applies the
    per-key limits (they count per replica).

    A console session cookie is not judged here (sessions live in the replicas): ``refusal``
    answers as if it were absent, and ``may_hold_session`` says whether a replica could still
    accept the request (see ``SessionGate``)."""

    def __init__(self, settings: Settings, admin_key: str):
        self.settings = settings
        self.admin_key = admin_key
        self.keys = KeyRing(settings.api_keys)
        self.key_guesses = key_guess_throttle(settings.max_failed_key_attempts)  # as one process's guard

    def refusal(self, path: str, headers: dict[bytes, bytes], client: str = "unknown") -> APIError | None:
        """The error for a request without a console session (None: let it through); a wrong
        bearer key counts against ``client``."""
        if path in OPEN_PATHS or is_open_console_path(path):
            return None
        token = bearer_token(headers)
        guesses = self.key_guesses if token is not None else None  # None: no limit, or no key to count
        if guesses is not None and (wait := guesses.retry_after(client)) is not None:
            return too_many_failed_keys(wait)
        if is_admin_path(path) or is_console_api(path):
            if key_matches(token, self.admin_key):
                return None
            count_guess(guesses, client)
            return _auth_error(token, "admin key")
        if self.keys.enabled and self.keys.authenticate(token) is None:
            count_guess(guesses, client)
            return _auth_error(token, "API key")
        return None

    @staticmethod
    def may_hold_session(headers: dict[bytes, bytes]) -> bool:
        """No bearer key but a console session cookie: a replica may know the session (a bearer
        key is judged alone, as in one process)."""
        return bearer_token(headers) is None and cookie_value(headers) is not None

    @staticmethod
    def unvouched_body_seconds(path: str, gated: bool) -> float | None:
        """How long a body no key vouches for may take to arrive: an open path's, or one whose
        only credential is a console cookie (``gated``). None: a key vouches for the sender."""
        return OPEN_BODY_SECONDS if gated or path in OPEN_PATHS or is_open_console_path(path) else None

    def body_limit(self, scope: dict) -> int:
        path = scope["path"]
        s = self.settings
        if path in OPEN_PATHS or is_open_console_path(path):
            return OPEN_BODY_BYTES
        if is_admin_path(path) or is_console_api(path):
            return s.max_upload_bytes if is_upload(scope) else s.max_admin_json_bytes
        return s.max_body_bytes


def _auth_error(token: str | None, what: str) -> AuthenticationError:
    if token is None:
        return AuthenticationError(f"missing {what}: send 'Authorization: Bearer <{what}>'")
    return AuthenticationError(f"incorrect {what} provided")


@dataclass(frozen=True)
class SessionGate:
    """A request the keys refuse but whose console session cookie a replica may accept. Its first
    ``free_bytes`` are read as any open path's are, and the replica that gets it decides (401, 403
    for a missing CSRF token, or the admin's request) exactly as in one process. A larger body
    (declared or counted) waits until ``confirm`` says some replica holds the session and takes
    its CSRF token, else ``refusal`` answers: an unauthenticated sender never makes the ingress
    hold more than ``free_bytes``, while the console's adapter uploads still go through."""

    free_bytes: int
    confirm: Callable[[], Awaitable[bool]]
    refusal: APIError

    async def open(self) -> None:
        if not await self.confirm():
            raise self.refusal


async def read_body(request: Request, limit: int, gate: SessionGate | None = None,
                    unvouched_seconds: float | None = None) -> bytes:
    """The whole body, refused with 413 as soon as it passes ``limit`` (counted as it streams in);
    past ``gate.free_bytes`` the gate must open first. ``unvouched_seconds``: a body no key vouches
    for (an open path's, or one waiting on its session gate) must be in within that time (408, as
    one process answers): a sign-in form sent a byte a minute would otherwise hold the ingress's
    connection for good. A gate that opens lifts the deadline (the session vouches for the rest)."""
    too_large = declared_too_large(request.scope, limit)
    if too_large is not None:
        raise too_large
    deadline = asyncio.timeout(unvouched_seconds)
    try:
        async with deadline:
            if gate is not None and declared_too_large(request.scope, gate.free_bytes) is not None:
                deadline.reschedule(None)
                await gate.open()
                gate = None
            chunks, size = [], 0
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise PayloadTooLargeError.over(limit)
                if gate is not None and size > gate.free_bytes:
                    deadline.reschedule(None)
                    await gate.open()
                    gate = None
                chunks.append(chunk)
    except TimeoutError:
        if not deadline.expired():
            raise
        raise BodyTimeoutError(f"the request body took longer than {unvouched_seconds:g} s to arrive") from None
    return b"".join(chunks)


def believed_client(scope: dict, trusted_proxies: list[str]) -> tuple[str, int] | None:
    """The client address the replicas may believe. Serve's HTTP proxy runs uvicorn with proxy
    headers on, trusting 127.0.0.1 and ::1 unless ``FORWARDED_ALLOW_IPS`` says otherwise (the fleet
    sets it where it starts Serve: ``gateway.fleet.app``): a proxy that took the address from
    ``X-Forwarded-For`` although ``trusted_proxies`` is empty left no trace of the real peer, so
    the address becomes unknown (None) rather than whatever a local client wrote in the header.
    With ``trusted_proxies`` set the proxy's own reading stands (it must trust the same ones)."""
    client = scope.get("client")
    if trusted_proxies or not client:
        return client
    forwarded = {_forwarded_host(entry) for name, value in scope["headers"] if name == b"x-forwarded-for"
                 for entry in value.decode("latin-1").split(",")}
    return None if client[0] in forwarded else client


def _forwarded_host(entry: str) -> str:
    """The host of one ``X-Forwarded-For`` entry, as uvicorn reads it (``[v6]:port``, ``v4:port``)."""
    entry = entry.strip()
    if entry.startswith("[") and "]" in entry:
        return entry[1:entry.index("]")]
    return entry.rsplit(":", 1)[0] if entry.count(":") == 1 else entry


@dataclass(frozen=True)
class ModelRequest:
    """The routing-relevant part of an inference body."""

    model: str
    user: str | None


def model_request(path: str, body: bytes) -> ModelRequest | None:
    """``model`` (and ``user``, for experiments sticky by user) of an inference body; None when
    the path takes no model or the body is not a JSON object with a string model (the replica then
    answers the request, e.g. with its 400)."""
    if path not in INFERENCE_PATHS:
        return None
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError, RecursionError):  # nested past the parser's depth: not ours to judge
        return None
    if not isinstance(data, dict) or not isinstance(data.get("model"), str) or not data["model"]:
        return None
    if len(data["model"]) > MAX_MODEL_CHARS:  # the replica's 400; remembered, 256 such names of 1 MiB held 256 MiB
        return None
    user = data.get("user")
    return ModelRequest(data["model"], user if isinstance(user, str) else None)


@dataclass(frozen=True)
class Route:
    """A replica's answer to "which adapter would serve this model name": ``adapter_id`` None for
    the base model or an unknown name (any replica answers, a 404 for an unknown one);
    ``cacheable`` False for an experiment (its arm depends on the request); ``known`` False for a
    name nothing is served under."""

    adapter_id: str | None
    cacheable: bool
    known: bool = True


AskReplica = Callable[[str, str | None, dict[str, str]], Awaitable[Route]]
_MISSING = object()


class ExpiringNames:
    """Model name -> value for ``ttl`` seconds, at most ``max_entries`` names (names come from
    clients: when full, expired names go, then all)."""

    def __init__(self, ttl: float, max_entries: int):
        self.ttl = ttl
        self.max_entries = max_entries
        self._entries: dict[str, tuple[Any, float]] = {}

    def get(self, name: str, now: float) -> Any:
        entry = self._entries.get(name)
        return entry[0] if entry is not None and entry[1] > now else _MISSING

    def put(self, name: str, value: Any, now: float) -> None:
        if len(self._entries) >= self.max_entries:
            self._entries = {k: v for k, v in self._entries.items() if v[1] > now}
            if len(self._entries) >= self.max_entries:
                self._entries.clear()
        self._entries[name] = (value, now + self.ttl)

    def __len__(self) -> int:
        return len(self._entries)


class ModelRoutes:
    """Model name -> adapter id, asked of a replica and remembered for ``ttl`` seconds unless the
    name is an experiment. A hint only: the serving replica resolves the name itself. Unknown names
    are remembered apart, in fewer entries: any client can make up names, and those must not push
    the served names out (each one pushed out costs a replica call and affinity)."""

    def __init__(self, ask: AskReplica, ttl: float, clock: Callable[[], float] = time.monotonic,
                 max_entries: int = 4096, max_unknown: int = 256):
        self._ask = ask
        self._clock = clock
        self.known = ExpiringNames(ttl, max_entries)
        self.unknown = ExpiringNames(ttl, max_unknown)

    async def adapter_for(self, request: ModelRequest, headers: dict[str, str]) -> str | None:
        now = self._clock()
        for names in (self.known, self.unknown):
            cached = names.get(request.model, now)
            if cached is not _MISSING:
                return cached
        route = await self._ask(request.model, request.user, headers)
        if route.cacheable and self.known.ttl > 0:
            (self.known if route.known else self.unknown).put(request.model, route.adapter_id, now)
        return route.adapter_id
