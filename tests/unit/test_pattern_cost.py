"""The pattern analyser that refuses regular expressions xgrammar would expand into a grammar too
costly to follow (``gateway.pattern_cost``): everyday patterns pass; branching counted repetitions
past their limit, counts past 128, oversized patterns and deep group nesting are refused."""

from __future__ import annotations

import collections
import json
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.pattern_cost import (
    MAX_BRANCHING_REPETITION, MAX_PATTERN_SIZE, MAX_REPEAT_COUNT, PatternTooComplexError, check_pattern_cost,
)

EVERYDAY = [
    r"^[a-z]{1,8}$", r"^\d{4}-\d{2}-\d{2}$", r"(\d{3}-){2}\d{4}", r"([0-9]{1,3}\.){3}[0-9]{1,3}",
    r"^((25[0-5]|2[0-4]\d|1?\d?\d)\.){3}(25[0-5]|2[0-4]\d|1?\d?\d)$", r"^[^@\s]+@[^@\s]+\.[a-z]{2,}$",
    r"^(?:[A-Z][a-z]+ ){1,5}$", r"(?<year>\d{4})-(?<month>\d{2})", r"^\p{L}+$", r"[\](]{2,5}",
    r"[a-z]{1,128}", r"\d{128}", r"([a-z]+ ){1,30}", r"(\w+\s?)*", r"([a-z]{1,30})*", r"a{,5}", r"x{2}{3}",
]

COSTLY = [
    # ((a|aa){1,30}){1,30}: compiles at once, then one mask step ran for minutes on the engine thread
    (r"((a|aa){1,30}){1,30}b", "{1,30}"),
    (r"([a-z]{1,30}){1,30}b", "{1,30}"),  # did not compile in 30 s
    (r"(.|..){1,100}", "{1,100}"),  # 5.5 s to compile
    (r"(\w+\s?){1,50}", "{1,50}"),
    (r"(([a-z]{1,5}){1,5}){1,5}", "{1,5}"),
    (r"(a|b){1,99999999999999999999}", "{1,99999999999999999999}"),
    ("a{1," + "9" * 5000 + "}", "{1,999"),  # more digits than Python reads as an int
    (r"[a-z]{1,129}", "{1,129}"),  # past 128 copies: up to 14 ms a token to follow
    (r"a{200,}", "{200,}"),
    (".{1,100}" * 21, f"limit {MAX_PATTERN_SIZE}"),
    ("(" * 40 + "a" + ")" * 40, "deeper than"),
]


@pytest.mark.parametrize("pattern", EVERYDAY)
def test_everyday_patterns_pass(pattern):
    check_pattern_cost(pattern)


@pytest.mark.parametrize("pattern, named", COSTLY)
def test_costly_patterns_are_refused_naming_the_part(pattern, named):
    with pytest.raises(PatternTooComplexError) as refused:
        check_pattern_cost(pattern)
    assert named in str(refused.value)


def test_the_limits_are_inclusive():
    check_pattern_cost("(a|b){%d}" % (MAX_BRANCHING_REPETITION // 2))  # two atoms a copy: exactly the limit
    check_pattern_cost("a" * MAX_PATTERN_SIZE)
    check_pattern_cost("a{%d}" % MAX_REPEAT_COUNT)
    with pytest.raises(PatternTooComplexError):
        check_pattern_cost("a{%d}" % (MAX_REPEAT_COUNT + 1))
    with pytest.raises(PatternTooComplexError):
        check_pattern_cost("(a|b){%d}" % (MAX_BRANCHING_REPETITION // 2 + 1))
    with pytest.raises(PatternTooComplexError):
        check_pattern_cost("a" * (MAX_PATTERN_SIZE + 1))


@pytest.mark.parametrize("pattern", ["(", ")", "((a)", "a)|(b", "[abc", "\\", "a{1,2", "(?<x", "\\p{L"])
def test_malformed_patterns_are_measured_without_error(pattern):
    """A pattern this reader cannot make sense of is left to xgrammar (which refuses it); the
    reader itself never fails on it."""
    check_pattern_cost(pattern)


def test_patterns_at_the_limit_compile_and_follow_their_language(tiny_tokenizer):
    """The most expensive shapes still allowed compile and constrain as written (xgrammar accepts
    a matching answer, refuses a longer one)."""
    import xgrammar

    info = xgrammar.TokenizerInfo.from_huggingface(tiny_tokenizer, vocab_size=len(tiny_tokenizer))
    compiler = xgrammar.GrammarCompiler(info, max_threads=1, cache_enabled=False)
    for pattern, good, bad in [("((a|aa){1,4}){1,5}", "a" * 40, "a" * 41), ("(([a-z]{1,4}){1,4}){1,4}", "b" * 64,
                                                                             "b" * 65)]:
        check_pattern_cost(pattern)
        grammar = compiler.compile_json_schema(json.dumps({"type": "string", "pattern": pattern}),
                                               any_whitespace=False, strict_mode=True)
        for text, accepted in ((good, True), (bad, False)):
            matcher = xgrammar.GrammarMatcher(grammar)
            assert all(matcher.accept_string(ch) for ch in json.dumps(text)) == accepted, (pattern, len(text))


@settings(max_examples=400, deadline=None)
@given(st.text(alphabet=st.sampled_from(list("ab.[]()|*+?{},0123456789\\^$-:<>=!dwsupk")), max_size=60))
def test_any_text_is_measured_or_refused_never_an_error(pattern):
    """Whatever a client puts in a pattern, the reader ends with a verdict: no other exception
    (it runs inside request validation, where one would be a 500)."""
    try:
        check_pattern_cost(pattern)
    except PatternTooComplexError:
        pass


def test_the_sweeps_random_patterns_are_all_measured():
    from loadtest.pattern_sweep import random_pattern

    rng = random.Random(0)
    verdicts = collections.Counter()
    for _ in range(2000):
        try:
            check_pattern_cost(random_pattern(rng))
            verdicts["pass"] += 1
        except PatternTooComplexError:
            verdicts["refused"] += 1
    assert verdicts["pass"] > 500 and verdicts["refused"] > 50  # the sweep explores both sides of the limits
