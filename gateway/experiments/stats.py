"""Pure-Python statistics for comparing experiment arms.

Standard library only, so the gateway needs no scipy at runtime.  The distribution functions
agree with scipy to ~1e-12 relative for everyday degrees of freedom (~1e-9 up to 1e7), far
more than a dashboard needs, but it lets the tests pin them tightly.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

_SQRT2 = math.sqrt(2.0)
_TINY = 1e-300  # keeps Lentz's algorithm away from division by zero

Interval = tuple[float | None, float | None, float | None]


def _beta_continued_fraction(a: float, b: float, x: float) -> float:
    """Continued fraction for I_x(a, b), evaluated with the modified Lentz method."""
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > _TINY else _TINY)
    result = d
    for m in range(1, 100_000):
        # One even and one odd term of the fraction per m.
        for numerator in (
            m * (b - m) * x / ((a + 2 * m - 1.0) * (a + 2 * m)),
            -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1.0)),
        ):
            d = 1.0 + numerator * d
            d = 1.0 / (d if abs(d) > _TINY else _TINY)
            c = 1.0 + numerator / c
            c = c if abs(c) > _TINY else _TINY
            result *= c * d
        if abs(c * d - 1.0) < 1e-16:
            return result
    raise ArithmeticError(f"incomplete beta did not converge (a={a}, b={b}, x={x})")


def _stirling_tail(x: float) -> float:
    """lgamma(x) minus its Stirling approximation; accurate to ~1e-20 for x >= 100."""
    inv, inv2 = 1.0 / x, 1.0 / (x * x)
    return inv * (1 / 12 - inv2 * (1 / 360 - inv2 * (1 / 1260 - inv2 / 1680)))


def _log_beta(a: float, b: float) -> float:
    """log B(a, b), accurate even when one argument is huge: with a = dof/2 in the millions,
    lgamma(a + 1/2) - lgamma(a) cancels most digits, so it is taken analytically instead."""
    big, small = max(a, b), min(a, b)
    if big < 100:
        return math.lgamma(a) + math.lgamma(b) - math.lgamma(a + b)
    gamma_ratio = (  # lgamma(big + small) - lgamma(big), Stirling rearranged
        (big - 0.5) * math.log1p(small / big) + small * math.log(big + small) - small
        + _stirling_tail(big + small) - _stirling_tail(big)
    )
    return math.lgamma(small) - gamma_ratio


def _betainc(a: float, b: float, x: float, y: float) -> float:
    """I_x(a, b) given both x and y = 1 - x: forming 1 - x when x is near 1 would lose the
    digits that matter for small t statistics or large degrees of freedom."""
    if x <= 0.0:
        return 0.0
    if y <= 0.0:
        return 1.0
    log_x = math.log1p(-y) if y < 0.5 else math.log(x)
    log_y = math.log1p(-x) if x < 0.5 else math.log(y)
    front = math.exp(a * log_x + b * log_y - _log_beta(a, b))
    # The fraction converges quickly only below this point; above it use the symmetry
    # I_x(a, b) = 1 - I_y(b, a).
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _beta_continued_fraction(a, b, x) / a
    return 1.0 - front * _beta_continued_fraction(b, a, y) / b


def regularized_incomplete_beta(a: float, b: float, x: float) -> float:
    """I_x(a, b) for a, b > 0 and 0 <= x <= 1 (scipy.special.betainc)."""
    if not (a > 0 and b > 0 and 0.0 <= x <= 1.0):
        raise ValueError(f"need a, b > 0 and 0 <= x <= 1, got a={a}, b={b}, x={x}")
    return _betainc(a, b, x, 1.0 - x)


def t_sf(t: float, dof: float) -> float:
    """Upper tail P(T > t) of Student's t; computed directly so tiny tails keep precision."""
    if not dof > 0:
        raise ValueError(f"degrees of freedom must be > 0, got {dof}")
    if math.isinf(dof):
        return norm_sf(t)
    t2 = t * t
    two_tail = _betainc(dof / 2.0, 0.5, dof / (dof + t2), t2 / (dof + t2))  # P(|T| > |t|)
    return 0.5 * two_tail if t >= 0 else 1.0 - 0.5 * two_tail


def t_cdf(t: float, dof: float) -> float:
    """P(T <= t) for Student's t with ``dof`` (possibly fractional) degrees of freedom."""
    return t_sf(-t, dof)


def t_two_sided_p(t: float, dof: float) -> float:
    """Two-sided p-value P(|T| >= |t|)."""
    return min(1.0, 2.0 * t_sf(abs(t), dof))


def norm_sf(z: float) -> float:
    """Upper tail of the standard normal; erfc keeps precision far into the tail."""
    return 0.5 * math.erfc(z / _SQRT2)


def norm_cdf(z: float) -> float:
    return 0.5 * math.erfc(-z / _SQRT2)


def _symmetric_ppf(p: float, upper_tail: Callable[[float], float]) -> float:
    """Quantile of a distribution symmetric about 0, given its decreasing upper tail.

    Works on the smaller tail probability (1 - p is exact for p > 0.5, p is not), brackets
    by doubling and bisects until the interval stops shrinking: slower than Newton, but it
    needs no derivative and cannot diverge.
    """
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"probability must be in [0, 1], got {p}")
    if p in (0.0, 1.0):
        return math.copysign(math.inf, p - 0.5)
    if p == 0.5:
        return 0.0
    q = min(p, 1.0 - p)
    lo, hi = 0.0, 1.0
    while upper_tail(hi) > q:
        lo, hi = hi, hi * 2.0
    while lo < (mid := 0.5 * (lo + hi)) < hi:
        lo, hi = (mid, hi) if upper_tail(mid) > q else (lo, mid)
    return math.copysign(0.5 * (lo + hi), p - 0.5)


def t_ppf(p: float, dof: float) -> float:
    """Quantile of Student's t (scipy.stats.t.ppf)."""
    t_sf(0.0, dof)  # validates dof even where the search would never evaluate the tail
    return _symmetric_ppf(p, lambda t: t_sf(t, dof))


def norm_ppf(p: float) -> float:
    """Quantile of the standard normal (scipy.stats.norm.ppf)."""
    return _symmetric_ppf(p, norm_sf)


def _mean_var(values: Sequence[float]) -> tuple[float, float]:
    """Mean and unbiased (n - 1) variance; two-pass with fsum to avoid cancellation."""
    n = len(values)
    mean = math.fsum(values) / n
    var = math.fsum((v - mean) ** 2 for v in values) / (n - 1) if n > 1 else 0.0
    return mean, var


def _check_confidence(confidence: float) -> None:
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")


def _check_counts(successes: int, n: int) -> None:
    if not 0 <= successes <= n:
        raise ValueError(f"need 0 <= successes <= n, got successes={successes}, n={n}")


def mean_ci(values: Sequence[float], confidence: float = 0.95) -> Interval:
    """(mean, low, high) with a t-based interval; bounds None below 2 values, all None at 0."""
    _check_confidence(confidence)
    values = list(values)
    if not values:
        return None, None, None
    mean, var = _mean_var(values)
    if len(values) < 2:
        return mean, None, None
    half = t_ppf(0.5 + confidence / 2.0, len(values) - 1) * math.sqrt(var / len(values))
    return mean, mean - half, mean + half


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


def welch_t_test(a_values: Sequence[float], b_values: Sequence[float]) -> Interval:
    """(t, dof, p_two_sided) of mean(a) - mean(b) (scipy ttest_ind with equal_var=False).

    Welch, not Student, because an adapter can change the spread of latency as well as its
    level.  All None when undefined (< 2 values on a side, or no variance in either arm).
    """
    a, b = list(a_values), list(b_values)
    if len(a) < 2 or len(b) < 2:
        return None, None, None
    (mean_a, var_a), (mean_b, var_b) = _mean_var(a), _mean_var(b)
    va, vb = var_a / len(a), var_b / len(b)
    if va + vb <= 0.0:
        return None, None, None
    t = (mean_a - mean_b) / math.sqrt(va + vb)
    # Welch-Satterthwaite; a side with zero variance simply contributes nothing.
    dof = (va + vb) ** 2 / (va * va / (len(a) - 1) + vb * vb / (len(b) - 1))
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
    return z, math.erfc(abs(z) / _SQRT2)


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
