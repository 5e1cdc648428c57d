"""LoRA: ``y += scale * (x @ A.T) @ B.T`` on targeted linear layers.

In the runtime every targeted module keeps one stacked bank per kind: ``A [slots, r_max, in]``
and ``B [slots, out, r_max]`` with the scale folded into B. Smaller ranks are zero-padded, which
adds exact zeros, so rows with different adapters and ranks share one batched matmul.
"""

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
    """Per-module stacked LoRA weights for every device slot (slot 0 stays zero = no LoRA)."""

    kind = AdapterKind.LORA
    stage = "output"

    def __init__(self, capacity: int, in_features: int, out_features: int, rank: int,
                 dtype: torch.dtype, device: torch.device):
        self.A = torch.zeros(capacity, rank, in_features, dtype=dtype, device=device)
        self.B = torch.zeros(capacity, out_features, rank, dtype=dtype, device=device)

    @property
    def rank(self) -> int:
        return self.A.shape[1]

    def _grow_rank(self, rank: int) -> None:
        pad = rank - self.rank
        self.A = torch.nn.functional.pad(self.A, (0, 0, 0, pad))
        self.B = torch.nn.functional.pad(self.B, (0, pad))

    def write(self, slot: int, a: torch.Tensor, b_scaled: torch.Tensor) -> None:
        rank = a.shape[0]
        if rank > self.rank:
            self._grow_rank(rank)
        self.clear(slot)
        self.A[slot, :rank] = a.to(self.A.device, self.A.dtype)
        self.B[slot, :, :rank] = b_scaled.to(self.B.device, self.B.dtype)

    def clear(self, slot: int) -> None:
        self.A[slot].zero_()
        self.B[slot].zero_()

    def transform_output(self, y: torch.Tensor, x: torch.Tensor, rows: torch.Tensor,
                         uniform_slot: int | None) -> torch.Tensor:
        x = x.to(self.A.dtype)
        if uniform_slot is not None:  # every row on one adapter: two plain matmuls
            delta = (x @ self.A[uniform_slot].T) @ self.B[uniform_slot].T
        else:
            # x [B, T, in]; gather each row's A [B, r, in] and B [B, out, r] (BGMV-style)
            a = self.A.index_select(0, rows)
            b = self.B.index_select(0, rows)
            delta = torch.bmm(torch.bmm(x, a.transpose(1, 2)), b.transpose(1, 2))
        return y + delta.to(y.dtype)


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
                bank = layer.banks["lora"] = LoraBank(
                    runtime.capacity, layer.in_features, layer.out_features, a.shape[0], runtime.dtype, runtime.device)
            bank.write(slot, a, b * scale)

    def uninstall(self, runtime, slot: int, weights: AdapterWeights) -> None:
        for module in weights.modules:
            runtime.layer(module).banks["lora"].clear(slot)
