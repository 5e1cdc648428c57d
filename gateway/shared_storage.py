"""Open the shared store of a multi-replica deployment (``shared_store_url``) and build the adapter
blob store on top of it; with no shared store, the local ``BlobStore`` in the data dir, as ever."""

from __future__ import annotations

import logging
import socket
import uuid
from pathlib import Path

from adapters.blobs import BlobStore
from adapters.shared_blobs import CachedBlobStore, SharedBlobs
from adapters.shared_store import SharedStore, SharedStoreError
from gateway.settings import Settings

log = logging.getLogger(__name__)


def open_shared_store(settings: Settings) -> SharedStore | None:
    """The shared store, checked readable and writable now (a wrong bucket, an unmounted or
    read-only folder, refused credentials fail the start, not the first request); None when none
    is configured."""
    if settings.shared_store_url is None:
        return None
    try:
        store = SharedStore(settings.shared_store_url, settings.shared_store_options)
        store.children(store.root)
        if not store.local and not store.fs.exists(store.root.split("/", 1)[0]):
            raise FileNotFoundError(f"the bucket {store.root.split('/', 1)[0]!r} does not exist")
        probe = store.key("probes", f"{socket.gethostname()[:40] or 'replica'}-{uuid.uuid4().hex}"
                          .replace("_", "-").replace(".", "-"))
        store.put_bytes(probe, b"writable")  # a read-only mount or credential fails here, not at upload
        store.remove(probe)
    except (OSError, ValueError) as exc:
        raise SharedStoreError(f"the shared store {settings.shared_store_url!r} cannot be used: {exc}") from None
    log.info("shared store: %s (adapter files, training checkpoints and results, /v1/files)", store.url)
    return store


def adapter_blobs(local_root: Path, shared: SharedStore | None) -> BlobStore | CachedBlobStore:
    local = BlobStore(local_root)
    return local if shared is None else CachedBlobStore(local, SharedBlobs(shared))
