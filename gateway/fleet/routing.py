"""What the ingress decides before a replica sees a request, without Ray: who may send it (keys,
checked before any body byte is read, as ``gateway.auth`` does in one process), how large its body
may be, and which adapter id its inference body asks for (the affinity key)."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from gateway.auth import OPEN_BODY_BYTES, OPEN_PATHS, bearer_token, is_admin_path, key_matches
from gateway.console.security import is_console_api, is_open_console_path
from gateway.errors import APIError, AuthenticationError
from gateway.keys import KeyRing
from gateway.limits import is_upload
from gateway.settings import Settings

log = logging.getLogger(__name__)
# the routes whose JSON body names a model served by an adapter
INFERENCE_PATHS = frozenset({"/v1/chat/completions", "/v1/completions"})
SESSION_COOKIE = b"cookie"


class IngressGuard:
    """The keys check of ``gateway.auth.AccessGuard``, done at the ingress so that nothing of a
    body is read (or parsed for routing) for a client without a key. The replica checks again and
    applies the per-key limits (they count per replica)."""

    def __init__(self, settings: Settings, admin_key: str):
        self.settings = settings
        self.admin_key = admin_key
        self.keys = KeyRing(settings.api_keys)

    def refusal(self, path: str, headers: dict[bytes, bytes]) -> APIError | None:
        if path in OPEN_PATHS or is_open_console_path(path):
            return None
        token = bearer_token(headers)
        if token is None and SESSION_COOKIE in headers:
            return None  # a console session cookie: the replica holding the session decides
        if is_admin_path(path) or is_console_api(path):
            return None if key_matches(token, self.admin_key) else _auth_error(token, "admin key")
        if self.keys.enabled and self.keys.authenticate(token) is None:
            return _auth_error(token, "API key")
        return None

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
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(data, dict) or not isinstance(data.get("model"), str) or not data["model"]:
        return None
    user = data.get("user")
    return ModelRequest(data["model"], user if isinstance(user, str) else None)


@dataclass(frozen=True)
class Route:
    """A replica's answer to "which adapter would serve this model name": ``adapter_id`` None for
    the base model or an unknown name (any replica answers, a 404 for an unknown one);
    ``cacheable`` False for an experiment (its arm depends on the request)."""

    adapter_id: str | None
    cacheable: bool


AskReplica = Callable[[str, str | None, dict[str, str]], Awaitable[Route]]


class ModelRoutes:
    """Model name -> adapter id, asked of a replica and remembered for ``ttl`` seconds unless the
    name is an experiment. A hint only: the serving replica resolves the name itself."""

    def __init__(self, ask: AskReplica, ttl: float, clock: Callable[[], float] = time.monotonic,
                 max_entries: int = 4096):
        self._ask = ask
        self._ttl = ttl
        self._clock = clock
        self._max_entries = max_entries  # names come from clients: the cache must stay bounded
        self._cache: dict[str, tuple[str | None, float]] = {}

    async def adapter_for(self, request: ModelRequest, headers: dict[str, str]) -> str | None:
        now = self._clock()
        cached = self._cache.get(request.model)
        if cached is not None and cached[1] > now:
            return cached[0]
        route = await self._ask(request.model, request.user, headers)
        if route.cacheable and self._ttl > 0:
            if len(self._cache) >= self._max_entries:
                self._cache = {k: v for k, v in self._cache.items() if v[1] > now}
                if len(self._cache) >= self._max_entries:
                    self._cache.clear()
            self._cache[request.model] = (route.adapter_id, now + self._ttl)
        return route.adapter_id
