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
import torch.nn.functional as F
from torch import nn

from adapters.errors import AdapterValidationError
from adapters.kinds.base import (
    PEFT_PREFIX, AdapterKind, AdapterLimits, AdapterWeights, BaseModelInfo, TrainingForm, cast_finite, check_finite,
    check_module, check_training_rank, tensors_by_module,
)
from adapters.kinds.lora import clear_lora, lora_bank
from adapters.training.base import PARAM_DTYPE, TrainableAdapter, param_key, resolve_targets
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


class TrainableVera(TrainableAdapter):
    """PEFT's VeRA: ``y = base(x) + lambda_b * (B[:out] @ (lambda_d * (A[:, :in] @ dropout(x))))``
    with A and B frozen (drawn from ``projection_prng_key`` as PEFT draws them, sized to the largest
    target), lambda_d starting at ``d_initial`` and lambda_b at zero (PEFT's init)."""

    kind = AdapterKind.VERA

    def __init__(self, shapes: dict[str, tuple[int, int]], r: int, prng_key: int, save_projection: bool,
                 d_initial: float, dropout: float, seed: int, device: torch.device):
        super().__init__(seed, device)
        self.r, self.prng_key, self.save_projection = r, prng_key, save_projection
        self.d_initial, self.dropout_p = d_initial, dropout
        self.modules_ = sorted(shapes)
        a, b = projections(prng_key, r, max(i for i, _ in shapes.values()), max(o for _, o in shapes.values()))
        self.register_buffer("vera_A", a.to(device, PARAM_DTYPE), persistent=False)
        self.register_buffer("vera_B", b.to(device, PARAM_DTYPE), persistent=False)
        self.lambda_d = nn.ParameterDict({param_key(n): nn.Parameter(
            torch.full((r,), float(d_initial), dtype=PARAM_DTYPE, device=device)) for n in self.modules_})
        self.lambda_b = nn.ParameterDict({param_key(n): nn.Parameter(
            torch.zeros(shapes[n][1], dtype=PARAM_DTYPE, device=device)) for n in self.modules_})

    def forward_layer(self, name: str, base_layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        y = base_layer(x)
        key = param_key(name)
        if key not in self.lambda_d:
            return y
        in_f, out_f = x.shape[-1], self.lambda_b[key].shape[0]
        h = self._dropout(x.to(PARAM_DTYPE), self.dropout_p)
        delta = self.lambda_b[key] * F.linear(self.lambda_d[key] * F.linear(h, self.vera_A[:, :in_f]),
                                              self.vera_B[:out_f])
        return y + delta.to(y.dtype)

    def to_weights(self) -> AdapterWeights:
        modules = {n: VeraModule(self.lambda_d[param_key(n)].detach().cpu().clone(),
                                 self.lambda_b[param_key(n)].detach().cpu().clone()) for n in self.modules_}
        config = {"r": self.r, "projection_prng_key": self.prng_key, "save_projection": self.save_projection,
                  "d_initial": self.d_initial, "vera_dropout": self.dropout_p}
        return AdapterWeights(kind=self.kind, config=config, modules=modules,
                              shared={"vera_A": self.vera_A.cpu().clone(), "vera_B": self.vera_B.cpu().clone()})


class VeraHandler(TrainingForm):
    kind = AdapterKind.VERA
    peft_type = "VERA"
    serves_as = AdapterKind.LORA
    default_learning_rate = 1e-2  # two vectors per layer: large steps, as in the VeRA paper
    training_fields = frozenset({"r", "target_modules", "projection_prng_key", "save_projection", "d_initial",
                                 "vera_dropout"})

    def check_training(self, config, limits: AdapterLimits, total_steps: int | None = None) -> None:
        check_training_rank("r", config.r, limits)

    def build_trainable(self, config, runtime, tokenizer, total_steps: int) -> TrainableVera:
        shapes = runtime.base_info.linear_shapes
        targets = resolve_targets(config.target_modules or "all-linear", sorted(shapes))
        return TrainableVera({n: shapes[n] for n in targets}, config.r, config.projection_prng_key,
                             config.save_projection, config.d_initial, config.vera_dropout, config.seed,
                             runtime.device)

    def trainable_from_weights(self, weights: AdapterWeights, device: torch.device, seed: int) -> TrainableVera:
        cfg = weights.config
        a, b = weights.shared["vera_A"], weights.shared["vera_B"]
        shapes = {n: (a.shape[1], m.lambda_b.shape[0]) for n, m in weights.modules.items()}  # sizes the draw only
        adapter = TrainableVera(shapes, int(cfg.get("r", 256)),
                                int(cfg.get("projection_prng_key", 0)), bool(cfg.get("save_projection", True)),
                                float(cfg.get("d_initial", 0.1)), float(cfg.get("vera_dropout", 0.0)), seed, device)
        with torch.no_grad():
            adapter.vera_A.copy_(a)
            adapter.vera_B.copy_(b)
            for name, m in weights.modules.items():
                adapter.lambda_d[param_key(name)].copy_(m.lambda_d)
                adapter.lambda_b[param_key(name)].copy_(m.lambda_b)
        return adapter

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
        parts = tensors_by_module(tensors, SUFFIXES, "VeRA")
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
