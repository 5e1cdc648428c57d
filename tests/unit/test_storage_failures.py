"""Storage failures, without a model: the start-up check of the database (damaged, or lost while
the files it described remain) and the HTTP answer to a full disk or a busy database."""

from __future__ import annotations

import errno
import sqlite3

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from adapters.store import DatabaseUnusableError, SqliteAdapterStore, check_database
from gateway.errors import install_error_handlers


def test_a_sound_or_new_database_passes(tmp_path):
    database = tmp_path / "gateway.sqlite3"
    check_database(database, (tmp_path / "adapter-store",))  # nothing there yet: a first start
    assert not database.exists()  # the check creates nothing
    SqliteAdapterStore(database).close()
    (tmp_path / "adapter-store" / ("0" * 64)).mkdir(parents=True)
    check_database(database, (tmp_path / "adapter-store",))


def test_a_damaged_database_is_refused_with_the_options(tmp_path):
    database = tmp_path / "gateway.sqlite3"
    database.write_bytes(b"not a database at all" * 100)
    with pytest.raises(DatabaseUnusableError) as caught:
        check_database(database)
    message = str(caught.value)
    assert str(database) in message and "damaged" in message
    assert "Restore it from a backup" in message and f"mv {database} {database}.damaged" in message
    assert database.read_bytes() == b"not a database at all" * 100


def test_a_truncated_database_is_refused(tmp_path):
    database = tmp_path / "gateway.sqlite3"
    conn = sqlite3.connect(database)
    conn.execute("CREATE TABLE t (x TEXT)")
    conn.executemany("INSERT INTO t VALUES (?)", [("x" * 500,) for _ in range(200)])
    conn.commit()
    conn.close()
    database.write_bytes(database.read_bytes()[: 4096 * 3])  # pages lost at the end
    with pytest.raises(DatabaseUnusableError, match="damaged"):
        check_database(database)


def test_a_lost_database_is_refused_while_its_files_remain(tmp_path):
    store = tmp_path / "adapter-store"
    (store / ("a" * 64)).mkdir(parents=True)
    with pytest.raises(DatabaseUnusableError) as caught:
        check_database(tmp_path / "gateway.sqlite3", (store, tmp_path / "training"))
    assert "is missing" in str(caught.value) and str(store) in str(caught.value)
    assert "move" in str(caught.value) and not (tmp_path / "gateway.sqlite3").exists()


@pytest.mark.parametrize(("error", "status", "code"), [
    (OSError(errno.ENOSPC, "No space left on device"), 507, "insufficient_storage"),
    (sqlite3.OperationalError("database or disk is full"), 507, "insufficient_storage"),
    (sqlite3.OperationalError("database is locked"), 503, "storage_unavailable"),
    (PermissionError(errno.EACCES, "Permission denied"), 500, "internal_error"),
], ids=["enospc", "sqlite-full", "locked", "other"])
def test_storage_errors_get_a_clean_status(error, status, code):
    app = FastAPI()
    install_error_handlers(app)

    @app.post("/write")
    async def write() -> None:
        raise error

    response = TestClient(app, raise_server_exceptions=False).post("/write")
    assert response.status_code == status
    body = response.json()["error"]
    assert body["code"] == code and "Errno" not in body["message"]  # no internals echoed
