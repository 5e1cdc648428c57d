"""The files of training jobs under ``root/<job id>/``, and when they go.

``dataset.jsonl`` (the upload, kept so a restart can rebuild the same run), ``validation.jsonl``
(a separate validation set, when the job has one), ``checkpoints/`` and ``adapter/`` (the PEFT
export). What each outcome keeps:

- succeeded: the dataset and checkpoints go at once; the export goes too once registered (the
  registry copied it into its own store), and stays as the job's result when it was not registered;
- failed / cancelled: everything stays ``retention_seconds`` after the job ended (to look at the
  data or the last checkpoint), then goes;
- deleted jobs: everything goes;
- folders no record names: removed when they hold nothing but the upload (a crash between writing
  the dataset and the record); kept, with a warning, when they hold checkpoints or an export (a
  database restored from an older backup may still need them; the operator decides).

Only folders named like a job id are ever removed: the root may hold an operator's files.

With a shared store (``shared``: ``gateway.training.shared_files``), the dataset, every checkpoint
and the export are copied there too, and whatever is removed here is removed there; ``pull``
brings them back onto the local disk of the replica that runs (or resumes) the job.
No torch: this runs on the event loop's worker threads and in tests without a model.
"""

from __future__ import annotations

import logging
import re
import shutil
import time
from collections.abc import Iterable
from pathlib import Path

from gateway.training.shared_files import SharedJobFiles
from gateway.training.store import CANCELLED, FAILED, SUCCEEDED, TrainingJobRecord

log = logging.getLogger(__name__)
DATASET_FILE = "dataset.jsonl"
DATASET_TMP = "dataset.tmp"
VALIDATION_FILE = "validation.jsonl"
VALIDATION_TMP = "validation.tmp"
UPLOADS = {DATASET_FILE, DATASET_TMP, VALIDATION_FILE, VALIDATION_TMP}
CHECKPOINTS = "checkpoints"
EXPORT = "adapter"
JOB_ID = re.compile(r"train-[0-9a-f]{12}")


class JobArtifacts:
    def __init__(self, root: Path, retention_seconds: float, shared: SharedJobFiles | None = None):
        self.root = root
        self.retention_seconds = retention_seconds
        self.shared = shared

    def folder(self, job_id: str) -> Path:
        return self.root / job_id

    def dataset(self, job_id: str) -> Path:
        return self.folder(job_id) / DATASET_FILE

    def validation(self, job_id: str) -> Path:
        return self.folder(job_id) / VALIDATION_FILE

    def checkpoints(self, job_id: str) -> Path:
        return self.folder(job_id) / CHECKPOINTS

    def export(self, job_id: str) -> Path:
        return self.folder(job_id) / EXPORT

    def write_dataset(self, job_id: str, data: bytes) -> None:
        """Write the upload whole or not at all (a temporary file renamed into place)."""
        self._write(job_id, self.dataset(job_id), DATASET_TMP, data)

    def write_validation(self, job_id: str, data: bytes) -> None:
        """Write a separate validation set, like the upload (a failure removes the job's folder)."""
        self._write(job_id, self.validation(job_id), VALIDATION_TMP, data)

    def _write(self, job_id: str, path: Path, tmp_name: str, data: bytes) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(tmp_name)
        try:
            tmp.write_bytes(data)
            tmp.replace(path)
            if self.shared is not None:  # before the record: any replica may run the job
                self.shared.upload(job_id, path.name, path)
        except BaseException:
            shutil.rmtree(path.parent, ignore_errors=True)  # a half-written dataset is never left
            raise

    def pull(self, job_id: str) -> None:
        """Bring the job's files from the shared store when this replica lacks them (another one
        queued the job, or ran it until it died); nothing without a shared store."""
        if self.shared is None:
            return
        try:
            self.shared.pull(job_id, self.folder(job_id), (DATASET_FILE, VALIDATION_FILE))
        except OSError as exc:
            if not self.dataset(job_id).is_file():
                raise
            log.warning("training job %s: the shared store cannot be read (%s); going on with this replica's "
                        "own files", job_id, exc)

    def checkpoint_saved(self, job_id: str) -> None:
        """Copy the checkpoint just written to the shared store (the trainer calls this on the engine
        thread). A failure is logged: training goes on, resumable from the local checkpoint."""
        if self.shared is None:
            return
        try:
            self.shared.push_checkpoint(job_id, self.checkpoints(job_id))
        except Exception as exc:  # noqa: BLE001 - the shared copy is a spare; the run must not fail for it
            log.error("training job %s: cannot copy its checkpoint to the shared store: %s", job_id, exc)

    def export_written(self, job_id: str) -> None:
        """Copy the PEFT export to the shared store (it stays the job's result when not registered).
        A failure is logged: the local export is whole, and registering copies it to the shared store."""
        if self.shared is None:
            return
        try:
            self.shared.push_export(job_id, self.export(job_id))
        except Exception as exc:  # noqa: BLE001 - the job's outcome does not depend on this copy
            log.error("training job %s: cannot copy its adapter to the shared store: %s", job_id, exc)

    def remove(self, job_id: str) -> None:
        if JOB_ID.fullmatch(job_id):
            shutil.rmtree(self.folder(job_id), ignore_errors=True)
            if self.shared is not None:
                self.shared.remove(job_id)

    def tidy(self, records: Iterable[TrainingJobRecord], now: float | None = None) -> list[str]:
        """Remove what the ended jobs among ``records`` no longer need; return the ids touched."""
        now = time.time() if now is None else now
        touched = []
        for record in records:
            folder = self.folder(record.id)
            if not folder.is_dir():
                continue
            if record.state == SUCCEEDED:
                leftovers = [self.dataset(record.id), self.validation(record.id), self.checkpoints(record.id)]
                if record.adapter_id is not None:
                    leftovers.append(self.export(record.id))
                if any(p.exists() for p in leftovers):
                    for path in leftovers:
                        shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
                    if self.shared is not None:
                        self.shared.remove(record.id, *(p.name for p in leftovers))
                    if not any(folder.iterdir()):
                        folder.rmdir()
                    touched.append(record.id)
            elif record.state in (FAILED, CANCELLED) and now - (record.finished or 0.0) >= self.retention_seconds:
                self.remove(record.id)
                touched.append(record.id)
        if touched:
            log.info("removed the files of ended training jobs no longer needed: %s", ", ".join(touched))
        return touched

    def remove_orphans(self, known: set[str]) -> list[str]:
        """Remove job folders no record names that hold only an upload (call before any job is
        created in this process); return the ids removed."""
        if not self.root.is_dir():
            return []
        removed = []
        for folder in self.root.iterdir():
            if not JOB_ID.fullmatch(folder.name) or folder.name in known:
                continue
            upload_only = {p.name for p in folder.iterdir()} <= UPLOADS
            if upload_only:
                log.warning("removing %s: the upload of a training job whose record was never saved", folder)
                self.remove(folder.name)
                removed.append(folder.name)
            else:
                log.warning("keeping %s: a training job folder with results but no job record (a database "
                            "restored from an older backup?); remove it by hand once it is not needed", folder)
        return removed
