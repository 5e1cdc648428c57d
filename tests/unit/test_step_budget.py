"""The adaptive prompt budget (``max_decode_slowdown``): it learns a decode-only step's cost and a
prompt token's from the steps it is shown, and keeps mixed steps within the slowdown asked for,
whether tokens are dear (a CPU) or nearly free (a bandwidth-bound GPU step), and on noisy steps."""

from __future__ import annotations

import random
import statistics

import pytest

from gateway.step_budget import StepBudget


def run(budget: StepBudget, cost, steps: int = 200) -> list[tuple[int, float]]:
    """Drive ``budget`` through ``steps`` steps that all have decoding rows and a prompt pending;
    ``cost(tokens)`` is a step's time. Returns (prompt tokens, seconds) of each step."""
    seen = []
    for _ in range(steps):
        tokens = budget.tokens()
        seconds = cost(tokens)
        budget.observe(tokens, seconds)
        seen.append((tokens, seconds))
    return seen


def test_fixed_budget_is_max_step_tokens_whatever_the_steps_cost():
    budget = StepBudget(256)
    assert [k for k, _ in run(budget, lambda k: 0.1 + 0.01 * k, steps=5)] == [256] * 5
    assert budget.estimate() == 256 and budget.decode_seconds is None


@pytest.mark.parametrize(("decode", "per_token", "slowdown", "expected"), [
    (0.150, 0.003, 1.10, 10),      # two CPU cores, SmolLM2: a few tokens a step
    (0.010, 0.000002, 1.10, 256),  # a bandwidth-bound GPU step: the whole max_step_tokens
    (0.100, 0.010, 1.26, 5),
])
def test_adaptive_budget_settles_where_the_slowdown_allows(decode, per_token, slowdown, expected):
    budget = StepBudget(256, slowdown)
    seen = run(budget, lambda k: decode + per_token * k)
    assert seen[0][0] == 0  # nothing known yet: a decode-only step is measured first
    assert seen[1][0] == StepBudget.PROBE_TOKENS  # then a probe gives a token's cost
    settled = seen[20:]
    assert {k for k, _ in settled if k} == {expected}
    # mixed steps take twice the allowance, the decode-only steps between them none: the mean
    # step stays within the slowdown
    assert sum(s for _, s in settled) / len(settled) <= slowdown * decode + 1e-9


def test_steps_alternate_while_the_budget_binds_and_thin_out_when_it_does_not():
    binding = [k for k, _ in run(StepBudget(64, 1.1), lambda k: 0.1 + 0.001 * k, steps=60)]
    assert binding[10:20] == [0, 20] * 5 or binding[10:20] == [20, 0] * 5
    free = [k for k, _ in run(StepBudget(64, 1.5), lambda k: 0.1 + 0.00001 * k, steps=100)]
    zeros = [i for i, k in enumerate(free) if k == 0]
    assert {b - a for a, b in zip(zeros[2:], zeros[3:], strict=False)} == {StepBudget.SPARSE_EVERY}


def test_the_budget_follows_the_decode_step_as_it_gets_dearer():
    """Rows join: a decode-only step doubles. The decode-only steps see it, and the allowance (a
    share of it) doubles the budget; stale, it would keep the old one."""
    budget = StepBudget(256, 1.2)
    run(budget, lambda k: 0.1 + 0.0039 * k, steps=100)
    assert budget.estimate() == 10
    run(budget, lambda k: 0.2 + 0.0039 * k, steps=100)
    assert budget.estimate() == 20


def test_slow_drift_of_the_machine_does_not_skew_the_price():
    """The machine slows by half over the run (load elsewhere): each mixed step is priced against
    the decode-only step just before it, so the drift does not read as prompt-token cost."""
    budget = StepBudget(256, 1.1)
    clock = [0]

    def cost(k):
        clock[0] += 1
        return (0.1 + 0.001 * k) * (1 + clock[0] / 400)

    run(budget, cost, steps=200)
    assert 18 <= budget.estimate() <= 30  # 20 at the start, 30 at the end: the decode step grew by half


def test_a_prompt_always_moves_on_and_noise_never_divides_by_zero():
    budget = StepBudget(32, 1.01)
    run(budget, lambda k: 0.1 + 0.05 * k, steps=30)  # one token costs half a step: still one a step
    assert budget.estimate() == 1 and budget.tokens() in (0, 1)
    budget = StepBudget(32, 1.5)
    run(budget, lambda k: 0.1, steps=30)  # prompt tokens measured free (or faster: noise)
    assert budget.estimate() == 32


def test_a_probe_read_as_free_only_doubles_the_next_step():
    """The probe's step came out faster than the decode-only one before it (noise): the next
    mixed step may carry twice the probe, not max_tokens, and the budget grows only as fast."""
    budget = StepBudget(256, 1.1)
    budget.observe(0, 0.30)
    assert budget.tokens() == StepBudget.PROBE_TOKENS
    budget.observe(StepBudget.PROBE_TOKENS, 0.29)
    assert budget.estimate() == 2 * StepBudget.PROBE_TOKENS


def test_one_noisy_step_barely_moves_the_budget():
    """A one-token step that happened to take half a step longer (the machine was busy) prices
    that token at 50 ms; as one step's own price it would drop the budget to one token for good."""
    budget = StepBudget(256, 1.1)
    run(budget, lambda k: 0.1 + 0.001 * k, steps=80)
    settled = budget.estimate()
    assert settled == 20
    budget.observe(0, 0.1)
    budget.observe(1, 0.15)
    assert budget.estimate() >= settled * 0.8


def test_noise_around_a_cost_model_keeps_the_mean_step_near_the_slowdown():
    """Steps swing by +-15% at random around 0.1 s + 1 ms a prompt token: the mean step stays near
    1.1x the decode-only step and the budget near the twenty tokens that allow it."""
    rng = random.Random(7)
    budget = StepBudget(256, 1.1)
    seen = run(budget, lambda k: (0.1 + 0.001 * k) * rng.uniform(0.85, 1.15), steps=2000)
    assert 1.0 <= sum(s for _, s in seen[100:]) / len(seen[100:]) / 0.1 <= 1.2
    assert 12 <= statistics.median(k for k, _ in seen[100:] if k) <= 30


@pytest.mark.parametrize(("max_tokens", "slowdown"), [(0, None), (8, 1.0), (8, 0.5)])
def test_nonsense_settings_are_refused(max_tokens, slowdown):
    with pytest.raises(ValueError):
        StepBudget(max_tokens, slowdown)
