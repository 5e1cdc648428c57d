"""Content-addressed adapter files on disk: ``<root>/<sha256>/{adapter_config.json,
adapter_model.safetensors}``.

A blob appears by renaming a fully written, fsynced temporary folder, so a crash leaves either no
blob or a whole one; temporary folders and blobs no row refers to are removed by ``reconcile``.
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
            if self.exists(digest):  # same content registered before: share the blob
                shutil.rmtree(tmp)
                return digest, False
            _fsync_dir(tmp)
            try:
                os.rename(tmp, self.path(digest))
            except OSError:
                if not self.exists(digest):
                    raise
                shutil.rmtree(tmp)  # an identical upload won the race
                return digest, False
            _fsync_dir(self.root)
            return digest, True
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    def remove(self, digest: str) -> None:
        faults.hit("blob.remove")
        shutil.rmtree(self.path(digest), ignore_errors=True)

    def reconcile(self, referenced: set[str]) -> list[str]:
        """Delete temporary folders and unreferenced blobs; return the referenced hashes missing.

        Only names this store creates (a sha256 hex digest, or the temporary prefix) are ever
        deleted: the root may share a folder with an operator's files, which must survive."""
        for child in self.root.iterdir():
            ours = child.name.startswith(_TMP_PREFIX) or _DIGEST.fullmatch(child.name) is not None
            if not ours:
                log.warning("ignoring %s in the adapter store: not a file the store wrote", child)
            elif child.name.startswith(_TMP_PREFIX) or (child.is_dir() and child.name not in referenced):
                log.warning("removing orphaned adapter files %s", child)
                shutil.rmtree(child, ignore_errors=True) if child.is_dir() else child.unlink(missing_ok=True)
        return sorted(d for d in referenced if not self.exists(d))
