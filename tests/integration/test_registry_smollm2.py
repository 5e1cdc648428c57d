"""The registry end to end on SmolLM2 NF4: adapters uploaded through the admin API are served
through the ``openai`` client; with 2 device slots and a CPU LRU of 3, ten adapters of mixed kinds
used in turn all give PEFT's greedy text, and the evictions show in /metrics."""

from __future__ import annotations

import io
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import openai
import pytest
import torch

from gateway.base_model import load_base
from gateway.settings import Settings

pytestmark = pytest.mark.slow

ADMIN_KEY = "integration-admin-key-0123456789"
MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]
MAX_NEW = 8
# ten adapters, mixed kinds and ranks
# (IA3 last: PEFT cannot unload IA3 from a 4-bit model, so the base is reloaded after each one)
KINDS = {"pt-a": ("prompt_tuning", 4), "pt-b": ("prompt_tuning", 8), "pt-c": ("prompt_tuning", 12),
         "lora-r4": ("lora", 4), "lora-r8": ("lora", 8), "lora-r16": ("lora", 16), "lora-r2": ("lora", 2),
         "ia3-a": ("ia3", 0), "ia3-b": ("ia3", 0), "ia3-c": ("ia3", 0)}


@dataclass
class Artifacts:
    adapters_dir: Path
    base_name: str
    references: dict[str, str] = field(default_factory=dict)  # adapter id -> PEFT greedy text


def _config(kind: str, size: int):
    from peft import IA3Config, LoraConfig, PromptTuningConfig

    if kind == "lora":
        return LoraConfig(r=size, lora_alpha=2 * size, target_modules=["q_proj", "v_proj", "down_proj"],
                          task_type="CAUSAL_LM")
    if kind == "ia3":
        return IA3Config(task_type="CAUSAL_LM")
    return PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=size)


@pytest.fixture(scope="module")
def artifacts(smollm2_dir: Path, tmp_path_factory) -> Artifacts:
    from peft import get_peft_model

    root = tmp_path_factory.mktemp("registry-smollm2")
    settings = Settings(model=str(smollm2_dir), data_dir=root / "data", device="cpu")
    base = load_base(settings)
    text = base.tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False)
    ids = torch.tensor([base.tokenizer.encode(text, add_special_tokens=False)])
    art = Artifacts(root / "adapters", base.name)
    model = base.model

    def greedy(m) -> str:
        with torch.no_grad():
            out = m.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=MAX_NEW,
                             do_sample=False, pad_token_id=base.tokenizer.eos_token_id)
        return base.tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)

    base_text = greedy(model)
    for seed, (name, (kind, size)) in enumerate(KINDS.items()):
        torch.manual_seed(seed)
        peft_model = get_peft_model(model, _config(kind, size))
        with torch.no_grad():
            for param in (p for p in peft_model.parameters() if p.requires_grad):
                if kind == "lora":
                    param.copy_(torch.randn_like(param) * 0.05)
                elif kind == "ia3":
                    param.mul_(1 + 0.4 * torch.randn_like(param))
                else:
                    param.copy_(torch.randn_like(param) * 0.5)
        peft_model.eval()
        peft_model.save_pretrained(art.adapters_dir / name)
        art.references[name] = greedy(peft_model)
        # prompt tuning never changes the base modules; LoRA layers come out again
        if kind == "prompt_tuning":
            model = peft_model.get_base_model()
        elif kind == "lora":
            model = peft_model.unload()
        else:
            del peft_model, model
            model = load_base(settings).model
    changed = [n for n, t in art.references.items() if t != base_text]
    assert len(changed) >= 8, (base_text, art.references)  # the comparison must have teeth
    return art


@pytest.fixture(scope="module")
def server(artifacts: Artifacts, smollm2_dir: Path, tmp_path_factory, launch_server):
    data_dir = tmp_path_factory.mktemp("registry-data")
    return launch_server(["--model", str(smollm2_dir), "--data-dir", str(data_dir), "--device", "cpu",
                          "--max-device-adapters", "2", "--max-cpu-adapters", "3"],
                         env={"GATEWAY_ADMIN_KEY": ADMIN_KEY})


def admin(server) -> httpx.Client:
    return httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=120)


def _zip(folder: Path) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for path in sorted(folder.iterdir()):
            archive.write(path, path.name)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def registered(server, artifacts: Artifacts) -> list[str]:
    """All ten uploaded through the admin API: half as files, half as one zip."""
    with admin(server) as http:
        for i, name in enumerate(KINDS):
            folder = artifacts.adapters_dir / name
            if i % 2:
                files = [("files", ("adapter.zip", _zip(folder), "application/zip"))]
            else:
                files = [("files", (p.name, p.read_bytes(), "application/octet-stream"))
                         for p in sorted(folder.iterdir())]
            response = http.post("/admin/adapters", data={"id": name}, files=files)
            assert response.status_code == 201, response.text
            assert response.json()["kind"] == KINDS[name][0]
    return list(KINDS)


def test_admin_routes_need_the_admin_key(server):
    for method, path in [("GET", "/admin/adapters"), ("POST", "/admin/adapters"), ("GET", "/admin/adapters/x"),
                         ("DELETE", "/admin/adapters/x"), ("POST", "/admin/adapters/x/pin")]:
        for headers in ({}, {"Authorization": "Bearer wrong-key"}):
            response = httpx.request(method, server.url + path, headers=headers, timeout=30)
            assert response.status_code == 401, (method, path, response.text)
            assert response.json()["error"]["type"] == "authentication_error"


def test_ten_adapters_through_two_slots_match_peft(server, artifacts: Artifacts, registered: list[str]):
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=120)
    for _ in range(2):  # the second round finds every adapter evicted from the device again
        for name in registered:
            reply = client.chat.completions.create(model=name, messages=MESSAGES, temperature=0, max_tokens=MAX_NEW)
            assert reply.choices[0].message.content == artifacts.references[name], name
    metrics = httpx.get(f"{server.url}/metrics", timeout=30).text
    assert _value(metrics, 'gateway_adapter_evictions_total{tier="device"}') >= 18
    assert _value(metrics, 'gateway_adapter_evictions_total{tier="cpu"}') >= 7
    assert _value(metrics, 'gateway_adapters_resident{tier="device"}') == 2
    assert _value(metrics, 'gateway_adapters_resident{tier="cpu"}') <= 3
    with admin(server) as http:
        listing = http.get("/admin/adapters").json()["data"]
    tiers = [a["tier"] for a in listing]
    assert tiers.count("device") == 2 and tiers.count("disk") >= 5, tiers
    assert all(a["requests"] == 2 and a["in_flight"] == 0 for a in listing), listing


def _value(metrics_text: str, series: str) -> float:
    for line in metrics_text.splitlines():
        if line.startswith(series + " "):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{series} not in /metrics")
