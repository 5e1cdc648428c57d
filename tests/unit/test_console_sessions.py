"""The console's session stores on a fake clock, the same contract in memory (one process) and in
the replicas' shared PostgreSQL database: expiry, the bound on how many are kept (oldest out first),
sign-out, lookups of ids never issued, and that the database holds no usable cookie value."""

from __future__ import annotations

import asyncio

import pytest
from postgres_support import migrated_database

from gateway.console.sessions import ConsoleSessions
from gateway.console.shared_sessions import SharedConsoleSessions


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture(params=["memory", "postgresql"])
def store(request):
    """A factory ``(lifetime, clock, max_sessions) -> store`` for each backend, and a row counter."""
    if request.param == "memory":
        return ConsoleSessions, len
    db = migrated_database(request.getfixturevalue("postgres_url"))
    request.addfinalizer(db.close)

    def rows(_sessions) -> int:
        return db.run(lambda tx: tx.one("SELECT COUNT(*) FROM console_sessions"))[0]
    return (lambda *args, **kw: SharedConsoleSessions(db, *args, **kw)), rows


def test_sessions_expire_and_are_bounded(store):
    make, count = store
    clock = Clock()
    sessions = make(60, clock=clock, max_sessions=3)

    async def scenario() -> None:
        first, session = await sessions.create()
        assert await sessions.get(first) == session and session.csrf_matches(session.csrf_token)
        assert not session.csrf_matches(None) and not session.csrf_matches("x")
        assert first != session.csrf_token
        clock.now += 59.9
        assert await sessions.get(first) == session
        clock.now += 0.1
        assert await sessions.get(first) is None
        ids = []
        for _ in range(4):  # the expired one goes at the next sign-in, then the oldest past 3
            ids.append((await sessions.create())[0])
            clock.now += 1
        assert count(sessions) == 3
        assert await sessions.get(ids[0]) is None and await sessions.get(ids[3]) is not None
        assert await sessions.get(None) is None and await sessions.get("x" * 200) is None
        assert await sessions.get("never-issued") is None
        await sessions.end(ids[3])
        assert await sessions.get(ids[3]) is None and await sessions.get(ids[2]) is not None
        await sessions.end(None)
        await sessions.end("never-issued")
        assert count(sessions) == 2

    asyncio.run(scenario())


def test_the_database_holds_digests_not_cookie_values(postgres_url):
    db = migrated_database(postgres_url)
    try:
        session_id, session = asyncio.run(SharedConsoleSessions(db, 60).create())
        stored = db.run(lambda tx: tx.execute("SELECT digest, csrf_token FROM console_sessions"))
        assert len(stored) == 1 and session_id not in stored[0][0] and stored[0][1] == session.csrf_token
    finally:
        db.close()


class Unreachable:
    """A database whose every call waits out a connection timeout, then fails; counts the calls."""

    def __init__(self):
        self.calls = 0

    def run(self, work):
        import time

        from adapters.sql import DatabaseUnavailableError

        self.calls += 1
        time.sleep(0.05)
        raise DatabaseUnavailableError("the database at postgresql://gateway:***@db:5432/gateway cannot be reached")


def test_an_unreachable_database_is_tried_once_for_lookups_sent_together():
    """Forty lookups at once (made-up cookies) while the database is away: one call tries it and
    the others, waiting behind it as coroutines, fail with it rather than each taking a worker
    thread for a connection timeout of its own. A lookup that comes after tries again."""
    from adapters.sql import DatabaseUnavailableError

    db = Unreachable()
    sessions = SharedConsoleSessions(db, 60)
    cookie = "a" * 43  # an id of the usable shape: looked up

    async def scenario() -> None:
        results = await asyncio.gather(*(sessions.get(cookie) for _ in range(40)), return_exceptions=True)
        assert all(isinstance(r, DatabaseUnavailableError) for r in results) and db.calls == 1
        with pytest.raises(DatabaseUnavailableError):
            await sessions.get(cookie)
        assert db.calls == 2

    asyncio.run(scenario())
