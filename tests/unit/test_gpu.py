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


@pytest.mark.parametrize("lora_kernel", ["torch", "triton"])
def test_mixed_batch_on_cuda_matches_peft(tmp_path, lora_kernel):
    """Every kind in one batch, LoRA deltas by torch's matmuls or by the Triton kernels."""
    if lora_kernel == "triton":
        pytest.importorskip("triton")
    torch.backends.cuda.matmul.allow_tf32 = False
    base = build_tiny_llama()
    kinds = ["lora", "ia3", "prompt_tuning", "dora", "adalora", "vera", "p_tuning"]
    references = {k: make_peft_adapter(base, k, tmp_path / k).cuda() for k in kinds}
    model = copy.deepcopy(base).cuda()
    runtime = AdapterRuntime(model, max_slots=len(kinds), dtype=torch.float32, lora_kernel=lora_kernel)
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


def test_paged_adamw_trains_on_cuda(tmp_path):
    """optimizer 'paged_adamw' runs bitsandbytes' PagedAdamW (QLoRA's paged optimizer): a short
    DoRA run on CUDA lowers the eval loss and checkpoints its optimizer state."""
    import bitsandbytes as bnb
    from support import build_tokenizer
    from test_trainer import dataset_bytes, run_to_end

    from adapters.training.config import TrainingConfig
    from adapters.training.prepare import check_device, prepare_dataset
    from adapters.training.trainer import TrainingRun

    base = build_tiny_llama()
    with torch.no_grad():
        base.lm_head.weight.mul_(30)
    runtime = AdapterRuntime(base.cuda(), max_slots=1, dtype=torch.float32)
    tokenizer = build_tokenizer()
    cfg = TrainingConfig(kind="dora", optimizer="paged_adamw", learning_rate=3e-2, lora_dropout=0.0, max_steps=6,
                         batch_size=4, max_seq_len=64, eval_fraction=0.25, checkpoint_every=3, seed=3)
    check_device(cfg, runtime.device)  # allowed on CUDA
    prepared = prepare_dataset(dataset_bytes(), tokenizer, cfg)
    run = TrainingRun(runtime, tokenizer, cfg, prepared.train, prepared.eval, tmp_path / "ckpt")
    assert isinstance(run.optimizer, bnb.optim.PagedAdamW)
    run_to_end(run)
    assert run.progress.eval_loss_after < 0.95 * run.progress.eval_loss_before
    resumed = TrainingRun(runtime, tokenizer, cfg, prepared.train, prepared.eval, tmp_path / "ckpt")
    assert resumed.resume() and resumed.progress.step == 6


def test_lora_kernel_probe_on_cuda():
    """``lora_kernel=auto``'s measurement runs on the GPU: both paths timed, the kernel agreeing."""
    pytest.importorskip("triton")
    from adapters.kinds.lora_kernel import measure

    for dtype in (torch.float32, torch.bfloat16):
        choice = measure(torch.device("cuda"), dtype, 576)
        assert set(choice.timings_ms) == {"torch", "triton"}, choice
        assert "disagrees" not in choice.reason and "failed" not in choice.reason, choice
