"""Attention over a paged KV pool, plugged into transformers' attention interface.

The pool holds, per layer, keys and values of ``num_blocks * block_size`` positions, head-major:
``[kv_heads, slots, head_dim]`` where slot = block * block_size + offset, so one block of one head
(``block_size`` positions) is one contiguous run. A packed forward feeds the model one flat batch
``[1, N]`` of tokens from many sequences (prefill chunks and decode tokens) with per-token
positions; the model's own projections and rotary embeddings run as usual, and this module's
attention function, registered as ``gateway_paged``, then

1. writes the N new keys/values into their pool slots (``PagedStep.write_slots``), and
2. attends each query to its own sequence's positions only:
   - every prefill chunk alone: its queries against its whole context (cached prefix + chunk),
     causal with the chunk's offset;
   - decode tokens (one query each) in groups of similar context length, gathered to the
     group's longest context and masked, so a long row never pads the short ones.
   A long decode row whose blocks form a few runs of consecutive blocks (the block manager
   places them so) is attended in place instead, over views of those runs: its keys and values
   are read once, never copied. Elsewhere keys and values are gathered with one ``index_select`` of (head, block) runs straight into
   SDPA's ``[rows, kv_heads, positions, head_dim]`` layout, contiguous, so the kernel reads them
   without another copy. A decode query is one position, so the query heads that share a KV head
   are folded into that head's query length (``[rows, kv_heads, heads / kv_heads, head_dim]``):
   grouped-query attention without expanding keys and values.

Why not transformers' own continuous-batching attention: its SDPA path attends all packed queries
to all packed keys under one block-diagonal mask (work and memory grow with the product of the
batch's total query and key lengths), and its cache and scheduler own the requests, where this
gateway needs per-token adapter slots, prompt-tuning embeddings and its own admission. The model
code, its projections and torch's SDPA kernels are reused unchanged; only the KV layout is ours.
On CUDA a paged kernel (flash-attn's block tables) can replace ``_attend`` behind this interface.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

IMPLEMENTATION = "gateway_paged"


@dataclass
class PrefillChunk:
    """Queries ``[q_start, q_end)`` of the packed batch: positions ``start .. start + len`` of one
    sequence, whose whole context ``[0, start + len)`` is gathered by ``gather``."""

    q_start: int
    q_end: int
    start: int  # position of the chunk's first token in its sequence
    gather: torch.Tensor  # [kv_heads * blocks] long: ``KVPool.gather_index`` of the blocks read

    @property
    def length(self) -> int:
        return self.start + self.q_end - self.q_start


@dataclass
class DecodeGroup:
    """Single-token queries at packed indices ``q_index [B]``; row i attends the positions of its
    gathered blocks where ``bias[i]`` is 0 (its own length; -inf over the padding blocks, which
    repeat its first)."""

    q_index: torch.Tensor  # [B] long
    gather: torch.Tensor  # [B * kv_heads * nb] long: ``KVPool.gather_index`` of [B, nb] blocks
    bias: torch.Tensor  # [B, 1, 1, nb * block_size] additive mask: 0 where attended, -inf elsewhere


@dataclass
class DecodeRuns:
    """A single-token query at packed index ``q_index`` whose context lies in a few runs of
    consecutive pool slots, ``(first slot, positions)`` in order: attended in place, no copy."""

    q_index: int
    runs: list[tuple[int, int]]


@dataclass
class PagedStep:
    write_slots: torch.Tensor  # [N] long: pool slot of every packed token
    chunks: list[PrefillChunk] = field(default_factory=list)
    groups: list[DecodeGroup] = field(default_factory=list)
    in_place: list[DecodeRuns] = field(default_factory=list)
    # prefix tuning: (pool slots of a row's virtual positions, [layers * 2, n, kv_heads, d] keys and
    # values for them); written over what the layers compute there, before attention reads them
    prefixes: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)


class KVPool:
    """Preallocated keys and values of every layer (one tensor each, ``[layers, kv_heads, slots, head_dim]``)."""

    def __init__(self, layers: int, num_blocks: int, block_size: int, kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device):
        shape = (layers, kv_heads, num_blocks * block_size, head_dim)
        # empty, not zeros: memory is touched only as blocks come into use (written, or ``zero_slots``)
        self.keys = torch.empty(shape, dtype=dtype, device=device)
        self.values = torch.empty(shape, dtype=dtype, device=device)
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.step: PagedStep | None = None  # set for the duration of one packed forward
        # gathered keys and values land here, reused by every layer and step: a fresh tensor of
        # that size per layer costs more in page faults on CPU than the copy itself
        self._gathered = (torch.empty(0, dtype=dtype, device=device), torch.empty(0, dtype=dtype, device=device))

    def gather(self, layer: int, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of the (head, block) runs ``index`` of ``layer``: two
        ``[len(index), block_size, head_dim]`` views of the workspace, valid until the next call."""
        d = self.keys.shape[-1]
        size = index.shape[0] * self.block_size * d
        if self._gathered[0].numel() < size:
            self._gathered = tuple(torch.empty(size, dtype=self.keys.dtype, device=self.keys.device) for _ in range(2))
        out_k, out_v = (buf[:size].view(-1, self.block_size, d) for buf in self._gathered)
        torch.index_select(self.keys[layer].view(-1, self.block_size, d), 0, index, out=out_k)
        torch.index_select(self.values[layer].view(-1, self.block_size, d), 0, index, out=out_v)
        return out_k, out_v

    @property
    def workspace_bytes(self) -> int:
        return sum(buf.numel() * buf.element_size() for buf in self._gathered)

    def gather_index(self, blocks: torch.Tensor) -> torch.Tensor:
        """Block tables ``[B, nb]`` -> the ``[B * kv_heads * nb]`` indices of their (head, block)
        runs in a layer's ``[kv_heads * num_blocks, block_size, head_dim]`` view, ordered so that
        the gathered runs are ``[B, kv_heads, nb * block_size, head_dim]``."""
        heads = torch.arange(self.keys.shape[1], device=blocks.device).view(1, -1, 1) * self.num_blocks
        return (heads + blocks.unsqueeze(1)).reshape(-1)

    @property
    def bytes_per_token(self) -> int:
        layers, heads, _, dim = self.keys.shape
        return 2 * layers * heads * dim * self.keys.element_size()

    def zero_slots(self, slots: torch.Tensor) -> None:
        """Zero the keys and values at pool ``slots`` in every layer. Attention reads whole blocks
        and masks the positions a row has not written; a masked position must still hold a finite
        number, since NaN times a zero weight is NaN. A block new to a row may hold anything there:
        the pool's first, never-written memory, or what its last owner left (an adapter that
        overflowed, say). The runner zeroes those positions before a forward can read them."""
        self.keys.index_fill_(2, slots, 0)
        self.values.index_fill_(2, slots, 0)

    @contextlib.contextmanager
    def active(self, model: torch.nn.Module, step: PagedStep) -> Iterator[None]:
        """Within the block, the model's attention reads and writes this pool for ``step``."""
        config = model.config
        previous = config._attn_implementation
        self.step = step
        config._attn_implementation = IMPLEMENTATION
        _ACTIVE.append(self)
        try:
            yield
        finally:
            _ACTIVE.pop()
            config._attn_implementation = previous
            self.step = None


_ACTIVE: list[KVPool] = []  # the pool of the forward in progress (the engine runs one at a time)


def _attend(pool: KVPool, layer: int, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
            scaling: float | None) -> torch.Tensor:
    """query ``[1, heads, N, d]``, key/value ``[1, kv_heads, N, d]`` -> output ``[1, N, heads, d]``."""
    step = pool.step
    keys, values = pool.keys[layer], pool.values[layer]  # [kv_heads, slots, d]
    keys.index_copy_(1, step.write_slots, key[0].to(keys.dtype))
    values.index_copy_(1, step.write_slots, value[0].to(values.dtype))
    for slots, prefix in step.prefixes:
        keys.index_copy_(1, slots, prefix[2 * layer].transpose(0, 1).to(keys.dtype))
        values.index_copy_(1, slots, prefix[2 * layer + 1].transpose(0, 1).to(values.dtype))
    q = query[0]  # [heads, N, d]
    heads, kv_heads, d = q.shape[0], keys.shape[0], q.shape[2]
    out = q.new_empty(q.shape[1], heads, d)  # [N, heads, d]

    def gathered(index: torch.Tensor, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values ``[rows, kv_heads, positions, d]``, contiguous, in the query's dtype."""
        k, v = pool.gather(layer, index)
        return k.view(rows, kv_heads, -1, d).to(q.dtype), v.view(rows, kv_heads, -1, d).to(q.dtype)

    for chunk in step.chunks:
        k, v = gathered(chunk.gather, 1)
        length = chunk.length  # the slice keeps the leading positions: a view, no copy
        k, v = k[:, :, :length], v[:, :, :length]
        qc = q[:, chunk.q_start:chunk.q_end].unsqueeze(0)  # [1, heads, C, d]
        if chunk.start == 0:
            o = F.scaled_dot_product_attention(qc, k, v, is_causal=True, scale=scaling, enable_gqa=True)
        else:  # query i sits at position start + i and sees positions <= start + i
            rows = torch.arange(chunk.q_end - chunk.q_start, device=q.device) + chunk.start
            allowed = torch.arange(length, device=q.device).unsqueeze(0) <= rows.unsqueeze(1)
            o = F.scaled_dot_product_attention(qc, k, v, attn_mask=allowed, scale=scaling, enable_gqa=True)
        out[chunk.q_start:chunk.q_end] = o[0].transpose(0, 1)
    for group in step.groups:
        rows = group.q_index.shape[0]
        k, v = gathered(group.gather, rows)
        # [B, kv_heads, heads / kv_heads, d]: query head h reads KV head h // (heads / kv_heads)
        qg = q.index_select(1, group.q_index).transpose(0, 1).reshape(rows, kv_heads, heads // kv_heads, d)
        o = F.scaled_dot_product_attention(qg, k, v, attn_mask=group.bias, scale=scaling)
        out.index_copy_(0, group.q_index, o.reshape(rows, heads, d))
    scale = scaling if scaling is not None else d ** -0.5
    for row in step.in_place:
        qr = q[:, row.q_index].view(kv_heads, heads // kv_heads, d)  # [kv_heads, heads / kv_heads, d]
        if len(row.runs) == 1:  # one view of the pool, [kv_heads, positions, d]: one kernel call
            s, n = row.runs[0]
            o = F.scaled_dot_product_attention(qr.unsqueeze(0), keys[None, :, s:s + n].to(q.dtype),
                                               values[None, :, s:s + n].to(q.dtype), scale=scaling)
            out[row.q_index] = o.reshape(heads, d)
            continue
        # scores over every run, [kv_heads, heads / kv_heads, positions]; the runs are views of the pool
        scores = torch.cat([torch.matmul(qr, keys[:, s:s + n].transpose(1, 2).to(q.dtype)) for s, n in row.runs],
                           dim=-1)
        probs = (scores.float() * scale).softmax(-1).to(q.dtype)
        o, seen = None, 0
        for s, n in row.runs:
            part = torch.matmul(probs[..., seen:seen + n], values[:, s:s + n].to(q.dtype))
            o, seen = part if o is None else o + part, seen + n
        out[row.q_index] = o.reshape(heads, d)
    return out.unsqueeze(0)


def paged_attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                            attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                            **kwargs) -> tuple[torch.Tensor, None]:
    if not _ACTIVE:  # a forward outside the engine's packed step (e.g. training): plain SDPA
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    return _attend(_ACTIVE[-1], module.layer_idx, query, key, value, scaling), None


AttentionInterface.register(IMPLEMENTATION, paged_attention_forward)
