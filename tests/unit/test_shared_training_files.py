"""Training files and /v1/files contents in a shared store (a shared folder): a checkpoint written
by one replica's trainer resumes on another, shared copies are verified, removals reach them."""

from __future__ import annotations

import asyncio
import hashlib
import json

import pytest
import torch

from adapters.shared_store import SharedStore
from adapters.training.checkpoint import load_latest
from adapters.training.prepare import prepare_dataset
from adapters.training.trainer import TrainingRun
from gateway.files.errors import FileUnavailableError
from gateway.files.service import FileLimits, FileService
from gateway.files.store import SqliteFileStore
from gateway.training.artifacts import JobArtifacts
from gateway.training.shared_files import SharedCheckpointError, SharedJobFiles
from gateway.training.store import SUCCEEDED, TrainingJobRecord
from test_trainer import base, config, dataset_bytes, make_runtime, run_to_end  # noqa: F401 - base: a fixture

JOB = "train-0123456789ab"


def artifacts(tmp_path, name: str) -> JobArtifacts:
    (tmp_path / "shared").mkdir(exist_ok=True)
    shared = SharedJobFiles(SharedStore(str(tmp_path / "shared")))
    return JobArtifacts(tmp_path / name / "training", 3600, shared=shared)


def train_until(run: TrainingRun, step: int) -> None:
    while run.progress.step < step:
        run.micro_step()


def test_a_checkpoint_written_by_one_trainer_resumes_on_another(base, tiny_tokenizer, tmp_path):  # noqa: F811
    cfg = config("lora", lora_dropout=0.2, max_steps=6, grad_accumulation=2, checkpoint_every=2)
    data = dataset_bytes()
    prepared = prepare_dataset(data, tiny_tokenizer, cfg)
    whole = TrainingRun(make_runtime(base), tiny_tokenizer, cfg, prepared.train, prepared.eval, tmp_path / "whole")
    run_to_end(whole)

    a, b = artifacts(tmp_path, "a"), artifacts(tmp_path, "b")
    a.write_dataset(JOB, data)
    first = TrainingRun(make_runtime(base), tiny_tokenizer, cfg, prepared.train, prepared.eval, a.checkpoints(JOB))
    first.checkpoint_saved = lambda: a.checkpoint_saved(JOB)
    train_until(first, 3)  # checkpoint at step 2 is shared; step 3 dies with replica A
    first.close()

    assert not b.dataset(JOB).exists()
    b.pull(JOB)
    assert b.dataset(JOB).read_bytes() == data
    second = TrainingRun(make_runtime(base), tiny_tokenizer, cfg, prepared.train, prepared.eval, b.checkpoints(JOB))
    assert second.resume() and second.progress.step == 2
    run_to_end(second)
    for (name, p), (_, q) in zip(whole.adapter.named_parameters(), second.adapter.named_parameters(), strict=True):
        assert torch.equal(p, q), name
    assert second.progress.train_loss == whole.progress.train_loss


def save(folder, step: int, value: float) -> None:
    from adapters.training.checkpoint import save_checkpoint
    save_checkpoint(folder, step, {"w": torch.full((4,), value)}, {"step": step})


def test_a_corrupt_shared_checkpoint_is_refused(tmp_path):
    a, b = artifacts(tmp_path, "a"), artifacts(tmp_path, "b")
    a.write_dataset(JOB, b"{}")
    save(a.checkpoints(JOB), 2, 1.0)
    a.checkpoint_saved(JOB)
    shared = tmp_path / "shared" / "training" / JOB / "checkpoints" / "checkpoint-00000002" / "state.safetensors"
    blob = bytearray(shared.read_bytes())
    blob[-1] ^= 0xFF
    shared.write_bytes(bytes(blob))
    with pytest.raises(SharedCheckpointError, match="does not match"):
        b.pull(JOB)
    assert load_latest(b.checkpoints(JOB)) is None  # nothing half-fetched is left to resume from


def test_the_shared_pointer_moves_only_once_a_checkpoint_is_whole(tmp_path, monkeypatch):
    a, b = artifacts(tmp_path, "a"), artifacts(tmp_path, "b")
    a.write_dataset(JOB, b"{}")
    save(a.checkpoints(JOB), 2, 2.0)
    a.checkpoint_saved(JOB)
    save(a.checkpoints(JOB), 4, 4.0)
    store = a.shared.store
    real_upload = store.upload

    def upload_then_die(source, key):
        if key.endswith("state.json"):
            raise OSError("connection reset (injected)")
        real_upload(source, key)

    monkeypatch.setattr(store, "upload", upload_then_die)
    a.checkpoint_saved(JOB)  # logged, not raised: training goes on
    monkeypatch.setattr(store, "upload", real_upload)
    b.pull(JOB)
    tensors, state = load_latest(b.checkpoints(JOB))
    assert state == {"step": 2} and torch.equal(tensors["w"], torch.full((4,), 2.0))
    a.checkpoint_saved(JOB)  # the next push completes step 4 and drops step 2 from the shared store
    b.pull(JOB)
    assert load_latest(b.checkpoints(JOB))[1] == {"step": 4}
    assert [p.name for p in (tmp_path / "shared" / "training" / JOB / "checkpoints").iterdir()
            if p.name.startswith("checkpoint-")] == ["checkpoint-00000004"]


def test_a_replica_keeps_its_own_newer_checkpoint(tmp_path):
    a, b = artifacts(tmp_path, "a"), artifacts(tmp_path, "b")
    a.write_dataset(JOB, b"{}")
    save(a.checkpoints(JOB), 2, 2.0)
    a.checkpoint_saved(JOB)
    save(b.checkpoints(JOB), 6, 6.0)
    b.pull(JOB)
    assert load_latest(b.checkpoints(JOB))[1] == {"step": 6}


def test_removals_reach_the_shared_copies(tmp_path):
    a = artifacts(tmp_path, "a")
    shared_job = tmp_path / "shared" / "training" / JOB
    a.write_dataset(JOB, b"{}")
    save(a.checkpoints(JOB), 2, 1.0)
    a.checkpoint_saved(JOB)
    (a.export(JOB)).mkdir()
    (a.export(JOB) / "adapter_config.json").write_text("{}")
    a.export_written(JOB)
    assert (shared_job / "adapter" / "COMPLETE").is_file()
    record = TrainingJobRecord(id=JOB, state=SUCCEEDED, config={}, created=0.0, finished=0.0, adapter_id=None)
    a.tidy([record])  # succeeded, not registered: only the export stays, here and there
    assert sorted(p.name for p in shared_job.iterdir()) == ["adapter"]
    a.remove(JOB)
    assert not shared_job.exists()


def test_job_ids_are_checked_before_they_become_keys(tmp_path):
    a = artifacts(tmp_path, "a")
    for bad in ("../x", "train-../../etc", "train-0123456789aB"):
        with pytest.raises(ValueError):
            a.shared.remove(bad)


# ---- /v1/files ------------------------------------------------------------------------------------
LIMITS = FileLimits(max_bytes=1 << 20, max_lines=100, max_line_bytes=1 << 16, max_files=10)
DATA = b'{"prompt": "a", "completion": "b"}\n{"prompt": "c", "completion": "d"}\n'


def file_service(tmp_path, name: str) -> FileService:
    # one database file stands in for the shared registry (PostgreSQL in a deployment)
    (tmp_path / "shared").mkdir(exist_ok=True)
    return FileService(tmp_path / name / "files", SqliteFileStore(tmp_path / "gateway.sqlite3"), LIMITS,
                       shared=SharedStore((tmp_path / "shared").as_uri()))


def test_a_file_uploaded_on_one_replica_is_read_on_another(tmp_path):
    async def scenario():
        a, b = file_service(tmp_path, "a"), file_service(tmp_path, "b")
        await a.start()
        record = await a.create(DATA, "train.jsonl", "fine-tune")
        await b.start()
        assert await b.read(record.id) == DATA
        assert not (tmp_path / "a" / "files").exists()  # the bytes live in the shared store only
        shared = tmp_path / "shared" / "files" / f"{record.id}.jsonl"
        assert hashlib.sha256(shared.read_bytes()).hexdigest() == record.sha256
        shared.write_bytes(DATA.replace(b"a", b"z"))
        with pytest.raises(FileUnavailableError, match="corrupt"):
            await b.read(record.id)
        shared.unlink()
        with pytest.raises(FileUnavailableError, match="cannot be read"):
            await b.read(record.id)
        second = await a.create(DATA, "again.jsonl", "fine-tune")
        await a.delete(second.id)  # b learns of new records through the shared registry (not here)
        assert not (tmp_path / "shared" / "files" / f"{second.id}.jsonl").exists()
        # an object no record of this replica names may be another replica's upload in progress
        orphan = tmp_path / "shared" / "files" / ("file-" + "0" * 24 + ".jsonl")
        orphan.write_bytes(DATA)
        c = file_service(tmp_path, "c")
        await c.start()
        assert orphan.exists()
        for service in (a, b, c):
            await service.close()

    asyncio.run(scenario())


def test_the_gateway_error_for_an_unreadable_file_is_a_clean_503():
    from gateway.errors import domain_error_spec
    spec = domain_error_spec(FileUnavailableError("x", param="id"))
    assert spec.status == 503 and spec.type == "server_error"


def test_no_shared_store_keeps_the_bytes_in_the_data_dir(tmp_path):
    async def scenario():
        service = FileService(tmp_path / "files", SqliteFileStore(tmp_path / "db.sqlite3"), LIMITS)
        await service.start()
        record = await service.create(DATA, "t.jsonl", "fine-tune")
        assert (tmp_path / "files" / f"{record.id}.jsonl").read_bytes() == DATA
        assert json.loads(json.dumps(record.as_dict()))["sha256"] == record.sha256
        await service.close()

    asyncio.run(scenario())
