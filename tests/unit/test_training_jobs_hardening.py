"""Training jobs under stress, on a tiny random Llama: cancel wins at every stage, ended jobs can be
deleted and their files go when nothing needs them, and a failing job store (database locked, disk
full) fails the job it hits with the reason while the scheduler carries on."""

from __future__ import annotations

import asyncio
import copy
import errno
import sqlite3
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from fastapi.testclient import TestClient
from support import build_tokenizer
from test_api import make_base, make_settings
from test_training_api import ADMIN, MESSAGES, jsonl, rows, submit, wait_for

from adapters.training.trainer import TrainingRun
from gateway.app import create_app
from gateway.training.artifacts import JobArtifacts
from gateway.training.jobs import TrainingJobs
from gateway.training.store import CANCELLED, FAILED, SUCCEEDED, TrainingJobRecord

WAIT = 30.0  # generous bound on a thread handshake; never reached when things work


def make_client(data_dir, **overrides) -> TestClient:
    settings = make_settings(data_dir, None, admin_key="k" * 24, max_body_bytes=65536, **overrides)
    return TestClient(create_app(settings, base=make_base(build_tokenizer())))


def jobs_of(client) -> TrainingJobs:
    return client.app.state.gateway.training


def adapter_ids(client) -> set[str]:
    return {a["id"] for a in client.get("/admin/adapters", headers=ADMIN).json()["data"]}


def poll(predicate) -> None:
    deadline = time.monotonic() + WAIT
    while not predicate():
        assert time.monotonic() < deadline, "condition never became true"
        time.sleep(0.01)


def run_to_end(client, **config) -> dict:
    """Submit a quick job and wait for it; the scheduler runs one job at a time, so every job
    submitted before it has been fully handled once it ends."""
    job_id = submit(client, jsonl(rows()), max_steps=1, batch_size=4, **config).json()["id"]
    return wait_for(client, job_id, lambda j: j["state"] in (SUCCEEDED, FAILED, CANCELLED))


@pytest.fixture
def client(tmp_path):
    with make_client(tmp_path, training_artifact_retention_seconds=0) as c:
        yield c


# ---- cancel ---------------------------------------------------------------------------------------
def test_cancel_while_the_dataset_is_prepared_wins(client, monkeypatch):
    entered, release = threading.Event(), threading.Event()
    build = TrainingJobs._build_run

    def slow_build(self, record, config):
        run = build(self, record, config)  # the dataset is read and tokenized: the run is ready
        entered.set()
        release.wait(WAIT)
        return run

    monkeypatch.setattr(TrainingJobs, "_build_run", slow_build)
    job_id = submit(client, jsonl(rows()), kind="lora", adapter_id="never", max_steps=2).json()["id"]
    assert entered.wait(WAIT)
    response = client.post(f"/admin/training-jobs/{job_id}/cancel", headers=ADMIN)
    assert response.status_code == 200 and response.json()["state"] == CANCELLED
    release.set()
    assert run_to_end(client, kind="ia3")["state"] == SUCCEEDED  # the cancelled job was handled before
    job = client.get(f"/admin/training-jobs/{job_id}", headers=ADMIN).json()
    assert job["state"] == CANCELLED and job["adapter_id"] is None and job["started"] is None
    assert "never" not in adapter_ids(client)
    reply = client.post("/v1/chat/completions", json={"model": "never", "messages": MESSAGES, "max_tokens": 2})
    assert reply.status_code == 404


def _block_export(monkeypatch, client, entered, release):
    export = TrainingRun.export

    def slow_export(self, folder):
        entered.set()
        release.wait(WAIT)
        return export(self, folder)

    monkeypatch.setattr(TrainingRun, "export", slow_export)


def _block_after_register(monkeypatch, client, entered, release):
    jobs = jobs_of(client)
    register = jobs._register

    async def slow_register(adapter_id, folder):
        registered = await register(adapter_id, folder)  # committed: the adapter is served now
        entered.set()
        await asyncio.to_thread(release.wait, WAIT)
        return registered

    monkeypatch.setattr(jobs, "_register", slow_register)


@pytest.mark.parametrize("block", [_block_export, _block_after_register], ids=["exporting", "registering"])
def test_cancel_while_exporting_or_registering_wins(client, monkeypatch, tmp_path, block):
    entered, release = threading.Event(), threading.Event()
    block(monkeypatch, client, entered, release)
    job_id = submit(client, jsonl(rows()), kind="lora", adapter_id="late", max_steps=1).json()["id"]
    assert entered.wait(WAIT)
    with ThreadPoolExecutor(1) as pool:
        cancel = pool.submit(client.post, f"/admin/training-jobs/{job_id}/cancel", headers=ADMIN)
        poll(lambda: job_id in jobs_of(client)._cancel_asked)  # the cancel reached the job
        release.set()
        response = cancel.result(WAIT)
    assert response.status_code == 200, response.text
    assert response.json()["state"] == CANCELLED and response.json()["adapter_id"] is None
    assert "late" not in adapter_ids(client)
    assert not (tmp_path / "training" / job_id).exists()  # retention 0: a cancelled job's files go


def test_cancel_after_success_says_the_adapter_stays(client):
    job = run_to_end(client, kind="ia3", adapter_id="done")
    assert job["state"] == SUCCEEDED
    response = client.post(f"/admin/training-jobs/{job['id']}/cancel", headers=ADMIN)
    assert response.status_code == 409
    error = response.json()["error"]
    assert error["code"] == "conflict" and "'done' is registered" in error["message"]
    assert "DELETE /admin/adapters/done" in error["message"]


# ---- delete and files -----------------------------------------------------------------------------
def test_delete_refuses_a_running_job_then_forgets_it_and_its_files(tmp_path):
    with make_client(tmp_path) as client:  # default retention: a cancelled job's files are kept
        job_id = submit(client, jsonl(rows()), kind="lora", max_steps=100_000, checkpoint_every=1).json()["id"]
        wait_for(client, job_id, lambda j: j["progress"].get("step", 0) >= 1)
        response = client.delete(f"/admin/training-jobs/{job_id}", headers=ADMIN)
        assert response.status_code == 409 and "cancel it first" in response.json()["error"]["message"]
        assert client.post(f"/admin/training-jobs/{job_id}/cancel", headers=ADMIN).json()["state"] == CANCELLED
        folder = tmp_path / "training" / job_id
        assert (folder / "dataset.jsonl").is_file() and (folder / "checkpoints").is_dir()
        response = client.delete(f"/admin/training-jobs/{job_id}", headers=ADMIN)
        assert response.status_code == 200 and response.json()["deleted"] is True
        assert not folder.exists()
        assert client.get(f"/admin/training-jobs/{job_id}", headers=ADMIN).status_code == 404
        assert client.delete(f"/admin/training-jobs/{job_id}", headers=ADMIN).status_code == 404
        assert client.delete("/admin/training-jobs/x").status_code == 401
    with make_client(tmp_path) as again:  # the row is gone from the database too
        assert again.get("/admin/training-jobs", headers=ADMIN).json()["data"] == []


def test_files_of_ended_jobs(tmp_path):
    with make_client(tmp_path, training_artifact_retention_seconds=0) as client:
        registered = run_to_end(client, kind="ia3")
        kept = run_to_end(client, kind="ia3", register=False)
        training = tmp_path / "training"
        assert registered["state"] == SUCCEEDED and registered["adapter_id"] is not None
        assert not (training / registered["id"]).exists()  # the registry copied the export into its store
        # the job's only result (its files are tidied just after the job is seen ended)
        poll(lambda: sorted(p.name for p in (training / kept["id"]).iterdir()) == ["adapter"])
    with make_client(tmp_path) as restarted:  # served from the adapter store, read from disk again
        reply = restarted.post("/v1/chat/completions", json={"model": registered["adapter_id"], "messages": MESSAGES,
                                                             "max_tokens": 2})
        assert reply.status_code == 200, reply.text


def test_retention_of_failed_and_cancelled_jobs_and_orphans(tmp_path):
    artifacts = JobArtifacts(tmp_path, retention_seconds=100)
    records = []
    for i, state in enumerate((FAILED, CANCELLED, SUCCEEDED)):
        job_id = f"train-{i:012x}"
        artifacts.write_dataset(job_id, b"{}")
        artifacts.checkpoints(job_id).mkdir()
        records.append(TrainingJobRecord(id=job_id, state=state, config={}, created=0.0, finished=1000.0))
    assert artifacts.tidy(records, now=1050.0) == [records[2].id]  # succeeded: at once; others kept
    assert artifacts.dataset(records[0].id).is_file() and artifacts.dataset(records[1].id).is_file()
    assert artifacts.tidy(records, now=1100.0) == [records[0].id, records[1].id]
    assert not any(tmp_path.iterdir())
    artifacts.write_dataset("train-00000000abcd", b"{}")  # a crash between the dataset and the record
    (tmp_path / "train-00000000beef" / "adapter").mkdir(parents=True)  # a result an older database lost
    (tmp_path / "operator-notes").mkdir()
    assert artifacts.remove_orphans(known={records[0].id}) == ["train-00000000abcd"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["operator-notes", "train-00000000beef"]


# ---- a failing store ------------------------------------------------------------------------------
class FlakyStore:
    """The real store, with writes that raise ``error`` while it is set."""

    def __init__(self, inner):
        self.inner = inner
        self.error: Exception | None = None

    def load_all(self):
        return self.inner.load_all()

    @property
    def unreadable(self):
        return self.inner.unreadable

    def put(self, record, **owner):
        if self.error is not None:
            raise self.error
        return self.inner.put(record, **owner)

    def delete(self, job_id):
        if self.error is not None:
            raise self.error
        self.inner.delete(job_id)

    def close(self):
        self.inner.close()


def metric(client, name: str) -> float:
    for line in client.get("/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    raise AssertionError(f"no metric {name}")


@pytest.mark.parametrize("error", [sqlite3.OperationalError("database is locked"),
                                   OSError(errno.ENOSPC, "No space left on device")], ids=["locked", "enospc"])
def test_a_failing_store_fails_the_job_and_the_scheduler_survives(client, monkeypatch, tmp_path, error):
    jobs = jobs_of(client)
    flaky = FlakyStore(jobs.store)
    monkeypatch.setattr(jobs.writer, "store", flaky)
    jobs.retry_seconds = 0.05
    entered, release = threading.Event(), threading.Event()
    build = TrainingJobs._build_run

    def held_build(self, record, config):
        entered.set()
        release.wait(WAIT)
        return build(self, record, config)

    monkeypatch.setattr(TrainingJobs, "_build_run", held_build)
    job_id = submit(client, jsonl(rows()), kind="ia3", max_steps=1).json()["id"]
    assert entered.wait(WAIT)
    flaky.error = error  # the job cannot be marked running
    release.set()
    job = wait_for(client, job_id, lambda j: j["state"] == FAILED)
    assert "could not be marked running" in job["error"] and str(error) in job["error"]
    assert metric(client, "gateway_training_store_errors_total") >= 1
    assert metric(client, "gateway_training_unsaved_jobs") == 1  # the failed state is not written yet

    refused = submit(client, jsonl(rows()), kind="ia3", max_steps=1)  # nothing queued, nothing on disk
    assert refused.status_code == 503 and refused.json()["error"]["code"] == "storage_unavailable"
    assert [p.name for p in (tmp_path / "training").iterdir()] == [job_id]
    assert client.delete(f"/admin/training-jobs/{job_id}", headers=ADMIN).status_code == 503

    flaky.error = None  # the disk has room again / the lock is gone
    assert run_to_end(client, kind="ia3")["state"] == SUCCEEDED  # the scheduler lived on
    saved = {r.id: r.state for r in flaky.load_all()}
    assert saved[job_id] == FAILED and len(saved) == 2  # the failed state was written on retry
    assert metric(client, "gateway_training_unsaved_jobs") == 0


def test_a_dataset_that_cannot_be_written_is_refused_cleanly(client, monkeypatch, tmp_path):
    def disk_full(job_id, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(jobs_of(client).artifacts, "write_dataset", disk_full)
    response = submit(client, jsonl(rows()), kind="ia3", max_steps=1)
    assert response.status_code == 503 and "No space left" in response.json()["error"]["message"]
    assert client.get("/admin/training-jobs", headers=ADMIN).json()["data"] == []


def test_the_scheduler_survives_an_unexpected_error(client, monkeypatch):
    jobs = jobs_of(client)
    jobs.retry_seconds = 0.05
    run_job = jobs._run_job
    calls = []

    async def failing_once(record):
        calls.append(record.id)
        if len(calls) == 1:
            raise RuntimeError("unexpected")
        await run_job(record)

    monkeypatch.setattr(jobs, "_run_job", failing_once)
    assert run_to_end(client, kind="ia3")["state"] == SUCCEEDED  # picked again after the pause
    assert len(calls) == 2
    assert metric(client, "gateway_training_scheduler_errors_total") >= 1


def test_files_that_cannot_be_removed_never_stop_training(client, monkeypatch):
    def refuse(records, now=None):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(jobs_of(client).artifacts, "tidy", refuse)
    assert run_to_end(client, kind="ia3")["state"] == SUCCEEDED


# ---- creates and cancels that race -------------------------------------------------------------
@pytest.mark.parametrize("same_id", [True, False])
def test_jobs_created_at_once_keep_the_id_and_the_queue_limit(tmp_path, same_id):
    """Two creates sent together both passed the checks while their datasets were read: two jobs
    for one adapter id (the second trained, then failed to register), or past max_training_jobs.
    The checks run again where the job is added; the one refused leaves no files."""
    from adapters.errors import AdapterConflictError
    from adapters.training.config import TrainingConfig
    from gateway.training.errors import TooManyTrainingJobsError

    limit = 4 if same_id else 1
    with make_client(tmp_path, max_training_jobs=limit) as client:
        jobs = jobs_of(client)
        config = TrainingConfig.model_validate({"kind": "ia3", "max_steps": 100_000,
                                                **({"adapter_id": "same-id"} if same_id else {})})

        async def both():
            return await asyncio.gather(jobs.create(jsonl(rows()), config), jobs.create(jsonl(rows()), config),
                                        return_exceptions=True)

        results = client.portal.call(both)
        queued = [r for r in results if not isinstance(r, BaseException)]
        refused = [r for r in results if isinstance(r, BaseException)]
        assert len(queued) == 1 and len(refused) == 1
        assert isinstance(refused[0], AdapterConflictError if same_id else TooManyTrainingJobsError)
        client.portal.call(jobs.cancel, queued[0].id)
        assert sorted(p.name for p in (tmp_path / "training").iterdir() if p.is_dir()) <= [queued[0].id]


def test_the_queue_limit_counts_jobs_another_replica_created(tmp_path):
    """A replica counted the jobs in its own memory, a resync behind: with another replica's job
    running, a create here passed max_training_jobs. The store counts them as the job is written."""
    with make_client(tmp_path, max_training_jobs=1) as client:
        jobs = jobs_of(client)
        elsewhere = TrainingJobRecord(id="train-0000000e15e1", state="running", config={"kind": "ia3"},
                                      created=time.time())
        jobs.store.put(elsewhere)
        jobs.store.db.run(lambda tx: tx.execute(  # held by a live claim of the other replica
            "UPDATE training_jobs SET claimed_by = 'other', lease_until = ? WHERE id = ?",
            (time.time() + 3600, elsewhere.id)))
        refused = submit(client, jsonl(rows()), kind="ia3", max_steps=1, batch_size=4)
        assert refused.status_code == 429, refused.text
        assert "1 training jobs are queued or running (limit 1)" in refused.json()["error"]["message"]
        assert [p.name for p in (tmp_path / "training").iterdir() if p.is_dir()] == []  # nothing left


def test_a_cancel_answered_while_the_job_is_being_claimed_holds(tmp_path):
    """The cancel of a queued job whose claim is in flight (the claim read the row as queued)
    answered cancelled; the scheduler then adopted the row it read, and the job trained and
    registered its adapter anyway."""
    with make_client(tmp_path) as client:
        jobs = jobs_of(client)
        claimed, go_on = threading.Event(), threading.Event()
        real_claim, claims = jobs.store.claim, []

        def slow_claim(owner, lease, now):
            claims.append(now)
            row = real_claim(owner, lease, now)
            if row is not None and not claimed.is_set():
                claimed.set()
                go_on.wait(WAIT)  # the claim's worker thread is still on its way back
            return row

        jobs.store.claim = slow_claim
        job_id = submit(client, jsonl(rows()), kind="ia3", max_steps=2, batch_size=4,
                        adapter_id="never-registered").json()["id"]
        assert claimed.wait(WAIT)
        assert client.post(f"/admin/training-jobs/{job_id}/cancel", headers=ADMIN).json()["state"] == "cancelled"
        go_on.set()
        poll(lambda: len(claims) >= 2)  # the scheduler is done with what that claim returned
        assert client.get(f"/admin/training-jobs/{job_id}", headers=ADMIN).json()["state"] == "cancelled"
        assert "never-registered" not in adapter_ids(client)


@pytest.mark.parametrize("noticed", [False, True], ids=["write-refused", "lease-lost-first"])
def test_a_cancel_committed_elsewhere_while_the_adapter_was_registered_withdraws_it(tmp_path, noticed):
    """Another replica's cancel committed after this runner's last cancel check, while it registered
    the adapter: the runner's success write is refused (an ended row is final), and the job read
    cancelled with its adapter registered and served. The stored cancel stands; the adapter goes
    again, as a local cancel's does. ``noticed``: the runner's lease renewal saw the ending first."""
    with make_client(tmp_path) as client:
        jobs = jobs_of(client)
        real_register = jobs._register  # noqa: SLF001 - the moment between the check and the write

        async def register_then_cancelled_elsewhere(adapter_id, folder):
            registered = await real_register(adapter_id, folder)
            cancelled = copy.deepcopy(jobs.get(job_id))
            cancelled.state, cancelled.finished = CANCELLED, time.time()
            assert jobs.store.put(cancelled)  # the other replica's cancel, no claim needed
            if noticed:
                jobs._lost.add(job_id)  # noqa: SLF001 - what the lease renewal marks
            return registered

        jobs._register = register_then_cancelled_elsewhere  # noqa: SLF001
        job_id = submit(client, jsonl(rows()), kind="ia3", max_steps=1, batch_size=4,
                        adapter_id="raced").json()["id"]
        # the runner's own view reads succeeded for the moment between its refused write and the
        # check of what the store holds; the store's ending is what stays
        job = wait_for(client, job_id, lambda j: j["state"] in (FAILED, CANCELLED))
        poll(lambda: "raced" not in adapter_ids(client))
        assert job["state"] == CANCELLED and job["adapter_id"] is None


def test_a_cancel_of_a_job_that_ended_on_another_replica_meanwhile_is_a_409(tmp_path):
    """The job finished on the replica running it, just before this one's cancel was written: the
    store keeps the ending (an ended job's row is final), so the cancel must not answer
    'cancelled' (it did, and tidied the job's files) while the job ends succeeded."""
    with make_client(tmp_path, training_artifact_retention_seconds=0) as client:
        jobs = jobs_of(client)
        claimed, go_on = threading.Event(), threading.Event()
        real_claim = jobs.store.claim

        def held_claim(owner, lease, now):  # keeps the job queued here: another replica runs it
            if not claimed.is_set():
                claimed.set()
                go_on.wait(WAIT)
                return None
            return real_claim(owner, lease, now)

        jobs.store.claim = held_claim
        job_id = submit(client, jsonl(rows()), kind="ia3", max_steps=2, batch_size=4).json()["id"]
        assert claimed.wait(WAIT)
        finished = copy.deepcopy(jobs.get(job_id))  # the other replica's final write
        finished.state, finished.adapter_id, finished.finished = SUCCEEDED, "from-elsewhere", time.time()
        assert jobs.store.put(finished)
        response = client.post(f"/admin/training-jobs/{job_id}/cancel", headers=ADMIN)
        go_on.set()
        assert response.status_code == 409, response.text
        assert "already ended (succeeded)" in response.json()["error"]["message"]
        job = client.get(f"/admin/training-jobs/{job_id}", headers=ADMIN).json()
        assert (job["state"], job["adapter_id"]) == (SUCCEEDED, "from-elsewhere")
        assert jobs.artifacts.dataset(job_id).is_file()  # its files were not tidied
