"""The PostgreSQL connection under a server restart: a transaction on a connection the server
dropped is tried once more on a fresh one (nothing of it was committed), a server that is away
answers ``DatabaseUnavailableError`` (503 upstream), and the next call after it returns works.
A transaction the server rolled back to break a deadlock runs again."""

from __future__ import annotations

import pytest
from postgres_support import PostgresCluster, unavailable_reason

from adapters.sql import DatabaseUnavailableError, PostgresDatabase


@pytest.fixture
def cluster():
    reason = unavailable_reason()
    if reason is not None:
        pytest.skip(reason)
    cluster = PostgresCluster.create()  # its own server: these tests stop it
    yield cluster
    cluster.destroy()


def test_a_connection_dropped_by_a_restart_is_replaced_transparently(cluster):
    db = PostgresDatabase(cluster.create_database(), timeout=2)
    db.run(lambda tx: tx.execute("CREATE TABLE t (id INTEGER)"))
    cluster.stop()
    cluster.start()
    db.run(lambda tx: tx.execute("INSERT INTO t VALUES (1)"))  # first call after the restart: no error
    assert db.read(lambda tx: tx.execute("SELECT id FROM t")) == [(1,)]
    db.close()


def test_a_server_away_answers_unavailable_until_it_returns(cluster):
    db = PostgresDatabase(cluster.create_database(), timeout=2)
    db.run(lambda tx: tx.execute("CREATE TABLE t (id INTEGER)"))
    cluster.stop()
    for _ in range(2):  # the stale connection, then a refused new one
        with pytest.raises(DatabaseUnavailableError, match="cannot be reached|unavailable"):
            db.run(lambda tx: tx.execute("INSERT INTO t VALUES (1)"))
    cluster.start()
    db.run(lambda tx: tx.execute("INSERT INTO t VALUES (2)"))
    assert db.read(lambda tx: tx.execute("SELECT id FROM t")) == [(2,)]  # the refused write left nothing
    db.close()


def test_a_transaction_rolled_back_to_break_a_deadlock_runs_again(postgres_url, caplog):
    """Two replicas' writes that lock the same two rows in opposite orders: PostgreSQL rolls one
    back (deadlock detected) and that one was a 503; it now runs again and both commit."""
    import logging
    import threading

    caplog.set_level(logging.INFO, logger="adapters.sql")
    first, second = PostgresDatabase(postgres_url), PostgresDatabase(postgres_url)
    first.run(lambda tx: tx.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, n INTEGER NOT NULL)"))
    first.run(lambda tx: tx.execute("INSERT INTO t VALUES (1, 0), (2, 0)"))
    both_hold_one = threading.Barrier(2, timeout=10)
    tries: dict[str, int] = {"first": 0, "second": 0}
    errors: list[BaseException] = []

    def crossing(name: str, order: tuple[int, int]):
        def write(tx) -> None:
            tries[name] += 1
            tx.execute("UPDATE t SET n = n + 1 WHERE id = ?", (order[0],))
            if tries[name] == 1:
                both_hold_one.wait()  # each holds its first row: the second updates cross
            tx.execute("UPDATE t SET n = n + 1 WHERE id = ?", (order[1],))
        return write

    def run(db: PostgresDatabase, name: str, order: tuple[int, int]) -> None:
        try:
            db.run(crossing(name, order))
        except BaseException as exc:  # noqa: BLE001 - reported by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(first, "first", (1, 2))),
               threading.Thread(target=run, args=(second, "second", (2, 1)))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert errors == []
    assert sorted(tries.values()) == [1, 2]  # the one rolled back ran again
    assert first.read(lambda tx: tx.execute("SELECT id, n FROM t ORDER BY id")) == [(1, 2), (2, 2)]
    assert "deadlock detected" in caplog.text
    first.close()
    second.close()
