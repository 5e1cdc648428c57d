"""Preference pairs from an experiment's captured answers and their feedback (pure: the reads
come in as functions).

Two captured answers make a pair when they answer the same prompt (the same messages, exactly),
come from different arms, differ in text, and their feedback ranks one above the other:

* both have a score: the higher score is preferred;
* otherwise both have a thumbs: up is preferred to down.

Feedback of different kinds (a score against a bare thumbs) or equal feedback ranks nothing. Each
(prompt, preferred text, other text) is written once, however many requests repeated it. The
records are in OpenAI's preference format, ready for a ``dpo`` fine-tuning job.

Bounded, because one client can send the same prompt many times: every pair of K answers would be
K²/4 records, each copying the prompt. So each distinct answer is the preferred side of at most
``PAIRS_PER_ANSWER`` pairs per other arm, and the file is written record by record against the
files' limits, failing as soon as it would pass one. Which pairs, deterministically: prompts in
the order of their first captured answer; for each, the ordered arm pairs (preferred arm first,
arms in the order of their first answer to it), scores before thumbs; the preferred arm's distinct
answers oldest first, the i-th paired with the answers it beats on the other arm (those ranked
lowest first, then oldest first), ``PAIRS_PER_ANSWER`` of them from position i·PAIRS_PER_ANSWER on,
cyclically, so the other arm's answers are spread over the preferred ones instead of the lowest
one meeting them all. Below the bound (few answers per prompt) every pair is written, as before.

The selection works on hashes of the prompts and answers (``Rated``), so it holds a few dozen
bytes per answer however long they are; the texts are read back only for the chosen pairs, a
batch at a time, while the file is written.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from gateway.experiments.errors import PreferenceFileTooLargeError
from gateway.experiments.store import CapturedAnswer

log = logging.getLogger(__name__)
PAIRS_PER_ANSWER = 4  # pairs one answer is preferred in, per other arm (linear, not quadratic, in answers)
FETCH_BATCH = 64  # pairs whose texts one read brings back while writing


@dataclass(frozen=True)
class PairSummary:
    answers: int  # captured answers with feedback
    prompts: int  # distinct prompts among them
    pairs: int  # records written
    skipped: int = 0  # pairs left out because their one line would pass the file's line limit


@dataclass(frozen=True)
class Rated:
    """A captured answer reduced to what pairing needs."""

    completion_id: str
    arm: str
    prompt: bytes  # digest of the messages (canonical JSON)
    text: bytes  # digest of the answer's text
    kind: str  # "score" or "thumbs": only answers of one kind are compared
    value: float


@dataclass
class _Node:
    """The distinct answers (one text) of one arm and kind to one prompt."""

    completion_id: str  # the first of them: its stored texts stand for all
    order: int
    high: float  # best feedback any of them got: what it can beat
    low: float  # worst: what beats it


def prompt_digest(messages: list[dict] | str) -> bytes:
    """The same for the same messages, whether parsed or JSON in any escaping or key order."""
    parsed = json.loads(messages) if isinstance(messages, str) else messages
    return hashlib.sha256(json.dumps(parsed, sort_keys=True, ensure_ascii=False).encode()).digest()


def rate(completion_id: str, arm: str, messages: list[dict] | str, completion: str, score: float | None,
         thumbs: str | None) -> Rated | None:
    """None when the feedback ranks nothing (neither a score nor a thumbs)."""
    if score is not None:
        kind, value = "score", float(score)
    elif thumbs is not None:
        kind, value = "thumbs", 1.0 if thumbs == "up" else 0.0
    else:
        return None
    return Rated(completion_id, arm, prompt_digest(messages), hashlib.sha256(completion.encode()).digest(), kind,
                 value)


def select_pairs(answers: Iterable[Rated],
                 per_answer: int = PAIRS_PER_ANSWER) -> tuple[list[tuple[str, str]], int, int]:
    """(preferred completion id, other completion id) of each pair in file order, the answers and
    the prompts seen. Time O(n log n + pairs): an answer's candidates are a prefix of the other
    arm's answers sorted by their worst feedback, and only a bounded number of them is skipped."""
    groups: dict[bytes, dict[tuple[str, str, bytes], _Node]] = {}
    count = 0
    for answer in answers:
        count += 1
        nodes = groups.setdefault(answer.prompt, {})
        node = nodes.get((answer.arm, answer.kind, answer.text))
        if node is None:
            nodes[(answer.arm, answer.kind, answer.text)] = _Node(answer.completion_id, count, answer.value,
                                                                   answer.value)
        else:
            node.high, node.low = max(node.high, answer.value), min(node.low, answer.value)
    pairs: list[tuple[str, str]] = []
    for nodes in groups.values():
        by_side: dict[tuple[str, str], list[tuple[bytes, _Node]]] = {}  # (arm, kind) -> its answers, oldest first
        for (arm, kind, text), node in nodes.items():
            by_side.setdefault((arm, kind), []).append((text, node))
        arms = list(dict.fromkeys(arm for arm, _ in by_side))
        seen: set[tuple[bytes, bytes]] = set()
        for preferred in arms:
            for other in arms:
                for kind in ("score", "thumbs"):
                    if other == preferred or (preferred, kind) not in by_side or (other, kind) not in by_side:
                        continue
                    losers = sorted(by_side[(other, kind)], key=lambda item: (item[1].low, item[1].order))
                    lows = [node.low for _, node in losers]
                    for i, (text, node) in enumerate(by_side[(preferred, kind)]):
                        beaten = bisect.bisect_left(lows, node.high)  # losers[:beaten] rank below it
                        taken, start = 0, i * per_answer
                        for step in range(beaten):
                            loser_text, loser = losers[(start + step) % beaten]
                            if loser_text == text or (text, loser_text) in seen:
                                continue  # bounded: at most one same text, and the pairs already written
                            seen.add((text, loser_text))
                            pairs.append((node.completion_id, loser.completion_id))
                            taken += 1
                            if taken == per_answer:
                                break
    return pairs, count, len(groups)


def record(messages: list[dict], preferred: str, other: str) -> dict:
    return {"input": {"messages": messages},
            "preferred_output": [{"role": "assistant", "content": preferred}],
            "non_preferred_output": [{"role": "assistant", "content": other}]}


def write_jsonl(pairs: list[tuple[str, str]], texts: Callable[[list[str]], dict[str, tuple[str, str]]], *,
                max_bytes: int, max_lines: int, max_line_bytes: int) -> tuple[bytes, int, int]:
    """(the JSONL, records written, pairs skipped) of ``pairs``, whose texts ``texts`` reads (completion
    id -> (messages JSON, answer)) a batch at a time. A pair whose line alone would pass
    ``max_line_bytes`` is skipped (and counted); raises ``PreferenceFileTooLargeError`` as soon as
    the file would pass ``max_bytes`` or ``max_lines``, so it never holds more than the limit."""
    out: list[bytes] = []
    size = written = skipped = 0
    for first in range(0, len(pairs), FETCH_BATCH):
        batch = pairs[first:first + FETCH_BATCH]
        found = texts(sorted({cid for pair in batch for cid in pair}))
        for preferred, other in batch:
            if preferred not in found or other not in found:
                continue  # deleted meanwhile (the experiment was deleted while the file was made)
            messages, preferred_text = found[preferred]
            line = (json.dumps(record(json.loads(messages), preferred_text, found[other][1]), ensure_ascii=False)
                    .encode() + b"\n")
            if len(line) > max_line_bytes:
                skipped += 1
                continue
            if size + len(line) > max_bytes or written + 1 > max_lines:
                limit = (f"{max_bytes} bytes (GATEWAY_MAX_TRAINING_DATASET_BYTES)" if size + len(line) > max_bytes
                         else f"{max_lines} records (GATEWAY_MAX_TRAINING_DATASET_LINES)")
                raise PreferenceFileTooLargeError(
                    f"the preference file would pass the files' limit of {limit}: {written} of {len(pairs)} "
                    f"pairs fit ({size} bytes) before the limit; no file was made. Raise the limit, or start a "
                    "new experiment for new preference data")
            out.append(line)
            size += len(line)
            written += 1
    if skipped:
        log.warning("preference file: %d pair(s) left out, each one line over the limit of %d bytes",
                    skipped, max_line_bytes)
    return b"".join(out), written, skipped


def preference_records(answers: list[CapturedAnswer],
                       per_answer: int = PAIRS_PER_ANSWER) -> tuple[list[dict], PairSummary]:
    """The records a list of parsed answers makes, in file order (for small inputs and tests; the
    service reads pages and writes with ``write_jsonl``)."""
    by_id = {a.completion_id: a for a in answers}
    rated = (rate(a.completion_id, a.arm, a.messages, a.completion, a.score, a.thumbs) for a in answers)
    pairs, count, prompts = select_pairs((r for r in rated if r is not None), per_answer)
    records = [record(by_id[p].messages, by_id[p].completion, by_id[o].completion) for p, o in pairs]
    return records, PairSummary(answers=count, prompts=prompts, pairs=len(records))
