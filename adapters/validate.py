"""Read ``adapter_config.json`` as plain data and keep only fields we understand.

PEFT adds config fields with every release, nearly all defaulting to null/false/empty. A field we
know is type-checked; an unknown field is accepted only while it holds such an empty value, so a
feature we do not implement (modules_to_save, alpha patterns, layers_to_transform ...) is refused
by name instead of being silently ignored and served wrong.
"""

from __future__ import annotations

import json
import math
import numbers
import os
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

from adapters.errors import AdapterValidationError
from adapters.module_match import check_spec

MAX_CONFIG_BYTES = 64 * 1024
# A PEFT config nests three levels at most (rank_pattern, auto_mapping); Python's JSON parser
# recurses per level and would raise RecursionError past about a thousand.
MAX_CONFIG_DEPTH = 16
# Integers longer than this are refused before int() runs: Python refuses over 4300 digits with a
# ValueError, and float() of a 400-digit one raises OverflowError.
MAX_INT_DIGITS = 18
MAX_INT = 1 << 31  # no count or size in an adapter config comes near this
MAX_MAGNITUDE = 1e6  # bound on float fields (lora_alpha): finite, and far from overflowing a float16

Check = Callable[[str, Any], None]


class _OutOfRange:
    """Stands in for a JSON number the gateway refuses (NaN, Infinity, 1e999, a 30-digit integer)
    until the walk over the parsed config can name the field that holds it."""

    def __init__(self, text: str):
        self.text = text if len(text) <= 24 else text[:20] + "..."


def _parse_int(text: str) -> int | _OutOfRange:
    return _OutOfRange(text) if len(text.lstrip("-")) > MAX_INT_DIGITS else int(text)


def _parse_float(text: str) -> float | _OutOfRange:
    value = float(text)  # the JSON grammar already bounds what reaches here; 1e999 gives inf
    return value if math.isfinite(value) else _OutOfRange(text)


def _find_out_of_range(value: Any, path: str) -> tuple[str, _OutOfRange] | None:
    if isinstance(value, _OutOfRange):
        return path, value
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, item in items:
        if (found := _find_out_of_range(item, f"{path}.{key}" if path else str(key))) is not None:
            return found
    return None


def json_depth(text: str) -> int:
    """How deep arrays and objects nest; a bracket inside a string is text. One linear pass (a
    regex stripping strings first would go quadratic on an unterminated run of escaped quotes)."""
    depth = deepest = 0
    in_string = escaped = False
    for char in text:
        if in_string:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = True
        elif char in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif char in "]}":
            depth -= 1
    return deepest


def parse_json_object(raw: bytes, what: str, *, max_bytes: int = MAX_CONFIG_BYTES,
                      max_depth: int = MAX_CONFIG_DEPTH) -> dict[str, Any]:
    """Parse untrusted JSON holding one object, bounded in size, depth and numbers.

    Every failure is an AdapterValidationError naming ``what`` (and the field, for a number that
    is not finite or too long); nothing else escapes."""
    if len(raw) > max_bytes:
        raise AdapterValidationError(f"{what} is larger than the limit of {max_bytes} bytes")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise AdapterValidationError(f"{what} is not valid JSON: it is not UTF-8") from None
    if json_depth(text) > max_depth:
        raise AdapterValidationError(f"{what} nests arrays or objects deeper than {max_depth} levels")
    try:
        value = json.loads(text, parse_int=_parse_int, parse_float=_parse_float, parse_constant=_OutOfRange)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError is a ValueError
        raise AdapterValidationError(f"{what} is not valid JSON: {str(exc)[:200]}") from None
    if not isinstance(value, dict):
        raise AdapterValidationError(f"{what} must hold a JSON object")
    if (found := _find_out_of_range(value, "")) is not None:
        field, bad = found
        raise AdapterValidationError(
            f"{what}: field {field!r} = {bad.text} is not supported (numbers must be finite, and integers "
            f"at most {MAX_INT_DIGITS} digits long)")
    return value


def _fail(field: str, value: Any, expected: str) -> None:
    shown = json.dumps(value, default=str)[:60]  # default: never fail on what we are refusing
    raise AdapterValidationError(f"adapter_config.json: field {field!r} = {shown} is not supported ({expected})")


fail = _fail  # for kinds that check a field of their own shape (AdaLoRA's rank_pattern)


def positive_int(field: str, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 < value <= MAX_INT:
        _fail(field, value, f"expected a positive integer up to {MAX_INT}")


def non_negative_int(field: str, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= MAX_INT:
        _fail(field, value, f"expected an integer from 0 to {MAX_INT}")


def number_in(low: float, high: float) -> Check:
    """A finite number within [low, high] (NaN and infinities never pass: they poison every row)."""

    def check(field: str, value: Any) -> None:
        if (not isinstance(value, numbers.Real) or isinstance(value, bool) or not math.isfinite(value)
                or not low <= value <= high):
            _fail(field, value, f"expected a finite number from {low:g} to {high:g}")

    return check


number = number_in(-MAX_MAGNITUDE, MAX_MAGNITUDE)


def boolean(field: str, value: Any) -> None:
    if not isinstance(value, bool):
        _fail(field, value, "expected true or false")


def module_spec(field: str, value: Any) -> None:
    """``target_modules``-like: null, a pattern RE2 can match, or a bounded list of names."""
    check_spec(field, value)


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
    # O_NONBLOCK: a fifo put in the file's place must not hang the reader; fstat the opened file.
    # Links are followed: an operator's adapters dir may point into a Hugging Face cache.
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise AdapterValidationError("adapter_config.json is not a regular file")
        raw = f.read(MAX_CONFIG_BYTES + 1)  # one byte over is enough to refuse
    return parse_json_object(raw, "adapter_config.json")


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
