"""The batched sampler: poison values are normalized or refused, a row with unusable logits fails
alone, and vectorizing rows changes nobody's tokens (a seeded row is its own, wherever it sits)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.sampling import (
    GREEDY_TEMPERATURE, MIN_TOP_P, RowFailure, SamplingParams, SamplingValueError, choose_tokens,
    make_generator, nucleus_probs,
)

CPU = torch.device("cpu")


def logits_for(rows: int, vocab: int = 64, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, vocab, generator=torch.Generator().manual_seed(seed)) * 3


def params(**values) -> SamplingParams:
    return SamplingParams(max_tokens=1, **values)


# ---- poison values ------------------------------------------------------------------------------

@pytest.mark.parametrize("temperature", [1e-300, 5e-324, 1e-40, GREEDY_TEMPERATURE / 2])
def test_vanishing_temperature_is_greedy(temperature):
    p = params(temperature=temperature)
    assert p.greedy and p.temperature == 0.0
    logits = logits_for(3)
    out = choose_tokens(logits, [p, params(temperature=1.0, seed=1), p], [None, make_generator(1, CPU), None])
    assert out[0] == int(logits[0].argmax()) and out[2] == int(logits[2].argmax())
    assert isinstance(out[1], int)


@pytest.mark.parametrize("top_p", [5e-324, 1e-300, 1e-30, MIN_TOP_P / 10])
def test_vanishing_top_p_keeps_the_top_token(top_p):
    p = params(temperature=1.0, top_p=top_p)
    assert p.top_p == MIN_TOP_P
    logits = logits_for(4, seed=1)
    gens = [make_generator(s, CPU) for s in range(4)]
    for _ in range(5):
        assert choose_tokens(logits, [p] * 4, gens) == logits.argmax(-1).tolist()


@pytest.mark.parametrize("values, param", [
    ({"temperature": math.nan}, "temperature"), ({"temperature": math.inf}, "temperature"),
    ({"temperature": -0.5}, "temperature"), ({"temperature": 2.5}, "temperature"),
    ({"top_p": 0.0}, "top_p"), ({"top_p": math.nan}, "top_p"), ({"top_p": 1.5}, "top_p"),
    ({"top_p": -1e-300}, "top_p"),
    ({"repetition_penalty": 5e-324}, "repetition_penalty"), ({"repetition_penalty": 0.0}, "repetition_penalty"),
    ({"repetition_penalty": 0.099}, "repetition_penalty"), ({"repetition_penalty": 10.5}, "repetition_penalty"),
])
def test_out_of_range_values_are_refused(values, param):
    with pytest.raises(SamplingValueError) as caught:
        params(**values)
    assert caught.value.param == param


# ---- a bad row fails alone ----------------------------------------------------------------------

@pytest.mark.parametrize("poison", ["nan", "posinf", "all_neginf"])
@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_unusable_logits_fail_only_their_row(poison, temperature):
    logits = logits_for(4, seed=2)
    alone = [choose_tokens(logits[i:i + 1], [params(temperature=temperature, seed=i)],
                           [make_generator(i, CPU)])[0] for i in range(4)]
    bad = logits.clone()
    if poison == "nan":
        bad[1, 5] = math.nan
    elif poison == "posinf":
        bad[1, 7] = math.inf
    else:
        bad[1] = -math.inf
    out = choose_tokens(bad, [params(temperature=temperature, seed=i) for i in range(4)],
                        [make_generator(i, CPU) for i in range(4)])
    assert isinstance(out[1], RowFailure) and "non-finite" in out[1].message
    assert [out[i] for i in (0, 2, 3)] == [alone[i] for i in (0, 2, 3)]


def test_some_negative_infinity_only_masks_tokens():
    logits = logits_for(2, seed=3)
    logits[:, :60] = -math.inf
    out = choose_tokens(logits, [params(temperature=0.0), params(temperature=1.0)], [None, None])
    assert all(isinstance(t, int) and t >= 60 for t in out)


def test_huge_finite_logits_are_sampled_not_failed():
    logits = logits_for(2, seed=4) * 1e37  # finite, but logits / 0.5 overflow float32
    out = choose_tokens(logits, [params(temperature=0.5, seed=0), params(temperature=0.0)],
                        [make_generator(0, CPU), None])
    assert isinstance(out[1], int)
    assert isinstance(out[0], (int, RowFailure))  # whichever: only this row is concerned


# ---- vectorized rows are each their own ---------------------------------------------------------

@settings(max_examples=40, deadline=None)
@given(rows=st.integers(1, 6), seed=st.integers(0, 1000), order=st.permutations(range(6)),
       temps=st.lists(st.sampled_from([0.0, 0.3, 1.0, 1.7]), min_size=6, max_size=6),
       top_ps=st.lists(st.sampled_from([1.0, 0.9, 0.3, 1e-6]), min_size=6, max_size=6))
def test_seeded_row_is_independent_of_its_neighbours(rows, seed, order, temps, top_ps):
    logits = logits_for(6, seed=seed)
    ps = [params(temperature=temps[i], top_p=top_ps[i], seed=seed + i) for i in range(6)]
    alone = [choose_tokens(logits[i:i + 1], [ps[i]], [make_generator(seed + i, CPU)])[0] for i in range(6)]
    picked = [i for i in order if i < rows]
    together = choose_tokens(logits[picked], [ps[i] for i in picked],
                             [make_generator(seed + i, CPU) for i in picked])
    assert together == [alone[i] for i in picked]


def test_nucleus_is_the_smallest_prefix_reaching_top_p():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05], [0.05, 0.15, 0.3, 0.5], [0.25] * 4]))
    probs = nucleus_probs(logits, torch.tensor([1.0, 1.0, 1.0]), torch.tensor([0.7, 0.85, 1.0]))
    assert (probs[0] > 0).tolist() == [True, True, False, False]
    assert (probs[1] > 0).tolist() == [False, True, True, True]
    assert (probs[2] > 0).all()


def test_unseeded_rows_follow_their_distribution():
    torch.manual_seed(0)
    logits = torch.log(torch.tensor([[0.6, 0.3, 0.1, 1e-9]] * 400))
    out = choose_tokens(logits, [params(temperature=1.0, top_p=0.85)] * 400, [None] * 400)
    counts = [out.count(t) for t in range(4)]
    assert counts[2] == counts[3] == 0  # outside the nucleus
    assert 200 < counts[0] < 280 and 120 < counts[1] < 200  # 2/3 and 1/3 of 400, wide margins
