"""Adapter blobs in a shared store (a shared folder here; S3 in test_shared_store_s3.py): two
replicas, each with its own local tier, one shared folder. Writes whole or invisible, reads
verified, the local tier a cache, nothing a row may refer to ever deleted."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from adapters import faults
from adapters.blobs import BLOB_FILES, BlobStore, content_hash
from adapters.errors import AdapterUnavailableError
from adapters.peft_io import WEIGHTS_FILE
from adapters.shared_blobs import CORRUPT, LIVE, MARKER, QUARANTINE, CachedBlobStore, SharedBlobs, check_digest
from adapters.shared_store import SharedStore, check_part
from test_blobs_store import adapter_folder


def replica(tmp_path: Path, name: str, shared_url: str) -> CachedBlobStore:
    return CachedBlobStore(BlobStore(tmp_path / name / "adapter-store"), SharedBlobs(SharedStore(shared_url)))


@pytest.fixture
def shared_dir(tmp_path) -> Path:
    (tmp_path / "shared").mkdir()  # the operator's folder (a mount): the gateway never creates it
    return tmp_path / "shared"


@pytest.fixture
def pair(tmp_path, shared_dir) -> tuple[CachedBlobStore, CachedBlobStore]:
    # one as a plain path, the other as a file:// URL: both name the same folder
    return replica(tmp_path, "a", str(shared_dir)), replica(tmp_path, "b", shared_dir.as_uri())


def arm(monkeypatch, tmp_path: Path, line: str) -> None:
    path = tmp_path / "faults"
    path.write_text(line + "\n")
    monkeypatch.setenv(faults.ENV, str(path))
    faults._hits.clear()  # noqa: SLF001 - counts are per arming


def test_registered_on_one_replica_is_read_through_on_the_other(tmp_path, shared_dir, pair):
    a, b = pair
    source = adapter_folder(tmp_path, "src", weights=b"w" * 5000)
    digest, created = a.add(source)
    assert created and a.local.exists(digest)
    assert (shared_dir / LIVE / digest / MARKER).is_file()
    assert not b.local.exists(digest) and b.exists(digest) and b.size(digest) == a.size(digest)
    folder = b.fetch(digest)
    assert folder == b.local.path(digest) and content_hash(folder) == digest
    assert [(folder / n).read_bytes() for n in BLOB_FILES] == [(source / n).read_bytes() for n in BLOB_FILES]
    assert b.fetches == 1 and a.fetches == 0
    assert not [p for p in b.local.root.iterdir() if p.name.startswith(".tmp-")]


def test_a_cache_hit_does_not_read_the_shared_store(tmp_path, shared_dir, pair):
    a, b = pair
    digest, _ = a.add(adapter_folder(tmp_path, "src"))
    b.fetch(digest)
    for name in (*BLOB_FILES, MARKER):  # the shared copy is gone: only the local tier can answer now
        (shared_dir / LIVE / digest / name).unlink()
    assert content_hash(b.fetch(digest)) == digest and a.fetch(digest) == a.local.path(digest)
    assert b.fetches == 1 and a.fetches == 0


def test_the_same_content_twice_is_one_blob_and_no_second_upload(tmp_path, shared_dir, pair):
    a, b = pair
    digest, _ = a.add(adapter_folder(tmp_path, "one"))
    weights = shared_dir / LIVE / digest / WEIGHTS_FILE
    before = weights.stat().st_ino, weights.stat().st_mtime_ns
    again, created = b.add(adapter_folder(tmp_path, "two"))  # same bytes, other replica
    assert again == digest and created  # new in b's local tier ...
    assert (weights.stat().st_ino, weights.stat().st_mtime_ns) == before  # ... untouched in the shared one
    assert b.shared.put(digest, b.local.path(digest)) is False
    assert sorted(p.name for p in (shared_dir / LIVE).iterdir()) == [digest]


def test_an_upload_that_fails_between_its_files_is_invisible_and_can_be_retried(tmp_path, monkeypatch, shared_dir,
                                                                               pair):
    a, b = pair
    source = adapter_folder(tmp_path, "src")
    digest = content_hash(source)
    arm(monkeypatch, tmp_path, "shared-blob.write enospc")
    with pytest.raises(OSError):
        a.add(source)
    assert (shared_dir / LIVE / digest / BLOB_FILES[0]).is_file()  # a file made it ...
    assert not (shared_dir / LIVE / digest / MARKER).exists()  # ... the marker did not
    assert not a.local.exists(digest)  # the local copy this add made is undone (no row will name it)
    assert not b.exists(digest) and b.reconcile({digest}) == [digest]
    with pytest.raises(AdapterUnavailableError, match="not in the shared store"):
        b.fetch(digest)
    monkeypatch.delenv(faults.ENV)
    assert a.add(source) == (digest, True)
    assert content_hash(b.fetch(digest)) == digest


def test_a_crash_between_the_files_leaves_no_blob(tmp_path, shared_dir):
    """A real crash (SIGKILL at the fault point) in another process, as a replica dies mid-upload."""
    source = adapter_folder(tmp_path, "src")
    fault_file = tmp_path / "faults"
    fault_file.write_text("shared-blob.write kill\n")
    script = textwrap.dedent(f"""
        from pathlib import Path
        from adapters.blobs import BlobStore
        from adapters.shared_blobs import CachedBlobStore, SharedBlobs
        from adapters.shared_store import SharedStore
        store = CachedBlobStore(BlobStore(Path({str(tmp_path / 'dying')!r})),
                                SharedBlobs(SharedStore({str(shared_dir)!r})))
        store.add(Path({str(source)!r}))
    """)
    env = {**os.environ, faults.ENV: str(fault_file)}
    done = subprocess.run([sys.executable, "-c", script], env=env, cwd=Path(__file__).parents[2], timeout=120)
    assert done.returncode == -signal.SIGKILL
    digest = content_hash(source)
    assert (shared_dir / LIVE / digest).is_dir() and not (shared_dir / LIVE / digest / MARKER).exists()
    survivor = replica(tmp_path, "survivor", str(shared_dir))
    assert not survivor.exists(digest)
    with pytest.raises(AdapterUnavailableError):
        survivor.fetch(digest)
    assert survivor.add(source) == (digest, True)  # registering again completes it


def test_a_corrupt_shared_blob_is_refused_and_moved_aside(tmp_path, shared_dir, pair):
    a, b = pair
    source = adapter_folder(tmp_path, "src", weights=b"good weights")
    digest, _ = a.add(source)
    (shared_dir / LIVE / digest / WEIGHTS_FILE).write_bytes(b"evil weights")  # same size, other bytes
    with pytest.raises(AdapterUnavailableError, match="corrupt"):
        b.fetch(digest)
    assert not b.local.exists(digest) and b.fetches == 0
    assert not [p for p in b.local.root.iterdir() if p.name.startswith(".tmp-")]
    assert not b.shared.has(digest)  # never offered again ...
    corrupt = list((shared_dir / CORRUPT).iterdir())
    assert len(corrupt) == 1 and corrupt[0].name.startswith(digest)  # ... and kept for a look
    assert (corrupt[0] / WEIGHTS_FILE).read_bytes() == b"evil weights"
    with pytest.raises(AdapterUnavailableError):
        b.fetch(digest)
    # the replica that holds a good copy repairs the shared store by registering again
    assert a.add(source) == (digest, False)
    assert (b.fetch(digest) / WEIGHTS_FILE).read_bytes() == b"good weights"


def test_release_quarantines_only_unreferenced_blobs_and_a_read_restores_them(tmp_path, shared_dir, pair):
    a, b = pair
    digest, _ = a.add(adapter_folder(tmp_path, "src"))
    assert a.release(digest, lambda d: True) is False and a.shared.has(digest)
    a.remove(digest)
    assert not a.local.exists(digest) and a.shared.has(digest)  # remove = the local copy only
    assert a.release(digest, lambda d: False) is True
    assert not a.shared.has(digest) and (shared_dir / QUARANTINE / digest / MARKER).is_file()
    assert not (shared_dir / LIVE / digest).exists()
    assert b.reconcile({digest}) == []  # restorable: not missing
    # a registration of the same content raced the delete: its row refers to the digest, so a read
    # brings the blob back from the quarantine
    assert content_hash(b.fetch(digest)) == digest and b.shared.has(digest)
    assert not (shared_dir / QUARANTINE / digest).exists()


def test_a_row_committed_during_a_release_keeps_the_blob_live(tmp_path, shared_dir, pair):
    """Another replica registered the same files while this one released them: it found the blob
    live (no upload) and committed its row during the move. Asked again after the move, the row
    brings the blob back; before, it stayed in the quarantine and the replica whose local copy
    had gone marked the new adapter missing for good."""
    a, b = pair
    digest, _ = a.add(adapter_folder(tmp_path, "src"))
    a.remove(digest)
    answers = iter([False, True])  # no row before the move; the other replica's row after it
    assert a.release(digest, lambda d: next(answers)) is False
    assert a.shared.has(digest) and not (shared_dir / QUARANTINE / digest).exists()
    assert content_hash(b.fetch(digest)) == digest


def test_a_quarantined_blob_counts_as_there_and_a_marker_without_its_files_is_healed(tmp_path, shared_dir, pair):
    a, b = pair
    digest, _ = a.add(adapter_folder(tmp_path, "src"))
    a.remove(digest)
    assert a.release(digest, lambda d: False) is True
    assert b.exists(digest)  # restorable by the first read: the registry must not call it missing
    # a release racing an upload of the same files: the live marker stands, its files went; the
    # quarantine holds the whole blob
    shutil.copytree(shared_dir / QUARANTINE / digest, shared_dir / LIVE / digest)
    (shared_dir / LIVE / digest / WEIGHTS_FILE).unlink()
    assert content_hash(b.fetch(digest)) == digest
    assert (shared_dir / LIVE / digest / WEIGHTS_FILE).is_file() and not (shared_dir / QUARANTINE / digest).exists()


def test_reconcile_counts_only_what_neither_tier_has(tmp_path, pair):
    a, b = pair
    digest, _ = a.add(adapter_folder(tmp_path, "src"))
    nowhere = "0" * 64
    assert b.reconcile({digest, nowhere}) == [nowhere]
    assert not b.local.exists(digest)  # start fetches nothing: first use does


@pytest.mark.parametrize("bad", ["", "../" + "a" * 61, "A" * 64, "a" * 63, "a" * 64 + "\n", None])
def test_digests_are_checked_before_they_become_keys(pair, bad):
    a, _ = pair
    with pytest.raises(ValueError):
        check_digest(bad)
    with pytest.raises(ValueError):
        a.fetch(bad)


@pytest.mark.parametrize("bad", ["..", "a/b", "/etc", ".hidden", "a..b", "x" * 129, ""])
def test_key_parts_are_names_never_paths(bad):
    with pytest.raises(ValueError):
        check_part(bad)



def test_a_shared_store_that_cannot_be_written_fails_the_start(tmp_path):
    from adapters.shared_store import SharedStoreError
    from gateway.settings import Settings
    from gateway.shared_storage import open_shared_store
    shared = tmp_path / "shared"
    settings = Settings(data_dir=tmp_path / "data", shared_store_url=str(shared))
    with pytest.raises(SharedStoreError, match="does not exist; create or mount it"):
        open_shared_store(settings)  # a typo or a missing mount must not become a private store
    assert not shared.exists()
    shared.mkdir()
    assert open_shared_store(settings) is not None and not list((shared / "probes").iterdir())
    shutil.rmtree(shared / "probes")
    (shared / "probes").write_bytes(b"")  # nothing can be written under it (as a read-only mount, even for root)
    with pytest.raises(SharedStoreError, match="cannot be used"):
        open_shared_store(settings)
    a_file = tmp_path / "a-file"
    a_file.write_bytes(b"")
    with pytest.raises(SharedStoreError, match="does not exist"):
        open_shared_store(Settings(data_dir=tmp_path / "data", shared_store_url=str(a_file / "sub")))


@pytest.mark.parametrize("url", ["relative/path", "http://host/x", "memory://x", "s3://", "file://relative",
                                 "gs://bucket/x"])
def test_settings_take_only_an_absolute_shared_folder_or_s3(tmp_path, url):
    from pydantic import ValidationError

    from gateway.settings import Settings
    with pytest.raises(ValidationError, match="shared_store_url"):
        Settings(data_dir=tmp_path, shared_store_url=url)


def test_settings_read_the_store_options_as_json(tmp_path, monkeypatch):
    from pydantic import ValidationError

    from gateway.settings import Settings
    ok = Settings(data_dir=tmp_path, shared_store_url="s3://bucket/prefix/", shared_store_options='{"anon": false}')
    assert ok.shared_store_url == "s3://bucket/prefix" and ok.shared_store_options == {"anon": False}
    monkeypatch.setenv("GATEWAY_SHARED_STORE_OPTIONS", '{"endpoint_url": "http://minio:9000"}')
    assert Settings(data_dir=tmp_path).shared_store_options == {"endpoint_url": "http://minio:9000"}
    for bad in ("not json", "[1, 2]"):
        with pytest.raises(ValidationError, match="shared_store_options"):
            Settings(data_dir=tmp_path, shared_store_options=bad)
    assert Settings(data_dir=tmp_path, shared_store_url=None).shared_store_url is None


def test_an_unreachable_shared_store_is_a_typed_error_and_a_full_disk_stays_one(tmp_path, monkeypatch, pair):
    import errno

    from adapters.errors import SharedStoreUnavailableError
    from gateway.errors import domain_error_spec
    a, b = pair
    source = adapter_folder(tmp_path, "src")
    digest, _ = a.add(source)

    def refused(*args, **kwargs):
        raise ConnectionRefusedError(111, "Connection refused")

    monkeypatch.setattr(b.shared.store, "download", refused)
    with pytest.raises(SharedStoreUnavailableError, match="reading adapter files"):
        b.fetch(digest)
    assert not b.local.exists(digest) and not [p for p in b.local.root.iterdir() if p.name.startswith(".tmp-")]

    class ClientError(Exception):  # what an object store's client library raises: not an OSError
        pass

    def client_error(*args, **kwargs):
        raise ClientError("403 Forbidden")

    other = adapter_folder(tmp_path, "other", weights=b"other")
    monkeypatch.setattr(b.shared.store, "upload", client_error)
    with pytest.raises(SharedStoreUnavailableError, match="uploading adapter files"):
        b.add(other)
    assert not b.local.exists(content_hash(other))  # no row will be written: the local copy is undone

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(b.shared.store, "upload", full)
    with pytest.raises(OSError) as raised:
        b.add(other)
    assert raised.value.errno == errno.ENOSPC  # answered 507 by the gateway, as a full local disk
    spec = domain_error_spec(SharedStoreUnavailableError("x"))
    assert (spec.status, spec.type, spec.code) == (503, "server_error", "storage_unavailable")
