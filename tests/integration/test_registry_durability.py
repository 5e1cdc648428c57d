"""Registry durability on the real server process (a small random model, so restarts are quick):
``kill -9`` while adapters are being uploaded, then restart with the same data directory; the
registry must hold every adapter whose upload was acknowledged, serve each one, and hold no
half-registered adapter nor stray file."""

from __future__ import annotations

import random
import threading
import time
from pathlib import Path

import httpx
import pytest

from support import build_small_llama, build_tokenizer, make_peft_adapter

pytestmark = pytest.mark.slow
ADMIN_KEY = "durability-admin-key-0123456789"
HEADERS = {"Authorization": f"Bearer {ADMIN_KEY}"}


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> tuple[Path, list[Path]]:
    root = tmp_path_factory.mktemp("durability")
    tokenizer = build_tokenizer()
    model = build_small_llama(len(tokenizer))
    model.save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    adapters = []
    for seed in range(4):  # few distinct files, uploaded under many ids
        folder = root / "adapters" / f"a{seed}"
        make_peft_adapter(model, "lora", folder, seed=seed, r=32, lora_alpha=32)
        adapters.append(folder)
    return root / "model", adapters


def _upload(url: str, adapter_id: str, folder: Path) -> int:
    files = [("files", (name, (folder / name).read_bytes(), "application/octet-stream"))
             for name in ("adapter_config.json", "adapter_model.safetensors")]
    return httpx.post(f"{url}/admin/adapters", data={"id": adapter_id}, files=files, headers=HEADERS,
                      timeout=30).status_code


def test_kill_9_during_uploads_then_restart(setup, launch_server, tmp_path):
    model_dir, adapters = setup
    data_dir = tmp_path / "data"
    args = ["--model", str(model_dir), "--quantization", "none", "--device", "cpu", "--data-dir", str(data_dir),
            "--max-device-adapters", "2", "--max-cpu-adapters", "2"]
    env = {"GATEWAY_ADMIN_KEY": ADMIN_KEY}
    acknowledged: set[str] = set()
    attempted: set[str] = set()
    rng = random.Random(7)
    for round_ in range(3):
        server = launch_server(args, env=env)
        stop = threading.Event()

        def upload_forever() -> None:
            i = 0
            while not stop.is_set():
                adapter_id = f"r{round_}-{i}"
                attempted.add(adapter_id)
                try:
                    if _upload(server.url, adapter_id, adapters[i % len(adapters)]) == 201:
                        acknowledged.add(adapter_id)
                except httpx.HTTPError:
                    return  # the server is gone
                i += 1

        worker = threading.Thread(target=upload_forever)
        worker.start()
        time.sleep(rng.uniform(0.5, 1.5))
        server.process.kill()  # SIGKILL: no cleanup of any kind
        server.process.wait(timeout=30)
        stop.set()
        worker.join(timeout=60)
    assert acknowledged, "no upload finished before the kills; the test proves nothing"

    server = launch_server(args, env=env)
    listing = httpx.get(f"{server.url}/admin/adapters", headers=HEADERS, timeout=30).json()["data"]
    registered = {a["id"] for a in listing}
    assert acknowledged <= registered <= attempted
    assert all(a["tier"] != "missing" for a in listing)
    for adapter_id in sorted(registered):
        reply = httpx.post(f"{server.url}/v1/completions", timeout=60, json={
            "model": adapter_id, "prompt": "hello world", "max_tokens": 2, "temperature": 0})
        assert reply.status_code == 200, (adapter_id, reply.text)
    blobs = data_dir / "adapter-store"
    assert {p.name for p in blobs.iterdir()} == {a["content_hash"] for a in listing}  # no orphan, no temp
    assert not any((data_dir / "staging").iterdir())
