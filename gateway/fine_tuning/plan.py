"""A ``POST /v1/fine_tuning/jobs`` body, checked, and turned into the trainer's ``TrainingConfig``.

The adapter to train is this API's one extension field, ``adapter``: ``{"kind": "lora" | "ia3" |
"prompt_tuning", ...}`` with that kind's settings, named as in ``TrainingConfig`` (``r``,
``lora_alpha``, ``lora_dropout``, ``use_rslora``, ``target_modules``, ``feedforward_modules``,
``num_virtual_tokens``, ``prompt_init_text``). Without it a LoRA is trained with the trainer's
defaults. OpenAI's hyperparameters map onto the run: ``n_epochs`` -> epochs (auto: 3),
``batch_size`` (auto: 4), ``learning_rate_multiplier`` x the kind's default learning rate (auto: 1),
and for method ``dpo`` ``beta`` (auto: 0.1) with the trainer's DPO objective. Nothing is held out
of the training file; a ``validation_file`` gives the validation loss.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from adapters.kinds import HANDLERS
from adapters.kinds.base import AdapterKind
from adapters.training.config import TRAINABLE_KINDS, TrainingConfig
from gateway.fine_tuning.errors import FineTuningRequestError
from gateway.fine_tuning.methods import AUTO, ParsedMethod, parse_method

# the extension field takes the kind and the settings of any trainable kind (each kind's handler
# names its own; a setting of another kind is refused by the training config, naming the kinds)
ADAPTER_FIELDS = ("kind", *sorted(set().union(*(HANDLERS[k].training_fields for k in TRAINABLE_KINDS))))
AUTO_VALUES = {"n_epochs": 3, "batch_size": 4, "learning_rate_multiplier": 1.0, "beta": 0.1}
SUFFIX_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
MAX_METADATA_KEYS, MAX_METADATA_KEY, MAX_METADATA_VALUE = 16, 64, 512  # OpenAI's limits


class FineTuningJobCreate(BaseModel):
    """OpenAI's create-job parameters, plus ``adapter`` (see the module docstring)."""

    model_config = ConfigDict(extra="forbid")
    model: str = Field(min_length=1, max_length=256, description=(
        "The base model's served name, or a registered adapter (id or ft: name) to continue training."))
    training_file: str = Field(min_length=1, max_length=64, description="A file id from /v1/files.")
    validation_file: str | None = Field(None, min_length=1, max_length=64)
    suffix: str | None = Field(None, pattern=SUFFIX_PATTERN, description=(
        "Part of the result's name ft:<model>:<suffix>:<job id> (letters, digits, . _ -; at most 64)."))
    seed: int | None = Field(None, ge=0, le=2**31 - 1)
    metadata: dict[str, str] | None = Field(None, description="Up to 16 string pairs kept with the job.")
    method: dict[str, Any] | None = None
    hyperparameters: dict[str, Any] | None = Field(None, description="Deprecated by OpenAI: use method.")
    integrations: list[Any] | None = Field(None, max_length=0, description="Not supported (must be empty).")
    adapter: dict[str, Any] | None = Field(None, description=(
        "Extension: the adapter to train, {'kind': any trainable kind (lora, ia3, prompt_tuning, dora, ...), ...its settings}."))

    @field_validator("metadata")
    @classmethod
    def _metadata_limits(cls, value: dict[str, str] | None) -> dict[str, str] | None:
        if value is not None:
            if len(value) > MAX_METADATA_KEYS:
                raise ValueError(f"at most {MAX_METADATA_KEYS} keys")
            if any(len(k) > MAX_METADATA_KEY or len(v) > MAX_METADATA_VALUE for k, v in value.items()):
                raise ValueError(f"keys at most {MAX_METADATA_KEY} and values at most {MAX_METADATA_VALUE} characters")
        return value


@dataclass(frozen=True)
class JobPlan:
    config: TrainingConfig
    method: ParsedMethod
    hyperparameters: dict[str, int | float]  # resolved: what the job uses


def _adapter_settings(adapter: dict[str, Any] | None) -> dict[str, Any]:
    settings = dict(adapter or {})
    for key in settings:
        if key not in ADAPTER_FIELDS:
            raise FineTuningRequestError(f"unknown field adapter.{key}; adapter takes {', '.join(ADAPTER_FIELDS)}",
                                         param=f"adapter.{key}")
    return settings


def _kind(settings: dict[str, Any], param: str) -> AdapterKind:
    kind = next((k for k in TRAINABLE_KINDS if k.value == settings.get("kind", AdapterKind.LORA.value)), None)
    if kind is None:
        raise FineTuningRequestError(f"{param}: the adapter kind must be one of the kinds trained here: "
                                     + ", ".join(k.value for k in TRAINABLE_KINDS), param=param)
    return kind


def _default_learning_rate(kind: AdapterKind, settings: dict[str, Any]) -> float:
    """The kind's learning rate for these adapter settings (prefix tuning's depends on its
    projection); settings that do not validate are named by the full validation that follows."""
    try:
        return TrainingConfig.model_validate({**settings, "kind": kind.value}).lr
    except ValidationError:
        return HANDLERS[kind].default_learning_rate


def plan_job(body: FineTuningJobCreate, start_from: dict[str, Any] | None = None) -> JobPlan:
    """Raises ``FineTuningRequestError`` naming the parameter at fault. ``start_from``: the settings
    of a registered adapter the job continues (``kind``, ``init_adapter`` ...), instead of ``adapter``."""
    method = parse_method(body.method, body.hyperparameters)
    settings = dict(start_from) if start_from is not None else _adapter_settings(body.adapter)
    kind = _kind(settings, "model" if start_from is not None else "adapter.kind")
    values = {name: AUTO_VALUES[name] if value == AUTO else value for name, value in method.hyperparameters.items()
              if name in AUTO_VALUES}
    run = {"epochs": values["n_epochs"], "batch_size": values["batch_size"],
           "learning_rate": values["learning_rate_multiplier"] * _default_learning_rate(kind, settings),
           "seed": body.seed or 0, "eval_fraction": 0.0, "objective": method.spec.objective}
    if "beta" in values:
        run["beta"] = values["beta"]
    try:
        config = TrainingConfig.model_validate({**settings, **run})
    except ValidationError as exc:
        first = exc.errors()[0]
        field = str(first["loc"][0]) if first.get("loc") else ""
        if start_from is not None:
            param = "model"
        elif field in ADAPTER_FIELDS:  # OpenAI's form, adapter.target_modules[0]: past the field, a string
            # in the location is a union member's name ("list[str]"), not a key (no field nests a model)
            param = f"adapter.{field}" + "".join(f"[{p}]" for p in first["loc"][1:] if isinstance(p, int))
        elif field == "learning_rate":
            param = "learning_rate_multiplier"
        else:
            param = "adapter"
        raise FineTuningRequestError(f"invalid value for {param}: {first.get('msg', 'invalid value')}",
                                     param=param) from None
    return JobPlan(config=config, method=method, hyperparameters=values)
