"""AdaLoRA: LoRA in SVD form, ``y += (x @ (A * E).T @ B.T) * alpha / (ranknum + 1e-5)``.

PEFT saves ``lora_A [r, in]``, ``lora_E [r, 1]`` (the singular values) and ``lora_B [out, r]`` per
module, at ``init_r`` or, once its rank allocator has pruned, at the rank ``rank_pattern`` keeps
for that module (the sum of its mask). ``ranknum`` is not saved: PEFT sets it to ``init_r`` and
keeps it when it resizes a module to its pattern, so the scale is ``lora_alpha / init_r`` (an
``alpha`` of 0 or less falls back to the module's rank, as PEFT's ``scaling`` does). Served as the
equivalent LoRA ``A' = E * A`` of the module's effective rank; a pruned-to-zero module adds nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from adapters.errors import AdapterValidationError
from adapters.kinds.base import (
    PEFT_PREFIX, AdapterKind, AdapterLimits, AdapterWeights, BaseModelInfo, TrainingForm, cast_finite,
    check_module, check_training_rank, tensors_by_module,
)
from adapters.kinds.lora import clear_lora, lora_bank
from adapters.training.base import PARAM_DTYPE, TrainableAdapter, param_key, resolve_targets
from adapters.module_match import MAX_ENTRY_CHARS, MAX_LIST_ENTRIES, check_targets_agree
from adapters.validate import (
    anything, boolean, equals, fail, module_spec, number, number_in, positive_int, sanitize_config,
)

RANKNUM_EPS = 1e-5  # PEFT adds it to ranknum
SUFFIXES = ("lora_A", "lora_E", "lora_B")
PATTERN_SUFFIX = ".lora_E"


def rank_pattern(field: str, value: Any) -> None:
    """Null, or ``{"<module>.lora_E": [bool, ...]}`` (which singular values each module keeps)."""
    if value is None:
        return
    if not isinstance(value, dict) or len(value) > MAX_LIST_ENTRIES:
        fail(field, value, f"expected an object of at most {MAX_LIST_ENTRIES} entries")
    for key, mask in value.items():
        if len(key) > MAX_ENTRY_CHARS or not key.endswith(PATTERN_SUFFIX):
            fail(field, key, f"expected keys '<module>{PATTERN_SUFFIX}'")
        if not isinstance(mask, list) or not all(isinstance(v, bool) for v in mask):
            fail(field, mask, f"expected a list of true/false per singular value for {key!r}")


FIELDS = {
    "init_r": positive_int,
    "rank_pattern": rank_pattern,
    "lora_alpha": number,
    "lora_dropout": number_in(0.0, 1.0),  # training only
    "target_modules": module_spec,
    "exclude_modules": module_spec,
    "bias": equals("none"),
    "fan_in_fan_out": equals(False),
    "use_dora": equals(False),
    "use_rslora": boolean,  # AdaLoRA's scale ignores it
    # the rank budget schedule and LoRA fields AdaLoRA does not read: training only
    "r": anything, "target_r": anything, "tinit": anything, "tfinal": anything, "deltaT": anything,
    "beta1": anything, "beta2": anything, "orth_reg_weight": anything, "total_step": anything,
    "init_lora_weights": anything, "megatron_core": anything, "qalora_group_size": anything,
    "layers_pattern": anything,
}


@dataclass(frozen=True)
class AdaLoraModule:
    a: torch.Tensor  # [rank, in], right singular vectors
    e: torch.Tensor  # [rank, 1], singular values
    b: torch.Tensor  # [out, rank], left singular vectors
    scale: float  # lora_alpha / (init_r + 1e-5)


SCHEDULE_FIELDS = ("init_r", "target_r", "tinit", "tfinal", "deltaT", "beta1", "beta2", "orth_reg_weight")


class TrainableAdaLora(TrainableAdapter):
    """AdaLoRA as PEFT's ``AdaLoraModel`` trains it.

    Each target adds ``(dropout(x) @ (A * E).T @ B.T) * alpha / (init_r + 1e-5)``; A and B start
    N(0, 0.02), E at zero. The training loss gains ``orth_reg_weight`` times the mean over every A
    and B of ``||P P^T - I||_F`` (``P^T P`` for B). After each optimizer step (gradients still
    there) the rank allocator runs PEFT's ``RankAllocator``: sensitivity ``|p * grad|`` smoothed by
    ``beta1``, its uncertainty by ``beta2``; from step ``tinit`` the budget falls cubically from
    ``init_r`` to ``target_r`` per module until ``total_step - tfinal``, and every ``deltaT`` steps
    the singular values of lowest importance are zeroed (``rank_pattern``); at ``total_step -
    tfinal`` the pattern is fixed and re-applied after every later step. The export keeps the
    pattern's rows only (PEFT's resize at save), with ``rank_pattern`` in the config.
    """

    kind = AdapterKind.ADALORA

    def __init__(self, shapes: dict[str, tuple[int, int]], ranks: dict[str, int], schedule: dict[str, Any],
                 alpha: float, dropout: float, total_step: int, seed: int, device: torch.device):
        super().__init__(seed, device)
        self.schedule = dict(schedule)
        self.init_r = int(schedule["init_r"])
        self.alpha, self.dropout_p, self.total_step = alpha, dropout, total_step
        # PEFT: scaling = alpha (or the rank when alpha <= 0), divided by ranknum = init_r (+ 1e-5)
        self.scale = (alpha if alpha > 0 else float(self.init_r)) / (self.init_r + RANKNUM_EPS)
        self.modules_ = sorted(shapes)
        init = torch.Generator().manual_seed(seed)
        self.A, self.E, self.B = nn.ParameterDict(), nn.ParameterDict(), nn.ParameterDict()
        for name in self.modules_:
            (in_f, out_f), rank, key = shapes[name], ranks[name], param_key(name)
            self.A[key] = nn.Parameter(torch.randn(rank, in_f, generator=init, dtype=PARAM_DTYPE).mul_(0.02).to(device))
            self.E[key] = nn.Parameter(torch.zeros(rank, 1, dtype=PARAM_DTYPE, device=device))
            self.B[key] = nn.Parameter(torch.randn(out_f, rank, generator=init, dtype=PARAM_DTYPE).mul_(0.02).to(device))
        self.rank_pattern: dict[str, list[bool]] | None = None  # module -> kept singular values
        self.exp_avg_ipt: dict[str, torch.Tensor] = {}
        self.exp_avg_unc: dict[str, torch.Tensor] = {}

    def forward_layer(self, name: str, base_layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        y = base_layer(x)
        key = param_key(name)
        if key not in self.A:
            return y
        h = self._dropout(x.to(PARAM_DTYPE), self.dropout_p)
        delta = F.linear(F.linear(h, self.A[key] * self.E[key]), self.B[key]) * self.scale
        return y + delta.to(y.dtype)

    def regularization(self) -> torch.Tensor | None:
        weight = float(self.schedule["orth_reg_weight"])
        if weight == 0:
            return None
        terms = []
        for key in self.A:
            for p, cov in ((self.A[key], self.A[key] @ self.A[key].T), (self.B[key], self.B[key].T @ self.B[key])):
                eye = torch.eye(cov.shape[0], dtype=cov.dtype, device=cov.device)
                terms.append(torch.linalg.norm(cov - eye, ord="fro"))
        return weight * torch.stack(terms).mean()

    # ---- the rank allocator (PEFT's RankAllocator, step by step) ----
    def _named(self):
        for key in self.A:
            yield key, "A", self.A[key]
            yield key, "E", self.E[key]
            yield key, "B", self.B[key]

    def _update_importance(self) -> None:
        beta1, beta2 = float(self.schedule["beta1"]), float(self.schedule["beta2"])
        with torch.no_grad():
            for key, part, p in self._named():
                name = f"{key}.{part}"
                ipt = (p * p.grad).abs() if p.grad is not None else torch.zeros_like(p)
                avg = self.exp_avg_ipt.get(name, torch.zeros_like(p))
                unc = self.exp_avg_unc.get(name, torch.zeros_like(p))
                avg = beta1 * avg + (1 - beta1) * ipt
                self.exp_avg_unc[name] = beta2 * unc + (1 - beta2) * (ipt - avg).abs()
                self.exp_avg_ipt[name] = avg

    def _budget(self, step: int) -> tuple[int, bool]:
        s = self.schedule
        init_budget = sum(a.shape[0] for a in self.A.values())
        target_budget = int(s["target_r"]) * len(self.A)
        tinit, tfinal = int(s["tinit"]), int(s["tfinal"])
        if step <= tinit:
            return init_budget, False
        if step > self.total_step - tfinal:
            return target_budget, True
        coeff = 1 - (step - tinit) / (self.total_step - tfinal - tinit)
        return int((init_budget - target_budget) * coeff ** 3 + target_budget), step % int(s["deltaT"]) == 0

    def _mask_to_budget(self, budget: int) -> None:
        scores = {}
        for key in self.A:
            def score(part: str) -> torch.Tensor:
                return self.exp_avg_ipt[f"{key}.{part}"] * self.exp_avg_unc[f"{key}.{part}"]
            scores[key] = (score("E").view(-1) + score("A").mean(dim=1) + score("B").mean(dim=0))  # [rank]
        k = sum(a.shape[0] for a in self.A.values()) - budget
        if k <= 0:
            return
        threshold = torch.kthvalue(torch.cat(list(scores.values())), k=k)[0].item()
        pattern = {}
        with torch.no_grad():
            for key, score in scores.items():
                pruned = score <= threshold
                self.E[key].masked_fill_(pruned.view(-1, 1), 0.0)
                pattern[key] = (~pruned).tolist()
        self.rank_pattern = {name: pattern[param_key(name)] for name in self.modules_}

    def _apply_pattern(self) -> None:
        with torch.no_grad():
            for name in self.modules_:
                keep = torch.tensor(self.rank_pattern[name], device=self.E[param_key(name)].device)
                self.E[param_key(name)].masked_fill_(~keep.view(-1, 1), 0.0)

    def after_optimizer_step(self, step: int, total_steps: int) -> None:
        final = self.total_step - int(self.schedule["tfinal"])
        if step < final:
            self._update_importance()
            budget, mask = self._budget(step)
            if mask:
                self._mask_to_budget(budget)
        elif step == final:
            self._mask_to_budget(self._budget(step)[0])
            self.exp_avg_ipt, self.exp_avg_unc = {}, {}
        elif self.rank_pattern is not None:
            self._apply_pattern()

    def extra_state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        tensors = {f"adalora.ipt.{k}": v for k, v in self.exp_avg_ipt.items()}
        tensors.update({f"adalora.unc.{k}": v for k, v in self.exp_avg_unc.items()})
        return tensors, {"rank_pattern": self.rank_pattern}

    def load_extra_state(self, tensors: dict[str, torch.Tensor], state: dict[str, Any]) -> None:
        device = next(iter(self.A.values())).device
        self.exp_avg_ipt = {k[len("adalora.ipt."):]: v.to(device) for k, v in tensors.items()
                            if k.startswith("adalora.ipt.")}
        self.exp_avg_unc = {k[len("adalora.unc."):]: v.to(device) for k, v in tensors.items()
                            if k.startswith("adalora.unc.")}
        self.rank_pattern = state.get("rank_pattern")

    def to_weights(self) -> AdapterWeights:
        modules = {}
        for name in self.modules_:
            key = param_key(name)
            a, e, b = (t.detach().cpu().clone() for t in (self.A[key], self.E[key], self.B[key]))
            if self.rank_pattern is not None:  # PEFT's resize at save: the kept singular values only
                keep = torch.tensor(self.rank_pattern[name], dtype=torch.bool)
                a, e, b = a[keep], e[keep], b[:, keep]
            modules[name] = AdaLoraModule(a.contiguous(), e.contiguous(), b.contiguous(), self.scale)
        config = {**self.schedule, "lora_alpha": self.alpha, "lora_dropout": self.dropout_p,
                  "total_step": self.total_step,
                  "rank_pattern": None if self.rank_pattern is None else {
                      f"{name}{PATTERN_SUFFIX}": mask for name, mask in self.rank_pattern.items()}}
        return AdapterWeights(kind=self.kind, config=config, modules=modules)


class AdaLoraHandler(TrainingForm):
    kind = AdapterKind.ADALORA
    peft_type = "ADALORA"
    serves_as = AdapterKind.LORA
    default_learning_rate = 1e-3
    training_fields = frozenset({*SCHEDULE_FIELDS, "lora_alpha", "lora_dropout", "target_modules"})

    def check_training_config(self, config) -> None:
        if config.target_r >= config.init_r:
            raise ValueError(f"target_r ({config.target_r}) must be below init_r ({config.init_r}): AdaLoRA "
                             "prunes each module's rank from init_r towards target_r")

    def check_training(self, config, limits: AdapterLimits, total_steps: int | None = None) -> None:
        check_training_rank("init_r", config.init_r, limits)
        if total_steps is not None and config.tinit >= total_steps - config.tfinal:
            raise ValueError(
                f"the AdaLoRA schedule leaves no budgeting phase: tinit ({config.tinit}) must be below the run's "
                f"{total_steps} optimizer steps minus tfinal ({config.tfinal}); lower tinit / tfinal or train longer")

    def build_trainable(self, config, runtime, tokenizer, total_steps: int) -> TrainableAdaLora:
        shapes = runtime.base_info.linear_shapes
        targets = resolve_targets(config.target_modules or "all-linear", sorted(shapes))
        total = total_steps  # PEFT's total_step
        self.check_training(config, AdapterLimits(max_lora_rank=10**9), total)
        schedule = {field: getattr(config, field) for field in SCHEDULE_FIELDS}
        return TrainableAdaLora({n: shapes[n] for n in targets}, {n: config.init_r for n in targets}, schedule,
                                config.lora_alpha, config.lora_dropout, total, config.seed, runtime.device)

    def trainable_from_weights(self, weights: AdapterWeights, device: torch.device, seed: int) -> TrainableAdaLora:
        cfg = weights.config
        defaults = {"init_r": 12, "target_r": 8, "tinit": 0, "tfinal": 0, "deltaT": 1, "beta1": 0.85,
                    "beta2": 0.85, "orth_reg_weight": 0.5}  # PEFT's
        schedule = {f: cfg.get(f, defaults[f]) for f in SCHEDULE_FIELDS}
        shapes = {n: (m.a.shape[1], m.b.shape[0]) for n, m in weights.modules.items()}
        adapter = TrainableAdaLora(shapes, {n: m.a.shape[0] for n, m in weights.modules.items()}, schedule,
                                   float(cfg.get("lora_alpha", 8)), float(cfg.get("lora_dropout", 0.0)),
                                   int(cfg.get("total_step") or 1), seed, device)
        with torch.no_grad():
            for name, m in weights.modules.items():
                for target, value in ((adapter.A, m.a), (adapter.E, m.e), (adapter.B, m.b)):
                    target[param_key(name)].copy_(value)
        return adapter

    def claims(self, config: dict[str, Any]) -> bool:
        return True

    def describe(self, weights: AdapterWeights) -> dict[str, Any]:
        return {"rank": max((m.a.shape[0] for m in weights.modules.values()), default=0),
                "init_r": weights.config.get("init_r")}

    def from_peft(self, config: dict[str, Any], tensors: dict[str, torch.Tensor], base: BaseModelInfo,
                  limits: AdapterLimits, dtype: torch.dtype) -> AdapterWeights:
        config = sanitize_config(config, FIELDS)
        init_r = config.get("init_r", 12)  # PEFT's default
        if init_r > limits.max_lora_rank:
            raise AdapterValidationError(
                f"AdaLoRA init_r {init_r} is above this gateway's limit of {limits.max_lora_rank}")
        masks = {key[: -len(PATTERN_SUFFIX)]: mask for key, mask in (config.get("rank_pattern") or {}).items()}
        for module, mask in masks.items():
            if len(mask) != init_r:
                raise AdapterValidationError(
                    f"adapter_config.json: rank_pattern for {module!r} has {len(mask)} entries; "
                    f"expected init_r = {init_r}")
        parts = tensors_by_module(tensors, SUFFIXES, "AdaLoRA")
        unknown = sorted(set(masks) - set(parts))
        if unknown:
            raise AdapterValidationError(
                f"adapter_config.json: rank_pattern names {unknown[:5]}, for which the adapter holds no tensors")
        alpha = float(config.get("lora_alpha", 8))
        modules = {}
        for module, part in sorted(parts.items()):
            in_f, out_f = check_module(module, base)
            missing = [s for s in SUFFIXES if s not in part]
            if missing:
                raise AdapterValidationError(f"module {module!r} lacks {', '.join(missing)}")
            rank = sum(masks[module]) if module in masks else init_r
            a, e, b = part["lora_A"], part["lora_E"], part["lora_B"]
            if tuple(a.shape) != (rank, in_f) or tuple(e.shape) != (rank, 1) or tuple(b.shape) != (out_f, rank):
                raise AdapterValidationError(
                    f"module {module!r}: lora_A {tuple(a.shape)} / lora_E {tuple(e.shape)} / lora_B {tuple(b.shape)} "
                    f"do not fit rank {rank} (init_r or the module's rank_pattern) on a layer of {in_f} -> {out_f} "
                    "features")
            scale = (alpha if alpha > 0 else float(rank)) / (init_r + RANKNUM_EPS)
            a, e = cast_finite(f"{module}.lora_A", a, dtype), cast_finite(f"{module}.lora_E", e, dtype)
            b = cast_finite(f"{module}.lora_B", b, dtype)
            cast_finite(f"{module}: lora_A scaled by lora_E", a * e, dtype)
            cast_finite(f"{module}.lora_B scaled by lora_alpha / init_r = {scale:g}", b * scale, dtype)
            modules[module] = AdaLoraModule(a, e, b, scale)
        check_targets_agree(config, modules, base.linear_shapes)
        return AdapterWeights(kind=self.kind, config=config, modules=modules)

    def to_peft(self, weights: AdapterWeights) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        tensors = {}
        for module, m in weights.modules.items():
            for suffix, tensor in zip(SUFFIXES, (m.a, m.e, m.b), strict=True):
                tensors[f"{PEFT_PREFIX}{module}.{suffix}"] = tensor.contiguous()
        config = {"peft_type": self.peft_type, "task_type": "CAUSAL_LM", "bias": "none", "lora_dropout": 0.0,
                  **weights.config, "target_modules": sorted({m.rsplit(".", 1)[-1] for m in weights.modules})}
        return config, tensors

    def install(self, runtime, slot: int, weights: AdapterWeights) -> None:
        for module, m in weights.modules.items():
            if m.a.shape[0]:  # a module pruned to rank 0 adds nothing
                lora_bank(runtime.layer(module), runtime).write(slot, m.a * m.e, m.b * m.scale)

    def uninstall(self, runtime, slot: int, weights: AdapterWeights) -> None:
        clear_lora(runtime, slot, [name for name, m in weights.modules.items() if m.a.shape[0]])
