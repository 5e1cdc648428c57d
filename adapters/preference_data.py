"""Parse and validate a preference (DPO) dataset in OpenAI's fine-tuning format.

One JSON object per line::

    {"input": {"messages": [{"role": "user", "content": "..."}]},
     "preferred_output": [{"role": "assistant", "content": "..."}],
     "non_preferred_output": [{"role": "assistant", "content": "..."}]}

Rules (the same spirit as ``adapters.training_data``): blank lines are skipped, a BOM on the first
line is ignored, extra keys (``tools``, ``parallel_tool_calls``) are ignored; the input holds at
least one message with a known role and non-blank string content and does not end with an
assistant message (nothing would be left to answer); each output is exactly one assistant message
with non-blank content, and the two answers differ. Every bad line is reported as
``(line, reason)`` without quoting content; any bad line raises ``DatasetValidationError``.

No tokenizer here: a DPO trainer tokenizes prompt + answer itself. This module only decides
whether a file is a well-formed preference file.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from adapters.errors import DatasetValidationError
from adapters.training_data import ROLES, _LineProblem, _summary, _text, _type_name

PREFERENCE_FORMAT = "preference"
OUTPUT_FIELDS = ("preferred_output", "non_preferred_output")


@dataclass
class PreferencePair:
    prompt: list[dict]  # the input messages
    chosen: str
    rejected: str
    line: int


def is_preference_record(obj: object) -> bool:
    """Whether a parsed line is meant as a preference record (it names one of the output fields)."""
    return isinstance(obj, dict) and any(key in obj for key in OUTPUT_FIELDS)


def _input_messages(obj: dict) -> list[dict]:
    raw = obj.get("input")
    if raw is None:
        raise _LineProblem("missing field 'input'")
    if not isinstance(raw, dict):
        raise _LineProblem(f"field 'input' must be an object, got {_type_name(raw)}")
    messages = raw.get("messages")
    if not isinstance(messages, list):
        raise _LineProblem(f"field 'input.messages' must be an array, got {_type_name(messages)}")
    if not messages:
        raise _LineProblem("field 'input.messages' is empty")
    out = []
    for i, msg in enumerate(messages):
        where = f"input.messages[{i}]: "
        if not isinstance(msg, dict):
            raise _LineProblem(f"input.messages[{i}] must be an object, got {_type_name(msg)}")
        role = _text(msg, "role", where=where)
        if role not in ROLES:
            raise _LineProblem(f"{where}unknown role {role[:32]!r} (expected system, user or assistant)")
        out.append({"role": role, "content": _text(msg, "content", where=where)})
    if out[-1]["role"] == "assistant":
        raise _LineProblem("input.messages ends with an assistant message (the outputs answer the last message)")
    return out


def _answer(obj: dict, key: str) -> str:
    raw = obj.get(key)
    if raw is None:
        raise _LineProblem(f"missing field '{key}'")
    if not isinstance(raw, list):
        raise _LineProblem(f"field '{key}' must be an array, got {_type_name(raw)}")
    if len(raw) != 1:
        raise _LineProblem(f"field '{key}' must hold exactly one assistant message, got {len(raw)}")
    msg = raw[0]
    if not isinstance(msg, dict):
        raise _LineProblem(f"{key}[0] must be an object, got {_type_name(msg)}")
    role = _text(msg, "role", where=f"{key}[0]: ")
    if role != "assistant":
        raise _LineProblem(f"{key}[0]: role must be 'assistant', got {role[:32]!r}")
    return _text(msg, "content", where=f"{key}[0]: ")


def parse_preference_dataset(data: bytes, *, max_lines: int = 100_000,
                             max_line_bytes: int = 1 << 20) -> list[PreferencePair]:
    """Every pair of the file; raises ``DatasetValidationError`` listing each bad line."""
    pairs: list[PreferencePair] = []
    problems: list[tuple[int, str]] = []
    records = 0
    for lineno, raw in enumerate(data.split(b"\n"), start=1):
        if not raw.strip():
            continue
        records += 1
        if records > max_lines:
            problems.append((lineno, f"too many lines (limit {max_lines}); this line and the rest were not read"))
            break
        try:
            if len(raw) > max_line_bytes:
                raise _LineProblem(f"line too long ({len(raw)} bytes > limit {max_line_bytes})")
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise _LineProblem("not valid UTF-8") from None
            try:
                obj = json.loads(text.lstrip("\ufeff") if lineno == 1 else text)
            except (ValueError, RecursionError):
                raise _LineProblem("not valid JSON") from None
            if not isinstance(obj, dict):
                raise _LineProblem(f"not a JSON object (got {_type_name(obj)})")
            if not is_preference_record(obj):
                raise _LineProblem("expected a preference record like the first one "
                                   "('input', 'preferred_output', 'non_preferred_output')")
            prompt = _input_messages(obj)
            chosen, rejected = _answer(obj, "preferred_output"), _answer(obj, "non_preferred_output")
            if chosen == rejected:
                raise _LineProblem("preferred_output and non_preferred_output are the same answer")
            pairs.append(PreferencePair(prompt, chosen, rejected, lineno))
        except _LineProblem as problem:
            problems.append((lineno, str(problem)))
    if not pairs:
        what = "dataset is empty" if records == 0 else "dataset has no usable record"
        raise DatasetValidationError(_summary(what, 0, records, problems), problems)
    if problems:
        raise DatasetValidationError(_summary("dataset has bad lines", len(pairs), records, problems), problems)
    return pairs
