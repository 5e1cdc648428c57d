"""The contract every adapter kind implements, and the data types the kinds share.

A kind turns PEFT files into ``AdapterWeights`` (checked against the base model), installs those
weights into a device slot of the multi-adapter runtime, and exports them back to PEFT tensors.
Serving a new kind means one new module implementing ``KindHandler`` and one line in
``adapters.kinds.HANDLERS``: parsing, limits, description, install, export and the trainable form
(``build_trainable``, the training fields it reads and their checks) hang off the handler, and
neither serving nor training code branches on the kind.
"""

from __future__ import annotations

import dataclasses
import enum
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import torch

from adapters import module_match
from adapters.errors import AdapterValidationError

if TYPE_CHECKING:
    from adapters.runtime import AdapterRuntime

# PEFT prefixes every saved tensor name with this (the PeftModel -> base model -> module path).
PEFT_PREFIX = "base_model.model."


class AdapterKind(str, enum.Enum):
    LORA = "lora"
    IA3 = "ia3"
    PROMPT_TUNING = "prompt_tuning"
    DORA = "dora"
    ADALORA = "adalora"
    VERA = "vera"
    P_TUNING = "p_tuning"
    PREFIX_TUNING = "prefix_tuning"


@dataclass(frozen=True)
class BaseModelInfo:
    """What validation needs to know of the resident base model."""

    model_type: str
    hidden_size: int
    # module path (as in ``model.named_modules()``) -> (in_features, out_features) of every
    # linear layer the runtime can adapt
    linear_shapes: dict[str, tuple[int, int]]
    # attention geometry (what prefix tuning's per-layer keys and values must fit)
    num_layers: int = 0
    kv_heads: int = 0
    head_dim: int = 0


@dataclass(frozen=True)
class AdapterLimits:
    max_lora_rank: int = 256
    max_virtual_tokens: int = 512
    max_adapter_bytes: int = 512 * 1024 * 1024


@dataclass(frozen=True)
class LoraModule:
    """One module's LoRA: ``y += scale * (x @ a.T) @ b.T``; with ``magnitude`` (DoRA) the result
    is then rescaled per output channel to ``magnitude / ||W + scale * b @ a||`` (row norms)."""

    a: torch.Tensor  # [r, in]
    b: torch.Tensor  # [out, r]
    scale: float
    magnitude: torch.Tensor | None = None  # [out], DoRA only


@dataclass(frozen=True)
class Ia3Module:
    """One module's IA3 scale: on the output (``y * vector``) or, on a feed-forward module, on
    the input (``base(x * vector)``)."""

    vector: torch.Tensor  # [out], or [in] when feedforward
    feedforward: bool


@dataclass
class AdapterWeights:
    """One adapter, parsed and validated, held as CPU tensors in the compute dtype.

    ``modules`` maps a module path to that kind's per-module weights (a dataclass per kind, e.g.
    ``LoraModule``, ``Ia3Module``); ``shared`` holds tensors every module
    reads (VeRA's projections); ``prompt`` holds virtual-token embeddings
    ``[num_virtual_tokens, hidden]`` (prompt tuning, P-tuning).
    """

    kind: AdapterKind
    config: dict[str, Any]
    modules: dict[str, Any] = field(default_factory=dict)
    prompt: torch.Tensor | None = None
    shared: dict[str, torch.Tensor] = field(default_factory=dict)
    prefix: torch.Tensor | None = None  # prefix tuning: [layers * 2 (key, value), virtual, kv_heads, head_dim]

    def tensors(self) -> list[torch.Tensor]:
        out: list[torch.Tensor] = [t for t in (self.prompt, self.prefix) if t is not None]
        out.extend(self.shared.values())
        for value in self.modules.values():
            if dataclasses.is_dataclass(value):
                value = [getattr(value, f.name) for f in dataclasses.fields(value)]
            out.extend(v for v in value if isinstance(v, torch.Tensor))
        return out

    @property
    def virtual_tokens(self) -> int:
        """Positions the adapter adds in front of every prompt (prompt tuning, P-tuning, prefix
        tuning), else 0."""
        if self.prefix is not None:
            return self.prefix.shape[1]
        return 0 if self.prompt is None else self.prompt.shape[0]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())

    def describe(self) -> dict[str, Any]:
        """Plain facts for listings: kind, target modules, and what the kind's handler adds (rank,
        virtual tokens ...)."""
        from adapters.kinds import HANDLERS  # the registry imports this module

        info: dict[str, Any] = {"kind": self.kind.value}
        info.update(HANDLERS[self.kind].describe(self))
        info["target_modules"] = sorted({name.rsplit(".", 1)[-1] for name in self.modules})
        return info


class KindHandler(Protocol):
    kind: AdapterKind
    peft_type: str
    # the runtime's bank family the kind is served by (AdaLoRA, VeRA and DoRA are served by the
    # LoRA bank, P-tuning as prompt tuning); a layer's banks of that family run when a row has it
    serves_as: AdapterKind

    def claims(self, config: dict[str, Any]) -> bool:
        """Whether a config of this handler's ``peft_type`` is this kind (DoRA is LoRA + use_dora)."""
        ...

    def describe(self, weights: AdapterWeights) -> dict[str, Any]: ...

    def from_peft(
        self, config: dict[str, Any], tensors: dict[str, torch.Tensor], base: BaseModelInfo,
        limits: AdapterLimits, dtype: torch.dtype,
    ) -> AdapterWeights: ...

    def to_peft(self, weights: AdapterWeights) -> tuple[dict[str, Any], dict[str, torch.Tensor]]: ...

    def install(self, runtime: AdapterRuntime, slot: int, weights: AdapterWeights) -> None: ...

    def uninstall(self, runtime: AdapterRuntime, slot: int, weights: AdapterWeights) -> None: ...

    # ---- the trainable form (``TrainingForm`` gives the defaults) ----
    # AdamW learning rate used when a job sets none; None: the kind is served but not trained
    default_learning_rate: float | None
    # the kind-specific ``TrainingConfig`` fields this kind reads (others sent with it are refused)
    training_fields: frozenset[str]

    def learning_rate_for(self, config: Any) -> float | None:
        """The learning rate of a ``TrainingConfig`` that sets none (``default_learning_rate``
        unless the kind's own fields change what a step does, as prefix tuning's projection)."""
        ...

    def check_training_config(self, config: Any) -> None:
        """Refuse (``ValueError``) inconsistent fields of a ``TrainingConfig`` of this kind."""
        ...

    def check_training(self, config: Any, limits: AdapterLimits, total_steps: int | None = None) -> None:
        """Refuse (``ValueError``) a config whose result the gateway would not serve, or (once the
        run's optimizer steps are known) a schedule that does not fit them."""
        ...

    def training_virtual_tokens(self, config: Any) -> int:
        """Positions the trained adapter adds in front of every sequence (they use the context)."""
        ...

    def build_trainable(self, config: Any, runtime: AdapterRuntime, tokenizer: Any, total_steps: int) -> Any:
        """A freshly initialised ``adapters.training.base.TrainableAdapter`` of this kind for a run of
        ``total_steps`` optimizer steps."""
        ...

    def trainable_from_weights(self, weights: AdapterWeights, device: torch.device, seed: int) -> Any:
        """A ``TrainableAdapter`` holding ``weights`` (continue training, compare with PEFT)."""
        ...


class TrainingForm:
    """Defaults of the trainable part of ``KindHandler``: a kind that is served only."""

    default_learning_rate: float | None = None
    training_fields: frozenset[str] = frozenset()

    def learning_rate_for(self, config: Any) -> float | None:
        return self.default_learning_rate

    def check_training_config(self, config: Any) -> None:
        return None

    def check_training(self, config: Any, limits: AdapterLimits, total_steps: int | None = None) -> None:
        return None

    def training_virtual_tokens(self, config: Any) -> int:
        return 0

    def build_trainable(self, config: Any, runtime: AdapterRuntime, tokenizer: Any, total_steps: int) -> Any:
        raise ValueError(f"{self.kind.value} adapters cannot be trained here")  # type: ignore[attr-defined]

    def trainable_from_weights(self, weights: AdapterWeights, device: torch.device, seed: int) -> Any:
        raise ValueError(f"{weights.kind.value} adapters cannot be trained here")


def check_training_rank(field: str, rank: int, limits: AdapterLimits) -> None:
    if rank > limits.max_lora_rank:
        raise ValueError(f"{field} {rank} is above this gateway's max_lora_rank of {limits.max_lora_rank}")


def check_training_virtual_tokens(count: int, limits: AdapterLimits) -> None:
    if count > limits.max_virtual_tokens:
        raise ValueError(f"num_virtual_tokens {count} is above this gateway's "
                         f"max_virtual_tokens of {limits.max_virtual_tokens}")


def matches_module_list(spec: str | list[str] | None, name: str) -> bool:
    """PEFT's rule for ``target_modules``-like fields: a string is a full-match regex (run on RE2:
    linear time); a list matches a module path equal to an entry or ending in ``.<entry>``."""
    return module_match.matches(spec, name)


def split_peft_key(key: str, suffixes: tuple[str, ...]) -> tuple[str, str]:
    """``base_model.model.<module>.<suffix>`` -> (module, suffix), or a validation error."""
    if key.startswith(PEFT_PREFIX):
        rest = key[len(PEFT_PREFIX):]
        for suffix in suffixes:
            if rest.endswith("." + suffix):
                return rest[: -len(suffix) - 1], suffix
    raise AdapterValidationError(
        f"unexpected tensor {key!r} in adapter_model.safetensors (expected names like "
        f"'{PEFT_PREFIX}<module>.{suffixes[0]}')"
    )


def tensors_by_module(tensors: dict[str, torch.Tensor], suffixes: tuple[str, ...],
                      kind: str) -> dict[str, dict[str, torch.Tensor]]:
    """PEFT's ``<prefix><module>.<suffix>`` tensors grouped as {module: {suffix: tensor}}, each
    checked finite; a validation error for a foreign name or when there is none."""
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        module, suffix = split_peft_key(key, suffixes)
        check_finite(key, tensor)
        parts.setdefault(module, {})[suffix] = tensor
    if not parts:
        raise AdapterValidationError(f"adapter_model.safetensors holds no {kind} tensors")
    return parts


def check_module(name: str, base: BaseModelInfo) -> tuple[int, int]:
    if name not in base.linear_shapes:
        raise AdapterValidationError(
            f"target module {name!r} does not exist in the base model ({base.model_type}) "
            "or is not a linear layer"
        )
    return base.linear_shapes[name]


def check_finite(name: str, tensor: torch.Tensor) -> None:
    if not tensor.is_floating_point():
        raise AdapterValidationError(f"tensor {name!r} has dtype {tensor.dtype}; adapters hold floats")
    if not bool(torch.isfinite(tensor).all()):
        raise AdapterValidationError(f"tensor {name!r} holds NaN or infinite values")


def cast_finite(name: str, tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``tensor`` in the compute dtype, refused if a value overflows it (finite in float32 can be
    infinite in float16, and one infinite weight poisons every row that meets it)."""
    cast = tensor.to(dtype)
    if not bool(torch.isfinite(cast).all()):
        raise AdapterValidationError(f"{name} holds values beyond the range of {dtype} (the serving dtype)")
    return cast


def lora_scale(alpha: float, rank: int, use_rslora: bool) -> float:
    return alpha / math.sqrt(rank) if use_rslora else alpha / rank
