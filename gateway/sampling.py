"""Per-row next-token choice for a whole batch at once.

Greedy rows take one argmax; sampled rows share one temperature division, one softmax and (when
some row asks for it) one top-p sort, with temperature and top-p as per-row tensors. Unseeded
rows draw together from the global generator; only seeded rows draw one by one, each from its
own generator, so a seeded row gives the same tokens whatever its batch neighbours are.

Isolation: a row whose logits are not usable (NaN, +inf, or nothing finite: e.g. a broken
adapter) or whose draw fails gets a ``RowFailure`` for itself; every other row gets its token.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

import torch

log = logging.getLogger(__name__)

# Below this temperature a request is served greedily. Dividing float32 logits by anything much
# smaller overflows to inf (1e-300 is 0 in float32), and at this scale the softmax already puts
# all mass on the top token whenever the two best logits differ by more than ~1e-3.
GREEDY_TEMPERATURE = 1e-5
MAX_TEMPERATURE = 2.0
# Smallest top-p kept as given. Any top-p this small keeps only the most likely token (the
# nucleus always holds it), so smaller values, denormals included, are raised to it.
MIN_TOP_P = 1e-6
# Bounds of the logit adjustments (OpenAI's for the penalties and the bias; repetition_penalty,
# an extension, divides or multiplies logits: 1 is neutral, and the bounds keep every adjusted
# logit finite: a denormal penalty would turn a positive logit into infinity).
MAX_PENALTY = 2.0
MAX_REPETITION_PENALTY = 10.0
MIN_REPETITION_PENALTY = 1 / MAX_REPETITION_PENALTY
MAX_LOGIT_BIAS = 100.0
MAX_TOP_LOGPROBS = 20


class SamplingValueError(ValueError):
    """A sampling value outside what the API accepts; ``param`` names the field."""

    def __init__(self, message: str, param: str):
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class SamplingParams:
    """What a request asks of the sampler, normalized: ``temperature`` below
    ``GREEDY_TEMPERATURE`` becomes 0 (greedy) and ``top_p`` below ``MIN_TOP_P`` becomes
    ``MIN_TOP_P``; a non-finite or out-of-range value raises ``SamplingValueError``."""

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    # logit adjustments before the choice (``gateway.logits_processing``)
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias)
    # log-probabilities reported (``gateway.logprobs``): None reports none; k reports the chosen
    # token's and the k most likely ones, for each generated token / each prompt token
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    # structured outputs: a ``gateway.structured.GrammarConstraint`` every sequence follows
    grammar: Any = None

    def __post_init__(self) -> None:
        self._check_adjustments()
        temperature, top_p = float(self.temperature), float(self.top_p)
        if not (math.isfinite(temperature) and 0.0 <= temperature <= MAX_TEMPERATURE):
            raise SamplingValueError(f"temperature must be between 0 and {MAX_TEMPERATURE:g}, got {temperature!r}",
                                     "temperature")
        if not (math.isfinite(top_p) and 0.0 < top_p <= 1.0):
            raise SamplingValueError(f"top_p must be greater than 0 and at most 1, got {top_p!r}", "top_p")
        object.__setattr__(self, "temperature", 0.0 if temperature < GREEDY_TEMPERATURE else temperature)
        object.__setattr__(self, "top_p", max(top_p, MIN_TOP_P))

    def _check_adjustments(self) -> None:
        for name in ("presence_penalty", "frequency_penalty"):
            value = float(getattr(self, name))
            if not (math.isfinite(value) and -MAX_PENALTY <= value <= MAX_PENALTY):
                raise SamplingValueError(f"{name} must be between {-MAX_PENALTY:g} and {MAX_PENALTY:g}, "
                                         f"got {value!r}", name)
        value = float(self.repetition_penalty)
        if not (math.isfinite(value) and MIN_REPETITION_PENALTY <= value <= MAX_REPETITION_PENALTY):
            raise SamplingValueError(f"repetition_penalty must be between {MIN_REPETITION_PENALTY:g} and "
                                     f"{MAX_REPETITION_PENALTY:g}, got {value!r}", "repetition_penalty")
        for token, bias in self.logit_bias:
            if not (math.isfinite(bias) and -MAX_LOGIT_BIAS <= bias <= MAX_LOGIT_BIAS):
                raise SamplingValueError(f"logit_bias values must be between {-MAX_LOGIT_BIAS:g} and "
                                         f"{MAX_LOGIT_BIAS:g}, got {bias!r} for token {token}", "logit_bias")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and not 0 <= value <= MAX_TOP_LOGPROBS:
                raise SamplingValueError(f"{name} must be between 0 and {MAX_TOP_LOGPROBS}, got {value!r}", name)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def adjusts_logits(self) -> bool:
        """Some penalty or bias changes this row's logits before the choice."""
        return bool(self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1.0
                    or self.logit_bias)


@dataclass(frozen=True)
class RowFailure:
    """Why no token could be chosen for one row; that row's request fails, the batch goes on."""

    message: str
    code: str | None = None  # the sequence's error code (None: generation_failed)


NON_FINITE = RowFailure("the model produced non-finite logits for this request (a broken adapter?)")


def make_generator(seed: int | None, device: torch.device) -> torch.Generator | None:
    if seed is None:
        return None
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    return gen


def usable_rows(logits: torch.Tensor) -> torch.Tensor:
    """``[rows]`` bool: the row has no NaN, no +inf and at least one finite logit (-inf alone
    only masks a token out)."""
    return ~(torch.isnan(logits).any(-1) | torch.isposinf(logits).any(-1)) & torch.isfinite(logits).any(-1)


def nucleus_probs(logits: torch.Tensor, temperature: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """``logits [rows, vocab]`` (float32, usable rows), ``temperature``/``top_p [rows]`` ->
    unnormalized probabilities with the tokens outside each row's nucleus at 0. The nucleus is
    the smallest prefix of tokens by probability whose mass reaches top-p; it always holds the
    most likely token."""
    probs = torch.softmax(logits / temperature.unsqueeze(-1), dim=-1)
    if not bool((top_p < 1.0).any()):
        return probs
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    keep = (sorted_probs.cumsum(-1) - sorted_probs) < top_p.unsqueeze(-1)
    keep[:, 0] = True
    keep |= (top_p >= 1.0).unsqueeze(-1)  # float32 cumsum can pass 1 early: top_p=1 keeps all
    return torch.zeros_like(probs).scatter_(-1, order, sorted_probs * keep)


def _draw(probs: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def choose_tokens(logits: torch.Tensor, params: list[SamplingParams],
                  generators: list[torch.Generator | None]) -> list[int | RowFailure]:
    """``logits [rows, vocab]`` -> per row, its token id or a ``RowFailure`` (that row alone)."""
    rows = logits.shape[0]
    results: list[int | RowFailure] = [NON_FINITE] * rows
    logits = logits.float()
    usable = usable_rows(logits).tolist()
    greedy = [r for r in range(rows) if usable[r] and params[r].greedy]
    sampled = [r for r in range(rows) if usable[r] and not params[r].greedy]
    if greedy:
        for r, token in zip(greedy, logits[greedy].argmax(-1).tolist(), strict=True):
            results[r] = token
    if not sampled:
        return results
    device = logits.device
    probs = nucleus_probs(logits[sampled],
                          torch.tensor([params[r].temperature for r in sampled], device=device),
                          torch.tensor([params[r].top_p for r in sampled], device=device))
    # a usable row always has mass; NaN here would mean a bug above, still failed alone
    valid = (torch.isfinite(probs).all(-1) & (probs.sum(-1) > 0)).tolist()
    unseeded = [i for i, r in enumerate(sampled) if valid[i] and generators[r] is None]
    if unseeded:
        try:
            drawn = _draw(probs[unseeded], None).tolist()
        except RuntimeError:  # not expected; find the row(s) at fault one by one
            log.exception("batched draw failed; drawing row by row")
            drawn = [_draw_one(probs[i], None) for i in unseeded]
        for i, token in zip(unseeded, drawn, strict=True):
            results[sampled[i]] = token
    for i, r in enumerate(sampled):
        if valid[i] and generators[r] is not None:
            results[r] = _draw_one(probs[i], generators[r])
    return results


def _draw_one(probs: torch.Tensor, generator: torch.Generator | None) -> int | RowFailure:
    try:
        return int(_draw(probs.unsqueeze(0), generator).item())
    except RuntimeError as exc:
        return RowFailure(f"sampling failed for this request: {exc}")


def sample_row(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> int | RowFailure:
    """One row's choice from ``logits [vocab]`` (what ``choose_tokens`` gives that row)."""
    return choose_tokens(logits.unsqueeze(0), [params], [generator])[0]
