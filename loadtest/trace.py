"""The S-LoRA workload as a list of requests, and the statistics reported over its results.
Pure Python (no torch): the same seed gives the same trace.

Popularity: request i goes to adapter ``floor(n * X)``, ``X ~ power(alpha)`` on [0, 1) (density
``alpha * x**(alpha - 1)``): alpha = 1 is uniform, a smaller alpha sends more requests to the low
indices. Arrivals are a Poisson process of rate R (exponential gaps of mean 1/R). Input and output
lengths are uniform in their ranges; outputs are generated to exactly their length (EOS ignored).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass


@dataclass(frozen=True)
class TraceRequest:
    arrival_s: float  # seconds after the start
    adapter: int  # index into the adapter list
    input_tokens: int
    output_tokens: int


def power_index(n: int, alpha: float, rng: random.Random) -> int:
    """``floor(n * X)`` with ``X ~ power(alpha)`` (inverse CDF: ``X = U ** (1 / alpha)``)."""
    x = rng.random() ** (1.0 / alpha)
    return min(n - 1, math.floor(n * x))


def make_trace(*, n_adapters: int, alpha: float, rate: float, requests: int, input_range: tuple[int, int],
               output_range: tuple[int, int], seed: int = 0) -> list[TraceRequest]:
    if n_adapters < 1 or alpha <= 0 or rate <= 0 or requests < 1:
        raise ValueError("need n_adapters >= 1, alpha > 0, rate > 0 and requests >= 1")
    for low, high in (input_range, output_range):
        if not 1 <= low <= high:
            raise ValueError(f"invalid length range {low}..{high}")
    rng = random.Random(seed)
    trace, clock = [], 0.0
    for _ in range(requests):
        clock += rng.expovariate(rate)
        trace.append(TraceRequest(arrival_s=clock, adapter=power_index(n_adapters, alpha, rng),
                                  input_tokens=rng.randint(*input_range), output_tokens=rng.randint(*output_range)))
    return trace


def percentile(values: list[float], q: float) -> float:
    """Linear-interpolated percentile, ``q`` in [0, 100]."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100.0
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def summarize(timings: list, wall_s: float) -> dict:
    """Throughput and latency figures of finished requests (objects with ``ttft_s``,
    ``latency_s`` and ``tokens``) that took ``wall_s`` seconds from first arrival to last answer."""
    tokens = sum(t.tokens for t in timings)
    ttfts = [t.ttft_s for t in timings if t.ttft_s is not None]
    latencies = [t.latency_s for t in timings]
    return {
        "requests": len(timings), "tokens": tokens, "wall_s": round(wall_s, 3),
        "tokens_per_s": round(tokens / wall_s, 2) if wall_s > 0 else None,
        "requests_per_s": round(len(timings) / wall_s, 3) if wall_s > 0 else None,
        "ttft_p50_s": round(percentile(ttfts, 50), 4), "ttft_p99_s": round(percentile(ttfts, 99), 4),
        "latency_p50_s": round(percentile(latencies, 50), 4), "latency_p99_s": round(percentile(latencies, 99), 4),
    }
