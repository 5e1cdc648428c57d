"""Random PEFT adapters at a base model's shapes, for benchmarks: made with PEFT itself
(``get_peft_model``, noise on the trainable parameters, ``save_pretrained`` as safetensors), so
the gateway and the PEFT baselines load exactly the same files.

Kinds of the mixed set, in turn: LoRA rank 16 on every linear layer, IA3, prompt tuning with 16
virtual tokens, LoRA rank 8 on the attention projections. Any rank can be named as
``lora{r}-all`` (every linear layer) or ``lora{r}-attn`` (q, k, v, o). Folders already there are
reused (a benchmark run can keep them in ``--adapters-dir``)."""

from __future__ import annotations

import gc
import logging
import re
from pathlib import Path

import torch

log = logging.getLogger(__name__)

MIXED_KINDS = ("lora16", "ia3", "prompt16", "lora8")
ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
ALL_LINEAR = (*ATTENTION, "gate_proj", "up_proj", "down_proj")
_LORA_SPEC = re.compile(r"lora(\d+)-(all|attn)")


def lora_spec(kind: str) -> tuple[int, tuple[str, ...]] | None:
    """Rank and target modules of a LoRA kind name; None for the other kinds."""
    if kind == "lora16":
        return 16, ALL_LINEAR
    if kind == "lora8":
        return 8, ATTENTION
    match = _LORA_SPEC.fullmatch(kind)
    if match is None:
        return None
    return int(match.group(1)), ALL_LINEAR if match.group(2) == "all" else ATTENTION


def peft_config(kind: str):
    from peft import IA3Config, LoraConfig, PromptTuningConfig

    if _LORA_SPEC.fullmatch(kind):
        rank, targets = lora_spec(kind)
        return LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=list(targets), task_type="CAUSAL_LM")
    if kind == "lora16":
        return LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM")
    if kind == "lora8":
        return LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                          task_type="CAUSAL_LM")
    if kind == "ia3":
        return IA3Config(task_type="CAUSAL_LM")
    if kind == "prompt16":
        return PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=16)
    raise ValueError(f"unknown adapter kind {kind!r}")


def _add_noise(model, kind: str, generator: torch.Generator) -> None:
    """Make the adapter change the output (PEFT starts LoRA at a zero delta and IA3 at ones)."""
    with torch.no_grad():
        for _, param in model.named_parameters():
            if not param.requires_grad:
                continue
            noise = torch.randn(param.shape, generator=generator, dtype=param.dtype)
            if kind.startswith("lora"):
                param.add_(noise * 0.02)
            elif kind == "ia3":
                param.mul_(1 + 0.2 * noise)
            else:  # prompt embeddings at about the scale of the model's own
                param.copy_(noise * 0.05)


def make_adapter(base: torch.nn.Module, kind: str, folder: Path, seed: int) -> Path:
    """Write one adapter on ``base`` and leave ``base`` as it was (PEFT's ``unload`` takes the
    LoRA/IA3 layers out again; prompt tuning only wraps it): no copy of the base per adapter, which
    matters for a 1B-parameter base."""
    from peft import get_peft_model

    if (folder / "adapter_model.safetensors").is_file():
        return folder
    model = get_peft_model(base, peft_config(kind))
    _add_noise(model, kind, torch.Generator().manual_seed(seed))
    folder.parent.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder, safe_serialization=True)
    if kind.startswith("lora") or kind == "ia3":
        model.unload()  # the wrapped modules go back to the base's own, in place
    del model
    gc.collect()
    return folder


def make_adapter_set(model_dir: Path, out_dir: Path, kinds: list[str], prefix: str, seed: int = 0) -> list[Path]:
    """One adapter folder per entry of ``kinds``: ``out_dir/{prefix}-{i:03d}-{kind}``."""
    from transformers import AutoModelForCausalLM

    folders = [out_dir / f"{prefix}-{i:03d}-{kind}" for i, kind in enumerate(kinds)]
    missing = [i for i, f in enumerate(folders) if not (f / "adapter_model.safetensors").is_file()]
    if missing:
        log.info("writing %d random %s adapter(s) into %s", len(missing), prefix, out_dir)
        base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        for i in missing:
            make_adapter(base, kinds[i], folders[i], seed=seed * 100_003 + i)
        del base
        gc.collect()
    return folders


def mixed_kinds(n: int) -> list[str]:
    return [MIXED_KINDS[i % len(MIXED_KINDS)] for i in range(n)]
