"""Two gateways (tiny random Llama, TestClient), each with its own data dir, one shared folder as
``shared_store_url``: an adapter uploaded on A is served by B, which fetches its files from the
shared store; a /v1/files upload on A is read on B. The shared registry is PostgreSQL in a
deployment; here B starts on a copy of A's database, as a new replica joining would."""

from __future__ import annotations

import shutil

from fastapi.testclient import TestClient

from adapters.blobs import content_hash
from adapters.shared_blobs import LIVE, MARKER, QUARANTINE
from gateway.app import create_app
from test_admin_adapters import (
    INFERENCE_KEY, check_error, files, folder_files, greedy_text, make_base, settings_for, upload,  # noqa: F401
)

ADMIN_KEY = "shared-store-admin-key-0123"
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
DATA = b'{"prompt": "a", "completion": "b"}\n'


def gateway(data_dir, shared, base):
    shared.mkdir(exist_ok=True)
    settings = settings_for(data_dir, api_keys=[INFERENCE_KEY], admin_key=ADMIN_KEY, shared_store_url=str(shared))
    return TestClient(create_app(settings, base=base))


def test_an_adapter_and_a_file_uploaded_on_a_are_served_by_b(tmp_path, files):  # noqa: F811
    shared, data_a, data_b = tmp_path / "shared", tmp_path / "a", tmp_path / "b"
    digest = content_hash(files["lora2"])
    with gateway(data_a, shared, make_base()) as a:
        response = upload(a, ADMIN, folder_files(files["lora2"]), id="shared-lora")
        assert response.status_code == 201, response.text
        expected = greedy_text(a, "shared-lora")
        assert (shared / LIVE / digest / MARKER).is_file()  # written through before the row
        uploaded = a.post("/v1/files", headers=ADMIN, files={"file": ("t.jsonl", DATA)}, data={"purpose": "fine-tune"})
        assert uploaded.status_code == 200, uploaded.text
        file_id = uploaded.json()["id"]
        assert not (data_a / "files").exists() or not any((data_a / "files").iterdir())
    data_b.mkdir()
    shutil.copy(data_a / "gateway.sqlite3", data_b / "gateway.sqlite3")  # the shared registry's rows
    with gateway(data_b, shared, make_base()) as b:  # same seed: same weights
        listed = b.get("/admin/adapters/shared-lora", headers=ADMIN)
        assert listed.status_code == 200 and listed.json()["tier"] != "missing"
        assert not (data_b / "adapter-store" / digest).exists()
        assert greedy_text(b, "shared-lora") == expected
        assert content_hash(data_b / "adapter-store" / digest) == digest  # now cached locally
        assert b.get(f"/v1/files/{file_id}/content", headers=ADMIN).content == DATA

        # a delete frees B's copy; no row refers to the digest any more: the shared copy is
        # quarantined, not deleted
        assert b.delete("/admin/adapters/shared-lora", headers=ADMIN).status_code == 200
        assert not (data_b / "adapter-store" / digest).exists()
        assert (shared / QUARANTINE / digest / MARKER).is_file() and not (shared / LIVE / digest).exists()
        assert b.delete(f"/v1/files/{file_id}", headers=ADMIN).status_code == 200
        assert not list((shared / "files").iterdir())


def test_a_corrupt_shared_file_is_a_clean_503(tmp_path, files):  # noqa: F811
    shared = tmp_path / "shared"
    with gateway(tmp_path / "a", shared, make_base()) as a:
        file_id = a.post("/v1/files", headers=ADMIN, files={"file": ("t.jsonl", DATA)},
                         data={"purpose": "fine-tune"}).json()["id"]
        (shared / "files" / f"{file_id}.jsonl").write_bytes(DATA.replace(b"a", b"b"))
        check_error(a.get(f"/v1/files/{file_id}/content", headers=ADMIN), 503, "corrupt")


def training_client(data_dir, shared):
    shared.mkdir(exist_ok=True)
    from support import build_tokenizer
    from test_api import make_base as make_api_base, make_settings
    settings = make_settings(data_dir, None, admin_key="k" * 24, max_body_bytes=65536, shared_store_url=str(shared))
    return TestClient(create_app(settings, base=make_api_base(build_tokenizer())))


def test_a_job_interrupted_on_a_resumes_on_b_from_the_shared_checkpoint(tmp_path):
    from test_training_api import ADMIN as TRAIN_ADMIN, jsonl, rows, submit, wait_for
    shared, data_a, data_b = tmp_path / "shared", tmp_path / "a", tmp_path / "b"
    with training_client(data_a, shared) as a:
        job_id = submit(a, jsonl(rows()), kind="lora", max_steps=100_000, checkpoint_every=2).json()["id"]
        wait_for(a, job_id, lambda j: j["progress"].get("step", 0) >= 3)
    assert (shared / "training" / job_id / "checkpoints" / "LATEST").is_file()
    data_b.mkdir()
    shutil.copy(data_a / "gateway.sqlite3", data_b / "gateway.sqlite3")  # the shared registry's rows
    with training_client(data_b, shared) as b:  # A is gone: nothing of the job is on B's disk
        job = wait_for(b, job_id, lambda j: j["progress"].get("resumed_from_step") is not None)
        assert job["state"] == "running" and job["progress"]["resumed_from_step"] >= 2
        assert (data_b / "training" / job_id / "dataset.jsonl").read_bytes() == jsonl(rows())
        b.post(f"/admin/training-jobs/{job_id}/cancel", headers=TRAIN_ADMIN)
