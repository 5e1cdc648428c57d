"""AdaLoRA: LoRA in SVD form, ``y += (x @ (A * E).T @ B.T) * alpha / (ranknum + 1e-5)``.

PEFT saves ``lora_A [r, in]``, ``lora_E [r, 1]`` (the singular values) and ``lora_B [out, r]`` per
module, at ``init_r`` or, once its rank allocator has pruned, at the rank ``rank_pattern`` keeps
for that module (the sum of its mask). ``ranknum`` is not saved: PEFT sets it to ``init_r`` and
keeps it when it resizes a module to its pattern, so the scale is ``lora_alpha / init_r`` (an
``alpha`` of 0 or less falls back to the module's rank, as PEFT's ``scaling`` does). Served as the
equivalent LoRA ``A' = E * A`` of the module's effective rank; a pruned-to-zero module adds nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from adapters.errors import AdapterValidationError
from adapters.kinds.base import (
    PEFT_PREFIX, AdapterKind, AdapterLimits, AdapterWeights, BaseModelInfo, cast_finite, check_finite,
    check_module, split_peft_key,
)
from adapters.kinds.lora import clear_lora, lora_bank
from adapters.module_match import MAX_ENTRY_CHARS, MAX_LIST_ENTRIES, check_targets_agree
from adapters.validate import (
    anything, boolean, equals, fail, module_spec, number, number_in, positive_int, sanitize_config,
)

RANKNUM_EPS = 1e-5  # PEFT adds it to ranknum
SUFFIXES = ("lora_A", "lora_E", "lora_B")
PATTERN_SUFFIX = ".lora_E"


def rank_pattern(field: str, value: Any) -> None:
    """Null, or ``{"<module>.lora_E": [bool, ...]}`` (which singular values each module keeps)."""
    if value is None:
        return
    if not isinstance(value, dict) or len(value) > MAX_LIST_ENTRIES:
        fail(field, value, f"expected an object of at most {MAX_LIST_ENTRIES} entries")
    for key, mask in value.items():
        if len(key) > MAX_ENTRY_CHARS or not key.endswith(PATTERN_SUFFIX):
            fail(field, key, f"expected keys '<module>{PATTERN_SUFFIX}'")
        if not isinstance(mask, list) or not all(isinstance(v, bool) for v in mask):
            fail(field, mask, f"expected a list of true/false per singular value for {key!r}")


FIELDS = {
    "init_r": positive_int,
    "rank_pattern": rank_pattern,
    "lora_alpha": number,
    "lora_dropout": number_in(0.0, 1.0),  # training only
    "target_modules": module_spec,
    "exclude_modules": module_spec,
    "bias": equals("none"),
    "fan_in_fan_out": equals(False),
    "use_dora": equals(False),
    "use_rslora": boolean,  # AdaLoRA's scale ignores it
    # the rank budget schedule and LoRA fields AdaLoRA does not read: training only
    "r": anything, "target_r": anything, "tinit": anything, "tfinal": anything, "deltaT": anything,
    "beta1": anything, "beta2": anything, "orth_reg_weight": anything, "total_step": anything,
    "init_lora_weights": anything, "megatron_core": anything, "qalora_group_size": anything,
    "layers_pattern": anything,
}


@dataclass(frozen=True)
class AdaLoraModule:
    a: torch.Tensor  # [rank, in], right singular vectors
    e: torch.Tensor  # [rank, 1], singular values
    b: torch.Tensor  # [out, rank], left singular vectors
    scale: float  # lora_alpha / (init_r + 1e-5)


class AdaLoraHandler:
    kind = AdapterKind.ADALORA
    peft_type = "ADALORA"
    serves_as = AdapterKind.LORA

    def claims(self, config: dict[str, Any]) -> bool:
        return True

    def describe(self, weights: AdapterWeights) -> dict[str, Any]:
        return {"rank": max((m.a.shape[0] for m in weights.modules.values()), default=0),
                "init_r": weights.config.get("init_r")}

    def from_peft(self, config: dict[str, Any], tensors: dict[str, torch.Tensor], base: BaseModelInfo,
                  limits: AdapterLimits, dtype: torch.dtype) -> AdapterWeights:
        config = sanitize_config(config, FIELDS)
        init_r = config.get("init_r", 12)  # PEFT's default
        if init_r > limits.max_lora_rank:
            raise AdapterValidationError(
                f"AdaLoRA init_r {init_r} is above this gateway's limit of {limits.max_lora_rank}")
        masks = {key[: -len(PATTERN_SUFFIX)]: mask for key, mask in (config.get("rank_pattern") or {}).items()}
        for module, mask in masks.items():
            if len(mask) != init_r:
                raise AdapterValidationError(
                    f"adapter_config.json: rank_pattern for {module!r} has {len(mask)} entries; "
                    f"expected init_r = {init_r}")
        parts: dict[str, dict[str, torch.Tensor]] = {}
        for key, tensor in tensors.items():
            module, suffix = split_peft_key(key, SUFFIXES)
            check_finite(key, tensor)
            parts.setdefault(module, {})[suffix] = tensor
        if not parts:
            raise AdapterValidationError("adapter_model.safetensors holds no AdaLoRA tensors")
        unknown = sorted(set(masks) - set(parts))
        if unknown:
            raise AdapterValidationError(
                f"adapter_config.json: rank_pattern names {unknown[:5]}, for which the adapter holds no tensors")
        alpha = float(config.get("lora_alpha", 8))
        modules = {}
        for module, part in sorted(parts.items()):
            in_f, out_f = check_module(module, base)
            missing = [s for s in SUFFIXES if s not in part]
            if missing:
                raise AdapterValidationError(f"module {module!r} lacks {', '.join(missing)}")
            rank = sum(masks[module]) if module in masks else init_r
            a, e, b = part["lora_A"], part["lora_E"], part["lora_B"]
            if tuple(a.shape) != (rank, in_f) or tuple(e.shape) != (rank, 1) or tuple(b.shape) != (out_f, rank):
                raise AdapterValidationError(
                    f"module {module!r}: lora_A {tuple(a.shape)} / lora_E {tuple(e.shape)} / lora_B {tuple(b.shape)} "
                    f"do not fit rank {rank} (init_r or the module's rank_pattern) on a layer of {in_f} -> {out_f} "
                    "features")
            scale = (alpha if alpha > 0 else float(rank)) / (init_r + RANKNUM_EPS)
            a, e = cast_finite(f"{module}.lora_A", a, dtype), cast_finite(f"{module}.lora_E", e, dtype)
            b = cast_finite(f"{module}.lora_B", b, dtype)
            cast_finite(f"{module}: lora_A scaled by lora_E", a * e, dtype)
            cast_finite(f"{module}.lora_B scaled by lora_alpha / init_r = {scale:g}", b * scale, dtype)
            modules[module] = AdaLoraModule(a, e, b, scale)
        check_targets_agree(config, modules, base.linear_shapes)
        return AdapterWeights(kind=self.kind, config=config, modules=modules)

    def to_peft(self, weights: AdapterWeights) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        tensors = {}
        for module, m in weights.modules.items():
            for suffix, tensor in zip(SUFFIXES, (m.a, m.e, m.b), strict=True):
                tensors[f"{PEFT_PREFIX}{module}.{suffix}"] = tensor.contiguous()
        config = {"peft_type": self.peft_type, "task_type": "CAUSAL_LM", "bias": "none", "lora_dropout": 0.0,
                  **weights.config, "target_modules": sorted({m.rsplit(".", 1)[-1] for m in weights.modules})}
        return config, tensors

    def install(self, runtime, slot: int, weights: AdapterWeights) -> None:
        for module, m in weights.modules.items():
            if m.a.shape[0]:  # a module pruned to rank 0 adds nothing
                lora_bank(runtime.layer(module), runtime).write(slot, m.a * m.e, m.b * m.scale)

    def uninstall(self, runtime, slot: int, weights: AdapterWeights) -> None:
        clear_lora(runtime, slot, [name for name, m in weights.modules.items() if m.a.shape[0]])
