"""DoRA (LoRA with ``use_dora: true``): the LoRA delta, then each output channel rescaled.

PEFT computes ``y = c * (base(x) - bias + scale * B @ A @ x) + bias`` with ``c = m / ||W + scale *
B @ A||`` (the norm of each output row of the combined weight, ``W`` the base weight, dequantized
when the base is NF4; treated as a constant). ``c`` depends only on the weights, so it is computed
once at install; serving then costs a LoRA delta and one multiply per channel (plus
``(1 - c) * bias`` on a layer with a bias), run by the LoRA bank.
"""

from __future__ import annotations

import copy
import logging
from typing import Any

import torch

from adapters.errors import AdapterValidationError
from adapters.kinds.base import AdapterKind, AdapterLimits, AdapterWeights, BaseModelInfo
from adapters.kinds.lora import FIELDS as LORA_FIELDS
from adapters.kinds.lora import clear_lora, lora_bank, lora_tensors, read_lora_modules
from adapters.validate import equals, sanitize_config

FIELDS = {**LORA_FIELDS, "use_dora": equals(True)}
log = logging.getLogger(__name__)


def dense_weight(layer: torch.nn.Module) -> torch.Tensor:
    """The base layer's weight ``[out, in]`` in float32, dequantized from NF4/FP4 as PEFT does."""
    weight = layer.weight
    kind = type(weight).__name__
    if kind == "Params4bit":
        import bitsandbytes.functional as bnb_functional

        if getattr(weight.quant_state, "packing_format_for_cpu", False):
            return _packed_weight(layer)
        return bnb_functional.dequantize_4bit(weight.data, weight.quant_state).float()
    if kind == "Int8Params":
        raise AdapterValidationError("DoRA adapters are not served on an 8-bit base model (use NF4 or none)")
    return weight.detach().float()


@torch.no_grad()
def _packed_weight(layer: torch.nn.Module) -> torch.Tensor:
    """A 4-bit weight bitsandbytes repacked on its first CPU forward, for its AVX512-BF16 kernel
    (codes reordered, block scales as a bf16 [blocks, rows] table), which ``dequantize_4bit``
    cannot read; PEFT 0.21 reads it anyway and gets a wrong norm. Unpacked here on copies (the
    layer keeps its packed weight) with bitsandbytes' own inverse, keeping the kernel's bf16 scales
    (a few ms a module); checked against the layer on random inputs, and if the layout ever
    differs, read through the layer instead (slower)."""
    import bitsandbytes.functional as bnb_functional

    weight = layer.weight
    try:
        state = copy.copy(weight.quant_state)
        state.original_nested = False  # keep the float scales (the inverse would re-quantize them)
        data, state = bnb_functional._convert_weight_packed_for_cpu_inverse(weight.data, state)
        state.absmax = state.absmax.T.reshape(-1).float()
        state.dtype = torch.float32
        dense = bnb_functional.dequantize_4bit(data, state).float()
    except Exception:  # noqa: BLE001 - a private layout; any failure falls back to the probe
        log.warning("could not unpack a CPU-packed 4-bit weight; reading it through the layer")
        return _probe_weight(layer)
    x = torch.randn(4, layer.in_features, generator=torch.Generator().manual_seed(0))
    y = layer(x).float()
    bias = getattr(layer, "bias", None)
    if bias is not None:
        y = y - bias.float()
    if tuple(dense.shape) != (layer.out_features, layer.in_features) or float(
            (x @ dense.T - y).norm() / y.norm().clamp_min(1e-12)) > 2e-2:  # bf16 kernel: ~4e-3
        log.warning("an unpacked CPU-packed 4-bit weight disagrees with its layer; reading it through the layer")
        return _probe_weight(layer)
    return dense


@torch.no_grad()
def _probe_weight(layer: torch.nn.Module) -> torch.Tensor:
    """``W`` as the layer computes it: ``layer(I) - bias`` is ``W.T`` (one forward of ``in x in``)."""
    eye = torch.eye(layer.in_features, device=layer.weight.device, dtype=torch.float32)
    out = layer(eye).float()
    bias = getattr(layer, "bias", None)
    if bias is not None:
        out = out - bias.float()
    return out.T.contiguous()


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
