"""Prefix tuning (P-tuning v2): learned keys and values for ``num_virtual_tokens`` positions in
front of every layer's cache, attended to by every real token (which start at position
``num_virtual_tokens``, as in PEFT, where the prefix arrives as ``past_key_values``).

PEFT saves ``prompt_embeddings [virtual, layers * 2 * token_dim]`` (its encoder's output when it
used ``prefix_projection``), read as ``[virtual, layers * 2, kv_heads, head_dim]``: for layer ``l``
row ``2l`` holds the keys and ``2l + 1`` the values (PEFT sizes ``token_dim`` and the head count
to the key/value heads of grouped-query models). The paged runner writes them into a row's own KV
blocks where its virtual positions lie; the padded engine cannot, so it refuses the install.

Training (``TrainablePrefix``) follows PEFT's ``PrefixEncoder``: the prefix is an embedding of
``layers * 2 * token_dim`` per virtual token, or with ``prefix_projection`` an embedding of
``token_dim`` run through ``Linear(token_dim, encoder_hidden_size) -> tanh -> Linear(...,
layers * 2 * token_dim)``; the export is the encoder's output, as PEFT saves it.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from adapters.errors import AdapterValidationError
from adapters.kinds.base import (
    AdapterKind, AdapterLimits, AdapterWeights, BaseModelInfo, TrainingForm, cast_finite, check_finite,
    check_training_virtual_tokens,
)
from adapters.training.base import PARAM_DTYPE, TrainableAdapter
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


class TrainablePrefix(TrainableAdapter):
    """PEFT's prefix encoder; ``prefix_key_values`` hands the trainer the per-layer keys and values."""

    kind = AdapterKind.PREFIX_TUNING

    def __init__(self, count: int, layers: int, kv_heads: int, head_dim: int, projection: bool, hidden: int,
                 seed: int, device: torch.device):
        super().__init__(seed, device)
        self.geometry = (count, layers, kv_heads, head_dim)
        self.projection, self.hidden = projection, hidden
        token_dim, width = kv_heads * head_dim, layers * 2 * kv_heads * head_dim
        with torch.random.fork_rng(devices=[]):  # PEFT's init (torch defaults), seeded by the job
            torch.manual_seed(seed)
            if projection:
                self.embedding = nn.Embedding(count, token_dim)
                self.transform = nn.Sequential(nn.Linear(token_dim, hidden), nn.Tanh(), nn.Linear(hidden, width))
            else:
                self.embedding = nn.Embedding(count, width)
        self.to(device, PARAM_DTYPE)

    def flat_prefix(self) -> torch.Tensor:
        """``[virtual, layers * 2 * token_dim]``: what PEFT saves as ``prompt_embeddings``."""
        out = self.embedding.weight
        return self.transform(out) if self.projection else out

    def prefix_key_values(self, dtype: torch.dtype) -> torch.Tensor:
        count, layers, heads, dim = self.geometry
        return self.flat_prefix().to(dtype).view(count, layers * 2, heads, dim).permute(1, 0, 2, 3)

    def to_weights(self) -> AdapterWeights:
        count, layers, heads, dim = self.geometry
        with torch.no_grad():
            prefix = self.prefix_key_values(PARAM_DTYPE).detach().cpu().contiguous()
        config = {"num_virtual_tokens": count, "num_layers": layers, "num_attention_heads": heads,
                  "token_dim": heads * dim, "prefix_projection": self.projection, "encoder_hidden_size": self.hidden}
        return AdapterWeights(kind=self.kind, config=config, prefix=prefix)


class PrefixTuningHandler(TrainingForm):
    kind = AdapterKind.PREFIX_TUNING
    peft_type = "PREFIX_TUNING"
    serves_as = AdapterKind.PREFIX_TUNING
    default_learning_rate = 1e-2  # the prefix itself is the parameter: each step moves one key or value entry
    # With the projection, every prefix entry is an output of one shared MLP (``encoder_hidden_size``
    # wide), so an AdamW step of size lr on every weight moves each entry about hidden x lr: at 1e-2
    # the loss of the strict-format benchmark jumped from 1.05 to 7.1 in three steps, identically
    # in PEFT's own loop and ours (README, training benchmark); at 1e-3 both fall from the start.
    projection_learning_rate = 1e-3
    training_fields = frozenset({"num_virtual_tokens", "prefix_projection", "encoder_hidden_size"})

    def learning_rate_for(self, config) -> float:
        return self.projection_learning_rate if config.prefix_projection else self.default_learning_rate

    def check_training_config(self, config) -> None:
        if config.encoder_hidden_size is not None and not config.prefix_projection:
            raise ValueError("encoder_hidden_size applies to prefix tuning with prefix_projection: true only")

    def check_training(self, config, limits: AdapterLimits, total_steps: int | None = None) -> None:
        check_training_virtual_tokens(config.num_virtual_tokens, limits)

    def training_virtual_tokens(self, config) -> int:
        return config.num_virtual_tokens

    def build_trainable(self, config, runtime, tokenizer, total_steps: int) -> TrainablePrefix:
        info = runtime.base_info
        token_dim = info.kv_heads * info.head_dim  # PEFT sizes it to the key/value heads
        return TrainablePrefix(config.num_virtual_tokens, info.num_layers, info.kv_heads, info.head_dim,
                               config.prefix_projection, config.encoder_hidden_size or token_dim, config.seed,
                               runtime.device)

    def trainable_from_weights(self, weights: AdapterWeights, device: torch.device, seed: int) -> TrainablePrefix:
        rows, count, heads, dim = weights.prefix.shape
        adapter = TrainablePrefix(count, rows // 2, heads, dim, False, heads * dim, seed, device)
        with torch.no_grad():
            adapter.embedding.weight.copy_(weights.prefix.permute(1, 0, 2, 3).reshape(count, -1))
        return adapter

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
