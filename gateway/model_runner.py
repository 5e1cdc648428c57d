"""Batched forward passes over a left-padded KV cache shared by sequences of different lengths
and different adapters. Knows nothing of requests, sampling or HTTP.

Layout: every running sequence is one row of a ``DynamicCache`` whose tensors are
``[rows, kv_heads, T, head_dim]``; shorter sequences are left-padded, and ``mask [rows, T]``
marks the real positions (prompt-tuning virtual tokens count as real). Positions are
``cumsum(mask) - 1``, so a row's positions do not depend on the padding around it: this is what
lets new sequences join a running batch (``merge``) and finished ones leave (``select``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import DynamicCache

from adapters.runtime import AdapterRuntime


@dataclass
class BatchState:
    cache: DynamicCache
    mask: torch.Tensor  # [rows, T] long, 1 on real positions
    slots: list[int]  # device adapter slot of each row (0 = base)

    @property
    def size(self) -> int:
        return len(self.slots)


def _pad_left(t: torch.Tensor, length: int, dim: int) -> torch.Tensor:
    missing = length - t.shape[dim]
    if missing == 0:
        return t
    shape = list(t.shape)
    shape[dim] = missing
    return torch.cat([t.new_zeros(shape), t], dim=dim)


class ModelRunner:
    def __init__(self, model: torch.nn.Module, runtime: AdapterRuntime):
        self.model = model
        self.runtime = runtime
        self.device = runtime.device
        self.embed = model.get_input_embeddings()

    def row_embeddings(self, token_ids: Sequence[int], slot: int) -> torch.Tensor:
        """[L (+ virtual tokens), hidden] input embeddings of one prompt."""
        ids = torch.tensor(list(token_ids), dtype=torch.long, device=self.device)
        embeds = self.embed(ids)
        prompt = self.runtime.prompts.get(slot)
        if prompt is not None:
            embeds = torch.cat([prompt.to(embeds.dtype), embeds], dim=0)
        return embeds

    def virtual_tokens(self, slot: int) -> int:
        prompt = self.runtime.prompts.get(slot)
        return 0 if prompt is None else prompt.shape[0]

    @torch.inference_mode()
    def prefill(self, prompts: Sequence[Sequence[int]], slots: Sequence[int],
                all_logits: bool = False) -> tuple[torch.Tensor, BatchState]:
        """Run the prompts; return last-position logits ``[rows, vocab]`` (or ``[rows, T, vocab]``)."""
        rows = [self.row_embeddings(ids, slot) for ids, slot in zip(prompts, slots, strict=True)]
        length = max(r.shape[0] for r in rows)
        embeds = torch.stack([_pad_left(r, length, 0) for r in rows])
        mask = torch.stack([
            _pad_left(torch.ones(r.shape[0], dtype=torch.long, device=self.device), length, 0) for r in rows
        ])
        cache = DynamicCache()
        with self.runtime.rows(slots):
            out = self.model(
                inputs_embeds=embeds, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
                past_key_values=cache, use_cache=True, logits_to_keep=0 if all_logits else 1,
            )
        logits = out.logits if all_logits else out.logits[:, -1, :]
        return logits.float(), BatchState(cache=out.past_key_values, mask=mask, slots=list(slots))

    @torch.inference_mode()
    def decode(self, state: BatchState, token_ids: Sequence[int]) -> torch.Tensor:
        """Feed one token per row; returns ``[rows, vocab]`` logits and grows ``state`` in place."""
        ids = torch.tensor(list(token_ids), dtype=torch.long, device=self.device).unsqueeze(1)
        state.mask = torch.cat([state.mask, state.mask.new_ones(state.size, 1)], dim=1)
        positions = state.mask.sum(-1, keepdim=True) - 1
        with self.runtime.rows(state.slots):
            out = self.model(
                input_ids=ids, attention_mask=state.mask, position_ids=positions,
                past_key_values=state.cache, use_cache=True, logits_to_keep=1,
            )
        state.cache = out.past_key_values
        return out.logits[:, -1, :].float()

    @staticmethod
    def merge(a: BatchState | None, b: BatchState) -> BatchState:
        """Append the rows of ``b`` after those of ``a``, left-padding the shorter to one length."""
        if a is None or a.size == 0:
            return b
        length = max(a.mask.shape[1], b.mask.shape[1])
        for la, lb in zip(a.cache.layers, b.cache.layers, strict=True):
            la.keys = torch.cat([_pad_left(la.keys, length, 2), _pad_left(lb.keys, length, 2)])
            la.values = torch.cat([_pad_left(la.values, length, 2), _pad_left(lb.values, length, 2)])
        a.mask = torch.cat([_pad_left(a.mask, length, 1), _pad_left(b.mask, length, 1)])
        a.slots = a.slots + b.slots
        return a

    @staticmethod
    def select(state: BatchState, keep: Sequence[int]) -> BatchState | None:
        """Keep only the given rows, and drop leading columns that are padding for all of them."""
        if not keep:
            return None
        index = torch.tensor(list(keep), dtype=torch.long, device=state.mask.device)
        mask = state.mask.index_select(0, index)
        start = int((mask.sum(0) > 0).nonzero()[0].item())  # first column any row uses
        for layer in state.cache.layers:
            layer.keys = layer.keys.index_select(0, index)[:, :, start:]
            layer.values = layer.values.index_select(0, index)[:, :, start:]
        state.mask = mask[:, start:]
        state.slots = [state.slots[i] for i in keep]
        return state
