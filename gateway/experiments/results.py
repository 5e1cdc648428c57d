"""Per-arm results of an experiment and the comparison of each arm with the control (pure code:
the numbers in, a JSON-ready dict out).

Counts, tokens, feedback and the tests cover every request and feedback of the running phase (the
store's per-arm totals); latency and time-to-first-token percentiles cover each arm's latest
``store.TIMING_SAMPLE`` requests among those the store keeps (``timing_sample`` says how many), so a
call costs the same however long the experiment ran.
"""

from __future__ import annotations

import math
from typing import Any

from gateway.experiments.stats import (
    mean_ci, percentile, proportion_ci, two_proportion_z_test, verdict, welch_t_test,
)
from gateway.experiments.store import ArmData, Experiment

CONFIDENCE = 0.95
ALPHA = 1.0 - CONFIDENCE


def _quantiles(values: list[float]) -> dict[str, float | None]:
    return {"p50": percentile(values, 50), "p95": percentile(values, 95)}


def _interval(low: float | None, high: float | None) -> list[float] | None:
    return None if low is None or high is None else [low, high]


def arm_summary(name: str, weight: float, share: float, data: ArmData) -> dict[str, Any]:
    score, score_low, score_high = mean_ci(data.scores, CONFIDENCE)
    rated = data.thumbs_up + data.thumbs_down
    positive, positive_low, positive_high = proportion_ci(data.thumbs_up, rated, CONFIDENCE)
    return {
        "arm": name, "weight": weight, "share": share,
        "requests": data.requests, "errors": data.errors, "cancelled": data.cancelled,
        "error_rate": data.errors / data.requests if data.requests else None,
        "timing_sample": data.timing_sample,
        "ttft_seconds": _quantiles(data.ttft_s),
        "latency_seconds": _quantiles(data.latency_s),
        "tokens": {"prompt": data.prompt_tokens, "completion": data.completion_tokens},
        "feedback": {
            "count": data.feedback,
            "score": {"count": data.scores.count, "mean": score, "ci95": _interval(score_low, score_high)},
            "thumbs": {"up": data.thumbs_up, "down": data.thumbs_down, "positive_rate": positive,
                       "ci95": _interval(positive_low, positive_high)},
        },
    }


def compare(arm: str, control: str, treated: ArmData, base: ArmData, min_samples: int) -> dict[str, Any]:
    """``arm`` against ``control``: thumbs by a two-proportion z test, scores by Welch's t test."""
    n_arm, n_control = treated.thumbs_up + treated.thumbs_down, base.thumbs_up + base.thumbs_down
    z, p_thumbs = two_proportion_z_test(treated.thumbs_up, n_arm, base.thumbs_up, n_control)
    thumbs_effect = treated.thumbs_up / n_arm - base.thumbs_up / n_control if n_arm and n_control else None
    t, dof, p_score = welch_t_test(treated.scores, base.scores)
    score_effect = (treated.scores.mean - base.scores.mean
                    if treated.scores.mean is not None and base.scores.mean is not None else None)

    def words(p_value: float | None, n_c: int, n_a: int, effect: float | None) -> str:
        return verdict(p_value, n_c, n_a, effect or 0.0, treatment=arm, control=control,
                       min_samples=min_samples, alpha=ALPHA)

    return {
        "arm": arm, "control": control,
        "thumbs": {"difference": thumbs_effect, "z": z, "p_value": p_thumbs,
                   "verdict": words(p_thumbs, n_control, n_arm, thumbs_effect)},
        "score": {"difference": score_effect, "t": t, "dof": dof, "p_value": p_score,
                  "verdict": words(p_score, base.scores.count, treated.scores.count, score_effect)},
    }


def experiment_results(experiment: Experiment, data: dict[str, ArmData], min_samples: int) -> dict[str, Any]:
    total = math.fsum(arm.weight for arm in experiment.arms)
    per_arm = {arm.name: data.get(arm.name, ArmData()) for arm in experiment.arms}
    control = experiment.control
    return {
        "object": "experiment.results", "experiment": experiment.name, "state": experiment.state,
        "winner": experiment.winner, "control": control, "confidence": CONFIDENCE, "min_samples": min_samples,
        "arms": [arm_summary(arm.name, arm.weight, arm.weight / total, per_arm[arm.name])
                 for arm in experiment.arms],
        "comparisons": [compare(arm.name, control, per_arm[arm.name], per_arm[control], min_samples)
                        for arm in experiment.arms[1:]],
    }
