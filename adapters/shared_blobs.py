"""Content-addressed adapter files in the store all replicas share, and each replica's local disk
tier as a cache of it.

Layout under the shared store's root::

    adapters/<sha256>/adapter_config.json
    adapters/<sha256>/adapter_model.safetensors
    adapters/<sha256>/COMPLETE              written last: a blob without it is not a blob
    adapters-quarantine/<sha256>/...        released (no row referred to it); restorable
    adapters-corrupt/<sha256>-<uuid>/...    failed verification; never served, never restored

Writes: both files, then ``COMPLETE`` (each object whole: ``SharedStore``), so a crash or a
partial upload leaves nothing a reader takes for a blob; a blob already complete is left alone
(same digest = same content). Reads: both files are downloaded into a temporary folder of the
local tier, hashed, and renamed into the local tier only when the hash equals the digest; a
mismatch moves the shared copy to ``adapters-corrupt`` and refuses the adapter.

Nothing here deletes a blob a row may refer to. ``release`` (after a delete, when no row refers
to the digest any more) moves the blob to ``adapters-quarantine``; a reader that finds a digest
missing there but quarantined brings it back first, because a row refers to it: that closes the
race of a delete on one replica with a registration of the same content on another.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import shutil
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

from adapters import faults
from adapters.blobs import _DIGEST, _TMP_PREFIX, BLOB_FILES, BlobStore, content_hash
from adapters.errors import AdapterError, AdapterUnavailableError, SharedStoreUnavailableError
from adapters.shared_store import SharedStore

log = logging.getLogger(__name__)
LIVE = "adapters"
QUARANTINE = "adapters-quarantine"
CORRUPT = "adapters-corrupt"
MARKER = "COMPLETE"


@contextlib.contextmanager
def shared_errors(doing: str) -> Iterator[None]:
    """Whatever the shared store's client raises (a refused connection, an HTTP error, a lost mount)
    becomes ``SharedStoreUnavailableError`` (a clean 503); our own typed errors and a full disk
    (``ENOSPC``, a 507) pass unchanged."""
    try:
        yield
    except (AdapterError, ValueError):
        raise
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise
        log.error("the shared store failed while %s: %s", doing, exc)
        raise SharedStoreUnavailableError(f"the shared store cannot be used now ({doing}): {exc}") from None
    except Exception as exc:  # noqa: BLE001 - client libraries raise their own exception types
        log.error("the shared store failed while %s: %s: %s", doing, type(exc).__name__, exc)
        raise SharedStoreUnavailableError(f"the shared store cannot be used now ({doing}): "
                                          f"{type(exc).__name__}") from None


def check_digest(digest: str) -> str:
    if not isinstance(digest, str) or not _DIGEST.fullmatch(digest):
        raise ValueError(f"not a sha256 hex digest: {digest!r}")
    return digest


class SharedBlobs:
    """The adapter blobs of a ``SharedStore``."""

    def __init__(self, store: SharedStore):
        self.store = store

    def _key(self, area: str, digest: str, name: str | None = None) -> str:
        parts = [area, check_digest(digest)] + ([name] if name else [])
        return self.store.key(*parts)

    def has(self, digest: str) -> bool:
        return self.store.exists(self._key(LIVE, digest, MARKER))

    def quarantined(self, digest: str) -> bool:
        return self.store.exists(self._key(QUARANTINE, digest, MARKER))

    def available(self, digest: str) -> bool:
        """Servable now, or restorable from the quarantine by the first read."""
        return self.has(digest) or self.quarantined(digest)

    def size(self, digest: str) -> int:
        marker = json.loads(self.store.read_bytes(self._key(LIVE, digest, MARKER)))
        return sum(int(v) for v in marker["sizes"].values())

    def put(self, digest: str, folder: Path) -> bool:
        """Upload a verified local blob; False when the shared store holds it already."""
        if self.has(digest):
            return False
        for name in BLOB_FILES:
            self.store.upload(folder / name, self._key(LIVE, digest, name))
            faults.hit("shared-blob.write")  # between the files and the marker: a partial blob
        sizes = {name: (folder / name).stat().st_size for name in BLOB_FILES}
        self.store.put_bytes(self._key(LIVE, digest, MARKER), json.dumps({"sha256": digest, "sizes": sizes}).encode())
        log.info("adapter files %s uploaded to the shared store %s", digest, self.store.url)
        return True

    def download(self, digest: str, target: Path) -> None:
        """Fetch the blob into the new folder ``target`` and verify it; raises
        ``AdapterUnavailableError`` when it is missing or does not hash to its digest."""
        if not self.has(digest) and self.quarantined(digest):
            self._restore(digest)
        if not self.has(digest):
            raise AdapterUnavailableError(f"the adapter files {digest[:12]} are not in the shared store")
        target.mkdir()
        try:
            self._read(digest, target)
        except FileNotFoundError:
            # released by another replica while we read (the marker went first), or a release that
            # raced a registration of the same files left the marker without them: the quarantine
            # holds the whole blob
            if not self.quarantined(digest):
                raise AdapterUnavailableError(f"the adapter files {digest[:12]} went from the shared store") from None
            self._restore(digest)
            shutil.rmtree(target)  # what the first read got
            target.mkdir()
            try:
                self._read(digest, target)
            except FileNotFoundError:
                raise AdapterUnavailableError(f"the adapter files {digest[:12]} went from the shared store") from None
        actual = content_hash(target)
        if actual != digest:
            self._move(LIVE, digest, CORRUPT, f"{digest}-{uuid.uuid4().hex[:8]}")
            log.error("adapter files %s in the shared store hash to %s: moved to %s, not served", digest, actual,
                      CORRUPT)
            raise AdapterUnavailableError(
                f"the adapter files {digest[:12]} in the shared store are corrupt (refused); register it again")

    def _read(self, digest: str, target: Path) -> None:
        for name in BLOB_FILES:
            self.store.download(self._key(LIVE, digest, name), target / name)

    def _restore(self, digest: str) -> None:
        """Bring the blob back from the quarantine: a row refers to it."""
        try:
            self._move(QUARANTINE, digest, LIVE, digest)
            log.warning("adapter files %s were in the shared quarantine and a row refers to them: restored", digest)
        except FileNotFoundError:  # another replica restored it meanwhile (it moved the marker first)
            pass

    def release(self, digest: str, referenced: Callable[[str], bool]) -> bool:
        """Move the blob to the shared quarantine unless ``referenced(digest)`` (a row of the shared
        registry refers to it); True when moved. Never deletes. A registration of the same files
        on another replica may commit its row during the move (it found the blob live and did not
        upload it): asked again afterwards, a row that refers to it now brings it back."""
        if referenced(digest) or not self.has(digest):
            return False
        self._move(LIVE, digest, QUARANTINE, digest)
        if referenced(digest):
            self._restore(digest)
            return False
        log.info("adapter files %s: no row refers to them; moved to the shared quarantine", digest)
        return True

    def _move(self, area: str, digest: str, to_area: str, to_name: str) -> None:
        """Copy files then marker to the target, then remove the marker, then the files, at the
        source: at every moment at least one complete copy has its marker."""
        for name in (*BLOB_FILES, MARKER):
            self.store.copy(self._key(area, digest, name), self.store.key(to_area, to_name, name))
        for name in (MARKER, *BLOB_FILES):
            self.store.remove(self._key(area, digest, name))
        self.store.remove_tree(self._key(area, digest))


class CachedBlobStore:
    """A replica's local ``BlobStore`` as a read-through, write-through cache of ``SharedBlobs``;
    the registry uses it exactly as it uses a ``BlobStore``."""

    def __init__(self, local: BlobStore, shared: SharedBlobs):
        self.local = local
        self.shared = shared
        self.fetches = 0  # blobs read from the shared store (a figure for tests and metrics)

    @property
    def root(self) -> Path:
        return self.local.root

    def path(self, digest: str) -> Path:
        return self.local.path(digest)

    def exists(self, digest: str) -> bool:
        if self.local.exists(digest):
            return True
        with shared_errors("looking up adapter files"):
            return self.shared.available(digest)  # a quarantined blob a row refers to is restored on read

    def size(self, digest: str) -> int:
        return self.local.size(digest) if self.local.exists(digest) else self.shared.size(digest)

    def add(self, source: Path) -> tuple[str, bool]:
        """Local first, then shared, both before the caller commits the row. A failed upload undoes
        the local copy this call made and raises: a row must never name a blob only one replica has."""
        digest, created = self.local.add(source)
        try:
            with shared_errors("uploading adapter files"):
                self.shared.put(digest, self.local.path(digest))
        except BaseException:
            if created:
                self.local.remove(digest)
            raise
        return digest, created

    def fetch(self, digest: str) -> Path:
        """The blob's local folder, read through from the shared store on first use (blocking)."""
        check_digest(digest)
        if self.local.exists(digest):
            return self.local.path(digest)
        tmp = self.local.root / f"{_TMP_PREFIX}{uuid.uuid4().hex}"  # swept by reconcile after a crash
        try:
            with shared_errors("reading adapter files"):
                self.shared.download(digest, tmp)
            self.local.adopt(tmp, digest)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        self.fetches += 1
        log.info("adapter files %s fetched from the shared store into %s", digest, self.local.root)
        return self.local.path(digest)

    def remove(self, digest: str) -> None:
        """Drop the local copy only; the shared one goes through ``release``."""
        self.local.remove(digest)

    def release(self, digest: str, referenced: Callable[[str], bool]) -> bool:
        return self.shared.release(digest, referenced)

    def quarantined(self) -> list[str]:
        return self.local.quarantined()

    def reconcile(self, referenced: set[str]) -> list[str]:
        """The local tier reconciled as a ``BlobStore``; what it lacks counts as missing only when
        the shared store lacks it too (a fresh replica fetches the rest on first use)."""
        missing = self.local.reconcile(referenced)
        with shared_errors("looking up adapter files"):
            return [d for d in missing if not self.shared.available(d)]


# what the registry takes: one disk (single process), or one disk caching the shared store
AnyBlobStore = BlobStore | CachedBlobStore
