"""Bookkeeping of the paged KV cache: which block of the pool holds what, and which full blocks
can be reused by a later sequence (prefix caching). Pure Python, no torch: the tensors live in
``gateway.paged_attention``; this module only hands out block numbers.

A block holds ``block_size`` consecutive positions of one sequence. Blocks are reference-counted:
a sequence holds a reference on each block of its table, and a block reached through the prefix
cache may be shared by several sequences. A *full* block gets a content key, a digest of
(the adapter version, every token up to and including the block): two sequences that share a key
share the same keys and values at those positions, because LoRA and IA3 change k and v and the
key covers the adapter. When its last reference goes, a keyed block is not freed but kept as
*cached* (least recently released first out); an unkeyed one goes back to the free list.

Placement: any block serves any sequence, but a sequence whose blocks are consecutive in the pool
can be read in place (``gateway.paged_attention`` attends long rows over views of their runs
instead of copying them). So a sequence grows into the block after its last when that one is
free, and a sequence that starts (or cannot grow in place) takes the lowest free run with room
for what it is expected to need, outside the ranges the others are expected to grow into.
Lowest first keeps the touched part of the pool small. Contiguity outranks keeping a cached
block: growth may take the next block when it is only cached, and a new run may span cached
blocks when no free run has room (the least recently released half first: a prefix served a
moment ago is the likeliest to be asked for again); failing all that, the longest run there is.
Without this, a pool full of cached blocks (the steady state: they are evicted only on demand)
would hand out LRU blocks scattered over the pool, and long sequences would split into many runs.
"""

from __future__ import annotations

import collections
import hashlib
from collections.abc import Callable, Iterable, Sequence


class OutOfBlocksError(Exception):
    """Every block is referenced by a running sequence; nothing can be evicted."""


def root_key(adapter_key: str) -> bytes:
    """The chain's start for one adapter version ("" for the base model)."""
    return hashlib.blake2b(b"adapter:" + adapter_key.encode(), digest_size=16).digest()


def chain_key(parent: bytes, tokens: Sequence[int]) -> bytes:
    """The key of a full block holding ``tokens``, after the block whose key is ``parent``."""
    return hashlib.blake2b(parent + ",".join(map(str, tokens)).encode(), digest_size=16).digest()


def block_keys(adapter_key: str, tokens: Sequence[int], block_size: int) -> list[bytes]:
    """Keys of every full block of ``tokens``, in order."""
    keys: list[bytes] = []
    parent = root_key(adapter_key)
    for start in range(0, len(tokens) - block_size + 1, block_size):
        parent = chain_key(parent, tokens[start:start + block_size])
        keys.append(parent)
    return keys


def _longest_run(candidates: bytes | bytearray) -> int:
    """Start of the longest run of 1s (the lowest among equals), or -1 when there is none."""
    best_start, best_length, position = -1, 0, 0
    for run in bytes(candidates).split(b"\x00"):
        if len(run) > best_length:
            best_start, best_length = position, len(run)
        position += len(run) + 1
    return best_start


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, prefix_caching: bool = True):
        if num_blocks < 1 or block_size < 1:
            raise ValueError("the KV pool needs at least one block of at least one token")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.prefix_caching = prefix_caching
        self._is_free = bytearray(b"\x01" * num_blocks)  # 1 where a block is free (searched with ``find``)
        self._free_count = num_blocks
        self._refs = [0] * num_blocks
        self._key_of: dict[int, bytes] = {}  # block -> content key (full blocks only)
        self._by_key: dict[bytes, int] = {}  # content key -> block
        self._cached: collections.OrderedDict[int, None] = collections.OrderedDict()  # refs == 0, keyed; LRU first
        self.hit_tokens = 0  # prefix-cache statistics since start
        self.query_tokens = 0

    # ---- counts ------------------------------------------------------------------------------
    @property
    def used(self) -> int:
        """Blocks referenced by at least one sequence."""
        return self.num_blocks - self._free_count - len(self._cached)

    @property
    def cached(self) -> int:
        """Unreferenced blocks kept for prefix reuse (evicted first when the pool is short)."""
        return len(self._cached)

    @property
    def available(self) -> int:
        """Blocks an allocation can take: free ones and cached ones (evicted on demand)."""
        return self._free_count + len(self._cached)

    def blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.block_size)

    # ---- allocation --------------------------------------------------------------------------
    def allocate(self, after: int | None = None, room: int = 1,
                 avoid: Callable[[], Iterable[tuple[int, int]]] | None = None) -> int:
        """A block for a sequence whose last block is ``after`` (None: its first), expected to
        need ``room`` more blocks (this one included). When it cannot grow into the block after
        ``after``, it starts a new run outside the ranges ``avoid()`` names (where other sequences
        are expected to grow) if it can. A cached block taken is evicted from the prefix cache."""
        if after is not None and after + 1 < self.num_blocks and self._refs[after + 1] == 0:
            block = after + 1  # free or only cached
        elif self._free_count or self._cached:
            block = self._run_start(max(1, room), avoid() if avoid is not None else ())
        else:
            raise OutOfBlocksError("the KV cache has no free block")
        if self._is_free[block]:
            self._is_free[block] = 0
            self._free_count -= 1
        else:
            self._evict(block)
        self._refs[block] = 1
        return block

    def _run_start(self, room: int, avoid: Iterable[tuple[int, int]]) -> int:
        """First block of a new run, by preference: the lowest run of ``room`` free blocks outside
        ``avoid``; the lowest such run of free blocks and the older half of the cached ones, then of
        free or any cached blocks; the start of the longest run of free or cached blocks outside
        ``avoid``, then anywhere."""
        ranges = [(max(start, 0), min(end, self.num_blocks)) for start, end in avoid]

        def outside(candidates: bytearray) -> bytearray:
            for start, end in ranges:
                if end > start:
                    candidates[start:end] = bytes(end - start)
            return candidates

        want = b"\x01" * room
        block = outside(bytearray(self._is_free)).find(want)
        if block >= 0:
            return block
        # cached blocks may join the run: first only the least recently released half (a prefix
        # served a moment ago is the likeliest to be asked for again), then all of them
        unreferenced = bytearray(self._is_free)
        cached = list(self._cached)  # least recently released first
        taken = 0
        for share in (len(cached) // 2, len(cached)):
            for index in range(taken, share):
                unreferenced[cached[index]] = 1
            taken = share
            block = outside(bytearray(unreferenced)).find(want)
            if block >= 0:
                return block
        block = _longest_run(outside(bytearray(unreferenced)))
        return block if block >= 0 else _longest_run(unreferenced)

    def _evict(self, block: int) -> None:
        """Forget a cached block's content: it is about to hold something else."""
        del self._cached[block]
        del self._by_key[self._key_of.pop(block)]

    def release(self, blocks: Sequence[int]) -> None:
        """Drop one reference on each block (a finished, cancelled or preempted sequence). Last
        block first: a chain's tail becomes the least recently released, so eviction takes tails
        before heads, and what stays cached is still a prefix some request can match (an evicted
        head would leave its whole tail unreachable while it takes up room)."""
        for block in reversed(blocks):
            self._refs[block] -= 1
            if self._refs[block] < 0:
                raise AssertionError(f"block {block} released more often than taken")
            if self._refs[block] == 0:
                if block in self._key_of:
                    self._cached[block] = None
                else:
                    self._is_free[block] = 1
                    self._free_count += 1

    # ---- prefix cache ------------------------------------------------------------------------
    def match_prefix(self, keys: Sequence[bytes]) -> list[int]:
        """Take a reference on the longest run of cached blocks matching ``keys`` from the start."""
        blocks: list[int] = []
        if self.prefix_caching:
            for key in keys:
                block = self._by_key.get(key)
                if block is None:
                    break
                if self._refs[block] == 0:
                    del self._cached[block]
                self._refs[block] += 1
                blocks.append(block)
        return blocks

    def count_query(self, query_tokens: int, hit_tokens: int) -> None:
        """Prefix-cache statistics of one admitted sequence."""
        self.query_tokens += query_tokens
        self.hit_tokens += hit_tokens

    def publish(self, block: int, key: bytes) -> None:
        """Record that the (now full) ``block`` holds the content ``key``. If another block already
        holds that content, the first one stays the one found (no duplicate entries)."""
        if not self.prefix_caching or block in self._key_of or key in self._by_key:
            return
        self._key_of[block] = key
        self._by_key[key] = block

    def check(self) -> None:
        """Invariants (tests): every block is exactly one of free, cached or referenced."""
        free, cached = {b for b in range(self.num_blocks) if self._is_free[b]}, set(self._cached)
        assert len(free) == self._free_count and not free & cached
        for block in range(self.num_blocks):
            refs = self._refs[block]
            assert refs >= 0
            assert (block in free) + (block in cached) + (refs > 0) == 1, block
            assert (block in cached) <= (block in self._key_of)
        assert all(self._by_key[k] == b for b, k in self._key_of.items())
