"""The paged engine: continuous batching over a paged KV cache, with chunked prefill, prefix
caching keyed by adapter version, and preemption by recomputation.

Each step:
1. finish cancelled rows (their blocks go back to the pool, full ones stay as prefix cache);
2. admit waiting sequences while a batch row and enough KV blocks are free: a sequence first
   takes the longest cached prefix of its own adapter version (``gateway.kv_blocks``);
3. schedule tokens: one for every decoding row, then chunks of pending prompts up to a budget
   (``gateway.step_budget`` while rows decode, so a long prompt is spread over many steps instead
   of stalling every stream; ``max_prefill_tokens`` when none does);
4. give each scheduled row the blocks it needs; when the pool runs dry, the most recently
   admitted row is preempted (its blocks freed, its tokens kept) and queued again at the front,
   to be recomputed later — often from its own cached blocks;
5. run one packed forward (``gateway.paged_runner``) with the rows of each adapter adjacent;
   if it raises, each adapter's rows run alone, so a failing adapter fails only its own rows;
6. publish newly filled blocks to the prefix cache, and sample rows that reached their end.
"""

from __future__ import annotations

import logging
import time

from gateway.engine import GENERATION_FAILED, Engine, KVCacheDemandError, _Sequence
from gateway.kv_blocks import BlockManager, OutOfBlocksError, block_keys, chain_key, root_key
from gateway.paged_runner import PagedRunner, StepItem, virtual_entries
from gateway.step_budget import StepBudget

log = logging.getLogger(__name__)

# Most prompt positions scored (echo with logprobs) in one step, over all sequences: their logits
# are all kept ([tokens, vocab] float32, ~50 MB at 256 tokens and a 49k vocabulary). Per sequence,
# 16 scoring sequences shared a 4,096-token prefill step: 0.8 GB of logits.
SCORED_CHUNK_TOKENS = 256


class PagedEngine(Engine):
    def __init__(self, runner: PagedRunner, tokenizer, *, blocks: BlockManager, max_step_tokens: int,
                 max_decode_slowdown: float | None = None, max_request_blocks: int | None = None, **options):
        """``max_step_tokens`` / ``max_decode_slowdown``: the prompt tokens a step with decoding rows
        may compute (``gateway.step_budget``). ``max_request_blocks``: the most KV blocks one
        request's sequences may need together at their longest (None: no bound; ``gateway.engines``
        gives half the pool)."""
        super().__init__(runner, tokenizer, **options)
        capacity = blocks.num_blocks * blocks.block_size
        if capacity < self.context_window:
            raise ValueError(f"the KV cache holds {capacity} tokens, less than one context window "
                             f"({self.context_window}); give it more memory")
        self.blocks = blocks
        self.step_budget = StepBudget(max_step_tokens, max_decode_slowdown)
        self.clock = time.perf_counter  # times steps for the budget
        self.max_request_blocks = max_request_blocks
        self.preemptions = 0

    def _check_demand(self, seqs: list[_Sequence]) -> None:
        """Refuse a request whose sequences (n choices of each of its prompts) could fill more than
        its share of the KV pool. One such request (n 8, 4,000 prompt tokens, max_tokens 4,096:
        twice the CPU pool) kept every other client's request waiting behind its preempted
        sequences for thousands of steps."""
        if self.max_request_blocks is None:
            return
        bs = self.blocks.block_size
        needed = sum(self.blocks.blocks_for(self._peak(s)) for s in seqs)
        if needed > self.max_request_blocks:
            longest = max(self._length(s) + s.max_new for s in seqs)
            raise KVCacheDemandError(
                f"this request could need {needed * bs} positions of KV cache ({len(seqs)} sequences, n for each "
                f"prompt, of up to {longest} tokens each, prompt and max_tokens), more than one request may hold "
                f"({self.max_request_blocks * bs}); lower n or max_tokens, or send fewer prompts")

    # ---- figures for metrics (read from other threads) ------------------------------------------
    @property
    def live_tokens(self) -> int:
        """Positions the running sequences hold in the KV cache."""
        return sum(s.computed for s in list(self._running))

    # ---- one sequence's inputs --------------------------------------------------------------------
    @staticmethod
    def _length(seq: _Sequence) -> int:
        return seq.virtual_tokens + len(seq.request.prompt_ids) + len(seq.tokens)

    @staticmethod
    def _peak(seq: _Sequence) -> int:
        """Positions the sequence holds at its longest: the last token it may generate ends it,
        so that token's keys and values are never computed."""
        return seq.virtual_tokens + len(seq.request.prompt_ids) + max(seq.max_new - 1, 0)

    @staticmethod
    def _entries(seq: _Sequence, start: int, end: int) -> list[int]:
        """Entries ``start .. end`` of: virtual tokens, then the prompt, then generated tokens."""
        virtual, prompt = seq.virtual_tokens, seq.request.prompt_ids
        out: list[int] = []
        if start < virtual:
            out += virtual_entries(virtual)[start:end]
        lo, hi = max(start - virtual, 0), max(end - virtual, 0)
        if lo < len(prompt):
            out += prompt[lo:hi]
        lo, hi = max(lo - len(prompt), 0), max(hi - len(prompt), 0)
        if hi > lo:
            out += seq.tokens[lo:hi]
        return out

    # ---- the step ----------------------------------------------------------------------------------
    def _step(self) -> None:
        for seq in self._running:
            if seq.request.cancelled and not seq.done:
                self._finish(seq, "cancelled")
        self._prune()
        self._admit()
        plan = self._allocate(self._schedule())
        if not plan:
            return
        plan.sort(key=lambda p: p[0].request.slot)  # each adapter's tokens adjacent: one LoRA segment
        pending = [self._length(seq) - seq.computed for seq, _ in plan]
        decoding = 1 in pending
        prompt_tokens = sum(count for (_, count), left in zip(plan, pending, strict=True) if left > 1)
        started = self.clock()
        for part, logits in self._forward(plan):
            self._advance(part, logits)
        if decoding:
            self.step_budget.observe(prompt_tokens, self.clock() - started)
        self.steps += 1
        self._prune()

    def _prune(self) -> None:
        self._running = [s for s in self._running if not s.done]

    def _admit(self) -> None:
        bs = self.blocks.block_size
        # blocks the running prompts and the sequences admitted in this pass still take (only
        # _allocate takes them): counted, or one pass admits more than the pool holds
        promised = sum(max(0, self.blocks.blocks_for(self._length(s)) - len(s.blocks)) for s in self._running)
        with self._cv:
            self._sweep_waiting()
            for seq in self._admissible():
                if len(self._running) >= self.max_batch_size:
                    break
                if self._copy_in_prefill(seq):
                    seq.waiting_since = time.monotonic()  # not waiting for a row: no queue timeout yet
                    continue  # the blocks its request's first choice publishes will serve it
                length = self._length(seq)
                # the last entry is always computed: its logits choose the next token
                keys = block_keys(seq.request.cache_key, self._entries(seq, 0, length - 1), bs)
                # a prompt to score needs the logits of every position: no cached block may skip one
                hits = [] if seq.scoring_prompt else self.blocks.match_prefix(keys)
                need = self.blocks.blocks_for(length) - len(hits)
                reserve = len(self._running)  # room for the running rows to grow a block each
                if need + promised + reserve > self.blocks.available:
                    self.blocks.release(hits)
                    break
                promised += need
                if not seq.looked_up:  # a preempted row finding its own blocks again is no client's reuse
                    self.blocks.count_query(len(keys) * bs, len(hits) * bs)
                    seq.looked_up = True
                seq.blocks, seq.block_keys, seq.computed = hits, keys[:len(hits)], len(hits) * bs
                self._take_waiting(seq)
                self._running.append(seq)

    def _copy_in_prefill(self, seq: _Sequence) -> bool:
        """Whether another choice of ``seq``'s request is computing the prompt they share. The n
        choices admitted together each computed the whole prompt (n 8 of a 4,000-token prompt:
        32,000 prompt positions); waiting for the first one's cached blocks costs the others a step."""
        if not self.blocks.prefix_caching or seq.scoring_prompt:  # a scored prompt takes no cached block
            return False
        return any(s.request is seq.request and self._length(s) - s.computed > 1 for s in self._running)

    def _schedule(self) -> list[tuple[_Sequence, int]]:
        """(sequence, tokens to compute) for this step, within the step's token budget.

        Prompts are computed shortest remaining first: a short prompt behind a long one reaches its
        first token in a step or two, not after the whole long prefill (with the adaptive budget on
        a CPU, a minute). The prompt admitted first keeps half of each step's budget, so a run of
        short arrivals never starves it."""
        plan = [(s, 1) for s in self._running if self._length(s) - s.computed == 1]
        budget = self.step_budget.tokens() if plan else self.max_prefill_tokens  # decode tokens come on top
        prompts = [s for s in self._running if self._length(s) - s.computed > 1]
        scored = SCORED_CHUNK_TOKENS  # every scored position's logits come back: bound their memory
        takes: dict[_Sequence, int] = {}  # prompt tokens of each sequence this step

        def give(seq: _Sequence, most: int) -> None:
            nonlocal budget, scored
            room = self._length(seq) - seq.computed - takes.get(seq, 0)
            if seq.scoring_prompt:
                room = min(room, scored)
            take = min(room, most, budget)
            if take > 0:
                takes[seq] = takes.get(seq, 0) + take
                budget -= take
                if seq.scoring_prompt:
                    scored -= take

        if prompts and budget > 0:
            give(prompts[0], max(1, budget // 2))
            for seq in sorted(prompts, key=lambda s: self._length(s) - s.computed):
                give(seq, budget)
        return plan + [(s, takes[s]) for s in prompts if s in takes]

    def _allocate(self, plan: list[tuple[_Sequence, int]]) -> list[tuple[_Sequence, int]]:
        """Give every planned row the blocks its new tokens need, preempting rows when short."""
        bs = self.blocks.block_size
        planned = list(plan)
        for seq, count in plan:
            while not seq.done and seq in self._running and len(seq.blocks) * bs < seq.computed + count:
                try:
                    seq.blocks.append(self.blocks.allocate(after=seq.blocks[-1] if seq.blocks else None,
                                                           room=self._growth(seq),
                                                           avoid=lambda seq=seq: self._growth_ranges(seq)))
                except OutOfBlocksError:
                    victim = self._running[-1]
                    self._preempt(victim)
                    planned = [p for p in planned if p[0] is not victim]
        return planned

    def _growth(self, seq: _Sequence) -> int:
        """Blocks ``seq`` is still expected to take: until it has generated all it may."""
        return max(1, self.blocks.blocks_for(self._peak(seq)) - len(seq.blocks))

    def _growth_ranges(self, placing: _Sequence):
        """Where the other running sequences are expected to grow (past their last block)."""
        return [(s.blocks[-1] + 1, s.blocks[-1] + 1 + self._growth(s))
                for s in self._running if s.blocks and s is not placing]

    def _preempt(self, seq: _Sequence) -> None:
        log.info("KV cache full: preempting a sequence of %d positions (it will be recomputed)", seq.computed)
        self.preemptions += 1
        self._running.remove(seq)
        self._release(seq)
        seq.computed = 0
        seq.waiting_since = time.monotonic()  # it had a row: its queue timeout counts from now
        with self._cv:
            self._waiting.appendleft(seq)
            self._queued_tokens += seq.prefill_cost

    def _items(self, plan: list[tuple[_Sequence, int]]) -> list[StepItem]:
        return [StepItem(slot=seq.request.slot, entries=self._entries(seq, seq.computed, seq.computed + count),
                         start=seq.computed, blocks=seq.blocks,
                         want_logits=seq.computed + count == self._length(seq), all_logits=seq.scoring_prompt)
                for seq, count in plan]

    def _forward(self, plan: list[tuple[_Sequence, int]]):
        """[(part of the plan, its logits)]; a forward that raises is retried adapter by adapter,
        and the rows of an adapter that still fails end with an error (keys and values written
        by a failed forward sit beyond every row's computed length: they are never read)."""
        try:
            return [(plan, self.runner.forward(self._items(plan)))]
        except Exception:
            slots = sorted({seq.request.slot for seq, _ in plan})
            if len(slots) == 1:
                log.exception("a forward pass failed for adapter slot %d; failing its %d rows", slots[0], len(plan))
                for seq, _ in plan:
                    self._finish(seq, "error", error="internal error while generating", error_code=GENERATION_FAILED)
                return []
        results = []
        for slot in slots:
            results += self._forward([p for p in plan if p[0].request.slot == slot])
        return results

    def _advance(self, plan: list[tuple[_Sequence, int]], logits) -> None:
        bs = self.blocks.block_size
        sampled: list[_Sequence] = []
        rows: list[int] = []  # the logits row of each sampled sequence
        row = 0
        for seq, count in plan:
            if seq.scoring_prompt:  # this item brought the logits of all its positions
                self._score_prompt(seq, seq.computed, logits[row:row + count])
                row += count
                last = row - 1
            else:
                last = row
                row += int(seq.computed + count == self._length(seq))
            seq.computed += count
            full = seq.computed // bs
            if len(seq.block_keys) < full:
                parent = seq.block_keys[-1] if seq.block_keys else root_key(seq.request.cache_key)
                for index in range(len(seq.block_keys), full):
                    parent = chain_key(parent, self._entries(seq, index * bs, (index + 1) * bs))
                    self.blocks.publish(seq.blocks[index], parent)
                    seq.block_keys.append(parent)
            if seq.computed == self._length(seq):
                sampled.append(seq)
                rows.append(last)
        if sampled:
            self._emit(sampled, logits if row == len(rows) else logits[rows])

    def _release(self, seq: _Sequence) -> None:
        if seq.blocks:
            self.blocks.release(seq.blocks)
        seq.blocks, seq.block_keys = [], []
