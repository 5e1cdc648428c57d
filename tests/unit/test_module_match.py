"""adapters.module_match: PEFT's module-matching rule, on a linear-time engine, with bounds."""

from __future__ import annotations

import re

import pytest

from adapters.errors import AdapterValidationError
from adapters.module_match import MAX_PATTERN_CHARS, check_spec, matches, targeted

NAMES = ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj", "model.layers.0.mlp.down_proj",
         "model.layers.1.self_attn.q_proj", "lm_head"]


@pytest.mark.parametrize("spec", [
    r".*\.(q_proj|v_proj)", r"model\.layers\.0\..*", r".*proj", "q_proj", r"model.layers.\d+.self_attn.q_proj",
    ["q_proj"], ["self_attn.q_proj", "down_proj"], ["layers.0.mlp.down_proj"], ["proj"], ["lm_head"], [],
])
def test_same_answers_as_peft_rule_on_python_re(spec):
    """PEFT: a string must match the whole path (re.fullmatch); a list entry is the path or its dotted tail."""
    for name in NAMES:
        if isinstance(spec, str):
            want = re.fullmatch(spec, name) is not None
        else:
            want = name in spec or any(name.endswith("." + entry) for entry in spec)
        assert matches(spec, name) is want, (spec, name)


def test_ia3_feedforward_list_uses_peft_plain_suffix_rule():
    assert matches(["proj"], "model.layers.0.mlp.down_proj", dotted=False)
    assert not matches(["proj"], "model.layers.0.mlp.down_proj")


@pytest.mark.parametrize("pattern", [r"(a+)+b", r"(a|a)*b", r"(.*a){12}b", r"(x+x+)+y"])
def test_catastrophic_patterns_match_in_linear_time(pattern):
    # Python's re needs ~2^n steps for these on n a's (hours at n=60); RE2 reads the text once
    assert not matches(pattern, "a" * 60 + "!")
    assert not matches(pattern, "x" * 60 + "!")


@pytest.mark.parametrize("pattern,words", [
    (r"(q)\1_proj", "backreferences"),
    (r"^(?!.*vision).*q_proj", "lookaround"),
    (r"(?<=attn\.)q_proj", "lookaround"),
    ("(unclosed", "not a pattern"),
    ("a{2000}", "not a pattern"),
    ("a" * (MAX_PATTERN_CHARS + 1), "limit"),
    ("q_proj\ud800", "lone surrogate"),  # JSON's "\ud800": RE2's UTF-8 encoding raised (a 500)
    ("\udc80.*", "lone surrogate"),
])
def test_unsafe_or_invalid_patterns_are_refused_by_field(pattern, words):
    for call in (lambda: check_spec("feedforward_modules", pattern),
                 lambda: matches(pattern, NAMES[0], field="feedforward_modules")):
        with pytest.raises(AdapterValidationError, match=words) as info:
            call()
        assert "feedforward_modules" in str(info.value)


@pytest.mark.parametrize("value", [["x"] * 2000, ["x" * 300], [1], {"q_proj": 1}, 3])
def test_module_lists_are_bounded(value):
    with pytest.raises(AdapterValidationError, match="target_modules"):
        check_spec("target_modules", value)


def test_exclusions_win_over_targets():
    config = {"target_modules": r".*_proj", "exclude_modules": ["v_proj"]}
    assert targeted(config, NAMES[0]) and not targeted(config, NAMES[1])
    config = {"target_modules": "all-linear", "exclude_modules": r".*layers\.1\..*"}
    assert targeted(config, NAMES[2]) and not targeted(config, NAMES[3])
