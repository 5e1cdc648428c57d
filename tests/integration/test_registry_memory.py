"""500 register / serve / unregister cycles through the admin and inference APIs, in process on a
small random model: resident memory must come back to where it was after warm-up (a leak of one
2 MB adapter per cycle would add a gigabyte)."""

from __future__ import annotations

import gc
import os
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient

from gateway.app import create_app
from gateway.base_model import LoadedBase
from gateway.settings import Settings
from support import build_small_llama, build_tokenizer, make_peft_adapter

pytestmark = pytest.mark.slow
ADMIN_KEY = "memory-admin-key-0123456789abcdef"
CYCLES, WARMUP = 500, 50


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="needs /proc to read resident memory")
def test_register_serve_unregister_cycles_do_not_leak(tmp_path):
    tokenizer = build_tokenizer()
    model = build_small_llama(len(tokenizer))
    folders = []
    for seed in range(3):
        folders.append(tmp_path / f"a{seed}")
        make_peft_adapter(model, "lora", folders[-1], seed=seed, r=32, lora_alpha=32)
    files = [{name: (folder / name).read_bytes() for name in ("adapter_config.json", "adapter_model.safetensors")}
             for folder in folders]
    assert len(files[0]["adapter_model.safetensors"]) > 1_000_000
    base = LoadedBase(model=build_small_llama(len(tokenizer)), tokenizer=tokenizer, name="small",
                      device=torch.device("cpu"), dtype=torch.float32, context_window=256, load_seconds=0.0)
    settings = Settings(quantization="none", device="cpu", data_dir=tmp_path / "data", admin_key=ADMIN_KEY,
                        max_device_adapters=2, max_cpu_adapters=2)
    headers = {"Authorization": f"Bearer {ADMIN_KEY}"}
    with TestClient(create_app(settings, base=base)) as client:
        def cycle(i: int) -> None:
            upload = [("files", (name, data, "application/octet-stream")) for name, data in files[i % 3].items()]
            assert client.post("/admin/adapters", data={"id": f"c{i}"}, files=upload, headers=headers).status_code == 201
            reply = client.post("/v1/completions", json={"model": f"c{i}", "prompt": "hello", "max_tokens": 2,
                                                         "temperature": 0})
            assert reply.status_code == 200, reply.text
            assert client.delete(f"/admin/adapters/c{i}", headers=headers).status_code == 200

        for i in range(WARMUP):
            cycle(i)
        gc.collect()
        before = rss_bytes()
        for i in range(WARMUP, CYCLES):
            cycle(i)
        gc.collect()
        after = rss_bytes()
        assert client.get("/admin/adapters", headers=headers).json()["data"] == []
        assert not any((tmp_path / "data" / "adapter-store").iterdir())
    growth = (after - before) / before
    print(f"resident memory: {before / 2**20:.1f} MiB after warm-up, {after / 2**20:.1f} MiB after "
          f"{CYCLES - WARMUP} more cycles ({growth:+.1%})")
    assert growth < 0.05
