"""A database row the running release cannot read (edited by hand, or written by a newer release)
fails alone: the gateway starts, serves everything else, and keeps the files the row describes.
The store-level behaviour (logged once, passed over by claims, repaired by a replace) is in
test_sql_stores.py and test_registry.py."""

from __future__ import annotations

import json
import sqlite3

from fastapi.testclient import TestClient
from support import build_tokenizer

from gateway.app import create_app
from gateway.database import DATABASE_FILE
from gateway.training.artifacts import DATASET_FILE
from gateway.training.store import CANCELLED, SqliteTrainingJobStore, TrainingJobRecord
from test_api import MESSAGES, make_adapters, make_base, make_settings

CHAT_LINE = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
JOB_ID, ENDED_JOB_ID = "train-0123456789ab", "train-00000000beef"


def test_the_gateway_starts_past_rows_that_do_not_read_and_keeps_their_files(tmp_path, caplog):
    data = tmp_path / "data"
    settings = make_settings(data, make_adapters(tmp_path, len(build_tokenizer())))
    with TestClient(create_app(settings, base=make_base(build_tokenizer()))) as first:
        admin = {"Authorization": f"Bearer {first.app.state.gateway.admin_key}"}
        uploaded = first.post("/v1/files", headers=admin, data={"purpose": "fine-tune"},
                              files={"file": ("train.jsonl", (json.dumps(CHAT_LINE) + "\n").encode())})
        assert uploaded.status_code == 200, uploaded.text
        file_id = uploaded.json()["id"]

    with sqlite3.connect(data / DATABASE_FILE) as db:  # what a hand edit, or a newer release, left
        db.execute("UPDATE registry_adapters SET info = '{' WHERE id = 'lora-a'")
        db.execute("UPDATE files SET record = '[]' WHERE id = ?", (file_id,))
        db.execute("INSERT INTO training_jobs (id, state, created, record) VALUES (?, 'queued', 1.0, '{')", (JOB_ID,))
    ended = SqliteTrainingJobStore(data / DATABASE_FILE)
    ended.put(TrainingJobRecord(id=ENDED_JOB_ID, state=CANCELLED, config={"kind": "lora"}, created=2.0))
    ended.close()
    job_upload = data / "training" / JOB_ID / DATASET_FILE  # what a queued job has before it runs
    job_upload.parent.mkdir(parents=True)
    job_upload.write_text(json.dumps(CHAT_LINE) + "\n")

    restarted = make_settings(data, None)  # no adapters folder: it would register lora-a whole again
    with TestClient(create_app(restarted, base=make_base(build_tokenizer()))) as second:
        admin = {"Authorization": f"Bearer {second.app.state.gateway.admin_key}"}
        assert second.get("/readyz").status_code == 200
        listed = {a["id"] for a in second.get("/admin/adapters", headers=admin).json()["data"]}
        assert listed == {"ia3-a", "pt-a"}
        reply = second.post("/v1/chat/completions", json={"model": "ia3-a", "messages": MESSAGES, "max_tokens": 2})
        assert reply.status_code == 200, reply.text
        assert second.get("/v1/files", headers=admin).json()["data"] == []
        assert second.get("/admin/training-jobs", headers=admin).status_code == 200

        # a row that stops reading while served: a resync keeps what this process read last
        kept = second.post("/v1/files", headers=admin, data={"purpose": "fine-tune"},
                           files={"file": ("more.jsonl", (json.dumps(CHAT_LINE) + "\n").encode())}).json()["id"]
        with sqlite3.connect(data / DATABASE_FILE) as db:
            db.execute("UPDATE files SET record = '{' WHERE id = ?", (kept,))
            db.execute("UPDATE training_jobs SET record = '{' WHERE id = ?", (ENDED_JOB_ID,))
        second.portal.call(second.app.state.gateway.files.sync)
        second.portal.call(second.app.state.gateway.training.sync)
        assert [f["id"] for f in second.get("/v1/files", headers=admin).json()["data"]] == [kept]
        assert second.get(f"/admin/training-jobs/{ENDED_JOB_ID}", headers=admin).json()["state"] == CANCELLED
    for table, row in (("registry_adapters", "lora-a"), ("files", file_id), ("training_jobs", JOB_ID)):
        assert f"{table} row '{row}' does not read" in caplog.text
    assert (data / "files" / f"{file_id}.jsonl").exists() and job_upload.exists()  # nothing removed
    assert list((data / "adapter-store" / "quarantine").iterdir())  # lora-a's files, kept
