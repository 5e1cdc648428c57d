"""The trainer on the real SmolLM2 in NF4: one short run per kind, exported, then served by our
runtime and loaded by PEFT's ``PeftModel.from_pretrained`` on its own NF4 copy of the base: the
logits agree (QLoRA-style training through the frozen 4-bit layers)."""

from __future__ import annotations

import json
import warnings

import pytest
import torch

from adapters.peft_io import read_adapter
from adapters.kinds.base import AdapterLimits
from adapters.runtime import AdapterRuntime
from adapters.training.config import TrainingConfig
from adapters.training.prepare import prepare_dataset
from adapters.training.trainer import TrainingRun
from gateway.base_model import load_base
from gateway.model_runner import ModelRunner
from gateway.settings import Settings

pytestmark = pytest.mark.slow
ROWS = [{"prompt": f"Extract the person as JSON: {n} is {a} years old.",
         "completion": json.dumps({"name": n, "age": a})} for n, a in (("Alice", 31), ("Bruno", 47), ("Chen", 25))]
CONFIGS = {"lora": {"learning_rate": 1e-3}, "ia3": {"learning_rate": 3e-2},
           "prompt_tuning": {"learning_rate": 3e-2, "num_virtual_tokens": 4}}


@pytest.fixture(scope="module")
def settings(smollm2_dir, tmp_path_factory) -> Settings:
    return Settings(model=str(smollm2_dir), device="cpu", data_dir=tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def served(settings):
    base = load_base(settings)
    runtime = AdapterRuntime(base.model, max_slots=4, dtype=base.dtype)
    return base, runtime, ModelRunner(base.model, runtime)


@pytest.mark.parametrize("kind", list(CONFIGS))
def test_trained_adapter_serves_the_logits_peft_gives(kind, served, settings, tmp_path):
    from peft import PeftModel

    base, runtime, runner = served
    config = TrainingConfig(kind=kind, max_steps=1, batch_size=3, eval_fraction=0, **CONFIGS[kind])
    prepared = prepare_dataset("\n".join(json.dumps(r) for r in ROWS).encode(), base.tokenizer, config)
    run = TrainingRun(runtime, base.tokenizer, config, prepared.train, prepared.eval)
    while run.micro_step():
        pass
    assert run.progress.step == 1 and run.progress.last_loss is not None
    run.export(tmp_path / kind)
    run.close()

    weights = read_adapter(tmp_path / kind, runtime.base_info, AdapterLimits(), base.dtype)
    slot = runtime.install(weights)
    try:
        ids = base.tokenizer("Extract the person as JSON: Dana is 52 years old.")["input_ids"]
        ours, _ = runner.prefill([ids], [slot])
    finally:
        runtime.uninstall(slot)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # a fresh NF4 copy of the base: PEFT wraps its layers its own way
        model = PeftModel.from_pretrained(load_base(settings).model, tmp_path / kind).eval()
        with torch.no_grad():
            expected = model(input_ids=torch.tensor([ids])).logits[0, -1].float()
    assert float((ours[0] - expected).abs().max() / expected.abs().max()) < 1e-4
