"""Assigning subjects (users, sessions, API keys) to experiment arms.

Sticky assignment hashes (experiment, salt, subject) to a point in [0, 1) and maps that point
onto the arms' cumulative weights.  Because the point depends only on those strings, a subject
sees the same arm on every request, in every worker process and after restarts.  Because arms
own contiguous slices of [0, 1) in their given order, changing the weights only moves the
subjects whose point lies in the part of the line that changed hands (70/30 -> 50/50 moves
exactly the subjects in [0.5, 0.7)), instead of reshuffling everybody.
"""

from __future__ import annotations

import bisect
import hashlib
import logging
import math
import random
from dataclasses import dataclass
from typing import Sequence

logger = logging.getLogger(__name__)

_TWO_POW_64 = float(2**64)


@dataclass(frozen=True)
class Arm:
    """One variant of an experiment.

    ``name`` is an adapter id or the base model name; ``weight`` is a relative share of traffic
    (weights need not sum to 1, they are normalised).
    """

    name: str
    weight: float


def validate_weights(arms: Sequence[Arm]) -> None:
    """Raise ``ValueError`` unless ``arms`` describes a usable experiment.

    Checked up front so a bad config fails at load time rather than on some later request.
    """
    if len(arms) < 2:
        raise ValueError(f"an experiment needs at least 2 arms, got {len(arms)}")
    seen: set[str] = set()
    for arm in arms:
        if arm.name in seen:
            raise ValueError(f"duplicate arm name {arm.name!r}")
        seen.add(arm.name)
        weight = arm.weight
        # bool is an int subclass; True as a weight is almost certainly a config mistake.
        if isinstance(weight, bool) or not isinstance(weight, (int, float)):
            raise ValueError(f"arm {arm.name!r}: weight must be a number, got {weight!r}")
        if not math.isfinite(weight):
            raise ValueError(f"arm {arm.name!r}: weight must be finite, got {weight!r}")
        if weight < 0:
            raise ValueError(f"arm {arm.name!r}: weight must be >= 0, got {weight!r}")
    total = math.fsum(arm.weight for arm in arms)
    if not total > 0:
        raise ValueError("arm weights must sum to more than 0")


def subject_point(experiment: str, salt: str, subject: str) -> float:
    """Deterministic point in [0, 1) for a subject within one experiment.

    Each string is length-prefixed before hashing so that ("ab", "c") and ("a", "bc") cannot
    collide.  sha256 (not ``hash()``) keeps the point stable across processes and Python
    versions.  Including the experiment name and salt makes assignments independent between
    experiments; changing the salt deliberately reshuffles one experiment.
    """
    digest = hashlib.sha256()
    for part in (experiment, salt, subject):
        data = part.encode("utf-8")
        digest.update(len(data).to_bytes(8, "big"))
        digest.update(data)
    value = int.from_bytes(digest.digest()[:8], "big")
    # value / 2**64 can round up to exactly 1.0 for values within 2**10 of 2**64; clamp so the
    # documented half-open range holds.
    return min(value / _TWO_POW_64, math.nextafter(1.0, 0.0))


def _cumulative_bounds(arms: Sequence[Arm]) -> list[float]:
    """Upper bound of each arm's slice of [0, 1); the last bound is exactly 1.0."""
    total = math.fsum(arm.weight for arm in arms)
    bounds: list[float] = []
    running = 0.0
    for arm in arms:
        running += arm.weight
        bounds.append(running / total)
    bounds[-1] = 1.0  # guard against rounding leaving a sliver above the last bound
    return bounds


def _arm_at(point: float, arms: Sequence[Arm]) -> Arm:
    """Arm whose slice contains ``point``.

    ``bisect_right`` picks the first bound strictly above the point, so a zero-weight arm
    (whose bound equals its predecessor's) can never be chosen.
    """
    validate_weights(arms)
    bounds = _cumulative_bounds(arms)
    index = bisect.bisect_right(bounds, point)
    if index >= len(arms):  # only reachable if point >= 1.0, i.e. a caller-supplied point
        index = max(i for i, arm in enumerate(arms) if arm.weight > 0)
    return arms[index]


def assign_arm(experiment: str, salt: str, subject: str, arms: Sequence[Arm]) -> Arm:
    """Sticky assignment: the same (experiment, salt, subject, arms) always yields the same arm."""
    arm = _arm_at(subject_point(experiment, salt, subject), arms)
    logger.debug("experiment %s: subject assigned to arm %s", experiment, arm.name)
    return arm


def assign_per_request(arms: Sequence[Arm], rng: random.Random | None = None) -> Arm:
    """Non-sticky assignment: draw an arm independently for each request.

    Pass a seeded ``rng`` for reproducible tests; the default uses the module-level generator.
    """
    point = rng.random() if rng is not None else random.random()
    return _arm_at(point, arms)
