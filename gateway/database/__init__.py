"""Where the gateway keeps its rows: SQLite in the data dir (one process, the default), or one
PostgreSQL database shared by many replicas (``database_url``). ``open_stores`` gives the four
stores either way; the rest of the gateway sees only their interfaces."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from adapters.sql import PostgresDatabase, redact_url
from adapters.store import AdapterStore, SqlAdapterStore, SqliteAdapterStore
from gateway.database.migrations import migrate
from gateway.experiments.store import ExperimentStore, SqlExperimentStore, SqliteExperimentStore
from gateway.files.store import SqlFileStore, SqliteFileStore
from gateway.settings import Settings
from gateway.training.store import SqliteTrainingJobStore, SqlTrainingJobStore, TrainingJobStore

log = logging.getLogger(__name__)
DATABASE_FILE = "gateway.sqlite3"


@dataclass
class Stores:
    adapters: AdapterStore
    experiments: ExperimentStore
    files: SqlFileStore
    training: TrainingJobStore
    postgres: PostgresDatabase | None = None  # shared with other replicas: where to follow their changes

    @property
    def shared(self) -> bool:
        return self.postgres is not None


def database_url(settings: Settings) -> str | None:
    return settings.database_url.get_secret_value() if settings.database_url is not None else None


def shared_database(settings: Settings) -> PostgresDatabase | None:
    """A connection of its own to the replicas' PostgreSQL database (opened at its first statement);
    None without ``database_url``."""
    url = database_url(settings)
    return None if url is None else PostgresDatabase(url, settings.database_timeout_seconds)


def open_stores(settings: Settings) -> Stores:
    """The four stores; on PostgreSQL the schema is migrated first (``SchemaTooNewError`` on a
    database a newer release migrated). Each store holds its own connection."""
    url = database_url(settings)
    if url is None:
        path = settings.data_dir / DATABASE_FILE
        return Stores(SqliteAdapterStore(path), SqliteExperimentStore(path), SqliteFileStore(path),
                      SqliteTrainingJobStore(path))

    first = shared_database(settings)
    migrate(first)
    log.info("registry in PostgreSQL at %s", redact_url(url))
    return Stores(SqlAdapterStore(first), SqlExperimentStore(shared_database(settings)),
                  SqlFileStore(shared_database(settings)), SqlTrainingJobStore(shared_database(settings)),
                  postgres=first)


def check_shared_database(settings: Settings) -> None:
    """PostgreSQL: reach the server and bring its schema up to date now, so that a start fails fast
    with the reason (``DatabaseUnavailableError``, ``SchemaTooNewError``) before the model loads."""
    url = database_url(settings)
    if url is None:
        return
    db = PostgresDatabase(url, settings.database_timeout_seconds)
    try:
        migrate(db)
    finally:
        db.close()
