"""The batched sampling step's grammar mask (structured outputs and tool calls,
``gateway.structured``): the rows whose sequence follows a grammar keep only the tokens it allows
next."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch


def mask_rows(logits: torch.Tensor, matchers: Sequence[Any]) -> torch.Tensor:
    """``logits [rows, vocab]`` -> a copy where each row with a grammar state
    (``gateway.structured.GrammarState``) keeps only the tokens its grammar allows next and that
    its state bans at this point (the others become -inf); rows without one are unchanged."""
    import xgrammar

    rows = [i for i, m in enumerate(matchers) if m is not None]
    bitmask = xgrammar.allocate_token_bitmask(len(rows), logits.shape[-1])
    bans: dict[int, tuple[torch.Tensor, list[int]]] = {}  # one entry per distinct ban list (one or two)
    for j, i in enumerate(rows):  # each matcher's own state (a CPU walk of its grammar)
        matchers[i].matcher.fill_next_token_bitmask(bitmask, j)
        banned = matchers[i].banned  # a tool call's state bans only inside its calls
        if banned.numel():
            bans.setdefault(id(banned), (banned, []))[1].append(j)
    sub = logits[rows].contiguous()
    xgrammar.apply_token_bitmask_inplace(sub, bitmask.to(logits.device))
    for banned, which in bans.values():
        index = torch.tensor(which, device=logits.device).unsqueeze(-1)
        sub[index, banned.to(logits.device).unsqueeze(0)] = float("-inf")
    out = logits.clone()
    out[rows] = sub
    return out
