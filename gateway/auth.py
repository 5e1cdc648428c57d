"""Bearer-key checks: inference keys for /v1, the admin key for /admin."""

from __future__ import annotations

import hmac

from fastapi import Request

from gateway.errors import AuthenticationError


def bearer_token(request: Request) -> str | None:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


def key_matches(token: str | None, keys: list[str]) -> bool:
    # compare against every key in constant time, so timing does not reveal a near match
    found = False
    for key in keys:
        found |= token is not None and hmac.compare_digest(token.encode(), key.encode())
    return found


def check_inference_key(request: Request) -> None:
    keys: list[str] = request.app.state.gateway.settings.api_keys
    if not keys:
        return
    token = bearer_token(request)
    if token is None:
        raise AuthenticationError("missing API key: send 'Authorization: Bearer <key>'")
    if not key_matches(token, keys):
        raise AuthenticationError("incorrect API key provided")


def check_admin_key(request: Request) -> None:
    """Admin routes are never open: a key is always set (configured or generated at start)."""
    token = bearer_token(request)
    if token is None:
        raise AuthenticationError("missing admin key: send 'Authorization: Bearer <admin key>'")
    if not key_matches(token, [request.app.state.gateway.admin_key]):
        raise AuthenticationError("incorrect admin key provided")
