"""The PostgreSQL connection under a server restart: a transaction on a connection the server
dropped is tried once more on a fresh one (nothing of it was committed), a server that is away
answers ``DatabaseUnavailableError`` (503 upstream), and the next call after it returns works."""

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
