"""Training methods of ``/v1/fine_tuning/jobs`` (``method.type``) and their hyperparameters.

A method is one ``MethodSpec`` row: the hyperparameters it takes (each may be ``"auto"``), the file
formats its training data may have, the trainer objective it runs (``TrainingConfig.objective``),
and, while the trainer cannot run it, why not. Parsing never branches on the method's name, so a
method the trainer learns is enabled by its row alone plus what the trainer needs from its
hyperparameters (``gateway.fine_tuning.plan``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from adapters.preference_data import PREFERENCE_FORMAT
from adapters.training_data import FORMATS as SUPERVISED_FORMATS
from gateway.fine_tuning.errors import FineTuningRequestError

AUTO = "auto"


@dataclass(frozen=True)
class Hyperparameter:
    name: str
    integer: bool
    low: float  # exclusive when ``low_open``
    high: float
    low_open: bool = False

    def parse(self, value: Any, param: str) -> int | float | str:
        """``"auto"`` or a number in range; anything else is a 400 naming ``param``."""
        if value == AUTO:
            return AUTO
        number_ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        if self.integer:  # an int is compared as it is: float() of a 400-digit one overflows
            number_ok = number_ok and (isinstance(value, int) or value.is_integer())
        in_range = number_ok and (value > self.low if self.low_open else value >= self.low) and value <= self.high
        if not in_range:
            kind = "an integer" if self.integer else "a number"
            low = f"above {self.low:g}" if self.low_open else f"from {self.low:g}"
            raise FineTuningRequestError(f"invalid value for {param}: must be \"auto\" or {kind} {low} to "
                                         f"{self.high:g}", param=param)
        return int(value) if self.integer else float(value)


COMMON = (Hyperparameter("n_epochs", True, 1, 50), Hyperparameter("batch_size", True, 1, 256),
          Hyperparameter("learning_rate_multiplier", False, 0, 100, low_open=True))


@dataclass(frozen=True)
class MethodSpec:
    type: str
    hyperparameters: tuple[Hyperparameter, ...]
    formats: frozenset[str]  # training data formats (gateway.files) this method trains on
    objective: str  # TrainingConfig.objective
    unavailable: str | None = None  # why the trainer cannot run it yet; None: it can


METHODS = {
    "supervised": MethodSpec("supervised", COMMON, frozenset(SUPERVISED_FORMATS), objective="supervised"),
    "dpo": MethodSpec("dpo", COMMON + (Hyperparameter("beta", False, 0, 10, low_open=True),),
                      frozenset({PREFERENCE_FORMAT}), objective="dpo"),
}


@dataclass(frozen=True)
class ParsedMethod:
    spec: MethodSpec
    hyperparameters: dict[str, int | float | str]  # every hyperparameter of the method, "auto" when not given

    def resolved(self, values: dict[str, int | float]) -> dict[str, Any]:
        """OpenAI's ``method`` object with the values a job actually uses."""
        return {"type": self.spec.type, self.spec.type: {"hyperparameters": values}}


def _object(value: Any, param: str) -> dict:
    if not isinstance(value, dict):
        raise FineTuningRequestError(f"{param} must be an object", param=param)
    return value


def _hyperparameters(spec: MethodSpec, raw: Any, param: str) -> dict[str, int | float | str]:
    given = {} if raw is None else _object(raw, param)
    known = {h.name: h for h in spec.hyperparameters}
    for name in given:
        if name not in known:
            raise FineTuningRequestError(f"unknown hyperparameter {param}.{name} for method '{spec.type}'; "
                                         f"known: {', '.join(known)}", param=f"{param}.{name}")
    return {name: h.parse(given.get(name, AUTO), f"{param}.{name}") for name, h in known.items()}


def parse_method(method: Any, legacy_hyperparameters: Any) -> ParsedMethod:
    """The method a request asks for: ``method`` when given, else supervised with the deprecated
    top-level ``hyperparameters``. Refuses both at once, unknown keys, and unavailable methods."""
    if method is None:
        spec = METHODS["supervised"]
        return ParsedMethod(spec, _hyperparameters(spec, legacy_hyperparameters, "hyperparameters"))
    method = _object(method, "method")
    kind = method.get("type")
    if not isinstance(kind, str) or kind not in METHODS:  # a list or an object is not hashable
        raise FineTuningRequestError(f"method.type must be one of {', '.join(map(repr, METHODS))}",
                                     param="method.type")
    spec = METHODS[kind]
    for key in method:
        if key not in ("type", kind):
            raise FineTuningRequestError(f"unexpected field method.{key} for method type '{kind}'",
                                         param=f"method.{key}")
    if spec.unavailable is not None:
        raise FineTuningRequestError(spec.unavailable, param="method.type")
    if legacy_hyperparameters is not None:
        raise FineTuningRequestError(f"give hyperparameters in method.{kind}.hyperparameters, not also in the "
                                     "deprecated top-level hyperparameters", param="hyperparameters")
    details = _object(method.get(kind) or {}, f"method.{kind}")
    for key in details:
        if key != "hyperparameters":
            raise FineTuningRequestError(f"unexpected field method.{kind}.{key}", param=f"method.{kind}.{key}")
    return ParsedMethod(spec, _hyperparameters(spec, details.get("hyperparameters"),
                                               f"method.{kind}.hyperparameters"))
