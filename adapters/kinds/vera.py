"""VeRA: two frozen random projections shared by every adapted layer, and two trained vectors
per layer: ``y += lambda_b * (B[:out] @ (lambda_d * (A[:, :in] @ x)))``.

``A [r, max_in]`` and ``B [max_out, r]`` are sized to the largest targeted layer and sliced per
layer. PEFT saves them with the adapter (``save_projection``) or regenerates them from
``projection_prng_key``: a CPU ``torch.Generator`` seeded with the key draws A, then B, each
Kaiming-uniform (bound ``sqrt(6 / fan_in)``, fan_in = the tensor's second dimension); this module
draws them the same way. Served as the equivalent LoRA per layer: ``A' = lambda_d * A[:, :in]``,
``B' = lambda_b * B[:out]``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from adapters.errors import AdapterValidationError
from adapters.kinds.base import (
    PEFT_PREFIX, AdapterKind, AdapterLimits, AdapterWeights, BaseModelInfo, cast_finite, check_finite,
    check_module, split_peft_key,
)
from adapters.kinds.lora import clear_lora, lora_bank
from adapters.module_match import check_targets_agree
from adapters.validate import (
    anything, boolean, equals, module_spec, non_negative_int, number_in, positive_int, sanitize_config,
)

FIELDS = {
    "r": positive_int,
    "target_modules": module_spec,
    "exclude_modules": module_spec,
    "projection_prng_key": non_negative_int,
    "save_projection": boolean,
    "vera_dropout": number_in(0.0, 1.0),  # training only
    "d_initial": anything,  # initial lambda_d; no effect on saved weights
    "init_weights": anything,
    "bias": equals("none"),
    "fan_in_fan_out": equals(False),
    "layers_pattern": anything,  # only read with layers_to_transform, which is refused
}
PROJECTIONS = {"vera_A": "base_model.vera_A", "vera_B": "base_model.vera_B"}
SUFFIXES = ("vera_lambda_d", "vera_lambda_b")


@dataclass(frozen=True)
class VeraModule:
    lambda_d: torch.Tensor  # [r]
    lambda_b: torch.Tensor  # [out]


def kaiming_uniform(shape: tuple[int, int], generator: torch.Generator) -> torch.Tensor:
    """PEFT's VeRA projection init: uniform in +-sqrt(3) * sqrt(2) / sqrt(fan_in), fan_in = shape[1]."""
    bound = math.sqrt(3.0) * math.sqrt(2) / math.sqrt(shape[1])
    return torch.empty(shape).uniform_(-bound, bound, generator=generator)


def projections(key: int, r: int, max_in: int, max_out: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator(device="cpu").manual_seed(key)
    a = kaiming_uniform((r, max_in), generator)
    return a, kaiming_uniform((max_out, r), generator)


class VeraHandler:
    kind = AdapterKind.VERA
    peft_type = "VERA"
    serves_as = AdapterKind.LORA

    def claims(self, config: dict[str, Any]) -> bool:
        return True

    def describe(self, weights: AdapterWeights) -> dict[str, Any]:
        return {"rank": weights.config.get("r")}

    def from_peft(self, config: dict[str, Any], tensors: dict[str, torch.Tensor], base: BaseModelInfo,
                  limits: AdapterLimits, dtype: torch.dtype) -> AdapterWeights:
        config = sanitize_config(config, FIELDS)
        rank = config.get("r", 256)  # PEFT's default
        if rank > limits.max_lora_rank:
            raise AdapterValidationError(f"VeRA rank {rank} is above this gateway's limit of {limits.max_lora_rank}")
        tensors = dict(tensors)
        saved = {name: tensors.pop(key) for name, key in PROJECTIONS.items() if key in tensors}
        save_projection = config.get("save_projection", True)
        if save_projection and len(saved) != 2:
            raise AdapterValidationError(
                "adapter_config.json sets save_projection, but adapter_model.safetensors lacks "
                "base_model.vera_A / base_model.vera_B")
        if not save_projection and saved:
            raise AdapterValidationError(
                "adapter_model.safetensors holds vera_A / vera_B, but adapter_config.json says save_projection "
                "is false (the projections would be regenerated from projection_prng_key): set one or the other")
        parts: dict[str, dict[str, torch.Tensor]] = {}
        for key, tensor in tensors.items():
            module, suffix = split_peft_key(key, SUFFIXES)
            check_finite(key, tensor)
            parts.setdefault(module, {})[suffix] = tensor
        if not parts:
            raise AdapterValidationError("adapter_model.safetensors holds no VeRA tensors")
        shapes = {module: check_module(module, base) for module in parts}
        check_targets_agree(config, parts, base.linear_shapes)
        max_in = max(i for i, _ in shapes.values())
        max_out = max(o for _, o in shapes.values())
        if saved:
            for name, tensor in saved.items():
                check_finite(PROJECTIONS[name], tensor)
            a, b = saved["vera_A"], saved["vera_B"]
            if tuple(a.shape) != (rank, max_in) or tuple(b.shape) != (max_out, rank):
                raise AdapterValidationError(
                    f"vera_A {tuple(a.shape)} / vera_B {tuple(b.shape)} do not fit rank {rank} and the largest "
                    f"adapted layer ({max_in} -> {max_out} features): expected ({rank}, {max_in}) / "
                    f"({max_out}, {rank})")
        else:
            a, b = projections(config.get("projection_prng_key", 0), rank, max_in, max_out)
        a, b = cast_finite("vera_A", a, dtype), cast_finite("vera_B", b, dtype)
        modules = {}
        for module, part in sorted(parts.items()):
            in_f, out_f = shapes[module]
            missing = [s for s in SUFFIXES if s not in part]
            if missing:
                raise AdapterValidationError(f"module {module!r} lacks {', '.join(missing)}")
            d, lb = part["vera_lambda_d"], part["vera_lambda_b"]
            if tuple(d.shape) != (rank,) or tuple(lb.shape) != (out_f,):
                raise AdapterValidationError(
                    f"module {module!r}: vera_lambda_d {tuple(d.shape)} / vera_lambda_b {tuple(lb.shape)}; expected "
                    f"({rank},) / ({out_f},)")
            d, lb = cast_finite(f"{module}.vera_lambda_d", d, dtype), cast_finite(f"{module}.vera_lambda_b", lb, dtype)
            cast_finite(f"{module}: vera_A scaled by vera_lambda_d", d[:, None] * a[:, :in_f], dtype)
            cast_finite(f"{module}: vera_B scaled by vera_lambda_b", lb[:, None] * b[:out_f], dtype)
            modules[module] = VeraModule(d, lb)
        return AdapterWeights(kind=self.kind, config=config, modules=modules, shared={"vera_A": a, "vera_B": b})

    def to_peft(self, weights: AdapterWeights) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        tensors = {}
        for module, m in weights.modules.items():
            tensors[f"{PEFT_PREFIX}{module}.vera_lambda_d"] = m.lambda_d.contiguous()
            tensors[f"{PEFT_PREFIX}{module}.vera_lambda_b"] = m.lambda_b.contiguous()
        if weights.config.get("save_projection", True):
            for name, key in PROJECTIONS.items():
                tensors[key] = weights.shared[name].contiguous()
        config = {"peft_type": self.peft_type, "task_type": "CAUSAL_LM", "bias": "none", "vera_dropout": 0.0,
                  **weights.config, "target_modules": sorted({m.rsplit(".", 1)[-1] for m in weights.modules})}
        return config, tensors

    def install(self, runtime, slot: int, weights: AdapterWeights) -> None:
        a, b = weights.shared["vera_A"], weights.shared["vera_B"]
        for module, m in weights.modules.items():
            layer = runtime.layer(module)
            lora_bank(layer, runtime).write(slot, m.lambda_d[:, None] * a[:, :layer.in_features],
                                            m.lambda_b[:, None] * b[:layer.out_features])

    def uninstall(self, runtime, slot: int, weights: AdapterWeights) -> None:
        clear_lora(runtime, slot, weights.modules)
