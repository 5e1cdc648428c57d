"""Parse, validate and tokenize a preference (DPO) dataset.

One JSON object per line, in OpenAI's fine-tuning format::

    {"input": {"messages": [{"role": "user", "content": "..."}]},
     "preferred_output": [{"role": "assistant", "content": "..."}],
     "non_preferred_output": [{"role": "assistant", "content": "..."}]}

or in the ``prompt`` / ``chosen`` / ``rejected`` shape of TRL's preference datasets::

    {"prompt": "..." | [messages], "chosen": "..." | [one assistant message], "rejected": (as chosen)}

(a string prompt is one user message). The first record decides the format; every later line must
use the same one.

Rules (the same spirit as ``adapters.training_data``): blank lines are skipped, a BOM on the first
line is ignored, extra keys (``tools``, ``parallel_tool_calls``) are ignored; the input holds at
least one message with a known role and non-blank string content and does not end with an
assistant message (nothing would be left to answer); each output is exactly one assistant message
with non-blank content, and the two answers differ. Every bad line is reported as
``(line, reason)`` without quoting content; any bad line raises ``DatasetValidationError``.

``tokenize_preferences`` renders each pair as the chat template writes the conversation: the
prompt with the generation prompt, then the tokens the answer turn adds (the answer and what closes
the turn, as supervised training labels them); without a template, the plain-text rendering of
``adapters.training_data``.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass

from adapters.chat_template import render_chat, template_kwargs
from adapters.errors import DatasetValidationError
from adapters.training_data import (
    ROLES, JsonlObjects, _LineProblem, _summary, _text, _tokenize_plain, _too_long, _type_name,
)

PREFERENCE_FORMAT = "preference"
OUTPUT_FIELDS = ("preferred_output", "non_preferred_output")
PAIR_FIELDS = ("chosen", "rejected")  # the prompt / chosen / rejected shape


@dataclass
class PreferencePair:
    prompt: list[dict]  # the input messages
    chosen: str
    rejected: str
    line: int


@dataclass
class PreferenceExample:
    """One tokenized pair: the two sequences are ``prompt_ids + chosen_ids`` and ``prompt_ids + rejected_ids``."""

    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]
    line: int


def is_preference_record(obj: object) -> bool:
    """Whether a parsed line is meant as a preference record (it names one of the output fields)."""
    return isinstance(obj, dict) and any(key in obj for key in OUTPUT_FIELDS + PAIR_FIELDS)


def first_record(data: bytes, max_line_bytes: int) -> object:
    """The first non-blank line of a JSONL file, parsed (None when it is not JSON, or longer than
    ``max_line_bytes``): enough to tell a preference file from a supervised one before validating
    every line. Reads that one line only (splitting the whole file held a copy of every line at
    once, and a line past the limit was parsed whole before its validation refused it)."""
    for raw in io.BytesIO(data):
        if not raw.strip():
            continue
        if len(raw) > max_line_bytes + 1:  # + its newline
            return None
        try:
            return json.loads(raw.decode("utf-8", "replace").lstrip("\ufeff"))
        except (ValueError, RecursionError):
            return None
    return None


def _record_format(obj: dict) -> str:
    return "openai" if any(key in obj for key in OUTPUT_FIELDS) else "pairs"


def _messages(messages: object, field: str) -> list[dict]:
    if not isinstance(messages, list):
        raise _LineProblem(f"field '{field}' must be an array, got {_type_name(messages)}")
    if not messages:
        raise _LineProblem(f"field '{field}' is empty")
    out = []
    for i, msg in enumerate(messages):
        where = f"{field}[{i}]: "
        if not isinstance(msg, dict):
            raise _LineProblem(f"{field}[{i}] must be an object, got {_type_name(msg)}")
        role = _text(msg, "role", where=where)
        if role not in ROLES:
            raise _LineProblem(f"{where}unknown role {role[:32]!r} (expected system, user or assistant)")
        out.append({"role": role, "content": _text(msg, "content", where=where)})
    if out[-1]["role"] == "assistant":
        raise _LineProblem(f"{field} ends with an assistant message (the outputs answer the last message)")
    return out


def _input_messages(obj: dict) -> list[dict]:
    raw = obj.get("input")
    if raw is None:
        raise _LineProblem("missing field 'input'")
    if not isinstance(raw, dict):
        raise _LineProblem(f"field 'input' must be an object, got {_type_name(raw)}")
    return _messages(raw.get("messages"), "input.messages")


def _prompt(obj: dict) -> list[dict]:
    """The ``prompt`` of the pairs shape: a string (one user message) or an array of messages."""
    if isinstance(obj.get("prompt"), list):
        return _messages(obj["prompt"], "prompt")
    return [{"role": "user", "content": _text(obj, "prompt")}]


def _answer(obj: dict, key: str) -> str:
    raw = obj.get(key)
    if raw is None:
        raise _LineProblem(f"missing field '{key}'")
    if isinstance(raw, str) and key in PAIR_FIELDS:
        return _text(obj, key)
    if not isinstance(raw, list):
        kind = "a string or an array" if key in PAIR_FIELDS else "an array"
        raise _LineProblem(f"field '{key}' must be {kind}, got {_type_name(raw)}")
    if len(raw) != 1:
        raise _LineProblem(f"field '{key}' must hold exactly one assistant message, got {len(raw)}")
    msg = raw[0]
    if not isinstance(msg, dict):
        raise _LineProblem(f"{key}[0] must be an object, got {_type_name(msg)}")
    role = _text(msg, "role", where=f"{key}[0]: ")
    if role != "assistant":
        raise _LineProblem(f"{key}[0]: role must be 'assistant', got {role[:32]!r}")
    return _text(msg, "content", where=f"{key}[0]: ")


def parse_preference_dataset(data: bytes, *, max_lines: int = 100_000, max_line_bytes: int = 1 << 20,
                             strict: bool = True, problems: list[tuple[int, str]] | None = None
                             ) -> list[PreferencePair]:
    """Every pair of the file; raises ``DatasetValidationError`` listing each bad line (with
    ``strict=False`` only when no pair is usable; the bad lines are appended to ``problems``)."""
    pairs: list[PreferencePair] = []
    problems = [] if problems is None else problems
    fmt: str | None = None
    lines = JsonlObjects(data, problems, max_lines=max_lines, max_line_bytes=max_line_bytes)
    for lineno, obj in lines:
        try:
            if not is_preference_record(obj):
                raise _LineProblem("expected a preference record like the first one ('input', 'preferred_output', "
                                   "'non_preferred_output', or 'prompt', 'chosen', 'rejected')")
            fmt = fmt or _record_format(obj)
            if _record_format(obj) != fmt:
                raise _LineProblem("mixes the two preference shapes: every line must use the first record's fields")
            if fmt == "openai":
                prompt = _input_messages(obj)
                chosen, rejected = _answer(obj, "preferred_output"), _answer(obj, "non_preferred_output")
            else:
                prompt = _prompt(obj)
                chosen, rejected = _answer(obj, "chosen"), _answer(obj, "rejected")
            if chosen == rejected:
                names = "preferred_output and non_preferred_output" if fmt == "openai" else "chosen and rejected"
                raise _LineProblem(f"{names} are the same answer")
            pairs.append(PreferencePair(prompt, chosen, rejected, lineno))
        except _LineProblem as problem:
            problems.append((lineno, str(problem)))
    if not pairs:
        what = "dataset is empty" if lines.records == 0 else "dataset has no usable record"
        raise DatasetValidationError(_summary(what, 0, lines.records, problems), problems)
    if problems and strict:
        raise DatasetValidationError(_summary("dataset has bad lines", len(pairs), lines.records, problems), problems)
    return pairs


def _answer_tokens(tokenizer, prompt: list[dict], prompt_ids: list[int], answer: str, kwargs: dict) -> list[int]:
    conversation = prompt + [{"role": "assistant", "content": answer}]
    turn = render_chat(tokenizer, conversation, generation_prompt=False, kwargs=kwargs)
    if len(turn) <= len(prompt_ids) or turn[:len(prompt_ids)] != prompt_ids:
        raise _LineProblem("chat template is not prefix-stable: the answer does not render as the prompt "
                           "followed by the answer tokens")
    return turn[len(prompt_ids):]


def _tokenize_pair(tokenizer, pair: PreferencePair, kwargs: dict | None) -> PreferenceExample:
    if kwargs is not None:  # the chat template
        try:
            prompt_ids = render_chat(tokenizer, pair.prompt, generation_prompt=True, kwargs=kwargs)
            chosen = _answer_tokens(tokenizer, pair.prompt, prompt_ids, pair.chosen, kwargs)
            rejected = _answer_tokens(tokenizer, pair.prompt, prompt_ids, pair.rejected, kwargs)
        except _LineProblem:
            raise
        except Exception as exc:  # template raise_exception(), renderer or tokenizer errors
            raise _LineProblem(f"chat template failed: {type(exc).__name__}: {str(exc)[:200]}") from None
        return PreferenceExample(prompt_ids, chosen, rejected, pair.line)
    prompt_ids, _ = _tokenize_plain(tokenizer, pair.prompt)
    answers = []
    for answer in (pair.chosen, pair.rejected):
        ids, labels = _tokenize_plain(tokenizer, pair.prompt + [{"role": "assistant", "content": answer}])
        answers.append(ids[len(prompt_ids):])
    return PreferenceExample(prompt_ids, answers[0], answers[1], pair.line)


def tokenize_preferences(pairs: list[PreferencePair], tokenizer, *, max_seq_len: int, strict: bool = True,
                         problems: list[tuple[int, str]] | None = None,
                         limit: str = "max_seq_len") -> list[PreferenceExample]:
    """Tokenized pairs; a pair whose longer sequence exceeds ``max_seq_len`` or whose rendering is not
    prefix-stable is a bad line (raised with ``strict``, else appended to ``problems`` and skipped)."""
    problems = [] if problems is None else problems
    total = len(pairs) + len(problems)  # the lines parsing already refused count too
    kwargs = template_kwargs(tokenizer) if getattr(tokenizer, "chat_template", None) else None
    examples = []
    for pair in pairs:
        try:
            example = _tokenize_pair(tokenizer, pair, kwargs)
            longest = len(example.prompt_ids) + max(len(example.chosen_ids), len(example.rejected_ids))
            if longest > max_seq_len:
                raise _too_long(longest, max_seq_len, limit=limit)
            if example.chosen_ids == example.rejected_ids:
                raise _LineProblem("the two answers tokenize to the same tokens")
            examples.append(example)
        except _LineProblem as problem:
            problems.append((pair.line, str(problem)))
    problems.sort(key=lambda p: p[0])
    if not examples or (strict and problems):
        what = "dataset has no usable example" if not examples else "dataset has bad lines"
        raise DatasetValidationError(_summary(what, len(examples), total, problems), problems)
    return examples
