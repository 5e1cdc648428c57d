"""The first engine, kept as the baseline the benchmarks measure the paged engine against
(``GATEWAY_KV_CACHE=padded``): every running sequence is a row of one left-padded cache
(``gateway.model_runner``); admission charges prompt tokens, each step prefills whole prompts and
then decodes one token for every row."""

from __future__ import annotations

import logging

import torch

from gateway.engine import GENERATION_FAILED, Engine, _Sequence
from gateway.model_runner import BatchState, ModelRunner

log = logging.getLogger(__name__)


class PaddedEngine(Engine):
    def __init__(self, runner: ModelRunner, tokenizer, **options):
        super().__init__(runner, tokenizer, **options)
        self._state: BatchState | None = None

    def _step(self) -> None:
        self._drop_finished()
        admitted = self._admit()
        for group, logits, state in self._prefill(admitted):
            self._running.extend(group)  # first: a merge that fails fails them with the running rows
            self._state = self.runner.merge(self._state, state)
            self._emit(group, logits)
        if admitted:
            self._drop_finished()
        if self._running:
            last = [s.tokens[-1] for s in self._running]
            logits = self.runner.decode(self._state, last)
            self.steps += 1
            self._emit(self._running, logits)

    def _prefill(self, seqs: list[_Sequence]) -> list[tuple[list[_Sequence], torch.Tensor, BatchState]]:
        """[(sequences, their last-position logits, their cache)] for newly admitted sequences. A
        prefill that raises is retried adapter by adapter, and the sequences of an adapter that
        still fails end with an error: taken from the queue, they are in no list the step's own
        failure handling would reach."""
        if not seqs:
            return []
        try:
            return [(seqs, *self._prefill_rows(seqs))]
        except Exception:
            slots = sorted({seq.request.slot for seq in seqs})
            if len(slots) == 1:
                log.exception("a prefill failed for adapter slot %d; failing its %d sequences", slots[0], len(seqs))
                for seq in seqs:
                    self._finish(seq, "error", error="internal error while generating", error_code=GENERATION_FAILED)
                return []
        return [part for slot in slots for part in self._prefill([s for s in seqs if s.request.slot == slot])]

    def _prefill_rows(self, seqs: list[_Sequence]) -> tuple[torch.Tensor, BatchState]:
        scoring = any(s.scoring_prompt for s in seqs)
        logits, state = self.runner.prefill([s.request.prompt_ids for s in seqs], [s.request.slot for s in seqs],
                                            all_logits=scoring)
        if scoring:  # [rows, T, vocab], left-padded: a row's entries are its last positions
            for row, seq in enumerate(seqs):
                length = seq.virtual_tokens + len(seq.request.prompt_ids)
                self._score_prompt(seq, 0, logits[row, logits.shape[1] - length:])
            logits = logits[:, -1, :]
        return logits, state

    def _admit(self) -> list[_Sequence]:
        admitted: list[_Sequence] = []
        budget = self.max_prefill_tokens
        with self._cv:
            self._sweep_waiting()
            for seq in self._admissible():
                if len(self._running) + len(admitted) >= self.max_batch_size:
                    break
                if admitted and seq.prefill_cost > budget:
                    break  # the first sequence always goes, however long
                budget -= seq.prefill_cost
                self._take_waiting(seq)
                admitted.append(seq)
        return admitted

    def _drop_finished(self) -> None:
        for seq in self._running:
            if seq.request.cancelled and not seq.done:
                self._finish(seq, "cancelled")
        keep = [i for i, s in enumerate(self._running) if not s.done]
        if len(keep) != len(self._running):
            self._state = self.runner.select(self._state, keep) if self._state else None
            self._running = [self._running[i] for i in keep]

    def _fail_running(self, message: str, code: str) -> None:
        super()._fail_running(message, code)
        self._state = None
