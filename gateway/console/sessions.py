"""Browser sessions of the console. Pure code: no FastAPI.

A session is created when the admin key is presented once at sign-in; the browser then holds
only a random 256-bit session id (in an HttpOnly cookie), never the key. Sessions live in memory:
a restart signs everyone out, which is the safe direction. Ids are looked up by their SHA-256
digest, so the table never holds a usable cookie value and lookups do not compare secrets
byte by byte."""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

MAX_SESSIONS = 256  # an operator console, not a user database: the oldest session goes first


def _digest(session_id: str) -> bytes:
    return hashlib.sha256(session_id.encode()).digest()


@dataclass
class ConsoleSession:
    csrf_token: str
    created: float
    expires: float

    def csrf_matches(self, token: str | None) -> bool:
        return token is not None and hmac.compare_digest(token.encode(), self.csrf_token.encode())


class ConsoleSessions:
    """Sessions by id digest, each with its own CSRF token and an absolute expiry."""

    def __init__(self, lifetime_seconds: float, clock: Callable[[], float] = time.time,
                 max_sessions: int = MAX_SESSIONS):
        self.lifetime = lifetime_seconds
        self.clock = clock
        self.max_sessions = max_sessions
        self._sessions: OrderedDict[bytes, ConsoleSession] = OrderedDict()

    def create(self) -> tuple[str, ConsoleSession]:
        """A new session; returns the id (for the cookie, never stored here) and the session."""
        self._drop_expired()
        while len(self._sessions) >= self.max_sessions:
            self._sessions.popitem(last=False)
        session_id = secrets.token_urlsafe(32)  # 256 random bits
        now = self.clock()
        session = ConsoleSession(csrf_token=secrets.token_urlsafe(32), created=now, expires=now + self.lifetime)
        self._sessions[_digest(session_id)] = session
        return session_id, session

    def get(self, session_id: str | None) -> ConsoleSession | None:
        if not session_id or len(session_id) > 128:
            return None
        key = _digest(session_id)
        session = self._sessions.get(key)
        if session is None:
            return None
        if session.expires <= self.clock():
            del self._sessions[key]
            return None
        return session

    def end(self, session_id: str | None) -> None:
        if session_id:
            self._sessions.pop(_digest(session_id), None)

    def __len__(self) -> int:
        return len(self._sessions)

    def _drop_expired(self) -> None:
        now = self.clock()
        for key in [k for k, s in self._sessions.items() if s.expires <= now]:
            del self._sessions[key]
