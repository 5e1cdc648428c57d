"""What every trainable adapter shares, importable by the kind modules (``adapters.kinds.*``).

A kind's trainable form (its handler's ``build_trainable``) subclasses ``TrainableAdapter``. This
module imports nothing of ``adapters.kinds`` so the kind modules can define their trainable forms
next to their serving code without an import cycle.

The trainer reads these hooks, never the kind:

- ``forward_layer``: the adapter's math around one frozen base layer (LoRA-family kinds, IA3);
- ``prompt_embeddings``: virtual-token embeddings in front of every sequence (prompt kinds);
- ``prefix_key_values``: per-layer keys and values of virtual positions (prefix tuning);
- ``regularization``: a term added to the training loss (AdaLoRA's orthogonality);
- ``after_optimizer_step``: work between the optimizer step and zeroing the gradients (AdaLoRA's
  rank allocator);
- ``extra_state`` / ``load_extra_state``: what a checkpoint must hold beyond the parameters.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from adapters import module_match

PARAM_DTYPE = torch.float32  # trainable parameters stay float32 whatever the compute dtype (as PEFT)


def param_key(module: str) -> str:
    return module.replace(".", "-")  # parameter names may not contain dots


def resolve_targets(spec: list[str] | str, layer_names: list[str]) -> list[str]:
    """Module paths matched by a ``target_modules``-like spec ('all-linear' = every wrapped layer)."""
    if spec == "all-linear":
        chosen = list(layer_names)
    else:
        chosen = [name for name in layer_names if module_match.matches(spec, name)]
    if not chosen:
        raise ValueError(f"target_modules {spec!r} match no linear layer of the base model")
    return chosen


def kaiming_a(rank: int, in_features: int, generator: torch.Generator) -> torch.Tensor:
    """LoRA's A init as PEFT does it: ``nn.Linear``'s default (Kaiming-uniform with a = sqrt(5))."""
    a = torch.empty(rank, in_features, dtype=PARAM_DTYPE)
    nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=generator)
    return a


class TrainableAdapter(nn.Module):
    """Common part: the kind, the dropout generator, and what the trainer reads."""

    kind: Any  # an AdapterKind

    def __init__(self, seed: int, device: torch.device):
        super().__init__()
        self.generator = torch.Generator(device=device)
        self.generator.manual_seed(seed)

    def forward_layer(self, name: str, base_layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return base_layer(x)

    def prompt_embeddings(self) -> torch.Tensor | None:
        """``[num_virtual_tokens, hidden]`` placed in front of every sequence, or None."""
        return None

    def prefix_key_values(self, dtype: torch.dtype) -> torch.Tensor | None:
        """``[layers * 2 (key, value), virtual, kv_heads, head_dim]`` attended to by every token, or None."""
        return None

    def regularization(self) -> torch.Tensor | None:
        """A term added to each micro-batch's training loss (not to eval loss), or None."""
        return None

    def after_optimizer_step(self, step: int, total_steps: int) -> None:
        """Called after optimizer step ``step`` (0-based), gradients still present."""

    def extra_state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """Tensors and JSON a checkpoint must hold beyond the parameters."""
        return {}, {}

    def load_extra_state(self, tensors: dict[str, torch.Tensor], state: dict[str, Any]) -> None:
        """Restore what ``extra_state`` saved (``tensors`` are all of the checkpoint's tensors)."""

    def to_weights(self):
        raise NotImplementedError

    def _dropout(self, x: torch.Tensor, p: float) -> torch.Tensor:
        if not self.training or p == 0:
            return x
        # one Bernoulli draw already scaled by 1 / (1 - p) (vectorized and multi-threaded on CPU),
        # then one multiply: ``rand >= p`` then two more passes cost about twice as much per layer
        keep = torch.empty_like(x).bernoulli_(1.0 - p, generator=self.generator).div_(1.0 - p)
        return x * keep
