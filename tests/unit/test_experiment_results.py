"""Per-arm results and arm-vs-control comparisons, checked against scipy on fixed data."""

from __future__ import annotations

import math

import pytest
from scipy import stats as scipy_stats

from gateway.experiments.assignment import Arm
from gateway.experiments.results import experiment_results
from gateway.experiments.stats import Moments
from gateway.experiments.store import ArmData, Experiment


def experiment(*arms: tuple[str, float], state: str = "running") -> Experiment:
    return Experiment(name="exp", salt="s", arms=[Arm(n, w) for n, w in arms], stickiness="user",
                      subject_header=None, state=state, created=0.0, updated=0.0)


CONTROL_SCORES = [3.0, 4.0, 2.0, 5.0, 3.0, 4.0, 3.0, 2.0, 4.0, 3.0] * 4
TREATED_SCORES = [4.0, 5.0, 4.0, 5.0, 3.0, 5.0, 4.0, 4.0, 5.0, 4.0] * 4


def test_arm_summaries_and_comparison_match_scipy():
    control = ArmData(requests=50, errors=2, cancelled=1, prompt_tokens=500, completion_tokens=250,
                      ttft_s=[0.1, 0.2, 0.3, 0.4], latency_s=[1.0, 2.0, 3.0, 4.0, 10.0], feedback=45,
                      scores=Moments.of(CONTROL_SCORES), thumbs_up=20, thumbs_down=20)
    treated = ArmData(requests=40, errors=0, prompt_tokens=400, completion_tokens=100, ttft_s=[0.5],
                      latency_s=[2.0], feedback=42, scores=Moments.of(TREATED_SCORES), thumbs_up=32, thumbs_down=8)
    results = experiment_results(experiment(("base", 3), ("lora-a", 1)), {"base": control, "lora-a": treated},
                                 min_samples=30)

    base, lora = results["arms"]
    assert (base["arm"], base["share"], lora["share"]) == ("base", 0.75, 0.25)
    assert (base["requests"], base["errors"], base["cancelled"], base["error_rate"]) == (50, 2, 1, 0.04)
    assert base["tokens"] == {"prompt": 500, "completion": 250}
    assert base["ttft_seconds"]["p50"] == pytest.approx(0.25)
    assert base["latency_seconds"]["p95"] == pytest.approx(float(scipy_stats.scoreatpercentile(
        [1.0, 2.0, 3.0, 4.0, 10.0], 95)))
    mean = sum(CONTROL_SCORES) / len(CONTROL_SCORES)
    low, high = scipy_stats.t.interval(0.95, len(CONTROL_SCORES) - 1, loc=mean,
                                       scale=scipy_stats.sem(CONTROL_SCORES))
    assert base["feedback"]["score"]["mean"] == pytest.approx(mean)
    assert base["feedback"]["score"]["ci95"] == pytest.approx([low, high])
    thumbs = lora["feedback"]["thumbs"]
    assert (thumbs["up"], thumbs["down"], thumbs["positive_rate"]) == (32, 8, 0.8)
    wilson = scipy_stats.binomtest(32, 40).proportion_ci(0.95, method="wilson")
    assert thumbs["ci95"] == pytest.approx([wilson.low, wilson.high])

    (comparison,) = results["comparisons"]
    assert (comparison["arm"], comparison["control"]) == ("lora-a", "base")
    welch = scipy_stats.ttest_ind(TREATED_SCORES, CONTROL_SCORES, equal_var=False)
    assert comparison["score"]["t"] == pytest.approx(welch.statistic, rel=1e-9)
    assert comparison["score"]["p_value"] == pytest.approx(welch.pvalue, rel=1e-6)
    pooled = 52 / 80
    z = (0.8 - 0.5) / math.sqrt(pooled * (1 - pooled) * (1 / 40 + 1 / 40))
    assert comparison["thumbs"]["z"] == pytest.approx(z)
    assert comparison["thumbs"]["p_value"] == pytest.approx(2 * scipy_stats.norm.sf(z))
    assert comparison["thumbs"]["difference"] == pytest.approx(0.3)
    assert comparison["thumbs"]["verdict"].startswith("lora-a better than base")
    assert comparison["score"]["verdict"].startswith("lora-a better than base")


def test_small_samples_say_not_enough_data_yet():
    control = ArmData(requests=3, feedback=3, scores=Moments.of([1.0, 2.0, 3.0]), thumbs_up=1, thumbs_down=2)
    treated = ArmData(requests=3, feedback=3, scores=Moments.of([3.0, 4.0, 5.0]), thumbs_up=3)
    results = experiment_results(experiment(("base", 1), ("lora-a", 1)), {"base": control, "lora-a": treated},
                                 min_samples=30)
    (comparison,) = results["comparisons"]
    assert comparison["thumbs"]["verdict"].startswith("not enough data yet")
    assert comparison["score"]["verdict"].startswith("not enough data yet")
    assert comparison["score"]["p_value"] is not None  # the numbers are still shown


def test_arms_without_data_report_zeros_and_nones():
    results = experiment_results(experiment(("base", 1), ("lora-a", 1), ("ia3-a", 0)), {}, min_samples=30)
    assert [arm["arm"] for arm in results["arms"]] == ["base", "lora-a", "ia3-a"]
    empty = results["arms"][2]
    assert (empty["requests"], empty["errors"], empty["error_rate"], empty["share"]) == (0, 0, None, 0.0)
    assert empty["latency_seconds"] == {"p50": None, "p95": None}
    assert empty["feedback"]["score"] == {"count": 0, "mean": None, "ci95": None}
    assert [c["arm"] for c in results["comparisons"]] == ["lora-a", "ia3-a"]
    assert results["comparisons"][0]["thumbs"]["p_value"] is None
    assert results["comparisons"][0]["score"]["verdict"].startswith("not enough data yet")
