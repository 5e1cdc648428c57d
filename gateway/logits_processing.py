"""Per-row logit adjustments before the next-token choice: ``repetition_penalty`` (an extension,
as in vLLM and transformers), OpenAI's ``frequency_penalty`` and ``presence_penalty``, then
``logit_bias``. The whole batch is adjusted in a few tensor operations (per-row values as
tensors, token counts by one scatter), never a loop over rows on the device; rows that ask for
none of this are left as they are, and a batch where no row asks costs nothing.

- repetition_penalty ``p``: every token seen in the prompt or the generated text has its logit
  divided by ``p`` when positive, multiplied by ``p`` when negative (``p > 1`` discourages).
- frequency_penalty ``f`` and presence_penalty ``q``: ``logit -= f * count + q * (count > 0)``,
  ``count`` being how often the token was generated so far (the prompt does not count).
- logit_bias: added to the logits of the listed tokens (-100 bans a token, 100 all but forces it).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch

from gateway.sampling import SamplingParams


def token_counts(histories: Sequence[Sequence[int]], vocab: int, device: torch.device) -> torch.Tensor:
    """``[rows, vocab]`` float32: how often each token occurs in each row's history (ids outside
    the vocabulary are not counted)."""
    lengths = torch.tensor([len(h) for h in histories], dtype=torch.long)
    counts = torch.zeros(len(histories), vocab + 1, dtype=torch.float32, device=device)
    if int(lengths.sum()) == 0:
        return counts[:, :vocab]
    ids = torch.tensor(list(itertools.chain.from_iterable(histories)), dtype=torch.long)
    ids = torch.where((ids >= 0) & (ids < vocab), ids, vocab)  # the spare column takes strays
    rows = torch.repeat_interleave(torch.arange(len(histories)), lengths)
    ones = torch.ones(ids.shape[0], dtype=torch.float32, device=device)
    counts.index_put_((rows.to(device), ids.to(device)), ones, accumulate=True)
    return counts[:, :vocab]


def adjust_logits(logits: torch.Tensor, params: Sequence[SamplingParams], prompts: Sequence[Sequence[int]],
                  generated: Sequence[Sequence[int]]) -> torch.Tensor:
    """``logits [rows, vocab]`` float32 -> the logits the choice is made from. The input is never
    modified (log-probabilities are reported from it); it is returned as is when no row adjusts."""
    rows = [r for r, p in enumerate(params) if p.adjusts_logits]
    if not rows:
        return logits
    device, vocab = logits.device, logits.shape[-1]
    chosen = [params[r] for r in rows]
    sub = logits[rows]  # a copy

    def per_row(values: list[float]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.float32, device=device).unsqueeze(-1)

    if any(p.repetition_penalty != 1.0 for p in chosen):
        seen = token_counts([list(prompts[r]) + list(generated[r]) for r in rows], vocab, device) > 0
        penalty = per_row([p.repetition_penalty for p in chosen])
        sub = torch.where(seen, torch.where(sub > 0, sub / penalty, sub * penalty), sub)
    if any(p.frequency_penalty or p.presence_penalty for p in chosen):
        counts = token_counts([generated[r] for r in rows], vocab, device)
        sub = sub - per_row([p.frequency_penalty for p in chosen]) * counts \
            - per_row([p.presence_penalty for p in chosen]) * (counts > 0).float()
    biased = [(i, token, bias) for i, p in enumerate(chosen) for token, bias in p.logit_bias if 0 <= token < vocab]
    if biased:
        where_rows = torch.tensor([i for i, _, _ in biased], dtype=torch.long, device=device)
        where_ids = torch.tensor([t for _, t, _ in biased], dtype=torch.long, device=device)
        values = torch.tensor([b for _, _, b in biased], dtype=torch.float32, device=device)
        sub = sub.index_put((where_rows, where_ids), values, accumulate=True)
    out = logits.clone()
    out[rows] = sub
    return out
