"""Segmented LoRA as two Triton kernels (SGMV: shrink, then expand), the fused path on CUDA.

A packed forward's tokens come in runs of one adapter slot (``TokenLayout.segments``). The runs
are cut into tiles of at most ``TILE`` tokens, ``tiles [T, 3]`` int32 rows of (first token,
end of its run, slot), built once per forward. For one rank bucket of one layer
(``lora_buckets.RankBucket``), one launch of each kernel covers every tile: a tile whose slot is
not in the bucket does nothing, so a bucket costs only what its own rows need, and an idle
adapter costs nothing. Per tile:

- shrink: ``s[rows] = x[rows] @ a[row_of_slot[slot]]`` (``[m, in] @ [in, rank]``), s in the
  weights' dtype, as PEFT rounds ``lora_A(x)``;
- expand: ``y[rows] = (y[rows] + s[rows] @ b[...]) * channel + shift`` (``[m, rank] @ [rank, out]``);
  channel and shift are DoRA's, 1 and 0 for a plain slot, skipped when the bucket has no DoRA slot.

Accumulation is float32; float32 inputs multiply in IEEE float32, never TF32, so the result
matches the torch path (and PEFT) to float32 rounding. Triton is imported only when this path is
chosen (``lora_kernel``); the CPU test suite runs these kernels in Triton's interpreter.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from adapters.kinds.lora_buckets import RankBucket

TILE = 16  # tokens per tile (a dot product needs 16 rows at least)
BLOCK_M = tl.constexpr(TILE)  # the same, as kernels read a global


def segment_tiles(segments: Sequence[tuple[int, int, int]], device: torch.device) -> torch.Tensor:
    """The ``[T, 3]`` int32 tiles (first token, run end, slot) of the adapter runs ``segments``
    (slot 0, the base, has none)."""
    tiles = [(row, end, slot) for start, end, slot in segments if slot for row in range(start, end, TILE)]
    table = torch.tensor(tiles, dtype=torch.int32).view(-1, 3)
    if device.type == "cuda":  # from pinned memory the copy queues behind the forward's kernels: no host wait
        return table.pin_memory().to(device, non_blocking=True)
    return table.to(device)


@triton.jit
def _tile(tiles_ptr, row_of_slot_ptr):
    """This program's tile: its tokens ``[BLOCK_M]``, which of them are in the run, and the tile
    adapter's row of the bucket's stack (-1: not in this bucket)."""
    tile = tl.program_id(0)
    tokens = tl.load(tiles_ptr + tile * 3) + tl.arange(0, BLOCK_M)
    live = tokens < tl.load(tiles_ptr + tile * 3 + 1)
    row = tl.load(row_of_slot_ptr + tl.load(tiles_ptr + tile * 3 + 2))
    return tokens, live, row


@triton.jit
def _dot(a, b, IEEE: tl.constexpr):
    if IEEE:  # float32 in, float32 products: never TF32
        return tl.dot(a, b, input_precision="ieee")
    return tl.dot(a, b)


@triton.jit
def _shrink(x_ptr, a_ptr, s_ptr, tiles_ptr, row_of_slot_ptr, in_features, stride_x, stride_s,
            RANK: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, IEEE: tl.constexpr):
    tokens, live, row = _tile(tiles_ptr, row_of_slot_ptr)
    if row >= 0:
        ranks = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
        a = a_ptr + row.to(tl.int64) * in_features * RANK
        acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        for k0 in range(0, in_features, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            inside = ks < in_features
            xt = tl.load(x_ptr + tokens[:, None].to(tl.int64) * stride_x + ks[None, :],
                         mask=live[:, None] & inside[None, :], other=0.0)
            at = tl.load(a + ks[:, None] * RANK + ranks[None, :], mask=inside[:, None], other=0.0)
            acc += _dot(xt, at, IEEE)
        tl.store(s_ptr + tokens[:, None].to(tl.int64) * stride_s + ranks[None, :],
                 acc.to(s_ptr.dtype.element_ty), mask=live[:, None])


@triton.jit
def _expand(s_ptr, b_ptr, y_ptr, channel_ptr, shift_ptr, tiles_ptr, row_of_slot_ptr, out_features, stride_s,
            stride_y, RANK: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, RESCALED: tl.constexpr,
            IEEE: tl.constexpr):
    tokens, live, row = _tile(tiles_ptr, row_of_slot_ptr)
    if row >= 0:
        cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        inside = cols < out_features
        b = b_ptr + row.to(tl.int64) * RANK * out_features
        delta = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for r0 in range(0, RANK, BLOCK_R):
            ranks = r0 + tl.arange(0, BLOCK_R)
            st = tl.load(s_ptr + tokens[:, None].to(tl.int64) * stride_s + ranks[None, :], mask=live[:, None],
                         other=0.0)
            bt = tl.load(b + ranks[:, None] * out_features + cols[None, :], mask=inside[None, :], other=0.0)
            delta += _dot(st, bt, IEEE)
        where = y_ptr + tokens[:, None].to(tl.int64) * stride_y + cols[None, :]
        mask = live[:, None] & inside[None, :]
        out = tl.load(where, mask=mask, other=0.0).to(tl.float32) + delta
        if RESCALED:
            channel = tl.load(channel_ptr + row.to(tl.int64) * out_features + cols, mask=inside, other=1.0)
            shift = tl.load(shift_ptr + row.to(tl.int64) * out_features + cols, mask=inside, other=0.0)
            out = out * channel.to(tl.float32)[None, :] + shift.to(tl.float32)[None, :]
        tl.store(where, out.to(y_ptr.dtype.element_ty), mask=mask)


def add_bucket(y: torch.Tensor, x: torch.Tensor, tiles: torch.Tensor, bucket: RankBucket) -> None:
    """``y [N, out] += LoRA delta`` (then DoRA's rescale) for every tile whose slot is in ``bucket``;
    ``x [N, in]`` in the bucket's dtype, rows contiguous."""
    count = tiles.shape[0]
    if count == 0 or len(bucket) == 0:
        return
    if x.stride(-1) != 1 or y.stride(-1) != 1:
        raise ValueError("the LoRA kernel needs rows stored contiguously")
    ieee = x.dtype == torch.float32
    shrunk = torch.empty(x.shape[0], bucket.rank, dtype=bucket.dtype, device=x.device)
    block_r = min(bucket.rank, 64)  # ranks per program: a rank-256 bucket is 4 programs per tile
    _shrink[(count, bucket.rank // block_r)](
        x, bucket.a, shrunk, tiles, bucket.row_of_slot, bucket.in_features, x.stride(0), shrunk.stride(0),
        RANK=bucket.rank, BLOCK_R=block_r, BLOCK_K=_block(bucket.in_features), IEEE=ieee)
    block_n = _block(bucket.out_features)
    _expand[(count, triton.cdiv(bucket.out_features, block_n))](
        shrunk, bucket.b, y, bucket.channel, bucket.shift, tiles, bucket.row_of_slot, bucket.out_features,
        shrunk.stride(0), y.stride(0), RANK=bucket.rank, BLOCK_R=block_r, BLOCK_N=block_n,
        RESCALED=bucket.rescaled, IEEE=ieee)


def _block(features: int) -> int:
    """Features per program step: a power of two from 16 (a dot product's least) to 64; the kernels
    mask what lies past ``features``."""
    return max(16, min(64, triton.next_power_of_2(features)))
