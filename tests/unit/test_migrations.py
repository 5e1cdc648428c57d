"""PostgreSQL schema migrations: applied once on a fresh database, nothing on a re-run, only the
new ones on an older database, serialized when replicas start together, and a database a newer
release migrated refused with a clear message."""

from __future__ import annotations

import threading

import pytest

from adapters.sql import PostgresDatabase
from gateway.app import check_data_dir
from gateway.database import open_stores
from gateway.database.migrations import LATEST, MIGRATIONS, SchemaTooNewError, migrate
from gateway.settings import Settings


def versions(db: PostgresDatabase) -> list[int]:
    return [r[0] for r in db.run(lambda tx: tx.execute("SELECT version FROM schema_migrations ORDER BY version"))]


def tables(db: PostgresDatabase) -> set[str]:
    return {r[0] for r in db.run(lambda tx: tx.execute(
        "SELECT tablename FROM pg_tables WHERE schemaname = 'public'"))}


def test_a_fresh_database_gets_every_migration_once(postgres_url):
    db = PostgresDatabase(postgres_url)
    assert migrate(db) == [m[0] for m in MIGRATIONS]
    assert versions(db) == [m[0] for m in MIGRATIONS]
    assert {"registry_adapters", "experiments", "experiment_requests", "experiment_feedback", "experiment_captures",
            "files", "training_jobs", "schema_migrations"} <= tables(db)
    assert migrate(db) == []  # a re-run (the next start) applies nothing
    assert versions(db) == [m[0] for m in MIGRATIONS]
    db.close()


def test_an_older_database_gets_only_the_new_migrations(postgres_url):
    db = PostgresDatabase(postgres_url)
    migrate(db)
    db.run(lambda tx: tx.execute("INSERT INTO registry_adapters VALUES ('kept', 'h', 'lora', 1, 1.0, 0, '{}')"))
    newer = MIGRATIONS + ((LATEST + 1, "a later column", ("ALTER TABLE registry_adapters ADD COLUMN note TEXT",)),)
    assert migrate(db, newer) == [LATEST + 1]
    assert db.run(lambda tx: tx.execute("SELECT id, note FROM registry_adapters")) == [("kept", None)]
    db.close()


def test_a_database_newer_than_the_code_is_refused(postgres_url):
    db = PostgresDatabase(postgres_url)
    migrate(db)
    db.run(lambda tx: tx.execute("INSERT INTO schema_migrations VALUES (?, 'from the future', 0)", (LATEST + 5,)))
    with pytest.raises(SchemaTooNewError, match=f"version {LATEST + 5}, newer than this release knows"):
        migrate(db)
    settings = Settings(database_url=postgres_url, database_timeout_seconds=2)
    with pytest.raises(SchemaTooNewError):  # the gateway refuses to start on it, before the model loads
        check_data_dir(settings)
    with pytest.raises(SchemaTooNewError):
        open_stores(settings)
    db.close()


def test_replicas_starting_together_apply_each_migration_once(postgres_url):
    # a statement that fails when run twice: a second application would raise
    once = ((1, "one table", ("CREATE TABLE only_once (id INTEGER)",)),
            (2, "one row", ("INSERT INTO only_once VALUES (1)",)))
    applied: list[list[int]] = []
    errors: list[BaseException] = []
    barrier = threading.Barrier(6)

    def replica() -> None:
        db = PostgresDatabase(postgres_url)
        try:
            barrier.wait()
            applied.append(migrate(db, once))
        except BaseException as exc:  # noqa: BLE001 - reported by the assertion below
            errors.append(exc)
        finally:
            db.close()

    threads = [threading.Thread(target=replica) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert sorted(applied, key=len) == [[]] * 5 + [[1, 2]]  # one replica applied both, the others nothing
    db = PostgresDatabase(postgres_url)
    assert db.run(lambda tx: tx.execute("SELECT COUNT(*) FROM only_once")) == [(1,)]
    db.close()


def test_the_password_never_reaches_the_message(postgres_cluster):
    url = f"postgresql://someone:s3cret-pw@127.0.0.1:{postgres_cluster.port + 1}/nothing"  # nothing listens
    from adapters.sql import DatabaseUnavailableError

    with pytest.raises(DatabaseUnavailableError) as caught:
        PostgresDatabase(url, timeout=1).run(lambda tx: tx.execute("SELECT 1"))
    assert "s3cret-pw" not in str(caught.value) and "someone:***@" in str(caught.value)
    assert "s3cret-pw" not in repr(Settings(database_url=url))
