"""The first engine, kept as the baseline the benchmarks measure the paged engine against
(``GATEWAY_KV_CACHE=padded``): every running sequence is a row of one left-padded cache
(``gateway.model_runner``); admission charges prompt tokens, each step prefills whole prompts and
then decodes one token for every row."""

from __future__ import annotations

from gateway.engine import Engine, _Sequence
from gateway.model_runner import BatchState, ModelRunner


class PaddedEngine(Engine):
    def __init__(self, runner: ModelRunner, tokenizer, **options):
        super().__init__(runner, tokenizer, **options)
        self._state: BatchState | None = None

    def _step(self) -> None:
        self._drop_finished()
        admitted = self._admit()
        if admitted:
            prompts = [s.request.prompt_ids for s in admitted]
            scoring = any(s.scoring_prompt for s in admitted)
            logits, state = self.runner.prefill(prompts, [s.request.slot for s in admitted], all_logits=scoring)
            if scoring:  # [rows, T, vocab], left-padded: a row's entries are its last positions
                for row, seq in enumerate(admitted):
                    length = seq.virtual_tokens + len(seq.request.prompt_ids)
                    self._score_prompt(seq, 0, logits[row, logits.shape[1] - length:])
                logits = logits[:, -1, :]
            self._state = self.runner.merge(self._state, state)
            self._running.extend(admitted)
            self._emit(admitted, logits)
            self._drop_finished()
        if self._running:
            last = [s.tokens[-1] for s in self._running]
            logits = self.runner.decode(self._state, last)
            self.steps += 1
            self._emit(self._running, logits)

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

    def _fail_all(self, message: str, code: str) -> None:
        super()._fail_all(message, code)
        self._state = None
