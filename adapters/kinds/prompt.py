"""Prompt tuning: learned virtual-token embeddings placed in front of the prompt.

Nothing happens inside the layers: the engine prepends ``prompt [num_virtual_tokens, hidden]``
to a sequence's input embeddings at prefill (positions and attention mask count them, as PEFT
does); decode steps need nothing more because the KV cache already holds them.
"""

from __future__ import annotations

from typing import Any

import torch

from adapters.errors import AdapterValidationError
from adapters.kinds.base import (
    AdapterKind, AdapterLimits, AdapterWeights, BaseModelInfo, TrainingForm, cast_finite, check_finite,
    check_training_virtual_tokens,
)
from adapters.validate import anything, equals, positive_int, sanitize_config

FIELDS = {
    "num_virtual_tokens": positive_int,
    "token_dim": positive_int,
    "num_transformer_submodules": equals(1, None),
    "num_attention_heads": anything,
    "num_layers": anything,
    "prompt_tuning_init": anything,
    "prompt_tuning_init_text": anything,
    "tokenizer_name_or_path": anything,
    "tokenizer_kwargs": anything,
}
TENSOR_NAME = "prompt_embeddings"


class PromptTuningHandler(TrainingForm):
    kind = AdapterKind.PROMPT_TUNING
    peft_type = "PROMPT_TUNING"
    serves_as = AdapterKind.PROMPT_TUNING
    fields = FIELDS
    default_learning_rate = 3e-2  # few parameters: large steps
    training_fields = frozenset({"num_virtual_tokens", "prompt_init_text"})

    def check_training(self, config, limits: AdapterLimits, total_steps: int | None = None) -> None:
        check_training_virtual_tokens(config.num_virtual_tokens, limits)

    def training_virtual_tokens(self, config) -> int:
        return config.num_virtual_tokens

    def build_trainable(self, config, runtime, tokenizer, total_steps: int):
        from adapters.training.trainable import build_prompt  # the trainer imports this package

        return build_prompt(config, runtime, tokenizer)

    def trainable_from_weights(self, weights: AdapterWeights, device: torch.device, seed: int):
        from adapters.training.trainable import TrainablePrompt

        return TrainablePrompt(weights.prompt, seed, device)

    def claims(self, config: dict[str, Any]) -> bool:
        return True

    def describe(self, weights: AdapterWeights) -> dict[str, Any]:
        return {"num_virtual_tokens": weights.config.get("num_virtual_tokens")}

    def from_peft(self, config: dict[str, Any], tensors: dict[str, torch.Tensor], base: BaseModelInfo,
                  limits: AdapterLimits, dtype: torch.dtype) -> AdapterWeights:
        config = sanitize_config(config, self.fields)
        extra = sorted(set(tensors) - {TENSOR_NAME})
        if extra or TENSOR_NAME not in tensors:
            raise AdapterValidationError(
                f"a prompt-tuning adapter holds exactly one tensor named {TENSOR_NAME!r}; found {sorted(tensors)[:5]}")
        prompt = tensors[TENSOR_NAME]
        check_finite(TENSOR_NAME, prompt)
        count = config.get("num_virtual_tokens")
        if count is None or prompt.ndim != 2 or tuple(prompt.shape) != (count, base.hidden_size):
            raise AdapterValidationError(
                f"prompt_embeddings has shape {tuple(prompt.shape)}; expected ({count}, {base.hidden_size}) "
                "(num_virtual_tokens x the base model's hidden size)")
        if config.get("token_dim", base.hidden_size) != base.hidden_size:
            raise AdapterValidationError(
                f"token_dim {config['token_dim']} differs from the base model's hidden size {base.hidden_size}")
        if count > limits.max_virtual_tokens:
            raise AdapterValidationError(
                f"{count} virtual tokens is above this gateway's limit of {limits.max_virtual_tokens}")
        return AdapterWeights(kind=self.kind, config=config, prompt=cast_finite(TENSOR_NAME, prompt, dtype))

    def to_peft(self, weights: AdapterWeights) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        assert weights.prompt is not None
        config = {"peft_type": self.peft_type, "task_type": "CAUSAL_LM", "num_transformer_submodules": 1,
                  **weights.config, "num_virtual_tokens": weights.prompt.shape[0],
                  "token_dim": weights.prompt.shape[1]}
        return config, {TENSOR_NAME: weights.prompt.contiguous()}

    def install(self, runtime, slot: int, weights: AdapterWeights) -> None:
        runtime.prompts[slot] = weights.prompt.to(runtime.device, runtime.dtype)

    def uninstall(self, runtime, slot: int, weights: AdapterWeights) -> None:
        runtime.prompts.pop(slot, None)
