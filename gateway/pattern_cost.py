"""How far a JSON-schema ``pattern`` expands when xgrammar turns it into a grammar, checked before
it is compiled: a pattern too costly to follow would slow or stall the engine thread, where every
constrained row's next-token mask is computed.

xgrammar (0.2.9) expands a counted repetition ``X{m,n}`` into copies of ``X``. Measured on two CPU
cores over SmolLM2's 49k-token vocabulary:
- a repetition whose operand can match in more than one way (it holds an alternation or another
  quantifier) multiplies the grammar's states: ``((a|aa){1,30}){1,30}b`` compiles at once, then a
  single ``fill_next_token_bitmask`` ran for minutes: one request would stall every stream;
- past 128 copies it switches to a form that is cheap to compile and slow to follow:
  ``.{1,129}`` costs up to 14 ms a token, ``.{1,1000}`` 18 ms on average (``.{1,128}``: 0.1 ms).

So a pattern is measured here: each atom counts 1, sequences and alternatives add up, ``X{m,n}``
counts ``n`` times ``X`` (``X{m,}`` ``m`` times; ``*``, ``+`` and ``?`` do not expand). No count
may exceed ``MAX_REPEAT_COUNT``; a counted repetition of a branching operand may count at most
``MAX_BRANCHING_REPETITION``, the whole pattern ``MAX_PATTERN_SIZE``. Compile time is bounded
separately (``gateway.grammar_process`` kills a compile past its deadline). The grammar is
ECMAScript's, read only as far as sizes need: groups, classes, escapes, alternatives and
quantifiers; a pattern it cannot read is left to xgrammar, which refuses it."""

from __future__ import annotations

import re
from dataclasses import dataclass

MAX_PATTERN_SIZE = 2000
MAX_REPEAT_COUNT = 128  # xgrammar's cheap-to-follow expansion ends here
MAX_BRANCHING_REPETITION = 64  # (.{1,8}){1,8} compiles in ~5 s here; ((a|aa){1,30}){1,30} never finishes matching
MAX_GROUP_DEPTH = 32  # groups inside groups (the reader recurses once per level)

_COUNTED = re.compile(r"\{(\d+)(?:(,)(\d*))?\}")
_GROUP_PREFIX = re.compile(r"\?(?::|=|!|<=|<!|<[A-Za-z_][A-Za-z0-9_]*>)")
_BRACED_ESCAPE = re.compile(r"\\(?:[pPu]\{[^}]*\}|k<[^>]*>)")


class PatternTooComplexError(ValueError):
    """The pattern would expand past a limit; the message says which part."""


@dataclass(frozen=True)
class _Part:
    size: int  # atoms after expanding counted repetitions
    branching: bool  # can match in more than one way (an alternation or a quantifier inside)


def check_pattern_cost(pattern: str) -> None:
    """Raise ``PatternTooComplexError`` when ``pattern`` expands past the limits above."""
    reader = _Reader(pattern)
    size = 0
    while reader.i < len(pattern):
        size += reader.alternation().size
        if reader.i < len(pattern):  # a stray ')': xgrammar refuses the pattern; keep measuring the rest
            reader.i += 1
    if size > MAX_PATTERN_SIZE:
        raise PatternTooComplexError(f"the pattern expands to {size} elements (limit {MAX_PATTERN_SIZE}); "
                                     "use smaller repetition counts")


class _Reader:
    def __init__(self, pattern: str):
        self.p = pattern
        self.i = 0
        self.depth = 0  # groups open at ``i``

    def alternation(self) -> _Part:
        parts = [self.sequence()]
        while self.i < len(self.p) and self.p[self.i] == "|":
            self.i += 1
            parts.append(self.sequence())
        return _Part(sum(p.size for p in parts), len(parts) > 1 or any(p.branching for p in parts))

    def sequence(self) -> _Part:
        size, branching = 0, False
        while self.i < len(self.p) and self.p[self.i] not in "|)":
            part = self.quantified(self.atom())
            size, branching = size + part.size, branching or part.branching
        return _Part(size, branching)

    def atom(self) -> _Part:
        p, c = self.p, self.p[self.i]
        if c == "(":
            self.depth += 1
            if self.depth > MAX_GROUP_DEPTH:
                raise PatternTooComplexError(f"the pattern nests groups deeper than {MAX_GROUP_DEPTH} levels")
            self.i += 1
            prefix = _GROUP_PREFIX.match(p, self.i)
            if prefix:
                self.i = prefix.end()
            inner = self.alternation()
            if self.i < len(p):  # its ')'; an unclosed group ends the pattern (xgrammar refuses it)
                self.i += 1
            self.depth -= 1
            return inner
        if c == "[":
            self.i += 1
            while self.i < len(p) and p[self.i] != "]":
                self.i += 2 if p[self.i] == "\\" else 1
            self.i += 1
            return _Part(1, False)
        if c == "\\":
            braced = _BRACED_ESCAPE.match(p, self.i)
            self.i = braced.end() if braced else self.i + 2
            return _Part(1, False)
        self.i += 1
        return _Part(1, False)

    def quantified(self, operand: _Part) -> _Part:
        p = self.p
        if self.i >= len(p):
            return operand
        if p[self.i] in "*+?":  # no copies: a loop or an option
            self.i += 1
            self._skip_lazy()
            return _Part(operand.size, True)
        counted = _COUNTED.match(p, self.i)
        if not counted:
            return operand
        self.i = counted.end()
        self._skip_lazy()
        low = _count(counted.group(1))
        high = low if counted.group(2) is None else _count(counted.group(3)) if counted.group(3) else None
        copies = max(low if high is None else high, 1)
        if copies > MAX_REPEAT_COUNT:
            raise PatternTooComplexError(
                f"the repetition {counted.group(0)[:40]} counts past {MAX_REPEAT_COUNT}, which structured outputs "
                "follow too slowly; use + or * (or maxLength on a string schema without a pattern)")
        size = operand.size * copies
        if operand.branching and copies > 1 and size > MAX_BRANCHING_REPETITION:
            raise PatternTooComplexError(
                f"the repetition {counted.group(0)} of a part that can match in several ways expands to {size} "
                f"elements (limit {MAX_BRANCHING_REPETITION}): structured outputs would be too slow to follow it")
        return _Part(size, operand.branching or high != low)

    def _skip_lazy(self) -> None:
        if self.i < len(self.p) and self.p[self.i] == "?":  # lazy: the same language
            self.i += 1


def _count(digits: str) -> int:
    """A repetition count; any count of ten digits or more reads as 10**9 (past every limit, and
    Python refuses to read integers of thousands of digits)."""
    return int(digits) if len(digits) < 10 else 10 ** 9
