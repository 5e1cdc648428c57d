"""The PostgreSQL schema, as numbered migrations applied at start.

``schema_migrations`` holds one row per applied version. Replicas starting together serialize on a
transaction-scoped advisory lock, so each migration runs once, in one transaction with its row. A
database whose newest version is above what this code knows was upgraded by a newer release: the
gateway refuses it rather than write rows an older schema's code does not understand.

A change of schema is a new entry at the end of ``MIGRATIONS``; an applied entry never changes.
(SQLite, the single-process default, keeps creating its tables in each store as before.)
"""

from __future__ import annotations

import logging

from adapters.sql import PostgresDatabase, Transaction
from gateway.experiments.store import ARM_TOTALS_UPGRADE

log = logging.getLogger(__name__)
LOCK_KEY = 0x6761_7465_7761_7931  # "gatewa" "y1": the advisory lock all replicas take to migrate

MIGRATIONS: tuple[tuple[int, str, tuple[str, ...]], ...] = (
    (1, "registry, experiments, files and training jobs", (
        "CREATE TABLE registry_adapters (id TEXT PRIMARY KEY, content_hash TEXT NOT NULL, kind TEXT NOT NULL,"
        " size_bytes BIGINT NOT NULL, created DOUBLE PRECISION NOT NULL, pinned INTEGER NOT NULL DEFAULT 0,"
        " info TEXT NOT NULL)",
        "CREATE TABLE experiments (name TEXT PRIMARY KEY, salt TEXT NOT NULL, arms TEXT NOT NULL,"
        " stickiness TEXT NOT NULL, subject_header TEXT, state TEXT NOT NULL, winner TEXT,"
        " created DOUBLE PRECISION NOT NULL, updated DOUBLE PRECISION NOT NULL, capture INTEGER NOT NULL DEFAULT 0)",
        "CREATE TABLE experiment_requests (completion_id TEXT PRIMARY KEY, experiment TEXT NOT NULL,"
        " arm TEXT NOT NULL, subject TEXT, endpoint TEXT NOT NULL, ttft_s DOUBLE PRECISION,"
        " latency_s DOUBLE PRECISION, prompt_tokens INTEGER NOT NULL, completion_tokens INTEGER NOT NULL,"
        " error_type TEXT, created DOUBLE PRECISION NOT NULL, api_key_id TEXT)",
        "CREATE INDEX experiment_requests_by_arm ON experiment_requests (experiment, arm)",
        "CREATE TABLE experiment_feedback (completion_id TEXT PRIMARY KEY, experiment TEXT NOT NULL,"
        " score DOUBLE PRECISION, thumbs TEXT CHECK (thumbs IN ('up', 'down')), created DOUBLE PRECISION NOT NULL)",
        "CREATE INDEX experiment_feedback_by_experiment ON experiment_feedback (experiment)",
        "CREATE TABLE experiment_captures (completion_id TEXT PRIMARY KEY, experiment TEXT NOT NULL,"
        " messages TEXT NOT NULL, completion TEXT NOT NULL, created DOUBLE PRECISION NOT NULL)",
        "CREATE INDEX experiment_captures_by_experiment ON experiment_captures (experiment)",
        "CREATE TABLE files (id TEXT PRIMARY KEY, created DOUBLE PRECISION NOT NULL, record TEXT NOT NULL)",
        "CREATE TABLE training_jobs (id TEXT PRIMARY KEY, state TEXT NOT NULL, created DOUBLE PRECISION NOT NULL,"
        " record TEXT NOT NULL, claimed_by TEXT, lease_until DOUBLE PRECISION)",
        "CREATE INDEX training_jobs_claimable ON training_jobs (state, created)",
    )),
    # shared with SQLite's upgrade, frozen there: results from running totals, request rows pruned
    (2, "experiment per-arm totals, feedback with its arm", ARM_TOTALS_UPGRADE),
    (3, "console sessions every replica admits", (
        "CREATE TABLE console_sessions (digest TEXT PRIMARY KEY, csrf_token TEXT NOT NULL,"
        " created DOUBLE PRECISION NOT NULL, expires DOUBLE PRECISION NOT NULL)",
        "CREATE INDEX console_sessions_by_created ON console_sessions (created)",
    )),
)
LATEST = MIGRATIONS[-1][0]


class SchemaTooNewError(RuntimeError):
    """The database was migrated by a newer release than this one."""


def migrate(db: PostgresDatabase, migrations=MIGRATIONS) -> list[int]:
    """Apply the migrations the database lacks (in one transaction, under the advisory lock); the
    versions applied now. Raises ``SchemaTooNewError`` on a database newer than ``migrations``."""
    latest = migrations[-1][0]

    def apply(tx: Transaction) -> list[int]:
        tx.execute("SELECT pg_advisory_xact_lock(?)", (LOCK_KEY,))  # released at commit or rollback
        tx.execute("CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER PRIMARY KEY,"
                   " description TEXT NOT NULL, applied DOUBLE PRECISION NOT NULL)")
        done = {r[0] for r in tx.execute("SELECT version FROM schema_migrations")}
        if done and max(done) > latest:
            raise SchemaTooNewError(
                f"the database's schema is at version {max(done)}, newer than this release knows ({latest}): a "
                "newer gateway migrated it. Run that release (or newer), or point GATEWAY_DATABASE_URL at "
                "another database")
        applied = []
        for version, description, statements in migrations:
            if version in done:
                continue
            for statement in statements:
                tx.execute(statement)
            tx.execute("INSERT INTO schema_migrations VALUES (?, ?, EXTRACT(EPOCH FROM now()))",
                       (version, description))
            applied.append(version)
        return applied

    applied = db.run(apply)
    if applied:
        log.info("database schema migrated to version %d (applied %s)", latest, ", ".join(map(str, applied)))
    return applied
