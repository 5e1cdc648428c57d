"""What a training job is asked to do: the adapter kind with its hyperparameters, and the run.

Every field has a default; fields left unset (``None``) take the kind's default, so
``{"kind": "ia3"}`` alone is a complete config. Unknown fields are refused, so a typo never
silently trains with a default; so is a kind-specific field sent with a kind that does not read
it (each kind's handler lists the fields it reads in ``training_fields``).
"""

from __future__ import annotations

import math
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from adapters.kinds import HANDLERS
from adapters.kinds.base import AdapterKind
from adapters.registry import ADAPTER_ID_PATTERN
from adapters.validate import MAX_MAGNITUDE

# the kinds the embedded trainer can train (a handler with a default learning rate has a trainable form)
TRAINABLE_KINDS = tuple(k for k, h in HANDLERS.items() if getattr(h, "default_learning_rate", None))
# fields only some kinds read; each handler's ``training_fields`` says which
KIND_FIELDS = frozenset().union(*(getattr(h, "training_fields", frozenset()) for h in HANDLERS.values()))
FALLBACK_IA3_TARGETS = (["k_proj", "v_proj", "down_proj"], ["down_proj"])


class TrainingConfig(BaseModel):
    # allow_inf_nan off: an infinite max_grad_norm was stored, then failed the job's JSON view (a 500)
    model_config = ConfigDict(extra="forbid", populate_by_name=True, allow_inf_nan=False)

    kind: AdapterKind = Field(AdapterKind.LORA, description=(
        "lora, dora, adalora, vera, ia3, prompt_tuning, p_tuning or prefix_tuning."))
    adapter_id: str | None = Field(None, pattern=ADAPTER_ID_PATTERN, description=(
        "Id to register the trained adapter under (default: the job id)."))
    # "register" in JSON (the attribute name would shadow a pydantic method)
    register_adapter: bool = Field(True, alias="register", description=(
        "Register the adapter for serving when training succeeds."))
    register_only_if_improved: bool = Field(False, description=(
        "Register only if the eval loss after training is lower than before."))
    init_adapter: str | None = Field(None, pattern=ADAPTER_ID_PATTERN, description=(
        "A registered adapter whose weights training starts from (continued training); its kind must be "
        "``kind``, and its own settings (rank, targets, virtual tokens) replace the kind's fields here."))

    # LoRA, DoRA (LoRA + magnitudes), VeRA (r: the shared projections' rank)
    r: int = Field(8, ge=1, le=1024, description="LoRA / DoRA rank; VeRA's shared projection rank.")
    # bounded as registration bounds it (adapters.validate): 1e308 trained to a NaN loss, then was refused
    lora_alpha: float = Field(16.0, gt=0, le=MAX_MAGNITUDE, description=(
        "LoRA / DoRA / AdaLoRA alpha (scale = alpha / r)."))
    lora_dropout: float = Field(0.05, ge=0, lt=1, description="Dropout on the LoRA / DoRA / AdaLoRA input while training.")
    use_rslora: bool = Field(False, description="LoRA / DoRA: scale by alpha / sqrt(r) instead of alpha / r.")
    # AdaLoRA (PEFT's AdaLoraConfig fields and defaults; total_step is the run's optimizer steps)
    init_r: int = Field(12, ge=1, le=1024, description="AdaLoRA: initial rank of every module.")
    target_r: int = Field(8, ge=1, le=1024, description="AdaLoRA: average rank per module after pruning.")
    tinit: int = Field(0, ge=0, le=1_000_000, description="AdaLoRA: steps of warmup before pruning starts.")
    tfinal: int = Field(0, ge=0, le=1_000_000, description="AdaLoRA: final steps at the target budget.")
    deltaT: int = Field(1, ge=1, le=1_000_000, description="AdaLoRA: steps between two budget allocations.")
    beta1: float = Field(0.85, gt=0, lt=1, description="AdaLoRA: EMA factor of the sensitivity.")
    beta2: float = Field(0.85, gt=0, lt=1, description="AdaLoRA: EMA factor of the uncertainty.")
    orth_reg_weight: float = Field(0.5, ge=0, le=100, description="AdaLoRA: weight of the orthogonal regularization.")
    # VeRA
    projection_prng_key: int = Field(0, ge=0, le=2**31 - 1, description=(
        "VeRA: seed of the shared frozen projections (drawn as PEFT draws them)."))
    save_projection: bool = Field(True, description=(
        "VeRA: save the projections with the adapter (else they are regenerated from projection_prng_key)."))
    d_initial: float = Field(0.1, ge=-100, le=100, description="VeRA: initial value of every lambda_d.")
    vera_dropout: float = Field(0.0, ge=0, lt=1, description="VeRA: dropout on the input while training.")
    # LoRA and IA3: a list of module names, "all-linear", or None for the kind's default
    target_modules: list[str] | Literal["all-linear"] | None = Field(None, description=(
        "Modules to adapt: names like ['q_proj', 'v_proj'] or 'all-linear' (LoRA default: all-linear; "
        "IA3 default: PEFT's choice for the model type)."))
    # IA3
    feedforward_modules: list[str] | None = Field(None, description=(
        "IA3 modules whose input (not output) is scaled (default: PEFT's choice for the model type)."))
    # prompt tuning, P-tuning, prefix tuning
    num_virtual_tokens: int = Field(20, ge=1, le=4096, description="Prompt / P- / prefix-tuning virtual tokens.")
    prompt_init_text: str | None = Field(None, min_length=1, max_length=4096, description=(
        "Prompt tuning: initialise the virtual tokens from this text's embeddings (default: random vocabulary)."))
    encoder_reparameterization_type: Literal["MLP", "LSTM"] = Field("MLP", description=(
        "P-tuning: the prompt encoder (PEFT's MLP, or a bidirectional LSTM followed by an MLP)."))
    encoder_hidden_size: int | None = Field(None, ge=1, le=16384, description=(
        "P-tuning encoder / prefix-tuning projection width (default: the token width, as PEFT)."))
    encoder_num_layers: int = Field(2, ge=1, le=8, description="P-tuning LSTM encoder: layers.")
    encoder_dropout: float = Field(0.0, ge=0, lt=1, description="P-tuning LSTM encoder: dropout between layers.")
    prefix_projection: bool = Field(False, description=(
        "Prefix tuning: produce the keys and values with a two-layer MLP over token embeddings (P-tuning v2)."))

    # the objective
    objective: Literal["supervised", "dpo"] = Field("supervised", description=(
        "supervised: next-token loss on the answers; dpo: preference training (sigmoid DPO loss) on a "
        "preference dataset, against the frozen base or, with init_adapter, that adapter frozen."))
    beta: float = Field(0.1, gt=0, le=10, description=(
        "DPO only: how far the policy may move from the reference (larger: closer to it)."))
    sft_weight: float = Field(0.0, ge=0, le=100, description=(
        "DPO only: weight of a supervised loss on the preferred answers added to the DPO loss (RPO; "
        "TRL's loss_type ['sigmoid', 'sft'] with loss_weights [1, sft_weight]): keeps the preferred "
        "answers likely while the margin grows, so a run from the bare base learns their exact form."))

    # the run
    epochs: float = Field(3.0, gt=0, le=1000, description="Passes over the training split (ignored with max_steps).")
    max_steps: int | None = Field(None, ge=1, le=1_000_000, description="Optimizer steps; overrides epochs.")
    learning_rate: float | None = Field(None, gt=0, le=10, description="Peak learning rate (default per kind).")
    lr_schedule: Literal["linear", "cosine", "constant"] = Field("linear", description="Decay after warmup.")
    warmup_steps: int = Field(0, ge=0, le=1_000_000, description="Optimizer steps of linear warmup from 0.")
    weight_decay: float = Field(0.0, ge=0, le=1, description="AdamW weight decay.")
    optimizer: Literal["adamw", "paged_adamw"] = Field("adamw", description=(
        "adamw (torch), or paged_adamw: bitsandbytes' paged AdamW as QLoRA prescribes (CUDA only; "
        "refused with a 400 on a CPU gateway)."))
    max_grad_norm: float | None = Field(1.0, gt=0, le=1e6, description="Clip the gradient norm (None: no clipping).")
    batch_size: int = Field(4, ge=1, le=1024, description="Examples per micro-batch.")
    grad_accumulation: int = Field(1, ge=1, le=1024, description="Micro-batches per optimizer step.")
    max_seq_len: int = Field(1024, ge=8, le=131072, description="Longest example in tokens (longer lines are refused).")
    eval_fraction: float = Field(0.1, ge=0, lt=1, description="Share of examples held out for eval loss.")
    eval_batches_max: int = Field(50, ge=1, le=1_000_000, description="Most micro-batches an eval pass runs.")
    checkpoint_every: int = Field(50, ge=1, le=1_000_000, description="Optimizer steps between checkpoints.")
    seed: int = Field(0, ge=0, le=2**31 - 1, description="Seeds the split, the shuffles, the init and dropout.")
    skip_bad_lines: bool = Field(False, description=(
        "Train on the usable lines and list the bad ones in the job, instead of refusing the dataset."))

    @model_validator(mode="after")
    def _consistent(self) -> TrainingConfig:
        if self.kind not in TRAINABLE_KINDS:
            raise ValueError(f"kind {self.kind.value!r} is served but not trained here yet; trainable: "
                             + ", ".join(k.value for k in TRAINABLE_KINDS))
        handler = HANDLERS[self.kind]
        # a field counts as sent when set to other than its default (a stored job's config holds them all)
        foreign = sorted(name for name in (self.model_fields_set & KIND_FIELDS) - handler.training_fields
                         if getattr(self, name) != type(self).model_fields[name].default)
        if foreign:
            readers = [k.value for k, h in HANDLERS.items() if foreign[0] in getattr(h, "training_fields", ())]
            raise ValueError(f"{', '.join(foreign)} do(es) not apply to kind {self.kind.value!r} "
                             f"({foreign[0]} applies to: {', '.join(readers)})")
        handler.check_training_config(self)
        if self.sft_weight and self.objective != "dpo":
            raise ValueError("sft_weight applies to objective 'dpo' only (supervised training is all SFT)")
        if self.register_only_if_improved and self.eval_fraction == 0:
            raise ValueError("register_only_if_improved needs eval_fraction > 0")
        return self

    @property
    def lr(self) -> float:
        return self.learning_rate if self.learning_rate is not None else HANDLERS[self.kind].learning_rate_for(self)

    def ia3_targets(self, model_type: str) -> tuple[list[str] | Literal["all-linear"], list[str]]:
        """``(target_modules, feedforward_modules)`` for IA3, PEFT's defaults filling the gaps."""
        targets, feedforward = self.target_modules, self.feedforward_modules
        if targets is None or feedforward is None:
            try:
                from peft.utils.constants import (
                    TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING as FF,
                    TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING as TARGETS,
                )
                default = (TARGETS.get(model_type), FF.get(model_type))
            except ImportError:  # PEFT is a dependency, but the trainer does not need it otherwise
                default = (None, None)
            if default[0] is None:
                default = FALLBACK_IA3_TARGETS
            targets = default[0] if targets is None else targets
            feedforward = list(default[1] or []) if feedforward is None else feedforward
        return targets, feedforward


def learning_rate_at(config: TrainingConfig, step: int, total_steps: int) -> float:
    """The learning rate for optimizer step ``step`` (0-based): linear warmup, then the schedule
    (the same curves as transformers' ``get_{linear,cosine,constant}_schedule_with_warmup``)."""
    peak = config.lr
    if step < config.warmup_steps:
        return peak * (step / max(1, config.warmup_steps))
    if config.lr_schedule == "constant":
        return peak
    progress = (step - config.warmup_steps) / max(1, total_steps - config.warmup_steps)
    if config.lr_schedule == "linear":
        return peak * max(0.0, 1.0 - progress)
    return peak * max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))
