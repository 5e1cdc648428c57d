"""LoRA: ``y += scale * (x @ A.T) @ B.T`` on targeted linear layers (the scale folded into B).

``LoraBank`` also serves every kind whose math is a LoRA delta: AdaLoRA and VeRA (turned into an
equivalent A and B at install) and DoRA (a LoRA delta plus one scale per output channel).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch

from adapters.errors import AdapterValidationError
from adapters.kinds.base import (
    PEFT_PREFIX, AdapterKind, AdapterLimits, AdapterWeights, BaseModelInfo, LoraModule, TrainingForm, cast_finite,
    check_module, check_training_rank, lora_scale, tensors_by_module,
)
from adapters.kinds.lora_buckets import RankBucket, bucket_rank
from adapters.module_match import check_targets_agree
from adapters.validate import (
    anything, boolean, equals, module_spec, number, number_in, positive_int, sanitize_config,
)

FIELDS = {
    "r": positive_int,
    "lora_alpha": number,
    "lora_dropout": number_in(0.0, 1.0),  # training only
    "target_modules": module_spec,
    "exclude_modules": module_spec,
    "bias": equals("none"),
    "use_rslora": boolean,
    "use_dora": equals(False),  # DoRA configs go to adapters.kinds.dora
    "fan_in_fan_out": equals(False),
    "init_lora_weights": anything,  # how training started; no effect on the saved weights
    "megatron_core": anything,
    "qalora_group_size": anything,  # only read when use_qalora is set, which is refused
    "layers_pattern": anything,  # only read with layers_to_transform, which is refused
}
A_KEY, B_KEY, MAGNITUDE_KEY = "lora_A.weight", "lora_B.weight", "lora_magnitude_vector"


class SlotLora(NamedTuple):
    """One slot's weights in a ``LoraBank``, laid out for the forward."""

    a_t: torch.Tensor  # A.T [in, r]
    b_t: torch.Tensor  # (scale * B).T [r, out]
    channel: torch.Tensor | None = None  # [out] DoRA: magnitude / ||W + scale * B @ A|| per output row
    shift: torch.Tensor | None = None  # [out] DoRA on a layer with a bias: (1 - channel) * bias


class LoraBank:
    """Per-module LoRA weights of every device slot that has them, each at its own rank.

    A forward's tokens come in runs of one slot (``TokenLayout.segments``; the paged engine packs
    the tokens of one adapter together), and each run gets two small matmuls on its own adapter's
    weights (SGMV-style): no rank padding, no per-row copies of the weights, and an idle adapter of
    a large rank costs nothing to the others. That is the torch path (``add_segments``). With
    ``fused`` (the runtime's ``lora_kernel`` is ``triton``, on CUDA) the weights are kept stacked
    by rank bucket instead (``lora_buckets``) and one launch per bucket applies every run
    (``lora_triton``).
    """

    kind = AdapterKind.LORA
    stage = "output"

    def __init__(self, dtype: torch.dtype, device: torch.device, *, fused: bool = False, slots: int = 0):
        self.dtype = dtype
        self.device = device
        self.weights: dict[int, SlotLora] = {}  # the torch path's
        self.fused = fused
        self.slots = slots  # slot numbers are below this (the fused path's lookup tables)
        self.buckets: dict[int, RankBucket] = {}  # the fused path's, by bucket rank
        self._bucket_of: dict[int, int] = {}  # slot -> its bucket's rank

    def write(self, slot: int, a: torch.Tensor, b_scaled: torch.Tensor, channel: torch.Tensor | None = None,
              shift: torch.Tensor | None = None) -> None:
        to = dict(device=self.device, dtype=self.dtype)
        weights = SlotLora(a.to(**to).T.contiguous(), b_scaled.to(**to).T.contiguous(),
                           None if channel is None else channel.to(**to), None if shift is None else shift.to(**to))
        if not self.fused:
            self.weights[slot] = weights
            return
        if slot in self._bucket_of:  # written again: its old row goes first
            self.clear(slot)
        in_features, rank = weights.a_t.shape
        key = bucket_rank(rank)
        bucket = self.buckets.get(key)
        if bucket is None:
            bucket = self.buckets[key] = RankBucket(key, in_features, weights.b_t.shape[1], self.slots, self.dtype,
                                                    self.device)
        try:
            bucket.add(slot, *weights)  # maps the slot only once its row is written
        except BaseException:
            if not bucket:  # made for this write: its memory goes with the failure
                del self.buckets[key]
            raise
        self._bucket_of[slot] = key

    def clear(self, slot: int) -> None:
        self.weights.pop(slot, None)
        key = self._bucket_of.pop(slot, None)
        if key is not None:
            self.buckets[key].remove(slot)
            if not self.buckets[key]:  # the bucket's last adapter left: its memory goes with it
                del self.buckets[key]

    def transform_output(self, y: torch.Tensor, x: torch.Tensor, layout) -> torch.Tensor:
        y2 = y.reshape(-1, y.shape[-1])  # [N, out], a view of y
        x2 = x.reshape(-1, x.shape[-1]).to(self.dtype)
        if self.fused:
            kernels = lora_triton()
            tiles = layout.derived("lora_tiles", lambda: kernels.segment_tiles(layout.segments, x.device))
            present = layout.derived("lora_slots", lambda: frozenset(slot for _, _, slot in layout.segments))
            x2 = x2.contiguous()
            for bucket in self.buckets.values():
                # a bucket none of whose adapters has rows here is not launched at all: an idle
                # rank-256 adapter costs traffic on other ranks no launches (two per layer per step)
                if not present.isdisjoint(bucket.rows):
                    kernels.add_bucket(y2, x2, tiles, bucket)
        else:
            add_segments(y2, x2, layout.segments, self.weights)
        return y2.view(y.shape)


def lora_triton():
    """The Triton kernels' module, imported on first use: Triton is needed only on the fused path."""
    from adapters.kinds import lora_triton as module

    return module


def add_segments(y: torch.Tensor, x: torch.Tensor, segments, weights: dict[int, SlotLora]) -> None:
    """``y[s:e] += (x[s:e] @ A.T) @ (scale * B).T`` for every run ``(s, e, slot)`` whose slot has
    LoRA weights here (DoRA then ``y[s:e] = channel * y[s:e] + shift``); ``y [N, out]`` is updated
    in place, ``x [N, in]``."""
    for start, end, slot in segments:
        w = weights.get(slot)
        if w is None:
            continue
        shrunk = x[start:end] @ w.a_t  # [run, r]
        out = y[start:end]
        if shrunk.dtype == y.dtype:
            out.addmm_(shrunk, w.b_t)
        else:
            out += (shrunk @ w.b_t).to(y.dtype)
        if w.channel is not None:
            out.mul_(w.channel.to(y.dtype))
            if w.shift is not None:
                out.add_(w.shift.to(y.dtype))


def read_lora_modules(config: dict[str, Any], tensors: dict[str, torch.Tensor], base: BaseModelInfo,
                      limits: AdapterLimits, dtype: torch.dtype, *, dora: bool = False) -> dict[str, LoraModule]:
    """PEFT's LoRA tensors (with DoRA's magnitude vectors when ``dora``) as checked ``LoraModule``s."""
    if "r" not in config:
        raise AdapterValidationError("adapter_config.json: LoRA config lacks 'r'")
    rank = config["r"]
    if rank > limits.max_lora_rank:
        raise AdapterValidationError(f"LoRA rank {rank} is above this gateway's limit of {limits.max_lora_rank}")
    scale = lora_scale(float(config.get("lora_alpha", 8)), rank, bool(config.get("use_rslora", False)))
    suffixes = (A_KEY, B_KEY, MAGNITUDE_KEY) if dora else (A_KEY, B_KEY)
    parts = tensors_by_module(tensors, suffixes, "LoRA")
    modules = {}
    for module, part in sorted(parts.items()):
        in_f, out_f = check_module(module, base)
        if (A_KEY in part) != (B_KEY in part):
            raise AdapterValidationError(f"module {module!r} has only one of lora_A / lora_B")
        missing = [s for s in suffixes if s not in part]
        if missing:
            why = " (a DoRA adapter, use_dora: true, holds one per module)" if MAGNITUDE_KEY in missing else ""
            raise AdapterValidationError(f"module {module!r} lacks {', '.join(missing)}{why}")
        a, b = part[A_KEY], part[B_KEY]
        if tuple(a.shape) != (rank, in_f) or tuple(b.shape) != (out_f, rank):
            raise AdapterValidationError(
                f"module {module!r}: lora_A {tuple(a.shape)} / lora_B {tuple(b.shape)} do not fit "
                f"rank {rank} on a layer of {in_f} -> {out_f} features"
            )
        a, b = cast_finite(f"{module}.lora_A", a, dtype), cast_finite(f"{module}.lora_B", b, dtype)
        cast_finite(f"{module}.lora_B scaled by lora_alpha / r = {scale:g}", b * scale, dtype)
        magnitude = None
        if dora:
            magnitude = part[MAGNITUDE_KEY]
            if tuple(magnitude.shape) != (out_f,):
                raise AdapterValidationError(
                    f"module {module!r}: lora_magnitude_vector has shape {tuple(magnitude.shape)}, expected "
                    f"({out_f},) (one magnitude per output feature)")
            magnitude = cast_finite(f"{module}.lora_magnitude_vector", magnitude, dtype)
        modules[module] = LoraModule(a, b, scale, magnitude)
    check_targets_agree(config, modules, base.linear_shapes)
    return modules


def lora_tensors(modules: dict[str, LoraModule]) -> dict[str, torch.Tensor]:
    """PEFT's tensor names for ``modules`` (DoRA magnitudes included where present)."""
    tensors = {}
    for module, m in modules.items():
        tensors[f"{PEFT_PREFIX}{module}.{A_KEY}"] = m.a.contiguous()
        tensors[f"{PEFT_PREFIX}{module}.{B_KEY}"] = m.b.contiguous()
        if m.magnitude is not None:
            tensors[f"{PEFT_PREFIX}{module}.{MAGNITUDE_KEY}"] = m.magnitude.contiguous()
    return tensors


def lora_bank(layer, runtime) -> LoraBank:
    """The layer's LoRA bank, made on first use."""
    bank = layer.banks.get("lora")
    if bank is None:
        bank = layer.banks["lora"] = LoraBank(runtime.dtype, runtime.device, fused=runtime.lora_kernel == "triton",
                                              slots=runtime.capacity)
    return bank


def clear_lora(runtime, slot: int, modules) -> None:
    for module in modules:
        bank = runtime.layer(module).banks.get("lora")
        if bank is not None:  # None: an install that failed before its first write here made none
            bank.clear(slot)


LORA_TRAINING_FIELDS = frozenset({"r", "lora_alpha", "lora_dropout", "use_rslora", "target_modules"})


class LoraHandler(TrainingForm):
    kind = AdapterKind.LORA
    peft_type = "LORA"
    serves_as = AdapterKind.LORA
    default_learning_rate = 2e-4
    training_fields = LORA_TRAINING_FIELDS

    def check_training(self, config, limits: AdapterLimits, total_steps: int | None = None) -> None:
        check_training_rank("r", config.r, limits)

    def build_trainable(self, config, runtime, tokenizer, total_steps: int):
        from adapters.training.trainable import build_lora  # the trainer imports this package

        return build_lora(config, runtime)

    def trainable_from_weights(self, weights: AdapterWeights, device: torch.device, seed: int):
        from adapters.training.trainable import lora_from_weights

        return lora_from_weights(weights, device, seed)

    def claims(self, config: dict[str, Any]) -> bool:
        return config.get("use_dora") is not True  # another value is refused by FIELDS, by name

    def describe(self, weights: AdapterWeights) -> dict[str, Any]:
        return {"rank": weights.config.get("r")}

    def from_peft(self, config: dict[str, Any], tensors: dict[str, torch.Tensor], base: BaseModelInfo,
                  limits: AdapterLimits, dtype: torch.dtype) -> AdapterWeights:
        config = sanitize_config(config, FIELDS)
        return AdapterWeights(kind=self.kind, config=config,
                              modules=read_lora_modules(config, tensors, base, limits, dtype))

    def to_peft(self, weights: AdapterWeights) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        config = {"peft_type": self.peft_type, "task_type": "CAUSAL_LM", "bias": "none", "lora_dropout": 0.0,
                  **weights.config, "target_modules": sorted({m.rsplit(".", 1)[-1] for m in weights.modules})}
        return config, lora_tensors(weights.modules)

    def install(self, runtime, slot: int, weights: AdapterWeights) -> None:
        for module, m in weights.modules.items():
            lora_bank(runtime.layer(module), runtime).write(slot, m.a, m.b * m.scale)

    def uninstall(self, runtime, slot: int, weights: AdapterWeights) -> None:
        clear_lora(runtime, slot, weights.modules)
