"""Per-key limits as pure code, driven by a hand-moved clock; and key configuration."""

from __future__ import annotations

import hashlib
import math

import pytest
from pydantic import ValidationError

from gateway.keys import ApiKeySpec, KeyRing, normalize_key_specs
from gateway.rate_limits import KeyLimiter, KeyLimits, Refusal, TokenBucket


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.mark.parametrize("capacity, takes, advance, then_take, expected_wait", [
    (60, [60], 0.0, 1, 1.0),  # empty: one unit comes back per second at 60/minute
    (60, [60], 0.5, 1, 0.5),
    (60, [60], 1.0, 1, 0.0),
    (60, [30], 0.0, 30, 0.0),  # burst up to the capacity
    (60, [30], 0.0, 31, 1.0),
    (10, [], 0.0, 11, math.inf),  # more than a minute's allowance: never
    (10, [10], 3600.0, 10, 0.0),  # refill stops at the capacity...
    (10, [10], 3600.0, 11, math.inf),
])
def test_token_bucket(capacity, takes, advance, then_take, expected_wait):
    clock = Clock()
    bucket = TokenBucket(capacity, clock=clock)
    for amount in takes:
        assert bucket.take(amount) == 0.0
    clock.now += advance
    assert bucket.take(then_take) == pytest.approx(expected_wait)


def test_refused_take_takes_nothing_and_give_back_is_capped():
    clock = Clock()
    bucket = TokenBucket(10, clock=clock)
    assert bucket.take(8) == 0.0
    assert bucket.take(5) > 0  # refused: the 2 left stay
    assert bucket.level() == pytest.approx(2)
    bucket.give_back(100)
    assert bucket.level() == pytest.approx(10)


def test_concurrency_limit_counts_in_flight_requests():
    limiter = KeyLimiter(KeyLimits(max_concurrent=2))
    assert limiter.admit() is None and limiter.admit() is None
    refusal = limiter.admit()
    assert refusal is not None and refusal.limit == "concurrency" and refusal.retry_after_header == "1"
    limiter.release()
    assert limiter.admit() is None


def test_concurrency_limit_counts_every_sequence_of_a_request():
    """max_concurrent bounds batch rows: a request of n 8 took 8 rows as one request, so four
    such requests on a limit of 4 held every row of the batch."""
    limiter = KeyLimiter(KeyLimits(max_concurrent=4))
    assert limiter.admit() is None and limiter.widen(2) is None  # one request, 3 sequences
    assert limiter.admit() is None
    refusal = limiter.widen(1)  # a second request of 2: 5 in flight
    assert refusal is not None and refusal.limit == "concurrency" and refusal.retry_after_header == "1"
    limiter.release()  # refused: only its admission is released
    never = limiter.widen(4)  # 5 sequences can never fit a limit of 4
    assert never is not None and never.retry_after_header is None and "lower n" in never.message
    limiter.release(3)
    assert limiter.running == 0
    assert KeyLimiter(KeyLimits()).widen(100) is None  # no limit


def test_requests_per_minute_with_retry_after():
    clock = Clock()
    limiter = KeyLimiter(KeyLimits(requests_per_minute=2), clock)
    assert limiter.admit() is None and limiter.admit() is None
    limiter.release(), limiter.release()
    refusal = limiter.admit()
    assert refusal.limit == "requests"
    assert refusal.retry_after == pytest.approx(30.0)  # 2/minute: one more every 30 s
    assert refusal.retry_after_header == "30"
    assert limiter.running == 0  # a refused request holds nothing
    clock.now += 30
    assert limiter.admit() is None


def test_concurrency_refusal_spends_no_request():
    clock = Clock()
    limiter = KeyLimiter(KeyLimits(max_concurrent=1, requests_per_minute=2), clock)
    assert limiter.admit() is None
    assert limiter.admit().limit == "concurrency"
    limiter.release()
    assert limiter.admit() is None  # the second of the two per minute: the refusal did not use it


def test_tokens_are_reserved_then_settled():
    clock = Clock()
    limiter = KeyLimiter(KeyLimits(tokens_per_minute=100), clock)
    assert limiter.reserve(80) is None
    refusal = limiter.reserve(30)
    assert refusal.limit == "tokens" and refusal.retry_after == pytest.approx(6.0)  # 10 more at 100/60 per s
    limiter.settle(80, 20)  # used 20 of the 80 reserved
    assert limiter.reserve(30) is None
    too_big = limiter.reserve(101)
    assert math.isinf(too_big.retry_after) and too_big.retry_after_header is None
    assert "lower max_tokens" in too_big.message


def test_no_limits_never_refuse():
    limiter = KeyLimiter(KeyLimits())
    for _ in range(1000):
        assert limiter.admit() is None
        assert limiter.reserve(10**9) is None


@pytest.mark.parametrize("retry_after, header", [(0.2, "1"), (1.0, "1"), (1.01, "2"), (59.5, "60"),
                                                 (math.inf, None)])
def test_retry_after_header_rounds_up(retry_after, header):
    assert Refusal("requests", "m", retry_after).retry_after_header == header


# ---- configuration ---------------------------------------------------------------------------------
def test_key_specs_from_env_forms():
    plain = [ApiKeySpec(**x) for x in normalize_key_specs("a1, b2")]
    assert [(k.key, k.name) for k in plain] == [("a1", "key-1"), ("b2", "key-2")]
    digest = hashlib.sha256(b"team-key").hexdigest().upper()
    specs = [ApiKeySpec(**x) for x in normalize_key_specs(
        f'[{{"sha256": "{digest}", "name": "team", "rpm": 5}}, "solo"]')]
    assert specs[0].name == "team" and specs[0].rpm == 5 and specs[1].name == "key-2"


@pytest.mark.parametrize("fields", [
    {"name": "x"},  # neither key nor sha256
    {"name": "x", "key": "k", "sha256": "0" * 64},
    {"name": "x", "sha256": "abc"},
    {"name": "x\n", "key": "k"},  # $ must not accept a trailing newline
    {"name": "bad name", "key": "k"},
    {"name": "x", "key": "k", "rpm": 0},
    {"name": "x", "key": "k", "unknown": 1},
])
def test_bad_key_specs(fields):
    with pytest.raises(ValidationError):
        ApiKeySpec(**fields)


def test_key_ring_finds_keys_by_value_and_by_digest():
    ring = KeyRing([ApiKeySpec(key="alpha-key", name="alpha"),
                    ApiKeySpec(sha256=hashlib.sha256(b"beta-key").hexdigest(), name="beta", max_concurrent=3)],
                   KeyLimits(requests_per_minute=7))
    assert ring.enabled
    alpha, beta = ring.authenticate("alpha-key"), ring.authenticate("beta-key")
    assert (alpha.name, beta.name) == ("alpha", "beta")
    assert ring.authenticate("alpha-key ") is None and ring.authenticate(None) is None
    assert beta.limiter.limits == KeyLimits(max_concurrent=3, requests_per_minute=7)  # own + defaults
    assert "alpha-key" not in alpha.id and len(alpha.id) == 16 and ring.by_id(alpha.id) is alpha
    assert not KeyRing([]).enabled
