"""The files of ``/v1/files``: validate an upload as a training dataset, keep its bytes under
``root/<file id>.jsonl`` (named by the id the server chose, never by the client's filename) and its
record in the gateway database; list, read and delete them.

Validation is the one training uses (``adapters.training_data``: chat, prompt/completion or
instruction records) or, for a file of preference records, ``adapters.preference_data``; every bad
line is reported by number and nothing is stored. Tokenization waits for a job (it depends on the
job's max_seq_len and adapter kind), and reports by line number too.

Records change on the event loop only; disk and database work runs in worker threads. A crash
between writing the bytes and the record leaves a file no record names: removed at the next start.

With a shared store (``shared``), the bytes live there instead, under ``files/<file id>.jsonl``, so
any replica reads them; a read checks them against the record's sha256. Orphans there are left
alone: another replica may be between its bytes and its record, and only its own records are
known here.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import re
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from adapters.errors import DatasetValidationError
from adapters.preference_data import PREFERENCE_FORMAT, first_record, is_preference_record, parse_preference_dataset
from adapters.training_data import parse_dataset
from adapters.shared_store import SharedStore
from gateway.files.errors import FileInUseError, FileNotFound, FileRequestError, FileUnavailableError
from gateway.files.store import FILE_ID, FileRecord, SqlFileStore

log = logging.getLogger(__name__)
PURPOSES = ("fine-tune",)
SUFFIX = ".jsonl"
SHARED_AREA = "files"
MAX_FILENAME_CHARS = 255
_UNSAFE_NAME_CHARS = re.compile(r"[\x00-\x1f\x7f/\\]")


@dataclass(frozen=True)
class FileLimits:
    max_bytes: int
    max_lines: int
    max_line_bytes: int
    max_files: int


def sanitize_filename(name: str | None) -> str:
    """The client's filename as metadata: its last path component, without control characters,
    at most 255 characters ('upload.jsonl' when nothing is left). Never used as a path."""
    base = re.split(r"[/\\]", name or "")[-1]
    base = _UNSAFE_NAME_CHARS.sub("", base).strip()[:MAX_FILENAME_CHARS]
    return base if base not in ("", ".", "..") else "upload.jsonl"


def validate_training_file(data: bytes, limits: FileLimits) -> tuple[str, int]:
    """``(format, usable records)``; raises ``DatasetValidationError`` naming every bad line."""
    if is_preference_record(first_record(data, limits.max_line_bytes)):
        pairs = parse_preference_dataset(data, max_lines=limits.max_lines, max_line_bytes=limits.max_line_bytes)
        return PREFERENCE_FORMAT, len(pairs)
    parsed = parse_dataset(data, max_lines=limits.max_lines, max_line_bytes=limits.max_line_bytes, strict=True)
    return parsed.format, len(parsed.conversations)


def _unreadable(record: FileRecord, where: str, exc: OSError) -> FileUnavailableError:
    log.error("file %s: cannot read its bytes from %s: %s", record.id, where, exc)
    return FileUnavailableError(f"the contents of {record.id} cannot be read now", param="id")


class FileService:
    def __init__(self, root: Path, store: SqlFileStore, limits: FileLimits, shared: SharedStore | None = None):
        self.root = root
        self.shared = shared
        self.store = store
        self.limits = limits
        self._records: dict[str, FileRecord] = {}
        # set by the fine-tuning wiring: why a file may not be deleted now (a job reads it), or None
        self.in_use: Callable[[str], str | None] = lambda file_id: None

    async def start(self) -> None:
        for record in await asyncio.to_thread(self.store.load_all):
            self._records[record.id] = record
        if self.shared is None:  # a file whose record does not read keeps its bytes (adapters.stored_rows)
            await asyncio.to_thread(self._remove_orphans, set(self._records) | self.store.unreadable)

    async def close(self) -> None:
        await asyncio.to_thread(self.store.close)

    async def sync(self) -> None:
        """Follow the store's records, which other replicas change when they share the database."""
        rows = await asyncio.to_thread(self.store.load_all)
        # a record that no longer reads stays as this replica read it last
        kept = {i: self._records[i] for i in self.store.unreadable if i in self._records}
        self._records = {**kept, **{r.id: r for r in rows}}

    def path(self, file_id: str) -> Path:
        return self.root / (file_id + SUFFIX)

    def _key(self, file_id: str) -> str:
        if not FILE_ID.fullmatch(file_id):
            raise ValueError(f"not a file id: {file_id!r}")
        return self.shared.key(SHARED_AREA, file_id + SUFFIX)

    # ---- API ------------------------------------------------------------------------------------
    def list(self, purpose: str | None = None) -> list[FileRecord]:
        """Newest first."""
        records = [r for r in self._records.values() if purpose is None or r.purpose == purpose]
        return sorted(records, key=lambda r: (r.created_at, r.id), reverse=True)

    def get(self, file_id: str) -> FileRecord:
        record = self._records.get(file_id)
        if record is None:
            raise FileNotFound(f"No such File object: {file_id}", param="id")
        return record

    async def create(self, data: bytes, filename: str | None, purpose: str) -> FileRecord:
        """Validate and keep an upload. Raises ``FileRequestError`` (purpose, count),
        ``DatasetValidationError`` (every bad line; nothing stored)."""
        if purpose not in PURPOSES:
            raise FileRequestError(f"purpose {purpose[:64]!r} is not supported here; this gateway stores "
                                   f"fine-tuning data only: use purpose 'fine-tune'", param="purpose")
        if len(self._records) >= self.limits.max_files:
            raise FileRequestError(f"{len(self._records)} files are stored (limit {self.limits.max_files}); "
                                   f"delete some first", param="file")
        if len(data) > self.limits.max_bytes:
            raise DatasetValidationError(f"the file is {len(data)} bytes; the limit is {self.limits.max_bytes}")
        fmt, count = await asyncio.to_thread(validate_training_file, data, self.limits)
        record = FileRecord(id=f"file-{uuid.uuid4().hex[:24]}", bytes=len(data), created_at=int(time.time()),
                            filename=sanitize_filename(filename), purpose=purpose, format=fmt, records=count,
                            sha256=hashlib.sha256(data).hexdigest())
        await asyncio.to_thread(self._write, record, data)
        self._records[record.id] = record
        log.info("file %s stored (%s, %d records, %d bytes)", record.id, fmt, count, len(data))
        return record

    async def read(self, file_id: str) -> bytes:
        """The file's bytes; ``FileUnavailableError`` (503) when they cannot be read, wherever they live."""
        record = self.get(file_id)
        read = self._read_local if self.shared is None else self._read_shared
        return await asyncio.to_thread(read, record)

    def _read_local(self, record: FileRecord) -> bytes:
        try:
            data = self.path(record.id).read_bytes()
        except OSError as exc:  # FileNotFoundError included: the record says it must be there
            raise _unreadable(record, "the data dir", exc) from None
        return _verified(record, data, "the data dir")

    def _read_shared(self, record: FileRecord) -> bytes:
        try:
            data = self.shared.read_bytes(self._key(record.id))
        except OSError as exc:
            raise _unreadable(record, "the shared store", exc) from None
        return _verified(record, data, "the shared store")

    async def delete(self, file_id: str) -> None:
        record = self.get(file_id)
        reason = self.in_use(file_id)
        if reason is not None:
            raise FileInUseError(f"the file {file_id} cannot be deleted now: {reason}", param="id")
        # gone for new jobs before the first await: a job created meanwhile finds no file (404)
        # instead of passing ``in_use`` and then naming a file deleted under it
        self._records.pop(file_id, None)
        try:
            await asyncio.to_thread(self.store.delete, file_id)
        except Exception:
            self._records[file_id] = record  # nothing was deleted
            raise
        if self.shared is None:
            await asyncio.to_thread(self.path(file_id).unlink, missing_ok=True)
        else:
            await asyncio.to_thread(self.shared.remove, self._key(file_id))
        log.info("file %s deleted", file_id)

    # ---- disk (worker threads) ----------------------------------------------------------------
    def _write(self, record: FileRecord, data: bytes) -> None:
        """Bytes first (whole, via a renamed temporary file), then the record; a failure leaves neither."""
        if self.shared is not None:
            key = self._key(record.id)
            try:
                self.shared.put_bytes(key, data)
                self.store.put(record)
            except BaseException:
                self.shared.remove(key)
                raise
            return
        self.root.mkdir(parents=True, exist_ok=True)
        path = self.path(record.id)
        tmp = path.with_suffix(".tmp")
        try:
            with open(tmp, "wb") as f:  # on disk before the record names it (a power loss)
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            tmp.replace(path)
            self.store.put(record)
        except BaseException:
            tmp.unlink(missing_ok=True)
            path.unlink(missing_ok=True)
            raise

    def _remove_orphans(self, known: set[str]) -> None:
        if not self.root.is_dir():
            return
        for path in self.root.iterdir():
            stem = path.name.split(".", 1)[0]
            if FILE_ID.fullmatch(stem) and stem not in known and path.suffix in (SUFFIX, ".tmp"):
                log.warning("removing %s: a file upload whose record was never saved", path)
                path.unlink(missing_ok=True)


def _verified(record: FileRecord, data: bytes, where: str) -> bytes:
    """``data`` if it hashes to the record's sha256; a truncated or altered file is never served
    (nor trained on) as if it were the upload."""
    if hashlib.sha256(data).hexdigest() != record.sha256:
        log.error("file %s: its bytes in %s do not match its sha256; refused", record.id, where)
        raise FileUnavailableError(f"the stored contents of {record.id} are corrupt (refused)", param="id")
    return data
