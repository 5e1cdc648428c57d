"""Random PEFT adapters at a base model's shapes, for benchmarks: made with PEFT itself
(``get_peft_model``, noise on the trainable parameters, ``save_pretrained`` as safetensors), so
the gateway and the PEFT baselines load exactly the same files.

Kinds of the mixed set, in turn: LoRA rank 16 on every linear layer, IA3, prompt tuning with 16
virtual tokens, LoRA rank 8 on the attention projections. The low-rank kinds are named
``{family}{r}-all`` (every linear layer) or ``{family}{r}-attn`` (q, k, v, o), the family one of
``lora``, ``dora`` (LoRA with ``use_dora``), ``adalora`` (``init_r`` r, never pruned: served at
rank r) and ``vera`` (shared projections of rank r, saved with the adapter); ``ptuning16`` is
P-tuning and ``prefix16`` prefix tuning, 16 virtual tokens each. Folders already there are reused
(a benchmark run can keep them in ``--adapters-dir``)."""

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
LOW_RANK_FAMILIES = ("lora", "dora", "adalora", "vera")  # served as a LoRA delta of rank r
_LOW_RANK_SPEC = re.compile(rf"({'|'.join(LOW_RANK_FAMILIES)})(\d+)-(all|attn)")
VIRTUAL_TOKENS = 16  # of ptuning16 and prefix16


def low_rank_spec(kind: str) -> tuple[str, int, tuple[str, ...]] | None:
    """Family, rank and target modules of a low-rank kind name; None for the other kinds."""
    if kind == "lora16":
        return "lora", 16, ALL_LINEAR
    if kind == "lora8":
        return "lora", 8, ATTENTION
    match = _LOW_RANK_SPEC.fullmatch(kind)
    if match is None:
        return None
    return match.group(1), int(match.group(2)), ALL_LINEAR if match.group(3) == "all" else ATTENTION


def lora_spec(kind: str) -> tuple[int, tuple[str, ...]] | None:
    """Rank and target modules of a plain LoRA kind name; None for the other kinds."""
    spec = low_rank_spec(kind)
    return None if spec is None or spec[0] != "lora" else spec[1:]


def peft_config(kind: str):
    from peft import (
        AdaLoraConfig, IA3Config, LoraConfig, PrefixTuningConfig, PromptEncoderConfig, PromptTuningConfig, VeraConfig,
    )

    spec = low_rank_spec(kind) if _LOW_RANK_SPEC.fullmatch(kind) else None
    if spec is not None:
        family, rank, targets = spec
        if family == "adalora":  # total_step: PEFT requires one; the schedule never runs here
            return AdaLoraConfig(init_r=rank, target_r=max(1, rank // 2), total_step=1000, lora_alpha=2 * rank,
                                 target_modules=list(targets), task_type="CAUSAL_LM")
        if family == "vera":
            return VeraConfig(r=rank, target_modules=list(targets), save_projection=True, task_type="CAUSAL_LM")
        return LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=list(targets), use_dora=family == "dora",
                          task_type="CAUSAL_LM")
    if kind == "lora16":
        return LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM")
    if kind == "lora8":
        return LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                          task_type="CAUSAL_LM")
    if kind == "ia3":
        return IA3Config(task_type="CAUSAL_LM")
    if kind == "prompt16":
        return PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=VIRTUAL_TOKENS)
    if kind == "ptuning16":
        return PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=VIRTUAL_TOKENS, encoder_hidden_size=128)
    if kind == "prefix16":
        return PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=VIRTUAL_TOKENS)
    raise ValueError(f"unknown adapter kind {kind!r}")


def _noise_scale(kind: str, name: str) -> float:
    """Scale of the noise added to one trainable parameter (on top of PEFT's initial value), chosen
    so each kind's delta is of the size a rank-r LoRA's is here: AdaLoRA's singular values start at
    zero and multiply two N(0, 0.02) factors; VeRA's ``lambda_b`` starts at zero and scales a
    product with ``lambda_d`` (0.1); P-tuning's prompt encoder and prefix tuning's embedding keep
    PEFT's initialisation, slightly moved."""
    if kind.startswith("adalora") and "lora_E" in name:
        return 1.0
    if kind.startswith("vera"):
        return 0.5 if "lambda_b" in name else 0.05
    if kind.startswith(("ptuning", "prefix")):
        return 0.05
    return 0.02


def _add_noise(model, kind: str, generator: torch.Generator) -> None:
    """Make the adapter change the output (PEFT starts LoRA at a zero delta and IA3 at ones)."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if not param.requires_grad:
                continue
            noise = torch.randn(param.shape, generator=generator, dtype=param.dtype)
            if kind == "ia3":
                param.mul_(1 + 0.2 * noise)
            elif kind == "prompt16":  # prompt embeddings at about the scale of the model's own
                param.copy_(noise * 0.05)
            else:
                param.add_(noise * _noise_scale(kind, name))


def make_adapter(base: torch.nn.Module, kind: str, folder: Path, seed: int) -> Path:
    """Write one adapter on ``base`` and leave ``base`` as it was (PEFT's ``unload`` takes the
    low-rank and IA3 layers out again; the virtual-token kinds only wrap it): no copy of the base per adapter, which
    matters for a 1B-parameter base."""
    from peft import get_peft_model

    if (folder / "adapter_model.safetensors").is_file():
        return folder
    model = get_peft_model(base, peft_config(kind))
    _add_noise(model, kind, torch.Generator().manual_seed(seed))
    folder.parent.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder, safe_serialization=True)
    if low_rank_spec(kind) is not None or kind == "ia3":
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
