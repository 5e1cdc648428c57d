"""Sticky A/B assignment: determinism, split accuracy, and minimal movement on re-weighting."""

from __future__ import annotations

import math
import random

import pytest

from gateway.experiments.assignment import (
    Arm,
    assign_arm,
    assign_per_request,
    subject_point,
    validate_weights,
)

SUBJECTS = [f"user-{i}" for i in range(10_000)]


def _split(arms: list[Arm], experiment: str = "exp", salt: str = "s1") -> dict[str, float]:
    counts = {arm.name: 0 for arm in arms}
    for subject in SUBJECTS:
        counts[assign_arm(experiment, salt, subject, arms).name] += 1
    return {name: count / len(SUBJECTS) for name, count in counts.items()}


# Pinned values: if these change, every running experiment silently reshuffles its users.
@pytest.mark.parametrize(
    "subject, expected",
    [
        ("user-1", 0.23463198009080938),
        ("user-2", 0.37326989356956464),
        ("key-abc", 0.11532574141947952),
    ],
)
def test_subject_point_is_pinned(subject: str, expected: float) -> None:
    assert subject_point("exp-a", "salt-1", subject) == expected


def test_subject_point_range_and_repeatability() -> None:
    points = [subject_point("exp", "s", subject) for subject in SUBJECTS[:2000]]
    assert all(0.0 <= p < 1.0 for p in points)
    assert points == [subject_point("exp", "s", subject) for subject in SUBJECTS[:2000]]


@pytest.mark.parametrize(
    "left, right",
    [
        (("ab", "c", "d"), ("a", "bc", "d")),  # boundaries must not be ambiguous
        (("a", "b", "c"), ("a", "b", "c ")),
        (("exp1", "s", "u"), ("exp2", "s", "u")),  # experiments are independent
        (("exp", "s1", "u"), ("exp", "s2", "u")),  # a new salt reshuffles
    ],
)
def test_subject_point_distinguishes_inputs(left: tuple, right: tuple) -> None:
    assert subject_point(*left) != subject_point(*right)


def test_assignment_is_deterministic() -> None:
    arms = [Arm("base", 0.5), Arm("lora-a", 0.5)]
    first = [assign_arm("exp", "s1", s, arms) for s in SUBJECTS[:1000]]
    again = [assign_arm("exp", "s1", s, list(arms)) for s in SUBJECTS[:1000]]
    assert first == again


@pytest.mark.parametrize(
    "weights",
    [
        {"base": 0.7, "lora-a": 0.3},
        {"base": 7, "lora-a": 3},  # weights are relative, not fractions
        {"base": 0.5, "lora-a": 0.3, "lora-b": 0.2},
        {"base": 1, "lora-a": 1, "lora-b": 1, "lora-c": 1},
    ],
)
@pytest.mark.parametrize("experiment, salt", [("exp", "s1"), ("other", "")])
def test_split_matches_weights_within_two_points(
    weights: dict[str, float], experiment: str, salt: str
) -> None:
    arms = [Arm(name, weight) for name, weight in weights.items()]
    total = sum(weights.values())
    shares = _split(arms, experiment, salt)
    for name, weight in weights.items():
        assert abs(shares[name] - weight / total) <= 0.02, (name, shares)


def test_reweighting_moves_only_the_shrinking_slice() -> None:
    before_arms = [Arm("base", 70), Arm("lora-a", 30)]
    after_arms = [Arm("base", 50), Arm("lora-a", 50)]
    moved = 0
    for subject in SUBJECTS:
        before = assign_arm("exp", "s1", subject, before_arms).name
        after = assign_arm("exp", "s1", subject, after_arms).name
        point = subject_point("exp", "s1", subject)
        if before != after:
            moved += 1
            assert (before, after) == ("base", "lora-a")
        assert (before != after) == (0.5 <= point < 0.7)
    assert 0.18 <= moved / len(SUBJECTS) <= 0.22


@pytest.mark.parametrize(
    "weights, allowed",
    [
        ({"a": 0, "b": 1, "c": 0}, {"b"}),
        ({"a": 0, "b": 1}, {"b"}),
        ({"a": 1, "b": 0}, {"a"}),
        ({"a": 1, "b": 0, "c": 1}, {"a", "c"}),
    ],
)
def test_zero_weight_arms_are_never_chosen(weights: dict[str, float], allowed: set[str]) -> None:
    arms = [Arm(name, weight) for name, weight in weights.items()]
    sticky = {assign_arm("exp", "s", s, arms).name for s in SUBJECTS[:3000]}
    rng = random.Random(7)
    per_request = {assign_per_request(arms, rng).name for _ in range(3000)}
    assert sticky == allowed
    assert per_request == allowed


@pytest.mark.parametrize(
    "arms, message",
    [
        ([], "at least 2 arms"),
        ([Arm("a", 1)], "at least 2 arms"),
        ([Arm("a", 1), Arm("a", 2)], "duplicate"),
        ([Arm("a", 1), Arm("b", -0.1)], ">= 0"),
        ([Arm("a", 1), Arm("b", math.nan)], "finite"),
        ([Arm("a", 1), Arm("b", math.inf)], "finite"),
        ([Arm("a", 0), Arm("b", 0)], "more than 0"),
        ([Arm("a", 1), Arm("b", "2")], "number"),  # type: ignore[arg-type]
    ],
)
def test_validate_weights_refuses(arms: list[Arm], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        validate_weights(arms)
    with pytest.raises(ValueError):
        assign_arm("exp", "s", "user", arms)


def test_validate_weights_accepts_zero_weight_arm() -> None:
    validate_weights([Arm("a", 0), Arm("b", 2.5)])


def test_per_request_is_reproducible_with_seeded_rng_and_follows_weights() -> None:
    arms = [Arm("base", 0.7), Arm("lora-a", 0.3)]
    first = [assign_per_request(arms, random.Random(42)).name for _ in range(5)]
    assert len(set(first)) == 1
    rng_a, rng_b = random.Random(1), random.Random(1)
    draws = [assign_per_request(arms, rng_a).name for _ in range(10_000)]
    assert draws == [assign_per_request(arms, rng_b).name for _ in range(10_000)]
    assert abs(draws.count("base") / len(draws) - 0.7) <= 0.02
    assert assign_per_request(arms).name in {"base", "lora-a"}  # default generator works
