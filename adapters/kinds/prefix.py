"""Prefix tuning (P-tuning v2): learned keys and values for ``num_virtual_tokens`` positions in
front of every layer's cache, attended to by every real token (which start at position
``num_virtual_tokens``, as in PEFT, where the prefix arrives as ``past_key_values``).

PEFT saves ``prompt_embeddings [virtual, layers * 2 * token_dim]`` (its encoder's output when it
used ``prefix_projection``), read as ``[virtual, layers * 2, kv_heads, head_dim]``: for layer ``l``
row ``2l`` holds the keys and ``2l + 1`` the values (PEFT sizes ``token_dim`` and the head count
to the key/value heads of grouped-query models). The paged runner writes them into a row's own KV
blocks where its virtual positions lie; the padded engine cannot, so it refuses the install.
"""

from __future__ import annotations

from typing import Any

import torch

from adapters.errors import AdapterValidationError
from adapters.kinds.base import AdapterKind, AdapterLimits, AdapterWeights, BaseModelInfo, cast_finite, check_finite
from adapters.validate import anything, equals, positive_int, sanitize_config

FIELDS = {
    "num_virtual_tokens": positive_int,
    "token_dim": positive_int,
    "num_attention_heads": positive_int,
    "num_layers": positive_int,
    "num_transformer_submodules": equals(1, None),
    "encoder_hidden_size": anything,  # the projection's width, training only (its output is saved)
    "prefix_projection": anything,
    "init_weights": anything,
}
TENSOR_NAME = "prompt_embeddings"


class PrefixTuningHandler:
    kind = AdapterKind.PREFIX_TUNING
    peft_type = "PREFIX_TUNING"
    serves_as = AdapterKind.PREFIX_TUNING

    def claims(self, config: dict[str, Any]) -> bool:
        return True

    def describe(self, weights: AdapterWeights) -> dict[str, Any]:
        return {"num_virtual_tokens": weights.config.get("num_virtual_tokens")}

    def from_peft(self, config: dict[str, Any], tensors: dict[str, torch.Tensor], base: BaseModelInfo,
                  limits: AdapterLimits, dtype: torch.dtype) -> AdapterWeights:
        config = sanitize_config(config, FIELDS)
        if sorted(tensors) != [TENSOR_NAME]:
            raise AdapterValidationError(
                f"a prefix-tuning adapter holds exactly one tensor named {TENSOR_NAME!r}; found {sorted(tensors)[:5]}")
        want = {"num_layers": base.num_layers, "num_attention_heads": base.kv_heads,
                "token_dim": base.kv_heads * base.head_dim}
        for field, value in want.items():
            if config.get(field) != value:
                raise AdapterValidationError(
                    f"adapter_config.json: {field} = {config.get(field)} does not fit the base model ({field} "
                    f"{value}: {base.num_layers} layers of {base.kv_heads} key/value heads of {base.head_dim})")
        count = config.get("num_virtual_tokens")
        if count is None:
            raise AdapterValidationError("adapter_config.json: prefix tuning config lacks num_virtual_tokens")
        if count > limits.max_virtual_tokens:
            raise AdapterValidationError(
                f"{count} virtual tokens is above this gateway's limit of {limits.max_virtual_tokens}")
        prefix = tensors[TENSOR_NAME]
        check_finite(TENSOR_NAME, prefix)
        expected = (count, base.num_layers * 2 * base.kv_heads * base.head_dim)
        if tuple(prefix.shape) != expected:
            raise AdapterValidationError(
                f"{TENSOR_NAME} has shape {tuple(prefix.shape)}; expected {expected} (num_virtual_tokens x "
                "layers * 2 * key/value width)")
        prefix = cast_finite(TENSOR_NAME, prefix, dtype)
        shaped = prefix.view(count, base.num_layers * 2, base.kv_heads, base.head_dim).permute(1, 0, 2, 3)
        return AdapterWeights(kind=self.kind, config=config, prefix=shaped.contiguous())

    def to_peft(self, weights: AdapterWeights) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        assert weights.prefix is not None
        rows, count, heads, dim = weights.prefix.shape
        flat = weights.prefix.permute(1, 0, 2, 3).reshape(count, rows * heads * dim)
        config = {"peft_type": self.peft_type, "task_type": "CAUSAL_LM", "num_transformer_submodules": 1,
                  **weights.config, "num_virtual_tokens": count, "num_layers": rows // 2,
                  "num_attention_heads": heads, "token_dim": heads * dim}
        return config, {TENSOR_NAME: flat.contiguous()}

    def install(self, runtime, slot: int, weights: AdapterWeights) -> None:
        if not runtime.kv_prefixes:
            raise AdapterValidationError(
                "prefix-tuning adapters need the paged KV cache (GATEWAY_KV_CACHE=paged); the padded engine "
                "cannot place their keys and values")
        runtime.prefixes[slot] = weights.prefix.to(runtime.device, runtime.dtype)

    def uninstall(self, runtime, slot: int, weights: AdapterWeights) -> None:
        runtime.prefixes.pop(slot, None)
