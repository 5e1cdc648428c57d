"""Preference pairs from an experiment's captured answers and their feedback (pure: no I/O).

Two captured answers make a pair when they answer the same prompt (the same messages, exactly),
come from different arms, differ in text, and their feedback ranks one above the other:

* both have a score: the higher score is preferred;
* otherwise both have a thumbs: up is preferred to down.

Feedback of different kinds (a score against a bare thumbs) or equal feedback ranks nothing. Each
(prompt, preferred text, other text) is written once, however many requests repeated it. The
records are in OpenAI's preference format, ready for a ``dpo`` fine-tuning job.
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass

from gateway.experiments.store import CapturedAnswer


@dataclass(frozen=True)
class PairSummary:
    answers: int  # captured answers with feedback
    prompts: int  # distinct prompts among them
    pairs: int


def _rank(answer: CapturedAnswer) -> tuple[str, float] | None:
    if answer.score is not None:
        return ("score", answer.score)
    if answer.thumbs is not None:
        return ("thumbs", 1.0 if answer.thumbs == "up" else 0.0)
    return None


def _prefers(a: CapturedAnswer, b: CapturedAnswer) -> bool:
    """Whether feedback ranks ``a`` above ``b``."""
    ra, rb = _rank(a), _rank(b)
    return ra is not None and rb is not None and ra[0] == rb[0] and ra[1] > rb[1]


def preference_records(answers: list[CapturedAnswer]) -> tuple[list[dict], PairSummary]:
    """The preference records the answers make, in a stable order, and what they came from."""
    by_prompt: dict[str, list[CapturedAnswer]] = defaultdict(list)
    for answer in answers:
        by_prompt[json.dumps(answer.messages, sort_keys=True)].append(answer)
    records, seen = [], set()
    for key, group in by_prompt.items():
        for a in group:
            for b in group:
                if a.arm == b.arm or a.completion == b.completion or not _prefers(a, b):
                    continue
                if (key, a.completion, b.completion) in seen:
                    continue
                seen.add((key, a.completion, b.completion))
                records.append({"input": {"messages": a.messages},
                                "preferred_output": [{"role": "assistant", "content": a.completion}],
                                "non_preferred_output": [{"role": "assistant", "content": b.completion}]})
    return records, PairSummary(answers=len(answers), prompts=len(by_prompt), pairs=len(records))


def jsonl(records: list[dict]) -> bytes:
    return b"".join(json.dumps(r, ensure_ascii=False).encode() + b"\n" for r in records)
