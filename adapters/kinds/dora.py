"""DoRA (LoRA with ``use_dora: true``): the LoRA delta, then each output channel rescaled.

PEFT computes ``y = c * (base(x) - bias + scale * B @ A @ x) + bias`` with ``c = m / ||W + scale *
B @ A||`` (the norm of each output row of the combined weight, ``W`` the base weight, dequantized
when the base is NF4; treated as a constant). ``c`` depends only on the weights, so it is computed
once at install; serving then costs a LoRA delta and one multiply per channel (plus
``(1 - c) * bias`` on a layer with a bias), run by the LoRA bank.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from adapters.errors import AdapterValidationError
from adapters.kinds.base import (
    AdapterKind, AdapterLimits, AdapterWeights, BaseModelInfo, LoraModule, TrainingForm, check_training_rank,
    lora_scale,
)
from adapters.kinds.lora import FIELDS as LORA_FIELDS
from adapters.kinds.lora import LORA_TRAINING_FIELDS, clear_lora, lora_bank, lora_tensors, read_lora_modules
from adapters.training.base import PARAM_DTYPE, TrainableAdapter, kaiming_a, param_key, resolve_targets
from adapters.validate import equals, sanitize_config

FIELDS = {**LORA_FIELDS, "use_dora": equals(True)}


def dense_weight(layer: torch.nn.Module) -> torch.Tensor:
    """The base layer's weight ``[out, in]`` in float32, dequantized from NF4/FP4 as PEFT does."""
    weight = layer.weight
    kind = type(weight).__name__
    if kind == "Params4bit":
        import bitsandbytes.functional as bnb_functional

        if getattr(weight.quant_state, "packing_format_for_cpu", False):
            # a layout dequantize_4bit cannot read; gateway.base_model.load_base never lets it happen
            raise RuntimeError("the base's 4-bit weights were repacked for bitsandbytes' bf16 CPU kernel; "
                               "load the base with gateway.base_model.load_base")
        return bnb_functional.dequantize_4bit(weight.data, weight.quant_state).float()
    if kind == "Int8Params":
        raise AdapterValidationError("DoRA adapters are not served on an 8-bit base model (use NF4 or none)")
    return weight.detach().float()


def channel_scales(layer: torch.nn.Module, a: torch.Tensor, b: torch.Tensor, scale: float,
                   magnitude: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(c, (1 - c) * bias or None)`` for one module, in float32 on the layer's device."""
    weight = dense_weight(layer)
    device = weight.device
    combined = weight + scale * (b.to(device, torch.float32) @ a.to(device, torch.float32))
    channel = magnitude.to(device, torch.float32) / torch.linalg.norm(combined, dim=1)
    if not bool(torch.isfinite(channel).all()):
        raise AdapterValidationError(
            "DoRA: a row of W + scale * B @ A has zero norm, so its magnitude scale is infinite")
    bias = getattr(layer, "bias", None)
    shift = None if bias is None else (1 - channel) * bias.detach().to(device, torch.float32)
    return channel, shift


class TrainableDora(TrainableAdapter):
    """PEFT's DoRA forward on each target: ``y = base(x) + (c - 1) * base_nobias(x') + c * scale * B A x'``
    with ``c = m / ||W + scale * B A||`` (row norms, detached as PEFT detaches them) and ``x'`` the
    input after dropout (with dropout active the base part is recomputed on ``x'``, as PEFT does).
    ``m`` starts at the row norms of ``W`` (B starts at zero), so training starts at the base."""

    kind = AdapterKind.DORA

    def __init__(self, shapes: dict[str, tuple[int, int]], magnitudes: dict[str, torch.Tensor], r: int, alpha: float,
                 dropout: float, use_rslora: bool, seed: int, device: torch.device):
        super().__init__(seed, device)
        self.r, self.alpha, self.dropout_p, self.use_rslora = r, alpha, dropout, use_rslora
        self.scale = lora_scale(alpha, r, use_rslora)
        self.modules_ = sorted(shapes)
        init = torch.Generator().manual_seed(seed)
        self.A, self.B, self.magnitude = nn.ParameterDict(), nn.ParameterDict(), nn.ParameterDict()
        for name in self.modules_:
            in_f, out_f = shapes[name]
            key = param_key(name)
            self.A[key] = nn.Parameter(kaiming_a(r, in_f, init).to(device))
            self.B[key] = nn.Parameter(torch.zeros(out_f, r, dtype=PARAM_DTYPE, device=device))
            self.magnitude[key] = nn.Parameter(magnitudes[name].detach().to(device, PARAM_DTYPE).clone())

    def forward_layer(self, name: str, base_layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        y = base_layer(x)
        key = param_key(name)
        if key not in self.A:
            return y
        a, b = self.A[key], self.B[key]
        weight = dense_weight(base_layer).to(y.device)
        norm = torch.linalg.norm(weight + self.scale * (b @ a).detach(), dim=1).detach()
        channel = self.magnitude[key] / norm  # [out]
        h = x.to(PARAM_DTYPE)
        dropped = self._dropout(h, self.dropout_p)
        if dropped is h:  # no dropout: the base output (less its bias) serves as PEFT's base_result
            bias = getattr(base_layer, "bias", None)
            base_out = y.to(PARAM_DTYPE) if bias is None else y.to(PARAM_DTYPE) - bias.to(PARAM_DTYPE)
        else:
            base_out = F.linear(dropped, weight)
        delta = (channel - 1) * base_out + channel * F.linear(F.linear(dropped, a), b) * self.scale
        return y + delta.to(y.dtype)

    def to_weights(self) -> AdapterWeights:
        modules = {name: LoraModule(self.A[param_key(name)].detach().cpu().clone(),
                                    self.B[param_key(name)].detach().cpu().clone(), self.scale,
                                    self.magnitude[param_key(name)].detach().cpu().clone())
                   for name in self.modules_}
        config = {"r": self.r, "lora_alpha": self.alpha, "lora_dropout": self.dropout_p,
                  "use_rslora": self.use_rslora, "use_dora": True}
        return AdapterWeights(kind=self.kind, config=config, modules=modules)


class DoraHandler(TrainingForm):
    kind = AdapterKind.DORA
    peft_type = "LORA"
    serves_as = AdapterKind.LORA
    default_learning_rate = 2e-4  # as LoRA
    training_fields = LORA_TRAINING_FIELDS

    def check_training(self, config, limits: AdapterLimits, total_steps: int | None = None) -> None:
        check_training_rank("r", config.r, limits)

    def build_trainable(self, config, runtime, tokenizer, total_steps: int) -> TrainableDora:
        shapes = runtime.base_info.linear_shapes
        targets = resolve_targets(config.target_modules or "all-linear", sorted(shapes))
        with torch.no_grad():  # PEFT's init: m = ||W|| per output row (B is zero)
            magnitudes = {n: torch.linalg.norm(dense_weight(runtime.layer(n).base_layer), dim=1).cpu()
                          for n in targets}
        return TrainableDora({n: shapes[n] for n in targets}, magnitudes, config.r, config.lora_alpha,
                             config.lora_dropout, config.use_rslora, config.seed, runtime.device)

    def trainable_from_weights(self, weights: AdapterWeights, device: torch.device, seed: int) -> TrainableDora:
        cfg = weights.config
        shapes = {name: (m.a.shape[1], m.b.shape[0]) for name, m in weights.modules.items()}
        adapter = TrainableDora(shapes, {n: m.magnitude for n, m in weights.modules.items()}, int(cfg["r"]),
                                float(cfg.get("lora_alpha", 8)), float(cfg.get("lora_dropout", 0.0)),
                                bool(cfg.get("use_rslora", False)), seed, device)
        with torch.no_grad():
            for name, m in weights.modules.items():
                adapter.A[param_key(name)].copy_(m.a)
                adapter.B[param_key(name)].copy_(m.b)
        return adapter

    def claims(self, config: dict[str, Any]) -> bool:
        return config.get("use_dora") is True

    def describe(self, weights: AdapterWeights) -> dict[str, Any]:
        return {"rank": weights.config.get("r")}

    def from_peft(self, config: dict[str, Any], tensors: dict[str, torch.Tensor], base: BaseModelInfo,
                  limits: AdapterLimits, dtype: torch.dtype) -> AdapterWeights:
        config = sanitize_config(config, FIELDS)
        modules = read_lora_modules(config, tensors, base, limits, dtype, dora=True)
        return AdapterWeights(kind=self.kind, config=config, modules=modules)

    def to_peft(self, weights: AdapterWeights) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        config = {"peft_type": self.peft_type, "task_type": "CAUSAL_LM", "bias": "none", "lora_dropout": 0.0,
                  **weights.config, "use_dora": True,
                  "target_modules": sorted({m.rsplit(".", 1)[-1] for m in weights.modules})}
        return config, lora_tensors(weights.modules)

    def install(self, runtime, slot: int, weights: AdapterWeights) -> None:
        scaled = {}
        for module, m in weights.modules.items():  # every scale first: a failure installs nothing
            scaled[module] = channel_scales(runtime.layer(module).base_layer, m.a, m.b, m.scale, m.magnitude)
        for module, m in weights.modules.items():
            channel, shift = scaled[module]
            lora_bank(runtime.layer(module), runtime).write(slot, m.a, m.b * m.scale, channel, shift)

    def uninstall(self, runtime, slot: int, weights: AdapterWeights) -> None:
        clear_lora(runtime, slot, weights.modules)
