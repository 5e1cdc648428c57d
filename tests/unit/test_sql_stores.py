"""Training job and file records on SQLite and PostgreSQL alike: round trips, ended jobs staying
ended, and job claims (one claimer per job, leases that expire, renew and release)."""

from __future__ import annotations

import json
import threading

import pytest

from gateway.files.store import FileRecord, SqlFileStore, SqliteFileStore
from gateway.training.errors import TooManyTrainingJobsError
from gateway.training.store import (
    CANCELLED, QUEUED, RUNNING, SUCCEEDED, SqliteTrainingJobStore, SqlTrainingJobStore, TrainingJobRecord,
)


def job(job_id: str, created: float = 1.0, state: str = QUEUED) -> TrainingJobRecord:
    return TrainingJobRecord(id=job_id, state=state, config={"kind": "lora", "adapter_id": job_id},
                             created=created, dataset={"format": "chat"}, progress={"step": 0})


@pytest.fixture
def open_jobs(store_backend):
    return lambda: store_backend.open(SqliteTrainingJobStore, SqlTrainingJobStore)


@pytest.fixture
def jobs(open_jobs):
    store = open_jobs()
    yield store
    store.close()


def test_job_records_round_trip_in_creation_order(open_jobs):
    store = open_jobs()
    store.put(job("b", created=2.0))
    store.put(job("a", created=3.0))
    changed = job("b", created=2.0, state=RUNNING)
    changed.progress = {"step": 7, "loss": 1.25}
    store.put(changed)
    store.close()
    reopened = open_jobs()
    assert reopened.load_all() == [changed, job("a", created=3.0)]
    reopened.delete("a")
    assert [r.id for r in reopened.load_all()] == ["b"]
    reopened.close()


def test_an_ended_job_stays_ended(jobs):
    jobs.put(job("j"))
    jobs.put(job("j", state=CANCELLED))  # e.g. cancelled on another replica
    jobs.put(job("j", state=RUNNING))  # a late progress write of the replica that ran it
    assert [r.state for r in jobs.load_all()] == [CANCELLED]


def test_claims_take_the_oldest_claimable_job_once(jobs):
    for job_id, created in (("new", 2.0), ("old", 1.0), ("done", 0.5)):
        jobs.put(job(job_id, created, SUCCEEDED if job_id == "done" else QUEUED))
    assert jobs.claim("a", 30.0, now=100.0).id == "old"
    assert jobs.claim("b", 30.0, now=100.0).id == "new"  # "old" is a's while its lease lasts
    assert jobs.claim("c", 30.0, now=100.0) is None


def test_an_expired_lease_lets_another_claimer_take_the_job(jobs):
    jobs.put(job("j"))
    assert jobs.claim("a", 10.0, now=100.0).id == "j"
    assert jobs.renew("a", "j", 10.0, now=105.0)  # lease until 115
    assert jobs.claim("b", 10.0, now=114.0) is None
    running = job("j", state=RUNNING)
    jobs.put(running)  # a's progress: a record write keeps the lease
    assert jobs.claim("b", 10.0, now=114.0) is None
    taken = jobs.claim("b", 10.0, now=116.0)  # a stopped renewing: b resumes it
    assert taken == running
    progressed = job("j", state=RUNNING)
    progressed.progress = {"step": 9}
    jobs.put(progressed, owner="b")
    late = job("j", state=RUNNING)
    late.progress = {"step": 3}
    jobs.put(late, owner="a")  # a late write of the replica that lost the claim changes nothing
    assert jobs.load_all() == [progressed]
    assert not jobs.renew("a", "j", 10.0, now=117.0)  # a learns it is no longer its job


def test_renew_fails_once_the_job_ended_elsewhere_and_release_frees_it(jobs):
    jobs.put(job("j"))
    jobs.claim("a", 10.0, now=100.0)
    jobs.release("b", "j")  # not b's: nothing happens
    assert jobs.claim("b", 10.0, now=101.0) is None
    jobs.release("a", "j")
    assert jobs.claim("b", 10.0, now=101.0).id == "j"
    jobs.put(job("j", state=CANCELLED))
    assert not jobs.renew("b", "j", 10.0, now=102.0)
    jobs.put(job("k"))
    jobs.claim("a", 10.0, now=100.0)
    jobs.release_all()
    assert jobs.claim("b", 10.0, now=100.0).id == "k"


def test_concurrent_claimers_never_take_the_same_job(open_jobs):
    setup = open_jobs()
    for i in range(20):
        setup.put(job(f"j{i:02d}", created=float(i)))
    setup.close()
    taken: dict[str, list[str]] = {}
    barrier = threading.Barrier(4)

    def claimer(name: str) -> None:
        store = open_jobs()  # its own connection, as a replica has
        mine = taken.setdefault(name, [])
        barrier.wait()
        while (record := store.claim(name, 60.0, now=100.0)) is not None:
            mine.append(record.id)
        store.close()

    threads = [threading.Thread(target=claimer, args=(f"c{i}",)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    claimed = [job_id for ids in taken.values() for job_id in ids]
    assert sorted(claimed) == [f"j{i:02d}" for i in range(20)]  # each job exactly once


def test_a_new_jobs_first_write_counts_every_replicas_active_jobs(jobs):
    """``max_active``: a replica's own memory may miss jobs another created a moment ago."""
    jobs.put(job("a", 1.0))
    jobs.put(job("b", 2.0, RUNNING))
    jobs.put(job("done", 0.5, SUCCEEDED))
    with pytest.raises(TooManyTrainingJobsError, match=r"2 training jobs are queued or running \(limit 2\)"):
        jobs.put(job("c", 3.0), max_active=2)
    assert [r.id for r in jobs.load_all()] == ["done", "a", "b"]  # nothing written
    jobs.put(job("a", 1.0, CANCELLED))
    assert jobs.put(job("c", 3.0), max_active=2)


def test_file_records_round_trip(store_backend):
    store = store_backend.open(SqliteFileStore, SqlFileStore)
    first = FileRecord(id="file-" + "a" * 24, bytes=10, created_at=5, filename="x.jsonl", purpose="fine-tune",
                       format="chat", records=2, sha256="f" * 64)
    second = FileRecord(id="file-" + "b" * 24, bytes=20, created_at=3, filename="y.jsonl", purpose="fine-tune",
                        format="preference", records=1, sha256="e" * 64)
    store.put(first)
    store.put(second)
    store.close()
    store = store_backend.open(SqliteFileStore, SqlFileStore)
    assert store.load_all() == [second, first]
    store.delete(second.id)
    assert store.load_all() == [first]
    store.close()


# ---- rows that do not read ----------------------------------------------------------------------
def test_a_job_record_that_does_not_read_is_left_out_and_never_claimed(jobs, caplog):
    for job_id, created in (("bad", 1.0), ("good", 2.0), ("newer", 3.0)):
        jobs.put(job(job_id, created))
    newer = {**job("newer", 3.0).as_dict(), "added_by_a_newer_release": {"x": 1}}
    for job_id, record in (("bad", "{not json"), ("newer", json.dumps(newer))):
        jobs.db.run(lambda tx, r=record, i=job_id: tx.execute(
            "UPDATE training_jobs SET record = ? WHERE id = ?", (r, i)))
    assert [r.id for r in jobs.load_all()] == ["good", "newer"]  # a newer release's field is dropped
    assert jobs.load_all()[1] == job("newer", 3.0)
    assert jobs.unreadable == {"bad"}
    assert caplog.text.count("training_jobs row 'bad' does not read") == 1  # once, however often read
    assert jobs.claim("a", 30.0, now=100.0).id == "good"  # the oldest, "bad", is passed over
    assert jobs.claim("b", 30.0, now=100.0).id == "newer"
    assert jobs.claim("c", 30.0, now=100.0) is None
    jobs.delete("bad")
    assert jobs.load_all() and jobs.unreadable == set()


def test_a_job_record_of_another_state_or_id_does_not_read(jobs):
    jobs.put(job("j"))
    record = {**job("j").as_dict(), "state": "paused"}
    jobs.db.run(lambda tx: tx.execute("UPDATE training_jobs SET record = ? WHERE id = ?", (json.dumps(record), "j")))
    assert jobs.load_all() == [] and jobs.unreadable == {"j"}
    jobs.claim("a", 30.0, now=100.0)  # passes it over, changes nothing
    assert jobs.db.read(lambda tx: tx.one("SELECT claimed_by FROM training_jobs WHERE id = ?", ("j",))) == (None,)


def test_a_file_record_that_does_not_read_is_left_out(store_backend, caplog):
    store = store_backend.open(SqliteFileStore, SqlFileStore)
    good = FileRecord(id="file-" + "a" * 24, bytes=10, created_at=5, filename="x.jsonl", purpose="fine-tune",
                      format="chat", records=2, sha256="f" * 64)
    store.put(good)
    store.put(FileRecord(**{**good.as_dict(), "id": "file-" + "b" * 24}))
    traversing = {**good.as_dict(), "id": "../../etc/passwd"}  # the id names the bytes on disk
    store.db.run(lambda tx: tx.execute("UPDATE files SET record = ? WHERE id = ?",
                                       (json.dumps(traversing), "file-" + "b" * 24)))
    assert store.load_all() == [good] and store.unreadable == {"file-" + "b" * 24}
    assert "files row 'file-bbbbbbbbbbbbbbbbbbbbbbbb' does not read" in caplog.text
    store.close()
