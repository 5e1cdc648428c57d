"""Content-addressed adapter files on disk: ``<root>/<sha256>/{adapter_config.json,
adapter_model.safetensors}``.

A blob appears by renaming a fully written, fsynced temporary folder, so a crash leaves either no
blob or a whole one. At start, ``reconcile`` removes temporary folders and moves blobs no row refers
to into ``<root>/quarantine/`` instead of deleting them: the rows may be the ones missing (a lost,
restored or older database), and a blob is the only copy of an uploaded adapter. A quarantined blob
a row refers to again (the right database put back) is moved back at the next start. Nothing is
ever deleted from the quarantine by the gateway; an operator empties it once sure.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
import uuid
from pathlib import Path

from adapters import faults
from adapters.peft_io import CONFIG_FILE, WEIGHTS_FILE

log = logging.getLogger(__name__)
BLOB_FILES = (CONFIG_FILE, WEIGHTS_FILE)
_TMP_PREFIX = ".tmp-"
QUARANTINE = "quarantine"
_CHUNK = 1 << 20
_DIGEST = re.compile(r"[0-9a-f]{64}")


def content_hash(folder: Path) -> str:
    """sha256 over both files, each prefixed by its name and length (no ambiguity at the seam)."""
    digest = hashlib.sha256()
    for name in BLOB_FILES:
        path = folder / name
        digest.update(f"{name}\0{path.stat().st_size}\0".encode())
        with open(path, "rb") as f:
            while chunk := f.read(_CHUNK):
                digest.update(chunk)
    return digest.hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class BlobStore:
    def __init__(self, root: Path):
        self.root = root
        root.mkdir(parents=True, exist_ok=True)

    def path(self, digest: str) -> Path:
        return self.root / digest

    def exists(self, digest: str) -> bool:
        return all((self.path(digest) / name).is_file() for name in BLOB_FILES)

    def size(self, digest: str) -> int:
        return sum((self.path(digest) / name).stat().st_size for name in BLOB_FILES)

    def add(self, source: Path) -> tuple[str, bool]:
        """Copy the adapter files of ``source`` in; returns (hash, whether this call created the blob)."""
        tmp = self.root / f"{_TMP_PREFIX}{uuid.uuid4().hex}"
        tmp.mkdir()
        try:
            for name in BLOB_FILES:
                with open(source / name, "rb") as src, open(tmp / name, "xb") as dst:
                    shutil.copyfileobj(src, dst, _CHUNK)
                    dst.flush()
                    os.fsync(dst.fileno())
                faults.hit("blob.write")
            digest = content_hash(tmp)
            return digest, self.adopt(tmp, digest)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    def adopt(self, tmp: Path, digest: str) -> bool:
        """Rename the whole folder ``tmp`` (under ``root``, its files fsynced, hashing to ``digest``)
        into place; False when the blob exists already (``tmp`` is then removed)."""
        if self.exists(digest):  # same content registered before: share the blob
            shutil.rmtree(tmp)
            return False
        _fsync_dir(tmp)
        try:
            os.rename(tmp, self.path(digest))
        except OSError:
            if not self.exists(digest):
                raise
            shutil.rmtree(tmp)  # an identical upload won the race
            return False
        _fsync_dir(self.root)
        return True

    def fetch(self, digest: str) -> Path:
        """The blob's folder, to read it (a ``CachedBlobStore`` fetches it from the shared store first)."""
        return self.path(digest)

    def remove(self, digest: str) -> None:
        faults.hit("blob.remove")
        shutil.rmtree(self.path(digest), ignore_errors=True)

    def release(self, digest: str, referenced) -> bool:
        """Nothing to do on one disk: ``remove`` freed the only copy (see ``CachedBlobStore.release``)."""
        return False

    @property
    def quarantine(self) -> Path:
        return self.root / QUARANTINE

    def quarantined(self) -> list[str]:
        """Hashes of the blobs in quarantine (kept, not served: no row refers to them)."""
        if not self.quarantine.is_dir():
            return []
        return sorted(p.name for p in self.quarantine.iterdir() if _DIGEST.fullmatch(p.name))

    def _move(self, source: Path, target: Path) -> None:
        target.parent.mkdir(exist_ok=True)
        os.rename(source, target)  # same filesystem (one root): atomic
        _fsync_dir(source.parent)
        _fsync_dir(target.parent)

    def reconcile(self, referenced: set[str]) -> list[str]:
        """Delete temporary folders, quarantine unreferenced blobs, bring back quarantined blobs that
        are referenced again; return the referenced hashes still missing.

        Only names this store creates (a sha256 hex digest, the temporary prefix, the quarantine)
        are touched: the root may share a folder with an operator's files, which must survive."""
        for child in self.root.iterdir():
            if child.name == QUARANTINE:
                continue
            ours = child.name.startswith(_TMP_PREFIX) or _DIGEST.fullmatch(child.name) is not None
            if not ours:
                log.warning("ignoring %s in the adapter store: not a file the store wrote", child)
            elif child.name.startswith(_TMP_PREFIX):  # an add that never finished: never a whole adapter
                log.warning("removing unfinished adapter files %s", child)
                shutil.rmtree(child, ignore_errors=True) if child.is_dir() else child.unlink(missing_ok=True)
            elif child.is_dir() and child.name not in referenced:
                self._quarantine_one(child)
        for digest in sorted(referenced & set(self.quarantined())):
            if not self.path(digest).exists():
                self._move(self.quarantine / digest, self.path(digest))
                log.warning("adapter files %s were in quarantine and a row refers to them again: restored", digest)
        held = self.quarantined()
        if held:
            log.warning("%d adapter blob(s) no row refers to are kept in %s (see README: Persistence)",
                        len(held), self.quarantine)
        return sorted(d for d in referenced if not self.exists(d))

    def _quarantine_one(self, child: Path) -> None:
        target = self.quarantine / child.name
        if target.exists():  # same name = same content (content-addressed): one whole copy is enough
            if all((target / name).is_file() for name in BLOB_FILES):
                log.warning("adapter files %s have no row; an identical copy is already in quarantine", child.name)
                shutil.rmtree(child, ignore_errors=True)
                return
            shutil.rmtree(target, ignore_errors=True)  # a partial copy gives way to this one
        self._move(child, target)
        log.warning("adapter files %s have no row in the database: moved to %s (not deleted)", child.name, target)
