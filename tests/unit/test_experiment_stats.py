"""Experiment statistics (distributions from scipy), pinned against scipy/numpy on fixed data."""

from __future__ import annotations

import random

import numpy as np
import pytest
from scipy import special
from scipy import stats as sp

from gateway.experiments import stats

REL = 1e-9


def close(expected: float, abs_tol: float = 1e-15):
    return pytest.approx(expected, rel=REL, abs=abs_tol)


def _sample(seed: int, n: int, mu: float, sigma: float) -> list[float]:
    rng = random.Random(seed)
    return [rng.gauss(mu, sigma) for _ in range(n)]


LATENCY_A = [212.0, 198.5, 240.1, 205.3, 221.9, 199.0, 230.4, 215.7, 208.8, 226.2]
LATENCY_B = [190.2, 185.0, 201.7, 179.9, 210.3, 188.8, 195.5]

T_TEST_CASES = [
    (LATENCY_A, LATENCY_B),
    (LATENCY_B, LATENCY_A),
    ([1.0, 2.0], [1.5, 2.5, 3.5]),
    ([1.0, 2.0, 3.0], [1.0, 2.0, 3.0]),  # identical: t = 0, p = 1
    ([5.0, 5.0, 5.0], [1.0, 2.0, 3.0, 4.0]),  # one side without variance
    (_sample(1, 40, 100, 15), _sample(2, 55, 108, 30)),
    (_sample(3, 500, 0.30, 0.1), _sample(4, 800, 0.31, 0.2)),
    (_sample(5, 1000, 10, 1), _sample(6, 1000, 11, 1)),  # p around 1e-100
    (_sample(7, 3, 1e6, 1), _sample(8, 200, 1e6 + 2, 5)),
]


@pytest.mark.filterwarnings("ignore:Precision loss:RuntimeWarning")  # scipy, on [5, 5, 5]
@pytest.mark.parametrize("a, b", T_TEST_CASES)
def test_welch_t_test_matches_scipy(a: list[float], b: list[float]) -> None:
    expected = sp.ttest_ind(a, b, equal_var=False)
    t, dof, p = stats.welch_t_test(a, b)
    assert t == close(expected.statistic, 1e-12)
    assert dof == close(expected.df)
    assert p == close(expected.pvalue, 1e-300)


def test_welch_t_test_of_tiny_variances_is_defined() -> None:
    """Scores 0 and 1e-84 (finite, within what feedback takes) beside a side without variance:
    the variances' squares underflow to 0, and the degrees of freedom were 0 / 0 (a 500 from the
    results route). The test does not depend on the scale: scipy's answer for 0 and 1 (at 1e-84
    scipy's own degrees of freedom break down too)."""
    t, dof, p = stats.welch_t_test([0.0, 0.0, 0.0], [0.0, 1e-84, 0.0, 1e-84])
    expected = sp.ttest_ind([0.0, 0.0, 0.0], [0.0, 1.0, 0.0, 1.0], equal_var=False)
    assert t == close(expected.statistic, 1e-12) and dof == close(expected.df) and p == close(expected.pvalue)


@pytest.mark.parametrize(
    "a, b",
    [([], [1.0, 2.0]), ([1.0], [1.0, 2.0]), ([1.0, 2.0], [3.0]), ([2.0, 2.0], [3.0, 3.0, 3.0])],
)
def test_welch_t_test_degenerate_returns_none(a: list[float], b: list[float]) -> None:
    assert stats.welch_t_test(a, b) == (None, None, None)


DOFS = [1, 2, 3, 4.5, 10, 29.7, 100, 1000, 1e5]


@pytest.mark.parametrize("dof", DOFS)
@pytest.mark.parametrize("t", [-60.0, -7.5, -2.1, -0.3, 0.0, 0.01, 1.0, 2.5, 12.0, 300.0])
def test_t_cdf_matches_scipy(dof: float, t: float) -> None:
    assert stats.t_cdf(t, dof) == close(sp.t.cdf(t, dof), 1e-300)
    assert stats.t_sf(t, dof) == close(sp.t.sf(t, dof), 1e-300)
    assert stats.t_two_sided_p(t, dof) == close(min(1.0, 2 * sp.t.sf(abs(t), dof)), 1e-300)


@pytest.mark.parametrize("dof", DOFS)
@pytest.mark.parametrize("p", [1e-10, 1e-4, 0.025, 0.05, 0.3, 0.5, 0.8, 0.975, 0.995, 1 - 1e-9])
def test_t_ppf_matches_scipy(dof: float, p: float) -> None:
    assert stats.t_ppf(p, dof) == close(sp.t.ppf(p, dof))


@pytest.mark.parametrize("z", [-38.0, -8.0, -1.96, -0.5, 0.0, 0.25, 1.0, 3.0, 9.0])
def test_norm_cdf_matches_scipy(z: float) -> None:
    assert stats.norm_cdf(z) == close(sp.norm.cdf(z), 1e-300)
    assert stats.norm_sf(z) == close(sp.norm.sf(z), 1e-300)
    assert stats.t_cdf(z, float("inf")) == close(sp.norm.cdf(z), 1e-300)


@pytest.mark.parametrize("p", [1e-300, 1e-12, 1e-3, 0.025, 0.3, 0.5, 0.7, 0.95, 0.975, 1 - 1e-12])
def test_norm_ppf_matches_scipy(p: float) -> None:
    assert stats.norm_ppf(p) == close(sp.norm.ppf(p))


@pytest.mark.parametrize(
    "a, b, x",
    [(0.5, 0.5, 0.3), (5, 3, 0.9), (100, 200, 0.33), (2000, 0.5, 0.999), (0.1, 10, 0.01),
     (3, 3, 0.0), (3, 3, 1.0), (50, 0.5, 0.2)],
)
def test_incomplete_beta_matches_scipy(a: float, b: float, x: float) -> None:
    assert stats.regularized_incomplete_beta(a, b, x) == close(special.betainc(a, b, x), 1e-300)


def test_quantiles_at_the_edges_and_bad_input() -> None:
    assert stats.norm_ppf(0.0) == -np.inf and stats.norm_ppf(1.0) == np.inf
    assert stats.t_ppf(0.5, 3) == 0.0
    for bad_call in (
        lambda: stats.t_ppf(1.5, 3),
        lambda: stats.t_cdf(1.0, 0),
        lambda: stats.t_ppf(0.5, 0),
    ):
        with pytest.raises(ValueError):
            bad_call()


@pytest.mark.parametrize(
    "values, confidence",
    [(LATENCY_A, 0.95), (LATENCY_B, 0.99), ([1.0, 3.0], 0.95), (_sample(9, 300, 5, 2), 0.9)],
)
def test_mean_ci_matches_scipy(values: list[float], confidence: float) -> None:
    mean, low, high = stats.mean_ci(values, confidence)
    expected_low, expected_high = sp.t.interval(
        confidence, len(values) - 1, loc=np.mean(values), scale=sp.sem(values)
    )
    assert mean == close(np.mean(values))
    assert low == close(expected_low)
    assert high == close(expected_high)


def test_mean_ci_small_samples() -> None:
    assert stats.mean_ci([]) == (None, None, None)
    assert stats.mean_ci([4.0]) == (4.0, None, None)
    assert stats.mean_ci([2.0, 2.0, 2.0]) == (2.0, 2.0, 2.0)


@pytest.mark.parametrize(
    "k, n, confidence",
    [(0, 10, 0.95), (10, 10, 0.95), (1, 20, 0.95), (37, 120, 0.95), (500, 1000, 0.99),
     (3, 7, 0.9), (9_990, 10_000, 0.95), (1, 1, 0.8)],
)
def test_proportion_ci_matches_scipy_wilson(k: int, n: int, confidence: float) -> None:
    expected = sp.binomtest(k, n).proportion_ci(confidence_level=confidence, method="wilson")
    p, low, high = stats.proportion_ci(k, n, confidence)
    assert p == k / n
    assert low == close(expected.low)
    assert high == close(expected.high)


def test_proportion_ci_edge_cases() -> None:
    assert stats.proportion_ci(0, 0) == (None, None, None)
    for k, n in [(-1, 5), (6, 5)]:
        with pytest.raises(ValueError):
            stats.proportion_ci(k, n)


@pytest.mark.parametrize(
    "s1, n1, s2, n2",
    [(45, 500, 30, 500), (30, 500, 45, 500), (1, 10, 0, 12), (480, 1000, 520, 1000),
     (5_000, 100_000, 4_500, 90_000), (200, 1000, 100, 1000)],
)
def test_two_proportion_z_test_matches_textbook(s1: int, n1: int, s2: int, n2: int) -> None:
    pooled = (s1 + s2) / (n1 + n2)
    z_expected = (s1 / n1 - s2 / n2) / np.sqrt(pooled * (1 - pooled) * (1 / n1 + 1 / n2))
    z, p = stats.two_proportion_z_test(s1, n1, s2, n2)
    assert z == close(z_expected)
    assert p == close(2 * sp.norm.sf(abs(z_expected)), 1e-300)
    # Independent check: the pooled z-test is the uncorrected chi-square test on the 2x2 table.
    table = [[s1, n1 - s1], [s2, n2 - s2]]
    chi2 = sp.chi2_contingency(table, correction=False)
    assert z * z == pytest.approx(chi2.statistic, rel=1e-9)
    assert p == pytest.approx(chi2.pvalue, rel=1e-9)


@pytest.mark.parametrize(
    "s1, n1, s2, n2", [(0, 0, 1, 5), (1, 5, 0, 0), (0, 10, 0, 20), (7, 7, 3, 3)]
)
def test_two_proportion_z_test_undefined(s1: int, n1: int, s2: int, n2: int) -> None:
    assert stats.two_proportion_z_test(s1, n1, s2, n2) == (None, None)


@pytest.mark.parametrize(
    "values",
    [[42.0], [3.0, 1.0], LATENCY_A, LATENCY_B, _sample(10, 1001, 250, 80), [1.0, 1.0, 2.0, 9.0]],
)
@pytest.mark.parametrize("q", [0, 1, 25, 50, 90, 95, 99, 99.9, 100])
def test_percentile_matches_numpy(values: list[float], q: float) -> None:
    assert stats.percentile(values, q) == close(np.percentile(values, q))


def test_percentile_edge_cases() -> None:
    assert stats.percentile([], 50) is None
    with pytest.raises(ValueError):
        stats.percentile([1.0], 101)


@pytest.mark.parametrize(
    "kwargs, expected",
    [
        (dict(p_value=0.01, n_control=29, n_treatment=100, effect=1.0), "not enough data yet"),
        (dict(p_value=None, n_control=50, n_treatment=50, effect=0.0), "not enough data yet"),
        (dict(p_value=0.2, n_control=50, n_treatment=50, effect=3.0),
         "no significant difference (p=0.2000)"),
        (dict(p_value=0.01, n_control=50, n_treatment=50, effect=3.0, treatment="lora-a"),
         "lora-a better than control (p=0.0100)"),
        (dict(p_value=0.01, n_control=50, n_treatment=50, effect=-3.0),
         "treatment worse than control (p=0.0100)"),
        (dict(p_value=1e-9, n_control=50, n_treatment=50, effect=-3.0, higher_is_better=False,
              treatment="lora-a", control="base"), "lora-a better than base (p<0.0001)"),
        (dict(p_value=0.04, n_control=50, n_treatment=50, effect=1.0, alpha=0.01),
         "no significant difference (p=0.0400)"),
        (dict(p_value=0.04, n_control=5, n_treatment=5, effect=1.0, min_samples=5),
         "treatment better than control (p=0.0400)"),
    ],
)
def test_verdict(kwargs: dict, expected: str) -> None:
    assert stats.verdict(**kwargs).startswith(expected)
