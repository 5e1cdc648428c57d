"""Read ``adapter_config.json`` as plain data and keep only fields we understand.

PEFT adds config fields with every release, nearly all defaulting to null/false/empty. A field we
know is type-checked; an unknown field is accepted only while it holds such an empty value, so a
feature we do not implement (DoRA, modules_to_save, rank patterns ...) is refused by name instead
of being silently ignored and served wrong.
"""

from __future__ import annotations

import json
import numbers
from collections.abc import Callable
from pathlib import Path
from typing import Any

from adapters.errors import AdapterValidationError

MAX_CONFIG_BYTES = 64 * 1024

Check = Callable[[str, Any], None]


def _fail(field: str, value: Any, expected: str) -> None:
    shown = json.dumps(value)[:60]
    raise AdapterValidationError(f"adapter_config.json: field {field!r} = {shown} is not supported ({expected})")


def positive_int(field: str, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        _fail(field, value, "expected a positive integer")


def number(field: str, value: Any) -> None:
    if not isinstance(value, numbers.Real) or isinstance(value, bool):
        _fail(field, value, "expected a number")


def boolean(field: str, value: Any) -> None:
    if not isinstance(value, bool):
        _fail(field, value, "expected true or false")


def module_spec(field: str, value: Any) -> None:
    ok = value is None or isinstance(value, str) or (
        isinstance(value, list) and all(isinstance(v, str) for v in value)
    )
    if not ok:
        _fail(field, value, "expected a module name list or a regex string")


def anything(field: str, value: Any) -> None:
    """Informational fields with no effect on inference."""


def equals(*allowed: Any) -> Check:
    def check(field: str, value: Any) -> None:
        if value not in allowed:
            _fail(field, value, "expected " + " or ".join(json.dumps(a) for a in allowed))

    return check


COMMON_FIELDS: dict[str, Check] = {
    "peft_type": anything,
    "task_type": equals("CAUSAL_LM", None),
    "base_model_name_or_path": anything,
    "revision": anything,
    "inference_mode": anything,
    "peft_version": anything,
    "auto_mapping": anything,  # names the classes PEFT used; informational
}


def _is_empty(value: Any) -> bool:
    return value is None or value is False or value == {} or value == [] or value == ""


def load_config(path: Path) -> dict[str, Any]:
    """Parse the JSON file, refusing anything but a small JSON object."""
    size = path.stat().st_size
    if size > MAX_CONFIG_BYTES:
        raise AdapterValidationError(f"adapter_config.json is {size} bytes; the limit is {MAX_CONFIG_BYTES}")
    try:
        config = json.loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise AdapterValidationError(f"adapter_config.json is not valid JSON: {exc}") from None
    if not isinstance(config, dict):
        raise AdapterValidationError("adapter_config.json must hold a JSON object")
    return config


def sanitize_config(config: dict[str, Any], kind_fields: dict[str, Check]) -> dict[str, Any]:
    """Return the config reduced to known fields, each checked; refuse unknown non-empty ones."""
    allowed = {**COMMON_FIELDS, **kind_fields}
    clean: dict[str, Any] = {}
    for field, value in config.items():
        check = allowed.get(field)
        if check is None:
            if not _is_empty(value):
                _fail(field, value, "this gateway does not implement that PEFT feature")
            continue
        check(field, value)
        clean[field] = value
    return clean
