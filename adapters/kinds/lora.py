"""LoRA: ``y += scale * (x @ A.T) @ B.T`` on targeted linear layers (the scale folded into B)."""

from __future__ import annotations

from typing import Any

import torch

from adapters.errors import AdapterValidationError
from adapters.kinds.base import (
    PEFT_PREFIX, AdapterKind, AdapterLimits, AdapterWeights, BaseModelInfo, cast_finite, check_finite,
    check_module, lora_scale, split_peft_key,
)
from adapters.module_match import check_targets_agree
from adapters.validate import (
    anything, boolean, equals, module_spec, number, number_in, positive_int, sanitize_config,
)

FIELDS = {
    "r": positive_int,
    "lora_alpha": number,
    "lora_dropout": number_in(0.0, 1.0),  # training only
    "target_modules": module_spec,
    "exclude_modules": module_spec,
    "bias": equals("none"),
    "use_rslora": boolean,
    "fan_in_fan_out": equals(False),
    "init_lora_weights": anything,  # how training started; no effect on the saved weights
    "megatron_core": anything,
    "qalora_group_size": anything,  # only read when use_qalora is set, which is refused
    "layers_pattern": anything,  # only read with layers_to_transform, which is refused
}


class LoraBank:
    """Per-module LoRA weights of every device slot that has them, each at its own rank.

    A forward's tokens come in runs of one slot (``TokenLayout.segments``; the paged engine packs
    the tokens of one adapter together), and each run gets two small matmuls on its own adapter's
    weights (SGMV-style): no rank padding, no per-row copies of the weights, and an idle adapter of
    a large rank costs nothing to the others. ``add_segments`` is the seam where a fused kernel
    (Triton SGMV/BGMV on CUDA) would plug in.
    """

    kind = AdapterKind.LORA
    stage = "output"

    def __init__(self, dtype: torch.dtype, device: torch.device):
        self.dtype = dtype
        self.device = device
        self.weights: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # slot -> (A.T [in, r], (scale*B).T [r, out])

    def write(self, slot: int, a: torch.Tensor, b_scaled: torch.Tensor) -> None:
        to = dict(device=self.device, dtype=self.dtype)
        self.weights[slot] = (a.to(**to).T.contiguous(), b_scaled.to(**to).T.contiguous())

    def clear(self, slot: int) -> None:
        self.weights.pop(slot, None)

    def transform_output(self, y: torch.Tensor, x: torch.Tensor, layout) -> torch.Tensor:
        y2 = y.reshape(-1, y.shape[-1])  # [N, out], a view of y
        add_segments(y2, x.reshape(-1, x.shape[-1]).to(self.dtype), layout.segments, self.weights)
        return y2.view(y.shape)


def add_segments(y: torch.Tensor, x: torch.Tensor, segments, weights) -> None:
    """``y[s:e] += (x[s:e] @ A.T) @ (scale * B).T`` for every run ``(s, e, slot)`` whose slot has
    LoRA weights here; ``y [N, out]`` is updated in place, ``x [N, in]``."""
    for start, end, slot in segments:
        pair = weights.get(slot)
        if pair is None:
            continue
        a_t, b_t = pair
        shrunk = x[start:end] @ a_t  # [run, r]
        if shrunk.dtype == y.dtype:
            y[start:end].addmm_(shrunk, b_t)
        else:
            y[start:end] += (shrunk @ b_t).to(y.dtype)


class LoraHandler:
    kind = AdapterKind.LORA
    peft_type = "LORA"

    def from_peft(self, config: dict[str, Any], tensors: dict[str, torch.Tensor], base: BaseModelInfo,
                  limits: AdapterLimits, dtype: torch.dtype) -> AdapterWeights:
        config = sanitize_config(config, FIELDS)
        if "r" not in config:
            raise AdapterValidationError("adapter_config.json: LoRA config lacks 'r'")
        rank = config["r"]
        if rank > limits.max_lora_rank:
            raise AdapterValidationError(f"LoRA rank {rank} is above this gateway's limit of {limits.max_lora_rank}")
        scale = lora_scale(float(config.get("lora_alpha", 8)), rank, bool(config.get("use_rslora", False)))
        pairs: dict[str, dict[str, torch.Tensor]] = {}
        for key, tensor in tensors.items():
            module, suffix = split_peft_key(key, ("lora_A.weight", "lora_B.weight"))
            check_finite(key, tensor)
            pairs.setdefault(module, {})[suffix] = tensor
        if not pairs:
            raise AdapterValidationError("adapter_model.safetensors holds no LoRA tensors")
        modules = {}
        for module, pair in sorted(pairs.items()):
            in_f, out_f = check_module(module, base)
            a, b = pair.get("lora_A.weight"), pair.get("lora_B.weight")
            if a is None or b is None:
                raise AdapterValidationError(f"module {module!r} has only one of lora_A / lora_B")
            if tuple(a.shape) != (rank, in_f) or tuple(b.shape) != (out_f, rank):
                raise AdapterValidationError(
                    f"module {module!r}: lora_A {tuple(a.shape)} / lora_B {tuple(b.shape)} do not fit "
                    f"rank {rank} on a layer of {in_f} -> {out_f} features"
                )
            a, b = cast_finite(f"{module}.lora_A", a, dtype), cast_finite(f"{module}.lora_B", b, dtype)
            cast_finite(f"{module}.lora_B scaled by lora_alpha / r = {scale:g}", b * scale, dtype)
            modules[module] = (a, b, scale)
        check_targets_agree(config, modules, base.linear_shapes)
        return AdapterWeights(kind=self.kind, config=config, modules=modules)

    def to_peft(self, weights: AdapterWeights) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        tensors = {}
        for module, (a, b, _scale) in weights.modules.items():
            tensors[f"{PEFT_PREFIX}{module}.lora_A.weight"] = a.contiguous()
            tensors[f"{PEFT_PREFIX}{module}.lora_B.weight"] = b.contiguous()
        config = {"peft_type": self.peft_type, "task_type": "CAUSAL_LM", "bias": "none", "lora_dropout": 0.0,
                  **weights.config, "target_modules": sorted({m.rsplit(".", 1)[-1] for m in weights.modules})}
        return config, tensors

    def install(self, runtime, slot: int, weights: AdapterWeights) -> None:
        for module, (a, b, scale) in weights.modules.items():
            layer = runtime.layer(module)
            bank = layer.banks.get("lora")
            if bank is None:
                bank = layer.banks["lora"] = LoraBank(runtime.dtype, runtime.device)
            bank.write(slot, a, b * scale)

    def uninstall(self, runtime, slot: int, weights: AdapterWeights) -> None:
        for module in weights.modules:
            runtime.layer(module).banks["lora"].clear(slot)
