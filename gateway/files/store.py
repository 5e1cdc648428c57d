"""File records in the gateway database (table ``files``), one JSON document per file, each write
one transaction (the training jobs' style). The bytes live next to it, under the data dir
(``gateway.files.service``)."""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from adapters.sql import SqlDatabase, SqliteDatabase, Transaction, upsert_sql
from adapters.stored_rows import RowReader, known_fields

FILE_ID = re.compile(r"file-[0-9a-f]{24}")


@dataclass
class FileRecord:
    id: str  # "file-" + 24 hex digits; also the name of the bytes on disk
    bytes: int
    created_at: int
    filename: str  # what the client called it, sanitized: metadata only, never a path
    purpose: str
    format: str  # chat | prompt_completion | instruction | preference
    records: int  # usable lines
    sha256: str

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


_PUT = upsert_sql("files", ("id", "created", "record"))


def _record(row: tuple) -> FileRecord:
    record = FileRecord(**known_fields(FileRecord, json.loads(row[1])))
    if record.id != row[0] or not FILE_ID.fullmatch(record.id):  # the id names the bytes on disk
        raise ValueError("its id is not a file id")
    return record


class SqlFileStore:
    """File records on SQLite or PostgreSQL (``adapters.sql``); a change notifies the topic ``files``."""

    def __init__(self, db: SqlDatabase):
        self.db = db
        self.rows = RowReader("files", "Fix or delete the row in the database; its bytes are kept.")

    def load_all(self) -> list[FileRecord]:
        """Every record that reads; the ids of those that do not are in ``unreadable`` (adapters.stored_rows)."""
        rows = self.db.read(lambda tx: tx.execute("SELECT id, record FROM files ORDER BY created, id"))
        return self.rows.parse_all(rows, _record)

    @property
    def unreadable(self) -> set[str]:
        return self.rows.unreadable

    def put(self, record: FileRecord) -> None:
        def write(tx: Transaction) -> None:
            tx.execute(_PUT, (record.id, record.created_at, json.dumps(record.as_dict())))
            tx.notify("files", id=record.id)
        self.db.run(write)

    def delete(self, file_id: str) -> None:
        def write(tx: Transaction) -> None:
            tx.execute("DELETE FROM files WHERE id = ?", (file_id,))
            tx.notify("files", id=file_id)
        self.db.run(write)

    def close(self) -> None:
        self.db.close()


class SqliteFileStore(SqlFileStore):
    def __init__(self, path: Path):
        super().__init__(SqliteDatabase(path))
        self.db.run(lambda tx: tx.execute(
            "CREATE TABLE IF NOT EXISTS files (id TEXT PRIMARY KEY, created REAL NOT NULL, record TEXT NOT NULL)"))
