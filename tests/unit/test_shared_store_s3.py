"""The s3:// shared store through s3fs, against moto's S3-compatible HTTP server running locally
(a real server on a local port, no network): blobs whole or invisible, verified reads, the local
tier a cache, training checkpoints and /v1/files contents. Skipped when s3fs or moto is absent."""

from __future__ import annotations

import asyncio
import uuid

import pytest

pytest.importorskip("s3fs")
moto_server = pytest.importorskip("moto.server")

from adapters import faults  # noqa: E402
from adapters.blobs import BLOB_FILES, BlobStore, content_hash  # noqa: E402
from adapters.errors import AdapterUnavailableError  # noqa: E402
from adapters.peft_io import WEIGHTS_FILE  # noqa: E402
from adapters.shared_blobs import LIVE, MARKER, QUARANTINE, CachedBlobStore, SharedBlobs  # noqa: E402
from adapters.shared_store import SharedStore  # noqa: E402
from gateway.files.errors import FileUnavailableError  # noqa: E402
from gateway.files.service import FileLimits, FileService  # noqa: E402
from gateway.files.store import SqliteFileStore  # noqa: E402
from gateway.settings import Settings  # noqa: E402
from gateway.shared_storage import open_shared_store  # noqa: E402
from gateway.training.artifacts import JobArtifacts  # noqa: E402
from gateway.training.shared_files import SharedCheckpointError, SharedJobFiles  # noqa: E402
from test_blobs_store import adapter_folder  # noqa: E402

BUCKET = "gateway-shared"


@pytest.fixture(scope="module")
def endpoint():
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def options(endpoint, monkeypatch) -> dict:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")  # moto accepts any; never real credentials
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    return {"endpoint_url": endpoint}


@pytest.fixture
def url(options) -> str:
    """A fresh prefix per test in one bucket."""
    store = SharedStore(f"s3://{BUCKET}", options)
    if not store.fs.exists(BUCKET):
        store.fs.mkdir(BUCKET)
    return f"s3://{BUCKET}/t-{uuid.uuid4().hex[:8]}"


def replica(tmp_path, name, url, options) -> CachedBlobStore:
    return CachedBlobStore(BlobStore(tmp_path / name), SharedBlobs(SharedStore(url, options)))


def test_blobs_through_s3(tmp_path, url, options, monkeypatch):
    a, b = replica(tmp_path, "a", url, options), replica(tmp_path, "b", url, options)
    fs, root = a.shared.store.fs, a.shared.store.root
    source = adapter_folder(tmp_path, "src", weights=b"w" * 70_000)
    digest = content_hash(source)

    # an upload that fails between its files leaves objects but no marker: not a blob
    fault_file = tmp_path / "faults"
    fault_file.write_text("shared-blob.write enospc\n")
    monkeypatch.setenv(faults.ENV, str(fault_file))
    with pytest.raises(OSError):
        a.add(source)
    monkeypatch.delenv(faults.ENV)
    faults._hits.clear()  # noqa: SLF001
    assert fs.exists(f"{root}/{LIVE}/{digest}/{BLOB_FILES[0]}") and not b.exists(digest)
    with pytest.raises(AdapterUnavailableError):
        b.fetch(digest)

    assert a.add(source) == (digest, True)
    assert fs.exists(f"{root}/{LIVE}/{digest}/{MARKER}")
    assert b.size(digest) == a.size(digest)
    assert content_hash(b.fetch(digest)) == digest and b.fetches == 1
    fs.rm(f"{root}/{LIVE}/{digest}", recursive=True)  # gone from S3: the cache still answers
    assert content_hash(b.fetch(digest)) == digest and b.fetches == 1

    # a corrupt object is refused and moved aside; the replica with a good copy repairs it
    assert a.add(source) == (digest, False)
    fs.pipe_file(f"{root}/{LIVE}/{digest}/{WEIGHTS_FILE}", b"x" * 70_000)
    c = replica(tmp_path, "c", url, options)
    with pytest.raises(AdapterUnavailableError, match="corrupt"):
        c.fetch(digest)
    assert not c.local.exists(digest) and not c.shared.has(digest)
    assert a.add(source) == (digest, False)
    assert content_hash(c.fetch(digest)) == digest

    # release: quarantined (not deleted) when unreferenced; a read restores it
    assert a.release(digest, lambda d: False)
    assert not a.shared.has(digest) and fs.exists(f"{root}/{QUARANTINE}/{digest}/{MARKER}")
    d = replica(tmp_path, "d", url, options)
    assert d.reconcile({digest}) == [] and content_hash(d.fetch(digest)) == digest


def test_training_checkpoints_and_files_through_s3(tmp_path, url, options):
    import torch

    from adapters.training.checkpoint import load_latest, save_checkpoint

    job = "train-00000000abcd"
    a = JobArtifacts(tmp_path / "a", 60, shared=SharedJobFiles(SharedStore(url, options)))
    b = JobArtifacts(tmp_path / "b", 60, shared=SharedJobFiles(SharedStore(url, options)))
    a.write_dataset(job, b'{"prompt": "p", "completion": "c"}\n')
    save_checkpoint(a.checkpoints(job), 3, {"w": torch.arange(4.0)}, {"step": 3})
    a.checkpoint_saved(job)
    b.pull(job)
    assert b.dataset(job).read_bytes() == a.dataset(job).read_bytes()
    tensors, state = load_latest(b.checkpoints(job))
    assert state == {"step": 3} and torch.equal(tensors["w"], torch.arange(4.0))

    fs, root = a.shared.store.fs, a.shared.store.root
    fs.pipe_file(f"{root}/training/{job}/checkpoints/checkpoint-00000003/state.json", b'{"step": 99}')
    other = JobArtifacts(tmp_path / "c", 60, shared=SharedJobFiles(SharedStore(url, options)))
    with pytest.raises(SharedCheckpointError):
        other.pull(job)
    a.remove(job)
    assert not fs.exists(f"{root}/training/{job}/dataset.jsonl")

    async def files():
        limits = FileLimits(max_bytes=1 << 20, max_lines=10, max_line_bytes=1 << 16, max_files=4)
        service = FileService(tmp_path / "files", SqliteFileStore(tmp_path / "db.sqlite3"), limits,
                              shared=SharedStore(url, options))
        await service.start()
        data = b'{"prompt": "p", "completion": "c"}\n'
        record = await service.create(data, "t.jsonl", "fine-tune")
        assert await service.read(record.id) == data
        fs.pipe_file(f"{root}/files/{record.id}.jsonl", b'{"prompt": "P", "completion": "c"}\n')
        with pytest.raises(FileUnavailableError):
            await service.read(record.id)
        await service.delete(record.id)
        assert not fs.exists(f"{root}/files/{record.id}.jsonl")
        await service.close()

    asyncio.run(files())


def test_settings_open_an_s3_store_and_refuse_a_missing_bucket(url, options, tmp_path):
    settings = Settings(data_dir=tmp_path, shared_store_url=url, shared_store_options=options)
    assert open_shared_store(settings) is not None
    from adapters.shared_store import SharedStoreError
    missing = Settings(data_dir=tmp_path, shared_store_url="s3://no-such-bucket/x", shared_store_options=options)
    with pytest.raises(SharedStoreError, match="cannot be used"):
        open_shared_store(missing)
