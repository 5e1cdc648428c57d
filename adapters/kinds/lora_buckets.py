"""LoRA weights of one layer stacked by rank bucket, for a fused kernel to read (``lora_triton``).

A kernel applies every segment of a forward in one launch per bucket, so it needs one tensor per
bucket that holds all its slots: ``a [capacity, in, rank]`` and ``b [capacity, rank, out]``, a
slot of a smaller rank zero-padded up to the bucket's (zeros add nothing to the delta). Buckets
are powers of two from ``MIN_BUCKET_RANK`` up, so an adapter of rank 16 or more pads to less than
twice its rank (a smaller one to 16), and a rank-256 adapter sits in a bucket of its own: launched
only when its rows are in the batch, and freed when it leaves. DoRA's per-channel rescale rides
along as ``channel`` (1 for a plain LoRA slot) and ``shift`` (0), so the kernel applies
``(y + delta) * channel + shift`` to every slot and a plain slot comes out unchanged.
"""

from __future__ import annotations

import torch

# a Triton dot product needs every dimension to be at least 16
MIN_BUCKET_RANK = 16


def bucket_rank(rank: int) -> int:
    """The bucket a LoRA of ``rank`` is stored in: the next power of two, at least ``MIN_BUCKET_RANK``."""
    return max(MIN_BUCKET_RANK, 1 << (rank - 1).bit_length())


class RankBucket:
    """The slots of one layer whose rank rounds up to ``rank``, stacked; rows of the stack are
    reused as slots come and go, and the stack doubles when full."""

    def __init__(self, rank: int, in_features: int, out_features: int, slots: int, dtype: torch.dtype,
                 device: torch.device):
        self.rank = rank
        self.in_features = in_features
        self.out_features = out_features
        self.dtype = dtype
        self.a = torch.zeros(0, in_features, rank, dtype=dtype, device=device)
        self.b = torch.zeros(0, rank, out_features, dtype=dtype, device=device)
        self.channel = torch.ones(0, out_features, dtype=dtype, device=device)
        self.shift = torch.zeros(0, out_features, dtype=dtype, device=device)
        self.rows: dict[int, int] = {}  # slot -> its row of the stack
        # slot -> row, -1 where the slot is not in this bucket: the kernel's lookup, [slots] int32
        self.row_of_slot = torch.full((slots,), -1, dtype=torch.int32, device=device)
        self._rescaled: set[int] = set()  # slots with a DoRA rescale

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def rescaled(self) -> bool:
        """Whether a slot here has a DoRA rescale (without one the kernel skips it)."""
        return bool(self._rescaled)

    def add(self, slot: int, a_t: torch.Tensor, b_t: torch.Tensor, channel: torch.Tensor | None,
            shift: torch.Tensor | None) -> int:
        """Store a slot's ``a_t [in, r]`` and ``b_t [r, out]`` (r <= rank) in a free row (zeroed
        first: a smaller rank leaves padding, a reused row holds its last slot's weights); return it."""
        used = set(self.rows.values())
        row = next((i for i in range(self.a.shape[0]) if i not in used), None)
        if row is None:
            row = self.a.shape[0]
            self._grow(max(1, 2 * row))
        r = a_t.shape[1]
        self.a[row].zero_()
        self.b[row].zero_()
        self.a[row, :, :r] = a_t
        self.b[row, :r] = b_t
        self.channel[row] = 1 if channel is None else channel
        self.shift[row] = 0 if shift is None else shift
        if channel is not None:
            self._rescaled.add(slot)
        self.rows[slot] = row
        self.row_of_slot[slot] = row
        return row

    def remove(self, slot: int) -> None:
        """Free the slot's row: the kernels no longer find the slot here (``add`` zeroes the row on reuse)."""
        del self.rows[slot]
        self.row_of_slot[slot] = -1
        self._rescaled.discard(slot)

    def _grow(self, capacity: int) -> None:
        def grown(old: torch.Tensor, fill: float) -> torch.Tensor:
            new = torch.full((capacity, *old.shape[1:]), fill, dtype=old.dtype, device=old.device)
            new[:old.shape[0]] = old
            return new

        self.a, self.b = grown(self.a, 0.0), grown(self.b, 0.0)
        self.channel, self.shift = grown(self.channel, 1.0), grown(self.shift, 0.0)
