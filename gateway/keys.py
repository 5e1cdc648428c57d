"""Inference API keys: how they are configured, recognised, and told apart without being kept.

A key is configured by its value or by its SHA-256 (so a config file need not hold the secret),
with a *name* that is what metrics and logs show, and its own limits. What is stored with a
request (to bind feedback to the key that made it) is the key's ``id``: a prefix of its SHA-256,
never the key.

Pydantic and the standard library only; no FastAPI.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import threading
import time
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from gateway.rate_limits import Clock, KeyLimiter, KeyLimits, Refusal

# pydantic patterns (Rust regex): there ``$`` is the end of the text, so "name\n" is refused (with
# Python's ``re`` it would match: never use these with ``re.match``)
KEY_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
SHA256_PATTERN = r"^[0-9a-f]{64}$"


class ApiKeySpec(BaseModel):
    """One inference key as the settings hold it (``GATEWAY_API_KEYS``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    key: str | None = Field(None, min_length=1, max_length=512, description="The key itself.")
    sha256: str | None = Field(None, pattern=SHA256_PATTERN, description=(
        "Lower-case hex SHA-256 of the key, instead of the key."))
    name: str = Field(pattern=KEY_NAME_PATTERN, description="Shown in metrics and logs; never the key.")
    max_concurrent: int | None = Field(None, ge=1, description="Requests in flight at once.")
    rpm: int | None = Field(None, ge=1, description="Requests per minute.")
    tpm: int | None = Field(None, ge=1, description="Tokens per minute (prompt + completion).")

    @model_validator(mode="after")
    def _one_secret(self) -> ApiKeySpec:
        if (self.key is None) == (self.sha256 is None):
            raise ValueError(f"key '{self.name}': give exactly one of 'key' and 'sha256'")
        return self

    def digest(self) -> bytes:
        return bytes.fromhex(self.sha256) if self.sha256 else hashlib.sha256(self.key.encode()).digest()


def normalize_key_specs(value: Any) -> Any:
    """What a settings source gives (a list, or a string: JSON list, or comma-separated keys) as a list
    of specs' fields. A plain key gets the name ``key-<n>`` (its 1-based position)."""
    if isinstance(value, str):
        text = value.strip()
        value = json.loads(text) if text.startswith("[") else [k.strip() for k in text.split(",") if k.strip()]
    if not isinstance(value, list):
        return value
    items = []
    for number, item in enumerate(value, start=1):
        if isinstance(item, str):
            item = {"key": item}
        if isinstance(item, dict):
            item = {"name": f"key-{number}", **item}
            if isinstance(item.get("sha256"), str):
                item["sha256"] = item["sha256"].lower()
        items.append(item)
    return items


def check_unique(specs: list[ApiKeySpec]) -> None:
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise ValueError("api_keys: two keys have the same name")
    digests = [s.digest() for s in specs]
    if len(set(digests)) != len(digests):
        raise ValueError("api_keys: the same key is configured twice")


@dataclass
class ApiKey:
    """A configured key at run time."""

    id: str  # the first 16 hex digits of the key's SHA-256: stored with requests, never the key
    name: str
    digest: bytes
    limiter: KeyLimiter


class KeyRing:
    """Every inference key; finds the key a bearer token is, and keeps token reservations until
    their requests end."""

    def __init__(self, specs: list[ApiKeySpec], defaults: KeyLimits = KeyLimits(), clock: Clock = time.monotonic):
        self.keys: list[ApiKey] = []
        for spec in specs:
            limits = KeyLimits(max_concurrent=spec.max_concurrent or defaults.max_concurrent,
                               requests_per_minute=spec.rpm or defaults.requests_per_minute,
                               tokens_per_minute=spec.tpm or defaults.tokens_per_minute)
            digest = spec.digest()
            self.keys.append(ApiKey(digest.hex()[:16], spec.name, digest, KeyLimiter(limits, clock)))
        self._reserved: dict[str, tuple[ApiKey, int]] = {}  # completion id -> (key, tokens reserved)
        self._lock = threading.Lock()

    @property
    def enabled(self) -> bool:
        """Keys are configured: /v1 needs one."""
        return bool(self.keys)

    def authenticate(self, token: str | None) -> ApiKey | None:
        """The key ``token`` is, or None. Compares digests with every key in constant time, so
        timing reveals neither a near match nor which key matched."""
        if token is None:
            return None
        digest = hashlib.sha256(token.encode()).digest()
        found = None
        for key in self.keys:
            if hmac.compare_digest(digest, key.digest):
                found = key
        return found

    def reserve(self, key: ApiKey, completion_id: str, tokens: int) -> Refusal | None:
        """Reserve a request's most tokens against its key; ``settle`` gives back the unused part."""
        refusal = key.limiter.reserve(tokens)
        if refusal is None:
            with self._lock:
                self._reserved[completion_id] = (key, tokens)
        return refusal

    def settle(self, completion_id: str, used: int) -> None:
        with self._lock:
            held = self._reserved.pop(completion_id, None)
        if held is not None:
            key, reserved = held
            key.limiter.settle(reserved, used)

    def by_id(self, key_id: str | None) -> ApiKey | None:
        return next((k for k in self.keys if k.id == key_id), None) if key_id else None
