"""Chaos on the real server process (a small random model, so starts are quick): a full disk at
each durable write, ``kill -9`` in the middle of each one, and a damaged or lost database.

Faults fire at exact points through ``adapters.faults`` (``GATEWAY_TEST_FAULTS_FILE``; the test
rewrites that file to arm and disarm them while the server runs). After every fault: whatever was
acknowledged is still there and served, nothing half-written is served or left behind, and the
gateway either starts or refuses to with a message that says what to do.

One chain of servers: each start checks what the previous one's crash left, then provokes the next
crash (upload, training checkpoint, experiment update, adapter delete)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from conftest import REPO
from support import build_small_llama, build_tokenizer, make_peft_adapter

from adapters.faults import ENV as FAULTS_ENV

pytestmark = pytest.mark.slow
ADMIN_KEY = "chaos-admin-key-0123456789abcdef"
HEADERS = {"Authorization": f"Bearer {ADMIN_KEY}"}
WAIT = 60.0


@pytest.fixture(scope="module")
def model_and_adapters(tmp_path_factory) -> tuple[Path, dict[str, Path]]:
    root = tmp_path_factory.mktemp("chaos")
    tokenizer = build_tokenizer()
    model = build_small_llama(len(tokenizer))
    model.save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    adapters = {}
    for seed, name in enumerate(("a", "b", "c")):
        adapters[name] = root / "adapters" / name
        make_peft_adapter(model, "lora", adapters[name], seed=seed, r=8, lora_alpha=16)
    return root / "model", adapters


class Chaos:
    """Starts servers on one data dir and arms faults in them."""

    def __init__(self, launch_server, model_dir: Path, tmp_path: Path):
        self.launch_server = launch_server
        self.data_dir = tmp_path / "data"
        self.faults = tmp_path / "faults"
        self.args = ["--model", str(model_dir), "--quantization", "none", "--device", "cpu",
                     "--data-dir", str(self.data_dir), "--max-device-adapters", "2", "--max-cpu-adapters", "2"]
        self.env = {"GATEWAY_ADMIN_KEY": ADMIN_KEY, FAULTS_ENV: str(self.faults)}
        self.server = None

    def start(self) -> str:
        self.disarm()
        self.server = self.launch_server(self.args, env=self.env)
        return self.server.url

    def arm(self, point: str, action: str) -> None:
        self.faults.write_text(f"{point} {action}\n")

    def disarm(self) -> None:
        self.faults.unlink(missing_ok=True)

    def expect_killed(self, request) -> None:
        """Run ``request`` (a call that hits an armed ``kill``); the server must die by SIGKILL."""
        with pytest.raises(httpx.HTTPError):
            request()
        assert self.server.process.wait(timeout=WAIT) == -9, self.server.log()


def upload(url: str, adapter_id: str, folder: Path) -> httpx.Response:
    files = [("files", (name, (folder / name).read_bytes(), "application/octet-stream"))
             for name in ("adapter_config.json", "adapter_model.safetensors")]
    return httpx.post(f"{url}/admin/adapters", data={"id": adapter_id}, files=files, headers=HEADERS, timeout=WAIT)


def listing(url: str) -> dict[str, dict]:
    return {a["id"]: a for a in httpx.get(f"{url}/admin/adapters", headers=HEADERS, timeout=WAIT).json()["data"]}


def served(url: str, model: str) -> int:
    return httpx.post(f"{url}/v1/completions", timeout=WAIT, json={
        "model": model, "prompt": "hello world", "max_tokens": 2, "temperature": 0}).status_code


def experiment(url: str) -> dict:
    return httpx.get(f"{url}/admin/experiments/exp", headers=HEADERS, timeout=WAIT).json()


def job(url: str, job_id: str) -> dict:
    return httpx.get(f"{url}/admin/training-jobs/{job_id}", headers=HEADERS, timeout=WAIT).json()


def wait_job(url: str, job_id: str, predicate) -> dict:
    deadline = time.monotonic() + WAIT
    while not predicate(current := job(url, job_id)):
        assert time.monotonic() < deadline, current
        time.sleep(0.1)
    return current


def submit_job(url: str, **config) -> str:
    data = "\n".join(json.dumps({"prompt": f"the quick fox {i}", "completion": "how are you?"}) for i in range(8))
    response = httpx.post(f"{url}/admin/training-jobs", headers=HEADERS, timeout=WAIT,
                          files={"dataset": ("d.jsonl", data.encode())}, data={"config": json.dumps(config)})
    assert response.status_code == 201, response.text
    return response.json()["id"]


def assert_consistent(data_dir: Path, url: str) -> dict[str, dict]:
    """Every listed adapter is served from whole files; no temporary or orphaned file is left."""
    adapters = listing(url)
    for adapter_id, entry in adapters.items():
        assert entry["tier"] != "missing", entry
        assert served(url, adapter_id) == 200, adapter_id
    store = data_dir / "adapter-store"
    # a blob whose row was never committed is quarantined at start (kept, never served)
    assert {p.name for p in store.iterdir() if p.name != "quarantine"} == {a["content_hash"] for a in adapters.values()}
    quarantined = {p.name for p in (store / "quarantine").iterdir()} if (store / "quarantine").is_dir() else set()
    assert not quarantined & {a["content_hash"] for a in adapters.values()}
    assert not any((data_dir / "staging").iterdir())
    return adapters


def assert_full_disk_error(response: httpx.Response) -> None:
    assert response.status_code == 507, response.text
    assert response.json()["error"]["code"] == "insufficient_storage"


def test_disk_full_and_kill_9_at_each_write(model_and_adapters, launch_server, tmp_path):
    model_dir, folders = model_and_adapters
    chaos = Chaos(launch_server, model_dir, tmp_path)
    data = chaos.data_dir

    # ---- server 1: state to protect, then a full disk at every write --------------------------------
    url = chaos.start()
    assert upload(url, "a", folders["a"]).status_code == 201
    assert upload(url, "c", folders["c"]).status_code == 201
    base = httpx.get(f"{url}/v1/models", timeout=WAIT).json()["data"][0]["id"]  # listed first
    created = httpx.post(f"{url}/admin/experiments", headers=HEADERS, timeout=WAIT, json={
        "name": "exp", "arms": [{"name": "a", "weight": 1}, {"name": base, "weight": 0}]})
    assert created.status_code == 201, created.text
    weights = {arm["name"]: arm["weight"] for arm in experiment(url)["arms"]}

    chaos.arm("blob.write", "enospc")  # the first file of the blob is written, the second is not
    assert_full_disk_error(upload(url, "b", folders["b"]))
    chaos.arm("experiment-db.update", "sqlite-full")
    assert_full_disk_error(httpx.patch(f"{url}/admin/experiments/exp", headers=HEADERS, timeout=WAIT,
                                       json={"weights": {"a": 5}}))
    chaos.arm("adapter-db.delete", "sqlite-full")
    assert_full_disk_error(httpx.delete(f"{url}/admin/adapters/c", headers=HEADERS, timeout=WAIT))
    chaos.arm("checkpoint.write", "enospc")
    failed = wait_job(url, submit_job(url, kind="lora", max_steps=3, checkpoint_every=1),
                      lambda j: j["state"] in ("failed", "succeeded"))
    assert failed["state"] == "failed" and "No space left on device" in failed["error"], failed
    chaos.disarm()
    assert {arm["name"]: arm["weight"] for arm in experiment(url)["arms"]} == weights
    assert set(assert_consistent(data, url)) == {"a", "c"}
    assert httpx.get(f"{url}/readyz", timeout=WAIT).status_code == 200

    chaos.arm("blob.write", "kill")  # kill -9 in the middle of an upload
    chaos.expect_killed(lambda: upload(url, "b", folders["b"]))

    # ---- server 2: the upload that never answered is not there; kill -9 during a checkpoint ---------
    url = chaos.start()
    assert set(assert_consistent(data, url)) == {"a", "c"}
    chaos.arm("checkpoint.write", "kill:3")  # two whole checkpoints, then a crash inside the third
    job_id = submit_job(url, kind="lora", adapter_id="trained", max_steps=6, checkpoint_every=1, batch_size=2)
    chaos.server.process.wait(timeout=WAIT)
    assert chaos.server.process.returncode == -9, chaos.server.log()

    # ---- server 3: the job resumes from the last whole checkpoint; kill -9 in an experiment update --
    url = chaos.start()
    done = wait_job(url, job_id, lambda j: j["state"] in ("failed", "succeeded", "cancelled"))
    assert done["state"] == "succeeded" and done["progress"]["resumed_from_step"] == 2, done
    assert served(url, "trained") == 200
    deadline = time.monotonic() + WAIT  # dataset, checkpoints, export: all go just after the job ends
    while (data / "training" / job_id).exists():
        assert time.monotonic() < deadline, sorted((data / "training" / job_id).rglob("*"))
        time.sleep(0.1)
    chaos.arm("experiment-db.update", "kill")
    chaos.expect_killed(lambda: httpx.patch(f"{url}/admin/experiments/exp", headers=HEADERS, timeout=WAIT,
                                            json={"weights": {"a": 5}}))

    # ---- server 4: the experiment is as it was acknowledged; kill -9 in an adapter delete -----------
    url = chaos.start()
    assert {arm["name"]: arm["weight"] for arm in experiment(url)["arms"]} == weights
    assert set(assert_consistent(data, url)) == {"a", "c", "trained"}
    chaos.arm("blob.remove", "kill")  # the row is deleted, its files not yet
    chaos.expect_killed(lambda: httpx.delete(f"{url}/admin/adapters/c", headers=HEADERS, timeout=WAIT))

    # ---- server 5: the delete is whole (no row, no files), everything else intact -------------------
    url = chaos.start()
    adapters = assert_consistent(data, url)
    assert set(adapters) == {"a", "trained"}
    assert {arm["name"]: arm["weight"] for arm in experiment(url)["arms"]} == weights
    assert job(url, job_id)["state"] == "succeeded"


def _serve_until_ready_or_exit(args: list[str], timeout: float = 120.0) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gateway", "serve", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, "GATEWAY_ADMIN_KEY": ADMIN_KEY})


def test_a_damaged_or_lost_database_refuses_to_start_and_says_what_to_do(model_and_adapters, tmp_path):
    model_dir, folders = model_and_adapters
    data = tmp_path / "data"
    database = data / "gateway.sqlite3"
    blob = data / "adapter-store" / ("0" * 64)
    blob.mkdir(parents=True)  # files the lost database described
    args = ["--model", str(model_dir), "--quantization", "none", "--device", "cpu", "--data-dir", str(data),
            "--port", "1"]  # never reached: the check comes first

    lost = _serve_until_ready_or_exit(args)
    assert lost.returncode != 0
    assert f"the database {database} is missing" in lost.stderr and "Restore" in lost.stderr, lost.stderr
    assert blob.is_dir() and not database.exists()  # nothing removed, nothing created

    database.write_bytes(b"this is not a database" * 1000)
    damaged = _serve_until_ready_or_exit(args)
    assert damaged.returncode != 0
    assert f"the database {database} is damaged" in damaged.stderr, damaged.stderr
    assert "Restore it from a backup" in damaged.stderr and "move it aside" in damaged.stderr
    assert database.read_bytes() == b"this is not a database" * 1000 and blob.is_dir()
