"""Adapters whose parameters require gradients: the one "trainable slot" of the runtime.

Inside ``AdapterRuntime.training(adapter)`` every wrapped linear layer calls
``adapter.forward_layer(name, base_layer, x)``; the frozen (NF4) base layer runs as in serving and
the adapter adds its own math with the same formulas PEFT uses, so the exported adapter serves
the logits it was trained with. Parameters are float32 whatever the compute dtype (as PEFT keeps
them), initialised as PEFT initialises them, and dropout draws from the adapter's own generator
so a resumed run continues the same random stream.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from adapters.kinds.base import AdapterKind, AdapterWeights, Ia3Module, LoraModule, lora_scale, matches_module_list
from adapters.training.base import PARAM_DTYPE, TrainableAdapter, kaiming_a, param_key, resolve_targets

if TYPE_CHECKING:
    from adapters.training.config import TrainingConfig

_key = param_key
__all__ = ["PARAM_DTYPE", "TrainableAdapter", "resolve_targets", "build_trainable", "trainable_from_weights"]


class TrainableLora(TrainableAdapter):
    """``y = base(x) + (dropout(x) @ A.T @ B.T) * scale`` on each target; A ``[r, in]``, B ``[out, r]``."""

    kind = AdapterKind.LORA

    def __init__(self, shapes: dict[str, tuple[int, int]], r: int, alpha: float, dropout: float,
                 use_rslora: bool, seed: int, device: torch.device):
        super().__init__(seed, device)
        self.r, self.alpha, self.dropout_p, self.use_rslora = r, alpha, dropout, use_rslora
        self.scale = lora_scale(alpha, r, use_rslora)
        self.modules_ = sorted(shapes)
        init = torch.Generator().manual_seed(seed)
        self.A = nn.ParameterDict()
        self.B = nn.ParameterDict()
        for name in self.modules_:
            in_f, out_f = shapes[name]
            self.A[_key(name)] = nn.Parameter(kaiming_a(r, in_f, init).to(device))  # as PEFT
            self.B[_key(name)] = nn.Parameter(torch.zeros(out_f, r, dtype=PARAM_DTYPE, device=device))

    def forward_layer(self, name: str, base_layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        y = base_layer(x)
        key = _key(name)
        if key not in self.A:
            return y
        h = self._dropout(x.to(PARAM_DTYPE), self.dropout_p)
        delta = F.linear(F.linear(h, self.A[key]), self.B[key]) * self.scale
        return y + delta.to(y.dtype)

    def to_weights(self) -> AdapterWeights:
        modules = {name: LoraModule(self.A[_key(name)].detach().cpu().clone(),
                                    self.B[_key(name)].detach().cpu().clone(), self.scale) for name in self.modules_}
        config = {"r": self.r, "lora_alpha": self.alpha, "lora_dropout": self.dropout_p,
                  "use_rslora": self.use_rslora}
        return AdapterWeights(kind=self.kind, config=config, modules=modules)


class TrainableIa3(TrainableAdapter):
    """Learned scales, initialised to ones: ``base(x * l)`` on feed-forward targets, else ``base(x) * l``."""

    kind = AdapterKind.IA3

    def __init__(self, shapes: dict[str, tuple[int, int]], feedforward: set[str], seed: int, device: torch.device):
        super().__init__(seed, device)
        self.modules_ = sorted(shapes)
        self.feedforward = set(feedforward)
        self.scales = nn.ParameterDict({
            _key(name): nn.Parameter(torch.ones(shapes[name][0 if name in feedforward else 1],
                                                dtype=PARAM_DTYPE, device=device))
            for name in self.modules_
        })

    def forward_layer(self, name: str, base_layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        key = _key(name)
        if key not in self.scales:
            return base_layer(x)
        scale = self.scales[key]
        if name in self.feedforward:
            return base_layer((x.to(PARAM_DTYPE) * scale).to(x.dtype))
        y = base_layer(x)
        return (y * scale).to(y.dtype)

    def to_weights(self) -> AdapterWeights:
        modules = {name: Ia3Module(self.scales[_key(name)].detach().cpu().clone(), name in self.feedforward)
                   for name in self.modules_}
        return AdapterWeights(kind=self.kind, config={}, modules=modules)


class TrainablePrompt(TrainableAdapter):
    """Virtual-token embeddings ``[n, hidden]`` in front of every sequence; the layers are untouched."""

    kind = AdapterKind.PROMPT_TUNING

    def __init__(self, init: torch.Tensor, seed: int, device: torch.device):
        super().__init__(seed, device)
        self.prompt = nn.Parameter(init.detach().to(device, PARAM_DTYPE).clone())

    def prompt_embeddings(self) -> torch.Tensor:
        return self.prompt

    def to_weights(self) -> AdapterWeights:
        # The saved config says RANDOM: the embeddings are the trained ones, and PEFT's TEXT init
        # would ask for a tokenizer path at load time for nothing.
        return AdapterWeights(kind=self.kind, config={"prompt_tuning_init": "RANDOM"},
                              prompt=self.prompt.detach().cpu().clone())


def _prompt_init(config: TrainingConfig, embed: nn.Module, tokenizer: Any) -> torch.Tensor:
    """Embeddings of the init text (repeated or cut to the length), else of random vocabulary
    tokens (PEFT's SAMPLE_VOCAB: starts in the region of real embeddings, unlike N(0, 1))."""
    n = config.num_virtual_tokens
    if config.prompt_init_text is not None:
        ids = list(tokenizer(config.prompt_init_text, add_special_tokens=False)["input_ids"])
        if not ids:
            raise ValueError("prompt_init_text encodes to no tokens")
        ids = (ids * math.ceil(n / len(ids)))[:n]
        token_ids = torch.tensor(ids, dtype=torch.long)
    else:
        generator = torch.Generator().manual_seed(config.seed)
        token_ids = torch.randint(0, embed.weight.shape[0], (n,), generator=generator)
    with torch.no_grad():
        return embed(token_ids.to(embed.weight.device)).float()


def build_lora(config: TrainingConfig, runtime) -> TrainableLora:
    shapes = runtime.base_info.linear_shapes  # module -> (in, out)
    targets = resolve_targets(config.target_modules or "all-linear", sorted(shapes))
    return TrainableLora({n: shapes[n] for n in targets}, config.r, config.lora_alpha, config.lora_dropout,
                         config.use_rslora, config.seed, runtime.device)


def build_ia3(config: TrainingConfig, runtime) -> TrainableIa3:
    shapes = runtime.base_info.linear_shapes
    target_spec, ff_spec = config.ia3_targets(runtime.base_info.model_type)
    targets = resolve_targets(target_spec, sorted(shapes))
    feedforward = {n for n in targets if matches_module_list(ff_spec, n)}
    return TrainableIa3({n: shapes[n] for n in targets}, feedforward, config.seed, runtime.device)


def build_prompt(config: TrainingConfig, runtime, tokenizer: Any) -> TrainablePrompt:
    embed = runtime.model.get_input_embeddings()
    return TrainablePrompt(_prompt_init(config, embed, tokenizer), config.seed, runtime.device)


def lora_from_weights(weights: AdapterWeights, device: torch.device, seed: int) -> TrainableLora:
    cfg = weights.config
    r = int(cfg["r"])
    shapes = {name: (m.a.shape[1], m.b.shape[0]) for name, m in weights.modules.items()}
    adapter = TrainableLora(shapes, r, float(cfg.get("lora_alpha", 8)), float(cfg.get("lora_dropout", 0.0)),
                            bool(cfg.get("use_rslora", False)), seed, device)
    with torch.no_grad():
        for name, m in weights.modules.items():
            adapter.A[_key(name)].copy_(m.a)
            adapter.B[_key(name)].copy_(m.b)
    return adapter


def ia3_from_weights(weights: AdapterWeights, device: torch.device, seed: int) -> TrainableIa3:
    shapes = {name: ((m.vector.numel(), 0) if m.feedforward else (0, m.vector.numel()))
              for name, m in weights.modules.items()}
    feedforward = {name for name, m in weights.modules.items() if m.feedforward}
    adapter = TrainableIa3(shapes, feedforward, seed, device)
    with torch.no_grad():
        for name, m in weights.modules.items():
            adapter.scales[_key(name)].copy_(m.vector)
    return adapter


def build_trainable(config: TrainingConfig, runtime, tokenizer: Any, total_steps: int | None = None) -> TrainableAdapter:
    """A freshly initialised trainable adapter of ``config.kind`` for the runtime's base model
    (the kind's handler builds it) for a run of ``total_steps`` optimizer steps (default:
    ``max_steps``, else 1)."""
    from adapters.kinds import HANDLERS  # the kind modules import this package

    steps = total_steps if total_steps is not None else (config.max_steps or 1)
    return HANDLERS[config.kind].build_trainable(config, runtime, tokenizer, steps)


def trainable_from_weights(weights: AdapterWeights, device: torch.device, seed: int = 0) -> TrainableAdapter:
    """A trainable adapter holding existing weights (continue training, or compare with PEFT)."""
    from adapters.kinds import HANDLERS

    return HANDLERS[weights.kind].trainable_from_weights(weights, device, seed)
