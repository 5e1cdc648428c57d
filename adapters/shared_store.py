"""One store several replicas share, reached through fsspec: a shared folder (``/mnt/shared/gw``,
``file:///mnt/shared/gw``) or an object store (``s3://bucket/prefix`` with s3fs).

Only the operator chooses the URL (a setting); keys are built here from fixed names and ids the
caller validated, and every part is checked again (``key``), so nothing a client sends becomes a
path. Each ``put_*`` makes one object appear whole or not at all to a reader:

- on a local or network filesystem, the bytes go to a temporary name next to the target, are
  fsynced, then renamed over it (``os.replace`` is atomic on POSIX filesystems, NFS included);
- on an object store, a PUT (or a server-side copy) is already atomic per object.

What spans several objects (an adapter's two files, a checkpoint) is made whole by the callers:
they write a small marker object last, and treat whatever has no marker as absent.
"""

from __future__ import annotations

import os
import re
import shutil
import uuid
from pathlib import Path
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

_PART = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_TMP = ".tmp-"
_CHUNK = 1 << 20


class SharedStoreError(Exception):
    """The shared store cannot be used as configured (a bad URL, an unknown protocol)."""


def check_part(part: str) -> str:
    """A key part is a name, never a path: letters, digits, '.', '_', '-'; no '..'; ≤ 128 chars."""
    if not isinstance(part, str) or not _PART.fullmatch(part) or ".." in part:
        raise ValueError(f"not a valid shared store key part: {part!r}")
    return part


class SharedStore:
    def __init__(self, url: str, options: dict[str, Any] | None = None):
        options = dict(options or {})
        protocol = fsspec.core.split_protocol(url)[0] or "file"
        if protocol == "s3":
            # listings cached in the process would hide what another replica wrote meanwhile
            options.setdefault("use_listings_cache", False)
        try:
            self.fs, root = fsspec.core.url_to_fs(url, **options)
        except (ImportError, ValueError) as exc:
            raise SharedStoreError(f"the shared store {url!r} cannot be opened: {exc}") from None
        self.url = url
        self.root = root.rstrip("/")
        self.local = isinstance(self.fs, LocalFileSystem)
        if self.local and not self.fs.isdir(self.root):
            # never created here: a typo or a missing mount would split the replicas into private stores
            raise SharedStoreError(f"the shared folder {self.root!r} does not exist; create or mount it first")

    def __repr__(self) -> str:
        return f"SharedStore({self.url!r})"

    def key(self, *parts: str) -> str:
        return "/".join([self.root, *(check_part(p) for p in parts)])

    # ---- reads --------------------------------------------------------------------------------
    def exists(self, key: str) -> bool:
        return self.fs.exists(key)

    def read_bytes(self, key: str) -> bytes:
        return self.fs.cat_file(key)

    def download(self, key: str, target: Path) -> None:
        """Copy one object into a new local file (the caller verifies and places it)."""
        with self.fs.open(key, "rb") as src, open(target, "xb") as dst:
            shutil.copyfileobj(src, dst, _CHUNK)
            dst.flush()
            os.fsync(dst.fileno())

    def children(self, key: str) -> list[str]:
        """Names directly under ``key`` ([] when there is nothing)."""
        try:
            return sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in self.fs.ls(key, detail=False))
        except FileNotFoundError:
            return []

    def modified(self, key: str) -> float | None:
        """Last change as a POSIX timestamp, when the backend says."""
        try:
            return self.fs.modified(key).timestamp()
        except (NotImplementedError, FileNotFoundError, AttributeError, KeyError):
            return None

    # ---- writes -------------------------------------------------------------------------------
    def put_bytes(self, key: str, data: bytes) -> None:
        if self.local:
            self._local_replace(key, lambda f: f.write(data))
        else:
            self.fs.pipe_file(key, data)

    def upload(self, source: Path, key: str) -> None:
        if self.local:
            with open(source, "rb") as src:
                self._local_replace(key, lambda f: shutil.copyfileobj(src, f, _CHUNK))
        else:
            self.fs.put_file(str(source), key)

    def copy(self, source: str, target: str) -> None:
        if self.local:
            with open(source, "rb") as src:
                self._local_replace(target, lambda f: shutil.copyfileobj(src, f, _CHUNK))
        else:
            self.fs.copy(source, target)  # server-side copy: atomic per object

    def _local_replace(self, key: str, write) -> None:
        target = Path(key)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f"{_TMP}{uuid.uuid4().hex}-{target.name}")
        try:
            with open(tmp, "xb") as f:
                write(f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, target)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        fd = os.open(target.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def remove(self, key: str) -> None:
        try:
            self.fs.rm_file(key)
        except FileNotFoundError:
            pass

    def remove_tree(self, key: str) -> None:
        try:
            self.fs.rm(key, recursive=True)
        except FileNotFoundError:
            pass
