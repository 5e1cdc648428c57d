"""Training data whose JSON escapes spell text no tokenizer can take: refused per line, in words."""

from __future__ import annotations

from adapters.training_data import parse_dataset


def test_unpaired_surrogate_escapes_are_line_problems():
    data = b"\n".join([
        b'{"prompt": "fine", "completion": "ok"}',
        b'{"prompt": "a\\ud800", "completion": "b"}',
        b'{"prompt": "ok", "completion": "\\udfff x"}',
        b'{"prompt": "pair \\ud83d\\ude00", "completion": "ok"}',  # a proper pair is one character: fine
    ])
    parsed = parse_dataset(data, strict=False)
    problems = dict(parsed.problems)
    assert set(problems) == {2, 3}
    assert "field 'prompt' holds an unpaired surrogate" in problems[2]
    assert "field 'completion' holds an unpaired surrogate" in problems[3]
