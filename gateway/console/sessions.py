"""Browser sessions of the console. Pure code: no FastAPI.

A session is created when the admin key is presented once at sign-in; the browser then holds
only a random 256-bit session id (in an HttpOnly cookie), never the key. Ids are looked up by their
SHA-256 digest, so a table never holds a usable cookie value and lookups do not compare secrets
byte by byte. One process keeps its sessions in memory (``ConsoleSessions``): a restart signs
everyone out, which is the safe direction. Replicas sharing a PostgreSQL database keep them there
(``gateway.console.shared_sessions``), so any replica admits a session another one started and a
sign-out on one ends it on all. Both have the same async interface: ``create``, ``get``, ``end``."""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

MAX_SESSIONS = 256  # an operator console, not a user database: the oldest session goes first


def session_digest(session_id: str) -> bytes:
    return hashlib.sha256(session_id.encode()).digest()


@dataclass
class ConsoleSession:
    csrf_token: str
    created: float
    expires: float

    def csrf_matches(self, token: str | None) -> bool:
        return token is not None and hmac.compare_digest(token.encode(), self.csrf_token.encode())


def new_session(lifetime: float, now: float) -> tuple[str, ConsoleSession]:
    """A fresh id (for the cookie, never stored) and its session: own CSRF token, absolute expiry."""
    session = ConsoleSession(csrf_token=secrets.token_urlsafe(32), created=now, expires=now + lifetime)
    return secrets.token_urlsafe(32), session  # 256 random bits each


def usable_id(session_id: str | None) -> bool:
    """Whether a cookie value is worth looking up (none, or longer than any id issued, is not)."""
    return bool(session_id) and len(session_id) <= 128


class SessionStore(Protocol):
    lifetime: float

    async def create(self) -> tuple[str, ConsoleSession]: ...

    async def get(self, session_id: str | None) -> ConsoleSession | None: ...

    async def end(self, session_id: str | None) -> None: ...

    def close(self) -> None: ...


class ConsoleSessions:
    """Sessions by id digest, each with its own CSRF token and an absolute expiry."""

    def __init__(self, lifetime_seconds: float, clock: Callable[[], float] = time.time,
                 max_sessions: int = MAX_SESSIONS):
        self.lifetime = lifetime_seconds
        self.clock = clock
        self.max_sessions = max_sessions
        self._sessions: OrderedDict[bytes, ConsoleSession] = OrderedDict()

    async def create(self) -> tuple[str, ConsoleSession]:
        """A new session; returns the id (for the cookie, never stored here) and the session."""
        self._drop_expired()
        while len(self._sessions) >= self.max_sessions:
            self._sessions.popitem(last=False)
        session_id, session = new_session(self.lifetime, self.clock())
        self._sessions[session_digest(session_id)] = session
        return session_id, session

    async def get(self, session_id: str | None) -> ConsoleSession | None:
        if not usable_id(session_id):
            return None
        key = session_digest(session_id)
        session = self._sessions.get(key)
        if session is None:
            return None
        if session.expires <= self.clock():
            del self._sessions[key]
            return None
        return session

    async def end(self, session_id: str | None) -> None:
        if usable_id(session_id):
            self._sessions.pop(session_digest(session_id), None)

    def __len__(self) -> int:
        return len(self._sessions)

    def close(self) -> None:
        """Nothing to release: the sessions go with the process."""

    def _drop_expired(self) -> None:
        now = self.clock()
        for key in [k for k, s in self._sessions.items() if s.expires <= now]:
            del self._sessions[key]
