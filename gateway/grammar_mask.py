"""The batched sampling step's grammar mask (structured outputs, ``gateway.structured``): the
rows whose sequence follows a grammar keep only the tokens it allows next."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch


def mask_rows(logits: torch.Tensor, matchers: Sequence[Any]) -> torch.Tensor:
    """``logits [rows, vocab]`` -> a copy where each row with a grammar state
    (``gateway.structured.GrammarState``) keeps only the tokens its grammar allows next and that
    are not banned (the others become -inf); rows without one are unchanged."""
    import xgrammar

    rows = [i for i, m in enumerate(matchers) if m is not None]
    bitmask = xgrammar.allocate_token_bitmask(len(rows), logits.shape[-1])
    for j, i in enumerate(rows):  # each matcher's own state (a CPU walk of its grammar)
        matchers[i].matcher.fill_next_token_bitmask(bitmask, j)
    sub = logits[rows].contiguous()
    xgrammar.apply_token_bitmask_inplace(sub, bitmask.to(logits.device))
    banned = matchers[rows[0]].banned  # one model, one list
    if banned.numel():
        sub[:, banned.to(logits.device)] = float("-inf")
    out = logits.clone()
    out[rows] = sub
    return out
