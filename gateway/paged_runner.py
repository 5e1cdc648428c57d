"""One packed forward over the paged KV cache: the tokens of many sequences (prefill chunks and
decode tokens, any adapters) as one flat batch. Knows nothing of requests, sampling or HTTP.

A sequence's inputs are ``entries``: token ids, and for prompt-tuning adapters negative entries
``-1 .. -V`` standing for its virtual tokens (so virtual tokens are just more tokens of the row:
they take positions, KV slots and prefix-cache keys like any other).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from adapters.runtime import AdapterRuntime
from gateway.paged_attention import DecodeGroup, DecodeRuns, KVPool, PagedStep, PrefillChunk


@dataclass
class StepItem:
    """Compute ``entries`` at positions ``start ..`` of one sequence whose blocks are ``blocks``."""

    slot: int
    entries: Sequence[int]
    start: int
    blocks: Sequence[int]
    want_logits: bool = True  # the item ends at the sequence's last entry: sample from it
    all_logits: bool = False  # logits of every entry (the prompt's log-probabilities are asked for)


def virtual_entries(count: int) -> list[int]:
    """The entries standing for an adapter's ``count`` virtual tokens, in order."""
    return [-1 - i for i in range(count)]


class PagedRunner:
    # decode rows whose context is shorter than this share of their group's longest start a new
    # group: gathering pads each row to its group's longest context, so this bounds that waste
    DECODE_GROUP_RATIO = 0.5
    # a decode row with at least this much context, held in at most IN_PLACE_MAX_RUNS runs of
    # consecutive blocks, is attended in place (CPU: a copy costs there what the attention costs;
    # below this length a row's own small matmuls cost more than its share of a group's copy)
    IN_PLACE_MIN_CONTEXT = 512
    IN_PLACE_MAX_RUNS = 8

    def __init__(self, model: torch.nn.Module, runtime: AdapterRuntime, pool: KVPool):
        self.model = model
        self.runtime = runtime
        self.pool = pool
        self.device = runtime.device
        self.embed = model.get_input_embeddings()
        self.in_place = self.device.type == "cpu"
        runtime.kv_prefixes = True  # this runner places prefix-tuning keys and values in the pool

    def virtual_tokens(self, slot: int) -> int:
        prefix = self.runtime.prefixes.get(slot)
        if prefix is not None:
            return prefix.shape[1]
        prompt = self.runtime.prompts.get(slot)
        return 0 if prompt is None else prompt.shape[0]

    def _slots_of(self, blocks: Sequence[int], start: int, end: int) -> torch.Tensor:
        """Pool slots of positions ``start .. end`` of a sequence with block table ``blocks``."""
        bs = self.pool.block_size
        positions = torch.arange(start, end)
        table = torch.tensor(list(blocks), dtype=torch.long)
        return (table[positions // bs] * bs + positions % bs).to(self.device)

    def _blocks_of(self, blocks: Sequence[int], length: int) -> list[int]:
        """The blocks holding positions ``0 .. length`` of a sequence."""
        return list(blocks[:-(-length // self.pool.block_size)])

    def _embeddings(self, items: Sequence[StepItem]) -> torch.Tensor:
        """``[N, hidden]`` input embeddings of the packed entries (virtual tokens from the slot's prompt)."""
        entries = [e for item in items for e in item.entries]
        ids = torch.tensor(entries, dtype=torch.long, device=self.device)
        embeds = self.embed(ids.clamp(min=0))
        if min(entries) < 0:
            offset = 0
            for item in items:
                virtual = [(i, -e - 1) for i, e in enumerate(item.entries) if e < 0]
                if virtual and item.slot in self.runtime.prompts:  # prefix tuning: any input (its KV is set)
                    where = torch.tensor([offset + i for i, _ in virtual], device=self.device)
                    which = torch.tensor([v for _, v in virtual], device=self.device)
                    prompt = self.runtime.prompts[item.slot]
                    embeds[where] = prompt.index_select(0, which).to(embeds.dtype)
                offset += len(item.entries)
        return embeds

    def _plan(self, items: Sequence[StepItem]) -> PagedStep:
        bs = self.pool.block_size
        writes, chunks, decodes, prefixes, tails = [], [], [], [], []
        offset = 0
        for item in items:
            count = len(item.entries)
            end = item.start + count
            writes.append(self._slots_of(item.blocks, item.start, end))
            read = self._blocks_of(item.blocks, end)
            if end % bs and (end - 1) // bs * bs >= item.start:
                # the row's last block is new to it this step and not filled: zero the rest of it
                tails.append(self._slots_of(item.blocks, end, len(read) * bs))
            prefix = self.runtime.prefixes.get(item.slot)
            if prefix is not None and item.start < prefix.shape[1]:  # the chunk holds virtual positions
                end = min(item.start + count, prefix.shape[1])
                prefixes.append((writes[-1][: end - item.start], prefix[:, item.start:end]))
            if count == 1:
                decodes.append((offset, item, read))
            else:
                table = torch.tensor([read], dtype=torch.long, device=self.device)
                chunks.append(PrefillChunk(q_start=offset, q_end=offset + count, start=item.start,
                                           gather=self.pool.gather_index(table)))
            offset += count
        if tails:
            self.pool.zero_slots(torch.cat(tails))
        in_place = []
        if self.in_place:
            for entry in [d for d in decodes if d[1].start + 1 >= self.IN_PLACE_MIN_CONTEXT]:
                runs = _runs(entry[2], entry[1].start + 1, bs)
                if len(runs) <= self.IN_PLACE_MAX_RUNS:
                    in_place.append(DecodeRuns(q_index=entry[0], runs=runs))
                    decodes.remove(entry)
        groups: list[DecodeGroup] = []
        decodes.sort(key=lambda d: d[1].start, reverse=True)
        while decodes:
            longest = decodes[0][1].start + 1
            size = next((i for i, (_, item, _) in enumerate(decodes)
                         if item.start + 1 < longest * self.DECODE_GROUP_RATIO), len(decodes))
            members, decodes = decodes[:size], decodes[size:]
            width = len(members[0][2])  # blocks of the longest row
            read = torch.tensor([r + [r[0]] * (width - len(r)) for _, _, r in members], dtype=torch.long,
                                device=self.device)  # padding repeats the row's first block (masked out)
            lengths = torch.tensor([item.start + 1 for _, item, _ in members], device=self.device)
            padding = torch.arange(width * bs, device=self.device) >= lengths.unsqueeze(1)
            bias = torch.zeros(padding.shape, dtype=self.runtime.dtype, device=self.device)
            bias.masked_fill_(padding, float("-inf"))
            q_index = torch.tensor([q for q, _, _ in members], dtype=torch.long, device=self.device)
            groups.append(DecodeGroup(q_index=q_index, gather=self.pool.gather_index(read),
                                      bias=bias.view(len(members), 1, 1, -1)))
        return PagedStep(write_slots=torch.cat(writes), chunks=chunks, groups=groups, in_place=in_place,
                         prefixes=prefixes)

    @torch.inference_mode()
    def forward(self, items: Sequence[StepItem]) -> torch.Tensor:
        """Run every item in one forward; return float32 logits ``[K, vocab]`` of the last entry
        of each item that wants them, and of every entry of items with ``all_logits``, in
        ``items`` order (``logit_rows`` says which rows are whose). Items of one slot should be adjacent:
        each run of one adapter is one LoRA segment."""
        step = self._plan(items)
        embeds = self._embeddings(items)
        positions = torch.cat([torch.arange(i.start, i.start + len(i.entries)) for i in items]).to(self.device)
        token_slots = [item.slot for item in items for _ in item.entries]
        ends = torch.tensor(list(_logit_positions(items)), dtype=torch.long, device=self.device)
        with self.pool.active(self.model, step), self.runtime.rows(token_slots):
            out = self.model(inputs_embeds=embeds.unsqueeze(0), position_ids=positions.unsqueeze(0),
                             use_cache=False, logits_to_keep=ends)
        return out.logits[0].float()

    def prefill(self, prompts: Sequence[Sequence[int]], slots: Sequence[int],
                blocks: Sequence[Sequence[int]]) -> torch.Tensor:
        """Whole prompts (virtual tokens added in front) in one forward: last-position logits ``[rows, vocab]``."""
        items = [StepItem(slot, virtual_entries(self.virtual_tokens(slot)) + list(ids), 0, table)
                 for ids, slot, table in zip(prompts, slots, blocks, strict=True)]
        return self.forward(items)


def logit_rows(item: StepItem) -> int:
    """How many rows of ``PagedRunner.forward``'s logits belong to ``item``."""
    return len(item.entries) if item.all_logits else int(item.want_logits)


def _runs(blocks: Sequence[int], length: int, block_size: int) -> list[tuple[int, int]]:
    """The first ``length`` positions of a sequence with block table ``blocks`` as runs of
    consecutive pool slots: ``[(first slot, positions)]``."""
    runs: list[tuple[int, int]] = []
    previous = None
    for index, block in enumerate(blocks[:-(-length // block_size)]):
        count = min(block_size, length - index * block_size)
        if previous is not None and block == previous + 1:
            first, n = runs[-1]
            runs[-1] = (first, n + count)
        else:
            runs.append((block * block_size, count))
        previous = block
    return runs


def _logit_positions(items: Sequence[StepItem]):
    offset = 0
    for item in items:
        if item.all_logits:
            yield from range(offset, offset + len(item.entries))
        elif item.want_logits:
            yield offset + len(item.entries) - 1
        offset += len(item.entries)
