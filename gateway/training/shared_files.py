"""A training job's files in the shared store, so that another replica can resume a job whose
replica died, and a result is not stuck on one machine's disk.

Layout under the shared store's root (the local layout of ``JobArtifacts``, mirrored)::

    training/<job id>/dataset.jsonl, validation.jsonl
    training/<job id>/checkpoints/checkpoint-00000050/state.safetensors, state.json
    training/<job id>/checkpoints/LATEST     JSON {"name", "sha256": {file: digest}}, written last
    training/<job id>/adapter/...             the PEFT export, COMPLETE written last

The trainer writes its checkpoints on local disk as before (``adapters.training.checkpoint``);
after each one, ``push_checkpoint`` uploads it and then moves the shared ``LATEST``, so the shared
pointer only ever names a checkpoint whose files are all there. ``pull`` brings a job's files
back onto a replica's local disk (checking every checkpoint file against the digest ``LATEST``
gives) before its run is built. Only names built here from a validated job id are ever keys.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
from pathlib import Path

from adapters.shared_store import SharedStore

log = logging.getLogger(__name__)
AREA = "training"
LATEST = "LATEST"  # the name adapters.training.checkpoint uses locally
CHECKPOINT_FILES = ("state.safetensors", "state.json")
CHECKPOINT = re.compile(r"checkpoint-[0-9]{8}")
JOB_ID = re.compile(r"train-[0-9a-f]{12}")
MARKER = "COMPLETE"


class SharedCheckpointError(ValueError):
    """The shared checkpoint of a job cannot be used (its files do not match its pointer); the job
    fails to start with this message (a ValueError, as a bad config does)."""


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _step(name: str | None) -> int:
    return int(name.rsplit("-", 1)[1]) if name and CHECKPOINT.fullmatch(name) else -1


class SharedJobFiles:
    def __init__(self, store: SharedStore):
        self.store = store

    def _key(self, job_id: str, *parts: str) -> str:
        if not JOB_ID.fullmatch(job_id):
            raise ValueError(f"not a training job id: {job_id!r}")
        return self.store.key(AREA, job_id, *parts)

    # ---- uploads ------------------------------------------------------------------------------
    def upload(self, job_id: str, name: str, path: Path) -> None:
        """One file of the job's folder (its dataset or validation set)."""
        self.store.upload(path, self._key(job_id, name))

    def push_checkpoint(self, job_id: str, checkpoints: Path) -> str | None:
        """Upload the local latest checkpoint, then point the shared ``LATEST`` at it, then drop the
        older shared ones; returns its name (None when there is none locally)."""
        pointer = checkpoints / LATEST
        if not pointer.is_file():
            return None
        name = pointer.read_text().strip()
        if not CHECKPOINT.fullmatch(name):
            raise SharedCheckpointError(f"the local checkpoint pointer names {name!r}")
        sums = {}
        for file in CHECKPOINT_FILES:
            self.store.upload(checkpoints / name / file, self._key(job_id, "checkpoints", name, file))
            sums[file] = _sha256(checkpoints / name / file)
        pointer_json = json.dumps({"name": name, "sha256": sums}).encode()
        self.store.put_bytes(self._key(job_id, "checkpoints", LATEST), pointer_json)
        for other in self.store.children(self._key(job_id, "checkpoints")):
            if CHECKPOINT.fullmatch(other) and other != name:
                self.store.remove_tree(self._key(job_id, "checkpoints", other))
        log.info("training job %s: %s copied to the shared store", job_id, name)
        return name

    def push_export(self, job_id: str, folder: Path) -> None:
        for path in sorted(p for p in folder.iterdir() if p.is_file()):
            self.store.upload(path, self._key(job_id, "adapter", path.name))
        self.store.put_bytes(self._key(job_id, "adapter", MARKER), b"{}")

    # ---- downloads ----------------------------------------------------------------------------
    def pull(self, job_id: str, folder: Path, names: tuple[str, ...]) -> list[str]:
        """Bring the job's ``names`` (dataset, validation) that the local ``folder`` lacks, and the
        shared checkpoint when it is newer than the local one; returns what was fetched."""
        fetched = []
        folder.mkdir(parents=True, exist_ok=True)
        for name in names:
            target = folder / name
            if target.exists() or not self.store.exists(self._key(job_id, name)):
                continue
            tmp = folder / f".{name}.pull"
            tmp.unlink(missing_ok=True)
            self.store.download(self._key(job_id, name), tmp)
            os.replace(tmp, target)
            fetched.append(name)
        if self._pull_checkpoint(job_id, folder / "checkpoints"):
            fetched.append("checkpoints")
        if fetched:
            log.info("training job %s: %s fetched from the shared store", job_id, ", ".join(fetched))
        return fetched

    def _pull_checkpoint(self, job_id: str, checkpoints: Path) -> bool:
        key = self._key(job_id, "checkpoints", LATEST)
        if not self.store.exists(key):
            return False
        pointer = json.loads(self.store.read_bytes(key))
        name, sums = pointer.get("name"), pointer.get("sha256") or {}
        if not isinstance(name, str) or not CHECKPOINT.fullmatch(name) or set(sums) != set(CHECKPOINT_FILES):
            raise SharedCheckpointError(f"the shared checkpoint pointer of {job_id} is malformed")
        local = checkpoints / LATEST
        if _step(local.read_text().strip() if local.is_file() else None) >= _step(name):
            return False  # this replica's own checkpoint is as new (it ran the job before)
        checkpoints.mkdir(parents=True, exist_ok=True)
        tmp = checkpoints / (name + ".pull")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        try:
            for file in CHECKPOINT_FILES:
                self.store.download(self._key(job_id, "checkpoints", name, file), tmp / file)
                if _sha256(tmp / file) != sums[file]:
                    raise SharedCheckpointError(f"the shared checkpoint {name} of {job_id}: {file} does not match "
                                                f"its digest (refused)")
            shutil.rmtree(checkpoints / name, ignore_errors=True)
            os.replace(tmp, checkpoints / name)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        pointer_tmp = checkpoints / (LATEST + ".tmp")
        pointer_tmp.write_text(name)
        os.replace(pointer_tmp, local)
        return True

    # ---- removal ------------------------------------------------------------------------------
    def remove(self, job_id: str, *names: str) -> None:
        """The named parts of the job's shared folder, or all of it when no name is given."""
        if not names:
            self.store.remove_tree(self._key(job_id))
        for name in names:
            self.store.remove_tree(self._key(job_id, name))
