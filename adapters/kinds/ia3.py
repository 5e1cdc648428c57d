"""IA3: learned per-feature scales. On ordinary targets the layer output is scaled
(``y = base(x) * l``); on feed-forward targets the input is (``y = base(x * l)``), as PEFT does.

In the runtime a module keeps up to two banks of ``[slots, features]`` vectors (input side and
output side); slot 0 and every slot of another kind stay all ones (identity).
"""

from __future__ import annotations

from typing import Any

import torch

from adapters.errors import AdapterValidationError
from adapters.kinds.base import (
    PEFT_PREFIX, AdapterKind, AdapterLimits, AdapterWeights, BaseModelInfo, Ia3Module, TrainingForm, cast_finite,
    check_finite, check_module, split_peft_key,
)
from adapters.module_match import check_feedforward_within_targets, check_targets_agree, matches
from adapters.validate import anything, equals, module_spec, sanitize_config

FIELDS = {
    "target_modules": module_spec,
    "feedforward_modules": module_spec,
    "exclude_modules": module_spec,
    "fan_in_fan_out": equals(False),
    "init_ia3_weights": anything,
}


class Ia3Bank:
    kind = AdapterKind.IA3

    def __init__(self, capacity: int, features: int, feedforward: bool, dtype: torch.dtype, device: torch.device):
        self.stage = "input" if feedforward else "output"
        self.scales = torch.ones(capacity, features, dtype=dtype, device=device)

    def write(self, slot: int, vector: torch.Tensor) -> None:
        self.scales[slot] = vector.to(self.scales.device, self.scales.dtype)

    def clear(self, slot: int) -> None:
        self.scales[slot].fill_(1.0)

    def _token_scales(self, layout, shape: torch.Size) -> torch.Tensor:
        """Scales broadcastable to a tensor of ``shape`` (``[..., features]``)."""
        slot = layout.uniform_slot
        if slot is not None:
            return self.scales[slot]
        return self.scales.index_select(0, layout.slots).view(*shape[:-1], -1)  # one vector per token

    def transform_input(self, x: torch.Tensor, layout) -> torch.Tensor:
        return x * self._token_scales(layout, x.shape).to(x.dtype)

    def transform_output(self, y: torch.Tensor, x: torch.Tensor, layout) -> torch.Tensor:
        return y * self._token_scales(layout, y.shape).to(y.dtype)


class Ia3Handler(TrainingForm):
    kind = AdapterKind.IA3
    peft_type = "IA3"
    serves_as = AdapterKind.IA3
    # IA3 moves far fewer parameters than LoRA, so it needs larger steps
    default_learning_rate = 5e-3
    training_fields = frozenset({"target_modules", "feedforward_modules"})

    def check_training_config(self, config) -> None:
        if config.target_modules == "all-linear" and config.feedforward_modules is None:
            raise ValueError("with target_modules 'all-linear', ia3 needs feedforward_modules")

    def build_trainable(self, config, runtime, tokenizer, total_steps: int):
        from adapters.training.trainable import build_ia3  # the trainer imports this package

        return build_ia3(config, runtime)

    def trainable_from_weights(self, weights: AdapterWeights, device: torch.device, seed: int):
        from adapters.training.trainable import ia3_from_weights

        return ia3_from_weights(weights, device, seed)

    def claims(self, config: dict[str, Any]) -> bool:
        return True

    def describe(self, weights: AdapterWeights) -> dict[str, Any]:
        return {}

    def from_peft(self, config: dict[str, Any], tensors: dict[str, torch.Tensor], base: BaseModelInfo,
                  limits: AdapterLimits, dtype: torch.dtype) -> AdapterWeights:
        config = sanitize_config(config, FIELDS)
        check_feedforward_within_targets(config)
        feedforward = config.get("feedforward_modules")
        modules = {}
        for key, tensor in sorted(tensors.items()):
            module, _ = split_peft_key(key, ("ia3_l",))
            check_finite(key, tensor)
            in_f, out_f = check_module(module, base)
            is_ff = matches(feedforward, module, field="feedforward_modules", dotted=False)  # PEFT's IA3 rule
            expected = (1, in_f) if is_ff else (out_f, 1)
            if tuple(tensor.shape) != expected:
                side = "feed-forward (input)" if is_ff else "output"
                raise AdapterValidationError(
                    f"module {module!r}: ia3_l has shape {tuple(tensor.shape)}, expected {expected} for an "
                    f"{side} scale on a layer of {in_f} -> {out_f} features"
                )
            modules[module] = Ia3Module(cast_finite(key, tensor.flatten(), dtype), is_ff)
        if not modules:
            raise AdapterValidationError("adapter_model.safetensors holds no IA3 tensors")
        check_targets_agree(config, modules, base.linear_shapes)
        return AdapterWeights(kind=self.kind, config=config, modules=modules)

    def to_peft(self, weights: AdapterWeights) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        tensors = {}
        for module, m in weights.modules.items():
            shaped = m.vector.reshape(1, -1) if m.feedforward else m.vector.reshape(-1, 1)
            tensors[f"{PEFT_PREFIX}{module}.ia3_l"] = shaped.contiguous()
        names = lambda ff: sorted({n.rsplit(".", 1)[-1] for n, m in weights.modules.items()  # noqa: E731
                                   if m.feedforward or not ff})
        config = {"peft_type": self.peft_type, "task_type": "CAUSAL_LM", **weights.config,
                  "target_modules": names(False), "feedforward_modules": names(True)}
        return config, tensors

    def install(self, runtime, slot: int, weights: AdapterWeights) -> None:
        for module, m in weights.modules.items():
            layer = runtime.layer(module)
            is_ff = m.feedforward
            key = "ia3_in" if is_ff else "ia3_out"
            bank = layer.banks.get(key)
            if bank is None:
                features = layer.in_features if is_ff else layer.out_features
                bank = layer.banks[key] = Ia3Bank(runtime.capacity, features, is_ff, runtime.dtype, runtime.device)
            bank.write(slot, m.vector)

    def uninstall(self, runtime, slot: int, weights: AdapterWeights) -> None:
        for module, m in weights.modules.items():
            bank = runtime.layer(module).banks.get("ia3_in" if m.feedforward else "ia3_out")
            if bank is not None:  # None: an install that failed before its first write here made none
                bank.clear(slot)
