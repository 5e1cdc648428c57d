"""File records in the gateway database (table ``files``), one JSON document per file, each write
one transaction (the training jobs' style). The bytes live next to it, under the data dir
(``gateway.files.service``)."""

from __future__ import annotations

import json
import threading
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from adapters.store import open_sqlite


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


class SqliteFileStore:
    def __init__(self, path: Path):
        self._conn = open_sqlite(path)
        self._lock = threading.Lock()
        with self._lock, self._conn:
            self._conn.execute(
                "CREATE TABLE IF NOT EXISTS files (id TEXT PRIMARY KEY, created REAL NOT NULL, record TEXT NOT NULL)")

    def load_all(self) -> list[FileRecord]:
        with self._lock:
            rows = self._conn.execute("SELECT record FROM files ORDER BY created, id").fetchall()
        return [FileRecord(**json.loads(r[0])) for r in rows]

    def put(self, record: FileRecord) -> None:
        with self._lock, self._conn:
            self._conn.execute("INSERT OR REPLACE INTO files VALUES (?, ?, ?)",
                               (record.id, record.created_at, json.dumps(record.as_dict())))

    def delete(self, file_id: str) -> None:
        with self._lock, self._conn:
            self._conn.execute("DELETE FROM files WHERE id = ?", (file_id,))

    def close(self) -> None:
        with self._lock:
            self._conn.close()
