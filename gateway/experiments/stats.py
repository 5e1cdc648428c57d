"""Statistics for comparing experiment arms.

The distributions (Student's t, the standard normal, the regularized incomplete beta) come from
scipy (``scipy.stats``, ``scipy.special``), a maintained library; this module adds what a
dashboard needs on top: confidence intervals, Welch's t test, the two-proportion z test,
percentiles and a plain-words verdict, each with the edge cases (tiny samples, no variance) that
make a test undefined answered by ``None`` instead of a NaN.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

from scipy import special
from scipy import stats as _dist

Interval = tuple[float | None, float | None, float | None]


def _check_dof(dof: float) -> None:
    # scipy answers NaN for a bad parameter; a caller's bug should raise instead
    if not dof > 0:
        raise ValueError(f"degrees of freedom must be > 0, got {dof}")


def _check_probability(p: float) -> None:
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"probability must be in [0, 1], got {p}")


def regularized_incomplete_beta(a: float, b: float, x: float) -> float:
    """I_x(a, b) for a, b > 0 and 0 <= x <= 1."""
    if not (a > 0 and b > 0 and 0.0 <= x <= 1.0):
        raise ValueError(f"need a, b > 0 and 0 <= x <= 1, got a={a}, b={b}, x={x}")
    return float(special.betainc(a, b, x))


def t_sf(t: float, dof: float) -> float:
    """Upper tail P(T > t) of Student's t (``dof`` may be fractional or infinite: the normal)."""
    _check_dof(dof)
    return norm_sf(t) if math.isinf(dof) else float(_dist.t.sf(t, dof))


def t_cdf(t: float, dof: float) -> float:
    """P(T <= t) for Student's t with ``dof`` (possibly fractional) degrees of freedom."""
    return t_sf(-t, dof)


def t_two_sided_p(t: float, dof: float) -> float:
    """Two-sided p-value P(|T| >= |t|)."""
    return min(1.0, 2.0 * t_sf(abs(t), dof))


def norm_sf(z: float) -> float:
    return float(_dist.norm.sf(z))


def norm_cdf(z: float) -> float:
    return float(_dist.norm.cdf(z))


def t_ppf(p: float, dof: float) -> float:
    """Quantile of Student's t."""
    _check_dof(dof)
    _check_probability(p)
    return float(_dist.t.ppf(p, dof))


def norm_ppf(p: float) -> float:
    """Quantile of the standard normal."""
    _check_probability(p)
    return float(_dist.norm.ppf(p))


def _mean_var(values: Sequence[float]) -> tuple[float, float]:
    """Mean and unbiased (n - 1) variance; two-pass with fsum to avoid cancellation."""
    n = len(values)
    mean = math.fsum(values) / n
    var = math.fsum((v - mean) ** 2 for v in values) / (n - 1) if n > 1 else 0.0
    return mean, var


@dataclass(frozen=True)
class Moments:
    """What a mean's interval and Welch's test need of a sample: its size, mean and sum of squared
    deviations from the mean. The store computes them in SQL (two passes, so no cancellation), so
    results cost the same however many values there are."""

    count: int = 0
    mean: float | None = None
    m2: float = 0.0  # sum of (value - mean) ** 2

    @classmethod
    def of(cls, values: Sequence[float]) -> Moments:
        values = list(values)
        if not values:
            return cls()
        mean, var = _mean_var(values)
        return cls(len(values), mean, var * (len(values) - 1))

    @classmethod
    def from_sums(cls, count: int, total: float, squares: float, shift: float = 0.0) -> Moments:
        """From the sums of (value - shift) and of its square (one pass, as SQL computes them);
        a shift near the mean keeps the subtraction from cancelling the variance away."""
        if count == 0:
            return cls()
        centred = total / count
        return cls(count, shift + centred, max(squares - total * centred, 0.0))

    @property
    def variance(self) -> float:
        """Unbiased (n - 1); 0 below two values."""
        return max(self.m2, 0.0) / (self.count - 1) if self.count > 1 else 0.0


def _moments(values: Sequence[float] | Moments) -> Moments:
    return values if isinstance(values, Moments) else Moments.of(values)


def _check_confidence(confidence: float) -> None:
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")


def _check_counts(successes: int, n: int) -> None:
    if not 0 <= successes <= n:
        raise ValueError(f"need 0 <= successes <= n, got successes={successes}, n={n}")


def mean_ci(values: Sequence[float] | Moments, confidence: float = 0.95) -> Interval:
    """(mean, low, high) with a t-based interval; bounds None below 2 values, all None at 0.
    ``values`` may be the values or their ``Moments``."""
    _check_confidence(confidence)
    m = _moments(values)
    if m.count == 0 or m.mean is None:
        return None, None, None
    if m.count < 2:
        return m.mean, None, None
    half = t_ppf(0.5 + confidence / 2.0, m.count - 1) * math.sqrt(m.variance / m.count)
    return m.mean, m.mean - half, m.mean + half


def proportion_ci(successes: int, n: int, confidence: float = 0.95) -> Interval:
    """(proportion, low, high) by the Wilson score interval; all None when n == 0.

    Wilson, not Wald, because it stays inside [0, 1] and is sensible at 0 or n successes,
    the usual case for error rates.
    """
    _check_confidence(confidence)
    _check_counts(successes, n)
    if n == 0:
        return None, None, None
    p = successes / n
    z = norm_ppf(0.5 + confidence / 2.0)
    denom = 2.0 * (n + z * z)
    center = (2.0 * n * p + z * z) / denom
    half = z / denom * math.sqrt(4.0 * n * p * (1.0 - p) + z * z)
    # At 0 or n successes the bound is exactly 0 or 1; set it rather than trust rounding.
    low = 0.0 if successes == 0 else center - half
    high = 1.0 if successes == n else center + half
    return p, low, high


def welch_t_test(a_values: Sequence[float] | Moments, b_values: Sequence[float] | Moments) -> Interval:
    """(t, dof, p_two_sided) of mean(a) - mean(b) (scipy ttest_ind with equal_var=False); each
    side may be the values or their ``Moments``.

    Welch, not Student, because an adapter can change the spread of latency as well as its
    level.  All None when undefined (< 2 values on a side, or no variance in either arm).
    """
    a, b = _moments(a_values), _moments(b_values)
    if a.count < 2 or b.count < 2 or a.mean is None or b.mean is None:
        return None, None, None
    va, vb = a.variance / a.count, b.variance / b.count
    if va + vb <= 0.0:
        return None, None, None
    t = (a.mean - b.mean) / math.sqrt(va + vb)
    # Welch-Satterthwaite, (va + vb)^2 / (va^2 / (na - 1) + vb^2 / (nb - 1)), written in each side's
    # share of va + vb: squares of variances near 1e-162 (scores 0 and 1e-84, which feedback takes)
    # underflow to 0 / 0, while the shares sum to 1. A side with zero variance contributes nothing.
    share_a, share_b = va / (va + vb), vb / (va + vb)
    dof = 1.0 / (share_a * share_a / (a.count - 1) + share_b * share_b / (b.count - 1))
    return t, dof, t_two_sided_p(t, dof)


def two_proportion_z_test(s1: int, n1: int, s2: int, n2: int) -> tuple[float | None, float | None]:
    """(z, p_two_sided) of s1/n1 - s2/n2, pooled variance (statsmodels proportions_ztest);
    all None when either sample is empty or the pooled proportion is 0 or 1."""
    _check_counts(s1, n1)
    _check_counts(s2, n2)
    if n1 == 0 or n2 == 0:
        return None, None
    pooled = (s1 + s2) / (n1 + n2)
    se = math.sqrt(pooled * (1.0 - pooled) * (1.0 / n1 + 1.0 / n2))
    if se == 0.0:
        return None, None
    z = (s1 / n1 - s2 / n2) / se
    return z, 2.0 * norm_sf(abs(z))


def percentile(values: Sequence[float], q: float) -> float | None:
    """q-th percentile (0..100), linear interpolation as numpy's default; None if empty."""
    if not 0.0 <= q <= 100.0:
        raise ValueError(f"percentile must be in [0, 100], got {q}")
    ordered = sorted(values)
    if not ordered:
        return None
    position = (len(ordered) - 1) * (q / 100.0)
    lo = math.floor(position)
    below, above = ordered[lo], ordered[min(lo + 1, len(ordered) - 1)]
    frac = position - lo
    # Interpolate from the nearer end, as numpy does, so results are monotone in q.
    if frac >= 0.5:
        return above - (above - below) * (1.0 - frac)
    return below + (above - below) * frac


def verdict(
    p_value: float | None,
    n_control: int,
    n_treatment: int,
    effect: float,
    *,
    treatment: str = "treatment",
    control: str = "control",
    higher_is_better: bool = True,
    min_samples: int = 30,
    alpha: float = 0.05,
) -> str:
    """One plain-words conclusion for a dashboard.

    ``effect`` is treatment minus control in the metric's units; ``higher_is_better`` says
    which sign is good (False for latency or error rate).  Small samples are refused outright
    because the p-value of a handful of requests is mostly noise.
    """
    if n_control < min_samples or n_treatment < min_samples:
        return (
            f"not enough data yet (need {min_samples} per arm, have "
            f"{n_control} {control} / {n_treatment} {treatment})"
        )
    if p_value is None:
        return "not enough data yet (test undefined, e.g. no variation in either arm)"
    shown = "p<0.0001" if p_value < 1e-4 else f"p={p_value:.4f}"
    if p_value >= alpha or effect == 0:
        return f"no significant difference ({shown})"
    direction = "better" if (effect > 0) == higher_is_better else "worse"
    return f"{treatment} {direction} than {control} ({shown})"
