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

from adapters.errors import AdapterValidationError
from adapters.kinds.base import AdapterKind, AdapterLimits, AdapterWeights, BaseModelInfo
from adapters.kinds.lora import FIELDS as LORA_FIELDS
from adapters.kinds.lora import clear_lora, lora_bank, lora_tensors, read_lora_modules
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


class DoraHandler:
    kind = AdapterKind.DORA
    peft_type = "LORA"
    serves_as = AdapterKind.LORA

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
