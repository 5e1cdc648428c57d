"""The multi-adapter runtime: one base forward serves rows that each carry their own adapter.

Every linear layer of the base is wrapped once in ``MultiAdapterLinear``. Before a forward the
caller sets, through ``AdapterRuntime.rows``, the device slot of every batch row (0 = base). Each
wrapped layer then applies the banks of the kinds present in the batch: input-side scales (IA3
feed-forward), the frozen base layer once for all rows, then output-side scales (IA3) and deltas
(LoRA). Prompt tuning lives at the embedding and is read by the engine from ``prompts``.

Training uses the same layers: inside ``AdapterRuntime.training(adapter)`` every wrapped layer
hands its input to that one trainable adapter (``adapters.training.trainable``) instead of the
slot banks, so gradients reach the adapter's parameters through the frozen base. Training
forwards run between serving forwards, never inside one.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from adapters.kinds import HANDLERS, AdapterKind
from adapters.kinds.base import AdapterWeights, BaseModelInfo

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TokenLayout:
    """Which adapter slot each token of a forward uses, flattened over batch and time."""

    slots: torch.Tensor  # [N] long, device slot of every token (0 = base)
    segments: tuple[tuple[int, int, int], ...]  # maximal runs (start, end, slot) covering 0..N in order
    # what banks derive from the layout once per forward rather than once per layer (kernel tiles)
    _derived: dict = field(default_factory=dict, compare=False, repr=False)

    def derived(self, name: str, build):
        """``build()``, computed on the first call of the forward and reused by every later one."""
        value = self._derived.get(name)
        if value is None:
            value = self._derived[name] = build()
        return value

    @property
    def uniform_slot(self) -> int | None:
        return self.segments[0][2] if len(self.segments) == 1 else None


def token_segments(slots: Sequence[int]) -> tuple[tuple[int, int, int], ...]:
    """Maximal runs of equal slots: ``[3, 3, 0, 3] -> ((0, 2, 3), (2, 3, 0), (3, 4, 3))``."""
    runs: list[tuple[int, int, int]] = []
    start = 0
    for i in range(1, len(slots) + 1):
        if i == len(slots) or slots[i] != slots[start]:
            runs.append((start, i, slots[start]))
            start = i
    return tuple(runs)


@dataclass
class BatchContext:
    """Per-forward state shared by every wrapped layer."""

    row_slots: list[int] | None = None  # slot of every row; in a packed forward, of every token
    kinds: frozenset[AdapterKind] = frozenset()  # bank families (``KindHandler.serves_as``) the rows need
    trainable: object | None = None  # a TrainableAdapter applied to every row (training forwards)
    device: torch.device | None = None
    _layouts: dict[int, TokenLayout] = field(default_factory=dict)  # by token count, built once a forward

    def layout(self, tokens: int) -> TokenLayout:
        """The slot of each of the forward's ``tokens`` flattened tokens: rows are ``tokens / rows``
        consecutive tokens each (one token each in a packed forward)."""
        layout = self._layouts.get(tokens)
        if layout is None:
            per_row = tokens // len(self.row_slots)
            slots = [s for s in self.row_slots for _ in range(per_row)]
            layout = TokenLayout(torch.tensor(slots, dtype=torch.long, device=self.device), token_segments(slots))
            self._layouts[tokens] = layout
        return layout


class MultiAdapterLinear(nn.Module):
    def __init__(self, base: nn.Module, context: BatchContext, name: str = ""):
        super().__init__()
        self.name = name  # module path in the base model, as adapters name it
        self.base_layer = base
        self.in_features = base.in_features
        self.out_features = base.out_features
        self.context = context
        self.banks: dict[str, object] = {}  # "lora" / "ia3_in" / "ia3_out" -> bank

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ctx = self.context
        if ctx.trainable is not None:
            return ctx.trainable.forward_layer(self.name, self.base_layer, x)
        if ctx.row_slots is None or not self.banks:
            return self.base_layer(x)
        active = [bank for bank in self.banks.values() if bank.kind in ctx.kinds]
        if not active:
            return self.base_layer(x)
        layout = ctx.layout(x.numel() // self.in_features)
        x_in = x
        for bank in active:
            if bank.stage == "input":
                x_in = bank.transform_input(x_in, layout)
        y = self.base_layer(x_in)
        for bank in active:
            if bank.stage == "output":
                y = bank.transform_output(y, x, layout)
        return y


def _linear_types() -> tuple[type, ...]:
    types: tuple[type, ...] = (nn.Linear,)
    try:
        import bitsandbytes as bnb

        types += (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)
    except ImportError:  # the runtime works on plain models without bitsandbytes
        pass
    return types


class AdapterRuntime:
    """Wraps a causal LM's linear layers and manages ``capacity - 1`` adapter slots on its device."""

    def __init__(self, model: nn.Module, max_slots: int, dtype: torch.dtype, lora_kernel: str = "torch"):
        self.model = model
        # how LoRA banks apply deltas ("torch" or "triton", ``adapters.kinds.lora_kernel``); fixed for
        # the runtime's life, since banks store their weights for it
        self.lora_kernel = lora_kernel
        self.capacity = max_slots + 1  # slot 0 is the identity
        self.dtype = dtype
        self.device = next(model.parameters()).device
        self.context = BatchContext()
        self.prompts: dict[int, torch.Tensor] = {}
        # prefix tuning: per-layer keys and values of a slot's virtual positions, written into that
        # row's KV blocks by the paged runner (which sets ``kv_prefixes`` when it is the engine's)
        self.prefixes: dict[int, torch.Tensor] = {}
        self.kv_prefixes = False
        self._layers: dict[str, MultiAdapterLinear] = {}
        self._installed: dict[int, AdapterWeights] = {}
        self._wrap_linears()
        config = model.config
        self.base_info = BaseModelInfo(
            model_type=getattr(config, "model_type", "unknown"),
            hidden_size=config.hidden_size,
            linear_shapes={n: (m.in_features, m.out_features) for n, m in self._layers.items()},
            num_layers=getattr(config, "num_hidden_layers", 0),
            kv_heads=getattr(config, "num_key_value_heads", None) or getattr(config, "num_attention_heads", 0),
            head_dim=getattr(config, "head_dim", None) or config.hidden_size // max(config.num_attention_heads, 1),
        )

    def _wrap_linears(self) -> None:
        output_layer = self.model.get_output_embeddings()
        linear_types = _linear_types()
        targets = [
            (name, module) for name, module in self.model.named_modules()
            if isinstance(module, linear_types) and module is not output_layer
        ]
        for name, module in targets:
            parent_name, _, child = name.rpartition(".")
            parent = self.model.get_submodule(parent_name) if parent_name else self.model
            wrapper = MultiAdapterLinear(module, self.context, name)
            setattr(parent, child, wrapper)
            self._layers[name] = wrapper
        log.info("wrapped %d linear layers for multi-adapter serving", len(targets))

    def layer(self, name: str) -> MultiAdapterLinear:
        return self._layers[name]

    @property
    def free_slots(self) -> list[int]:
        return [s for s in range(1, self.capacity) if s not in self._installed]

    def kind_of(self, slot: int) -> AdapterKind | None:
        weights = self._installed.get(slot)
        return weights.kind if weights else None

    def install(self, weights: AdapterWeights, slot: int | None = None) -> int:
        """Copy an adapter into a free device slot and return the slot."""
        if slot is None:
            free = self.free_slots
            if not free:
                raise RuntimeError("no free adapter slot on the device")
            slot = free[0]
        elif slot in self._installed or not 0 < slot < self.capacity:
            raise ValueError(f"slot {slot} is taken or out of range")
        handler = HANDLERS[weights.kind]
        try:
            handler.install(self, slot, weights)
        except BaseException:
            # kinds write one module at a time: one that failed part-way (out of device memory at
            # the third module) left the first two in the slot's banks, and the next adapter
            # installed in this free slot would run with them. Clearing a module never written is harmless.
            handler.uninstall(self, slot, weights)
            raise
        self._installed[slot] = weights
        return slot

    def uninstall(self, slot: int) -> None:
        weights = self._installed.pop(slot)
        HANDLERS[weights.kind].uninstall(self, slot, weights)

    @contextlib.contextmanager
    def rows(self, slots: Sequence[int]) -> Iterator[None]:
        """Within the block, row ``i`` of every forward uses the adapter in ``slots[i]``; in a packed
        forward (inputs ``[1, N]``) pass one slot per token."""
        ctx = self.context
        # the bank families the rows need (AdaLoRA, VeRA and DoRA rows run the LoRA banks)
        kinds = frozenset(HANDLERS[k].serves_as for k in map(self.kind_of, set(slots)) if k is not None)
        ctx.row_slots, ctx.kinds, ctx.device, ctx._layouts = list(slots), kinds, self.device, {}
        try:
            yield
        finally:
            ctx.row_slots, ctx.kinds, ctx._layouts = None, frozenset(), {}

    @contextlib.contextmanager
    def training(self, adapter) -> Iterator[None]:
        """Within the block, every forward applies ``adapter`` (a TrainableAdapter) to all rows and
        no slot adapter; the caller runs its own forward/backward (never during a serving step)."""
        ctx = self.context
        if ctx.row_slots is not None or ctx.trainable is not None:
            raise RuntimeError("a training forward cannot run inside another forward")
        ctx.trainable = adapter
        try:
            yield
        finally:
            ctx.trainable = None
