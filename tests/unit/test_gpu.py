"""The multi-adapter runtime on a CUDA device: a mixed batch of every kind against PEFT there.
Skipped cleanly where no GPU is visible (CI never has one)."""

import copy

import pytest
import torch
from support import build_tiny_llama, make_peft_adapter

from adapters.kinds.base import AdapterLimits
from adapters.peft_io import read_adapter
from adapters.runtime import AdapterRuntime
from gateway.model_runner import ModelRunner

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def test_mixed_batch_on_cuda_matches_peft(tmp_path):
    torch.backends.cuda.matmul.allow_tf32 = False
    base = build_tiny_llama()
    kinds = ["lora", "ia3", "prompt_tuning", "dora", "adalora", "vera", "p_tuning"]
    references = {k: make_peft_adapter(base, k, tmp_path / k).cuda() for k in kinds}
    model = copy.deepcopy(base).cuda()
    runtime = AdapterRuntime(model, max_slots=len(kinds), dtype=torch.float32)
    runner = ModelRunner(model, runtime)
    slots = {k: runtime.install(read_adapter(tmp_path / k, runtime.base_info, AdapterLimits(), torch.float32))
             for k in kinds}
    prompts = [[5 + i, 6, 7 + i, 8][: 2 + i % 3] for i in range(len(kinds))] + [[17, 18, 19]]
    logits, _ = runner.prefill(prompts, [slots[k] for k in kinds] + [0])
    reference_models = [references[k] for k in kinds] + [base.cuda()]
    for row, (ids, ref_model) in enumerate(zip(prompts, reference_models, strict=True)):
        with torch.no_grad():
            ref = ref_model(input_ids=torch.tensor([ids], device="cuda")).logits[0, -1].float()
        assert float((logits[row] - ref).abs().max() / ref.abs().max()) < 1e-4
