"""Parse, validate and tokenize an uploaded JSONL training dataset.

One JSON object per line, in one of three formats, detected from the first line holding a
recognisable object (every later line must use the same format):

* ``chat``: ``{"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}``
* ``prompt_completion``: ``{"prompt": str, "completion": str}``
* ``instruction``: ``{"instruction": str, "input": str (optional, may be empty or null), "output": str}``

Every row becomes a chat conversation. Decisions:

* Blank lines are skipped; a UTF-8 byte-order mark on the first line is ignored; extra keys are ignored.
* Content must be a non-blank string. A chat needs at least one assistant message and must not open
  with one (nothing could prompt it). Messages after the last assistant turn are accepted but carry
  no loss, so tokenization leaves them out.
* Bad lines are reported as ``(line, reason)`` and skipped: the caller gets the usable rows plus the
  problems and decides. ``strict=True`` raises on any problem. :class:`DatasetValidationError` is
  raised whenever no usable row remains. Reasons never quote message content.

Tokenization renders through the tokenizer's chat template. For each assistant message ``i`` the
prompt is ``messages[:i]`` with the generation prompt and the turn is ``messages[:i+1]``; the tokens
the turn adds (the answer and what the template writes to close it, ``<|im_end|>\\n`` in ChatML) are
trained on, everything else is labelled -100. Each rendering must be a token-prefix of the next,
else the line is reported as not prefix-stable. Control tokens written inside message content are
encoded as plain text where transformers supports it, so a row cannot forge turn boundaries.
Without a chat template, plain text is used: each non-assistant message is ``content + "\\n"``
(masked) and each assistant message is ``content`` followed by the EOS token (trained on), after a
BOS token when the tokenizer has one distinct from EOS.
"""

from __future__ import annotations

import io
import json
import random
from collections.abc import Iterator
from dataclasses import dataclass, field

from adapters.chat_template import render_chat, template_kwargs
from adapters.errors import DatasetValidationError

IGNORE_INDEX = -100
ROLES = ("system", "user", "assistant")
FORMATS = ("chat", "prompt_completion", "instruction")
_FIELDS = {"prompt_completion": ("prompt", "completion"), "instruction": ("instruction", "output")}


class Conversation(list):
    """A list of ``{"role", "content"}`` messages that remembers its 1-based source ``line``."""

    def __init__(self, messages=(), line: int = 0):
        super().__init__(messages)
        self.line = line

    def __repr__(self) -> str:
        return f"Conversation(line={self.line}, {list.__repr__(self)})"


@dataclass
class ParsedDataset:
    format: str
    conversations: list[Conversation]
    problems: list[tuple[int, str]] = field(default_factory=list)


@dataclass
class TrainingExample:
    input_ids: list[int]
    labels: list[int]
    line: int


@dataclass
class TokenizedDataset:
    format: str
    examples: list[TrainingExample]
    problems: list[tuple[int, str]] = field(default_factory=list)


class _LineProblem(Exception):
    """Internal: the current line is unusable for the given reason."""


def _type_name(value) -> str:
    for kind, name in ((bool, "boolean"), (str, "string"), ((int, float), "number"),
                       (list, "array"), (dict, "object")):
        if isinstance(value, kind):
            return name
    return "null"


def _kind(obj: dict) -> str | None:
    if "messages" in obj:
        return "chat"
    if "prompt" in obj or "completion" in obj:
        return "prompt_completion"
    if "instruction" in obj or "output" in obj:
        return "instruction"
    return None


def _text(obj: dict, key: str, *, where: str = "", optional: bool = False, allow_empty: bool = False) -> str:
    label = f"{where}field '{key}'"
    if key not in obj or (optional and obj[key] is None):
        if optional:
            return ""
        raise _LineProblem(f"missing {label}")
    value = obj[key]
    if not isinstance(value, str):
        raise _LineProblem(f"{label} must be a string, got {_type_name(value)}")
    if not allow_empty and not value.strip():
        raise _LineProblem(f"{label} is empty")
    try:
        value.encode("utf-8")  # JSON escapes can spell unpaired surrogates, which no tokenizer takes
    except UnicodeEncodeError:
        raise _LineProblem(f"{label} holds an unpaired surrogate escape (\\ud800-\\udfff): not valid Unicode") from None
    return value


def _chat_messages(obj: dict) -> list[dict]:
    if "messages" not in obj:  # a record of no known format after chat ones (found by fuzzing: KeyError)
        raise _LineProblem("missing field 'messages'")
    raw = obj["messages"]
    if not isinstance(raw, list):
        raise _LineProblem(f"field 'messages' must be an array, got {_type_name(raw)}")
    if not raw:
        raise _LineProblem("field 'messages' is empty")
    messages = []
    for i, msg in enumerate(raw):
        where = f"messages[{i}]: "
        if not isinstance(msg, dict):
            raise _LineProblem(f"messages[{i}] must be an object, got {_type_name(msg)}")
        role = _text(msg, "role", where=where)
        if role not in ROLES:
            raise _LineProblem(f"{where}unknown role {role[:32]!r} (expected system, user or assistant)")
        messages.append({"role": role, "content": _text(msg, "content", where=where)})
    if not any(m["role"] == "assistant" for m in messages):
        raise _LineProblem("chat has no assistant message")
    if messages[0]["role"] == "assistant":
        raise _LineProblem("chat starts with an assistant message (a system or user message must come first)")
    return messages


def _to_messages(obj: dict, fmt: str) -> list[dict]:
    if fmt == "chat":
        return _chat_messages(obj)
    if fmt == "prompt_completion":
        prompt, answer = _text(obj, "prompt"), _text(obj, "completion")
    else:
        prompt, answer = _text(obj, "instruction"), _text(obj, "output")
        extra = _text(obj, "input", optional=True, allow_empty=True)
        if extra.strip():
            prompt = f"{prompt}\n\n{extra}"
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]


def _summary(what: str, usable: int, total: int, problems: list[tuple[int, str]]) -> str:
    msg = f"{what}: {usable} of {total} records usable, {len(problems)} problem(s)"
    if problems:
        line, reason = problems[0]
        msg += f"; first at line {line}: {reason}"
    return msg


class JsonlObjects:
    """The non-blank lines of a JSONL file as JSON objects: iterating yields ``(line number, object)``;
    a line that is not one (too long, not UTF-8, not JSON, not an object) goes to ``problems`` as
    ``(line, reason)``, and reading stops after ``max_lines`` records. ``records`` counts the
    non-blank lines seen (one more than ``max_lines`` when the file has more)."""

    def __init__(self, data: bytes, problems: list[tuple[int, str]], *, max_lines: int, max_line_bytes: int):
        self.data, self.problems = data, problems
        self.max_lines, self.max_line_bytes = max_lines, max_line_bytes
        self.records = 0

    def __iter__(self) -> Iterator[tuple[int, dict]]:
        # One line at a time: data.split() would hold a copy of every line at once (several times the
        # file, per concurrent upload). BytesIO shares the bytes and splits at b"\n" only, as split()
        # did, so a "\r" stays in its line (and in its length); it just never yields the empty piece
        # after a final "\n", which split() yielded and the blank check skipped.
        for lineno, raw in enumerate(io.BytesIO(self.data), start=1):
            if not raw.strip():
                continue
            raw = raw.removesuffix(b"\n")
            self.records += 1
            if self.records > self.max_lines:
                self.problems.append((lineno, f"too many lines (limit {self.max_lines}); this line and the rest "
                                              "were not read"))
                return
            try:
                yield lineno, self._object(raw, lineno)
            except _LineProblem as problem:
                self.problems.append((lineno, str(problem)))

    def _object(self, raw: bytes, lineno: int) -> dict:
        if len(raw) > self.max_line_bytes:
            raise _LineProblem(f"line too long ({len(raw)} bytes > limit {self.max_line_bytes})")
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
        return obj


def parse_dataset(data: bytes, *, max_lines: int = 100_000, max_line_bytes: int = 1 << 20,
                  strict: bool = False) -> ParsedDataset:
    """Parse JSONL bytes into conversations; bad lines go to ``problems`` (see module docstring)."""
    fmt: str | None = None
    conversations: list[Conversation] = []
    problems: list[tuple[int, str]] = []
    lines = JsonlObjects(data, problems, max_lines=max_lines, max_line_bytes=max_line_bytes)
    for lineno, obj in lines:
        try:
            kind = _kind(obj)
            if fmt is None:
                if kind is None:
                    raise _LineProblem("unrecognised record: expected 'messages', 'prompt'/'completion' "
                                       "or 'instruction'/'output' fields")
                fmt = kind
            elif kind is not None and kind != fmt:
                raise _LineProblem(f"expected {fmt} format like the first record, got a {kind} record")
            conversations.append(Conversation(_to_messages(obj, fmt), line=lineno))
        except _LineProblem as problem:
            problems.append((lineno, str(problem)))
    if not conversations:
        what = "dataset is empty" if lines.records == 0 else "dataset has no usable record"
        raise DatasetValidationError(_summary(what, 0, lines.records, problems), problems)
    if strict and problems:
        raise DatasetValidationError(_summary("dataset has bad lines", len(conversations), lines.records, problems),
                                     problems)
    return ParsedDataset(format=fmt or "chat", conversations=conversations, problems=problems)


def _too_long(tokens: int, max_seq_len: int, at_least: bool = False, limit: str = "max_seq_len") -> _LineProblem:
    counted = f"at least {tokens}" if at_least else str(tokens)
    return _LineProblem(f"too long after tokenization ({counted} tokens > {limit} {max_seq_len})")


def _tokenize_with_template(tokenizer, messages: list[dict], kwargs: dict, max_seq_len: int,
                            limit: str = "max_seq_len") -> tuple[list[int], list[int]]:
    """Each assistant turn renders the conversation up to it (twice: prompt, then answer), so a
    line of many short turns costs the square of its length: rendering stops at the first prompt
    past ``max_seq_len``, which bounds the turns rendered by the tokens allowed (a 1 MiB line of
    14k one-character turns took hours before)."""
    ids: list[int] = []
    labels: list[int] = []
    for i, msg in enumerate(messages):
        if msg["role"] != "assistant":
            continue
        prefix = render_chat(tokenizer, messages[:i], generation_prompt=True, kwargs=kwargs)
        if len(prefix) > max_seq_len:
            raise _too_long(len(prefix), max_seq_len, at_least=True, limit=limit)
        if prefix[:len(ids)] != ids:
            raise _LineProblem(f"chat template is not prefix-stable: the prompt for messages[{i}] does not "
                               "start with the tokens of the conversation before it")
        labels += [IGNORE_INDEX] * (len(prefix) - len(ids))
        turn = render_chat(tokenizer, messages[:i + 1], generation_prompt=False, kwargs=kwargs)
        if len(turn) <= len(prefix) or turn[:len(prefix)] != prefix:
            raise _LineProblem(f"chat template is not prefix-stable: messages[{i}] does not render as its "
                               "prompt followed by the answer tokens")
        labels += turn[len(prefix):]
        ids = turn
    return ids, labels


def _tokenize_plain(tokenizer, messages: list[dict]) -> tuple[list[int], list[int]]:
    eos, bos = tokenizer.eos_token_id, getattr(tokenizer, "bos_token_id", None)
    if eos is None:
        raise DatasetValidationError("tokenizer has neither a chat template nor an EOS token; "
                                     "cannot mark where an answer ends")

    def encode(text: str) -> list[int]:
        return list(tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"])

    ids: list[int] = [bos] if bos is not None and bos != eos else []
    labels: list[int] = [IGNORE_INDEX] * len(ids)
    for msg in messages:
        if msg["role"] == "assistant":
            piece = encode(msg["content"]) + [eos]
            labels += piece
        else:
            piece = encode(msg["content"] + "\n")
            labels += [IGNORE_INDEX] * len(piece)
        ids += piece
    return ids, labels


def tokenize_dataset(parsed: ParsedDataset, tokenizer, *, max_seq_len: int, strict: bool = False,
                     limit: str = "max_seq_len") -> TokenizedDataset:
    """Turn conversations into ``TrainingExample``s with loss only on assistant turns; ``limit``
    names what bounds ``max_seq_len`` in the too-long message."""
    if max_seq_len < 1:
        raise ValueError(f"max_seq_len must be at least 1, got {max_seq_len}")
    use_template = bool(getattr(tokenizer, "chat_template", None))
    kwargs = template_kwargs(tokenizer) if use_template else {}
    examples: list[TrainingExample] = []
    problems = list(parsed.problems)
    for conv in parsed.conversations:
        last = max((i for i, m in enumerate(conv) if m["role"] == "assistant"), default=-1)
        messages = [{"role": m["role"], "content": m["content"]} for m in conv[:last + 1]]
        try:
            if last < 0:
                raise _LineProblem("chat has no assistant message")
            if use_template:
                try:
                    ids, labels = _tokenize_with_template(tokenizer, messages, kwargs, max_seq_len, limit)
                except _LineProblem:
                    raise
                except Exception as exc:  # template raise_exception(), renderer or tokenizer errors
                    raise _LineProblem(f"chat template failed: {type(exc).__name__}: {str(exc)[:200]}") from None
            else:
                ids, labels = _tokenize_plain(tokenizer, messages)
            if len(ids) > max_seq_len:
                raise _too_long(len(ids), max_seq_len, limit=limit)
            examples.append(TrainingExample(input_ids=ids, labels=labels, line=conv.line))
        except _LineProblem as problem:
            problems.append((conv.line, str(problem)))
    problems.sort(key=lambda p: p[0])
    total = len(parsed.conversations) + len(parsed.problems)
    if not examples:
        raise DatasetValidationError(_summary("dataset has no usable example", 0, total, problems), problems)
    if strict and problems:
        raise DatasetValidationError(_summary("dataset has bad lines", len(examples), total, problems), problems)
    return TokenizedDataset(format=parsed.format, examples=examples, problems=problems)


def split_train_eval(examples: list, eval_fraction: float, seed: int) -> tuple[list, list]:
    """Deterministically split into ``(train, eval)``, each in the original order.

    ``eval`` holds ``round(n * eval_fraction)`` examples, at least one when the fraction is positive,
    but ``train`` always keeps at least one (so a single example gives an empty eval set).
    """
    if not 0.0 <= eval_fraction < 1.0:
        raise ValueError(f"eval_fraction must be in [0, 1), got {eval_fraction}")
    n = len(examples)
    if n == 0:
        raise ValueError("cannot split an empty list of examples")
    n_eval = 0 if eval_fraction == 0 else min(n - 1, max(1, round(n * eval_fraction)))
    order = list(range(n))
    random.Random(seed).shuffle(order)
    eval_idx = set(order[:n_eval])
    train = [ex for i, ex in enumerate(examples) if i not in eval_idx]
    held = [ex for i, ex in enumerate(examples) if i in eval_idx]
    return train, held
