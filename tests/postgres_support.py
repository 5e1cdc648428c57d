"""A throwaway PostgreSQL cluster for tests: Debian's ``initdb`` and ``pg_ctl``, run as the
``postgres`` user (the server refuses root), data and unix socket in a temporary folder, a free
TCP port on 127.0.0.1. One cluster per test session; each test gets a fresh database, cloned from
``template0`` (cheap). Tests skip with the reason when the binaries are absent."""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path

USER = "postgres"  # the operating-system user that runs the server, and the database superuser


def find_bin_dir() -> Path | None:
    """The newest ``/usr/lib/postgresql/<version>/bin`` holding initdb and pg_ctl, or None."""
    root = Path("/usr/lib/postgresql")
    found = [p / "bin" for p in root.glob("*") if (p / "bin" / "initdb").is_file() and (p / "bin" / "pg_ctl").is_file()]
    if not found:
        return None
    return max(found, key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0)


def unavailable_reason() -> str | None:
    """Why no cluster can be started here, or None."""
    if find_bin_dir() is None:
        return "PostgreSQL's server binaries are not installed (apt-get install postgresql)"
    try:
        pwd.getpwnam(USER)
    except KeyError:
        return f"there is no {USER!r} user to run the PostgreSQL server as"
    if os.geteuid() != 0 and pwd.getpwnam(USER).pw_uid != os.geteuid():
        return f"the tests run neither as root nor as {USER!r}, so they cannot start the server as {USER!r}"
    return None


def _free_port() -> int:
    with contextlib.closing(socket.socket()) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class PostgresCluster:
    bin_dir: Path
    root: Path  # the temporary folder: data/, socket/, log
    port: int

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def socket_dir(self) -> Path:
        return self.root / "socket"

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://{USER}@127.0.0.1:{self.port}/{database}"

    def _as_postgres(self, *args: str) -> subprocess.CompletedProcess:
        command = [str(a) for a in args]
        if os.geteuid() == 0:
            command = ["runuser", "-u", USER, "--", *command]
        return subprocess.run(command, check=True, capture_output=True, text=True, timeout=120)

    @classmethod
    def create(cls) -> PostgresCluster:
        bin_dir = find_bin_dir()
        assert bin_dir is not None
        root = Path(tempfile.mkdtemp(prefix="gateway-pg-"))
        info = pwd.getpwnam(USER)
        (root / "socket").mkdir()
        for path in (root, root / "socket"):
            os.chown(path, info.pw_uid, info.pw_gid)
        root.chmod(0o700)
        cluster = cls(bin_dir, root, _free_port())
        # trust: the server listens on 127.0.0.1 and a private socket only, for one test session
        cluster._as_postgres(bin_dir / "initdb", "-D", cluster.data, "-U", USER, "--auth=trust", "-E", "UTF8",
                             "--no-sync", "--locale=C")
        cluster.start()
        return cluster

    def start(self) -> None:
        options = (f"-p {self.port} -k {self.socket_dir} -c listen_addresses=127.0.0.1 -c fsync=off "
                   "-c synchronous_commit=off -c full_page_writes=off -c max_connections=200")
        self._as_postgres(self.bin_dir / "pg_ctl", "-D", self.data, "-l", self.root / "server.log", "-o", options,
                          "-w", "start")

    def stop(self) -> None:
        """Stop the server at once (fast shutdown: open connections are closed)."""
        self._as_postgres(self.bin_dir / "pg_ctl", "-D", self.data, "-m", "fast", "-w", "stop")

    def create_database(self) -> str:
        """A new empty database; its URL."""
        import psycopg

        name = f"test_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}" TEMPLATE template0')
        return self.url(name)

    def destroy(self) -> None:
        with contextlib.suppress(subprocess.SubprocessError):
            self.stop()
        shutil.rmtree(self.root, ignore_errors=True)


def migrated_database(url: str):
    """A ``PostgresDatabase`` on ``url`` with the gateway's schema applied."""
    from adapters.sql import PostgresDatabase
    from gateway.database.migrations import migrate

    db = PostgresDatabase(url, timeout=5.0)
    migrate(db)
    return db


@dataclass
class StoreBackend:
    """One database for a store test: SQLite's file, or a fresh migrated PostgreSQL database."""

    name: str
    path: Path
    url: str | None = None

    def open(self, sqlite_class, sql_class):
        """A new store (its own connection) on this database."""
        if self.url is None:
            return sqlite_class(self.path)
        from adapters.sql import PostgresDatabase

        return sql_class(PostgresDatabase(self.url))
