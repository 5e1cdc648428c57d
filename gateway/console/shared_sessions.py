"""Console sessions in the PostgreSQL database the replicas share (table ``console_sessions``).

Behind a load balancer without affinity, the replica that answers a console request is rarely the
one that signed the browser in; with the sessions in the shared database every replica admits
them, and a sign-out on any replica ends the session on all of them at once (there is no copy
anywhere else to revoke). Rows are keyed by the SHA-256 digest of the cookie's id, as in memory,
so the table never holds a usable cookie value. Each call is one short transaction on this
object's own connection, run off the event loop; the console is operator traffic, a few requests
a second at most. An unreachable database raises ``DatabaseUnavailableError`` (a 503).

Calls run one at a time behind an asyncio lock, so callers queued behind a hung database wait as
coroutines, not in worker threads (forty made-up cookies against an unreachable server took the
default thread pool for a minute from every other ``to_thread`` call), and the callers that waited
behind a call the database failed fail with it, instead of each waiting out its own connection
timeout; a call that comes after tries the database again."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from adapters.sql import DatabaseUnavailableError, PostgresDatabase, Transaction
from gateway.console.sessions import MAX_SESSIONS, ConsoleSession, new_session, session_digest, usable_id



class SharedConsoleSessions:
    def __init__(self, db: PostgresDatabase, lifetime_seconds: float, clock: Callable[[], float] = time.time,
                 max_sessions: int = MAX_SESSIONS):
        self.db = db
        self.lifetime = lifetime_seconds
        self.clock = clock
        self.max_sessions = max_sessions
        self._one_at_a_time = asyncio.Lock()
        self._failures = 0  # calls the database failed

    async def _run(self, work: Callable[[Transaction], object]):
        failures = self._failures
        async with self._one_at_a_time:
            if self._failures != failures:  # the database failed a call while this one waited
                raise DatabaseUnavailableError("the database could not be reached a moment ago")
            try:
                return await asyncio.to_thread(self.db.run, work)
            except DatabaseUnavailableError:
                self._failures += 1
                raise

    async def create(self) -> tuple[str, ConsoleSession]:
        """A new session, stored for every replica; the oldest go first past ``max_sessions``."""
        session_id, session = new_session(self.lifetime, self.clock())

        def store(tx: Transaction) -> None:
            tx.execute("DELETE FROM console_sessions WHERE expires <= ?", (session.created,))
            # replicas signing in at once may each keep one more: the cap bounds the table, not exactly
            tx.execute("DELETE FROM console_sessions WHERE digest IN (SELECT digest FROM console_sessions"
                       " ORDER BY created DESC, digest OFFSET ?)", (self.max_sessions - 1,))
            tx.execute("INSERT INTO console_sessions (digest, csrf_token, created, expires) VALUES (?, ?, ?, ?)",
                       (_key(session_id), session.csrf_token, session.created, session.expires))

        await self._run(store)
        return session_id, session

    async def get(self, session_id: str | None) -> ConsoleSession | None:
        if not usable_id(session_id):
            return None
        row = await self._run(lambda tx: tx.one(
            "SELECT csrf_token, created, expires FROM console_sessions WHERE digest = ? AND expires > ?",
            (_key(session_id), self.clock())))
        return None if row is None else ConsoleSession(csrf_token=row[0], created=row[1], expires=row[2])

    async def end(self, session_id: str | None) -> None:
        if usable_id(session_id):
            await self._run(lambda tx: tx.execute(
                "DELETE FROM console_sessions WHERE digest = ?", (_key(session_id),)))

    def close(self) -> None:
        self.db.close()


def _key(session_id: str) -> str:
    return session_digest(session_id).hex()
