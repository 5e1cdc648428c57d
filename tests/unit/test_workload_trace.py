"""The S-LoRA trace generator and the statistics of the load tests (pure Python)."""

from __future__ import annotations

import random
from dataclasses import dataclass

import pytest

from loadtest.trace import make_trace, percentile, power_index, summarize


def trace(**overrides):
    options = {"n_adapters": 8, "alpha": 1.0, "rate": 4.0, "requests": 2000, "input_range": (8, 32),
               "output_range": (4, 16), "seed": 3, **overrides}
    return make_trace(**options)


def test_same_seed_same_trace_other_seed_other_trace():
    assert trace() == trace()
    assert trace() != trace(seed=4)


def test_lengths_in_range_and_arrivals_increasing():
    requests = trace()
    assert all(8 <= r.input_tokens <= 32 and 4 <= r.output_tokens <= 16 for r in requests)
    assert {r.input_tokens for r in requests} == set(range(8, 33))  # both ends are reachable
    arrivals = [r.arrival_s for r in requests]
    assert all(b > a for a, b in zip(arrivals, arrivals[1:]))
    # Poisson at rate 4: 2000 arrivals take about 500 s (a 5-sigma band is about +-56 s)
    assert 440 < arrivals[-1] < 560


@pytest.mark.parametrize(("alpha", "low", "high"), [
    (1.0, 0.10, 0.15),  # uniform: each of 8 adapters gets 1/8
    (0.5, 0.30, 0.40),  # P(X < 1/8) = (1/8) ** 0.5 = 0.354
    (0.1, 0.78, 0.85),  # (1/8) ** 0.1 = 0.812
])
def test_popularity_of_adapter_zero(alpha, low, high):
    requests = trace(alpha=alpha, requests=4000)
    share = sum(r.adapter == 0 for r in requests) / len(requests)
    assert low < share < high
    assert {r.adapter for r in requests} <= set(range(8))


def test_power_index_stays_in_range():
    rng = random.Random(0)
    assert {power_index(3, 2.0, rng) for _ in range(500)} == {0, 1, 2}
    assert power_index(1, 0.3, rng) == 0


@pytest.mark.parametrize("bad", [{"n_adapters": 0}, {"alpha": 0}, {"rate": -1}, {"requests": 0},
                                 {"input_range": (5, 4)}, {"output_range": (0, 3)}])
def test_invalid_parameters_refused(bad):
    with pytest.raises(ValueError):
        trace(**bad)


def test_percentile_interpolates():
    assert percentile([3.0, 1.0, 2.0, 4.0], 50) == 2.5
    assert percentile([1.0, 2.0, 3.0], 0) == 1.0 and percentile([1.0, 2.0, 3.0], 100) == 3.0
    assert percentile([5.0], 99) == 5.0


@dataclass
class Done:
    ttft_s: float | None
    latency_s: float
    tokens: int


def test_summarize():
    summary = summarize([Done(0.1, 1.0, 10), Done(0.3, 2.0, 30), Done(None, 3.0, 0)], wall_s=4.0)
    assert summary["tokens"] == 40 and summary["tokens_per_s"] == 10.0
    assert summary["requests_per_s"] == 0.75
    assert summary["ttft_p50_s"] == 0.2 and summary["latency_p50_s"] == 2.0
    assert summary["latency_p99_s"] == pytest.approx(2.98)
