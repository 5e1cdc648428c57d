"""The engine owns the model and runs the step loop on one thread.

Each loop: run queued tasks (adapter installs, training work), then one step of the concrete
engine (``gateway.paged_engine`` by default, ``gateway.padded_engine`` as the baseline): drop
cancelled rows, drop cancelled waiting sequences and fail those that waited past the queue
timeout, admit waiting sequences whose adapter holds a device slot, and run one forward pass for
every running row whatever adapter each row uses. Results go back to the asyncio side through each
request's ``sink`` callback; the event loop never waits on the model.
"""

from __future__ import annotations

import collections
import itertools
import logging
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

import torch

from gateway.background import BackgroundWork
from gateway.detokenize import IncrementalText
from gateway.grammar_mask import mask_rows
from gateway.logits_processing import adjust_logits
from gateway.logprobs import TokenLogprob, score_rows
from gateway.sampling import NON_FINITE, RowFailure, SamplingParams, choose_tokens, make_generator, usable_rows

log = logging.getLogger(__name__)

# SequenceEvent.error_code values: what ended a sequence with an error (the API picks the status)
QUEUE_TIMEOUT = "queue_timeout"  # waited longer than max_queue_wait_seconds for a batch row
SHUTTING_DOWN = "shutting_down"  # the server stopped, or its shutdown grace period ran out
GENERATION_FAILED = "generation_failed"  # a forward pass raised
ADAPTER_UNAVAILABLE = "adapter_unavailable"  # the adapter could not be brought onto the device
GRAMMAR_DEAD_END = "grammar_dead_end"  # the request's output grammar allows no token the model has


@dataclass(frozen=True)
class SequenceEvent:
    """Progress of one choice: new text, and the finish reason once it ends."""

    index: int
    text: str
    completion_tokens: int
    finish_reason: str | None = None
    error: str | None = None
    error_code: str | None = None  # one of the codes above when ``error`` is set
    # for requests that ask: the generated tokens whose text this event completes (or all that
    # are left, when it ends), and the prompt's tokens once, with the sequence's first event
    logprobs: tuple[TokenLogprob, ...] = ()
    prompt_logprobs: tuple[TokenLogprob, ...] | None = None


class SlotClaim(Protocol):
    """A request's way to its adapter's device slot, claimed when the engine is ready to run it
    (so that waiting requests never hold a slot) and held until the request is done."""

    def poll(self, wake: Callable[[], None]) -> int | None:
        """The slot once claimed, else None (the first call starts the claim; ``wake`` is called
        from any thread when it completes). Raises if the claim failed."""


@dataclass
class EngineRequest:
    prompt_ids: list[int]
    slot: int  # device adapter slot (0 = base); with ``claim``, set when the claim succeeds
    params: SamplingParams
    sink: Callable[[SequenceEvent], None]
    n: int = 1
    on_done: Callable[[], None] | None = None
    cache_key: str = ""  # the adapter version's identity (content hash); "" for the base model
    claim: SlotClaim | None = None  # None: ``slot`` is already held
    virtual_tokens: int | None = None  # the adapter's prompt-tuning positions (None: the slot's)
    cancelled: bool = False
    id: int = field(default_factory=itertools.count().__next__)
    submitted: float = field(default_factory=time.monotonic)
    _open: int = 0  # sequences not finished yet


class QueueFullError(Exception):
    """The engine's waiting queue is at its limit (requests or prompt tokens); retry later."""


class KVCacheDemandError(Exception):
    """The request could need more of the KV cache than one request may hold; a smaller one fits."""


class EngineStoppedError(Exception):
    """The engine is shutting down and takes no new work."""


@dataclass(eq=False)  # identity: the engine looks sequences up in its lists
class _Sequence:
    request: EngineRequest
    index: int
    text: IncrementalText
    generator: torch.Generator | None
    max_new: int  # max_tokens, capped by the context window
    virtual_tokens: int = 0  # prompt-tuning positions in front of the prompt
    tokens: list[int] = field(default_factory=list)
    done: bool = False
    # paged engine: the KV blocks the sequence holds, how many of its entries (virtual tokens,
    # prompt, generated tokens) have keys and values there, and the content keys of its full blocks
    blocks: list[int] = field(default_factory=list)
    computed: int = 0
    block_keys: list[bytes] = field(default_factory=list)
    # log-probabilities (requests that ask): the prompt's, scored as its positions are computed,
    # and the generated tokens' not sent yet (their text waits for a whole character)
    prompt_logprobs: list[TokenLogprob] | None = None
    matcher: Any = None  # structured outputs: the grammar's state after this sequence's tokens
    pending_logprobs: list[TokenLogprob] = field(default_factory=list)
    prompt_sent: bool = False
    # when it last began to wait for a batch row, for the queue timeout: its request's submission,
    # else the end of what held it back without a row being the matter (a preemption; in the paged
    # engine, the prefill of its request's first choice, whose cached blocks it waits for)
    waiting_since: float = 0.0
    looked_up: bool = False  # its prompt was counted in the prefix-cache statistics (first admission)

    @property
    def scoring_prompt(self) -> bool:
        """The prompt's log-probabilities are asked for and not all computed yet: every prompt
        position's logits are needed (so no prefix-cache hit may skip one)."""
        return self.prompt_logprobs is not None and len(self.prompt_logprobs) < len(self.request.prompt_ids)

    @property
    def prefill_cost(self) -> int:
        """Positions its (re)computation takes: virtual tokens, prompt, and tokens generated
        before a preemption sent it back to the queue."""
        return len(self.request.prompt_ids) + self.virtual_tokens + len(self.tokens)


class Engine:
    """What every engine shares: the queue and its limits, the thread and its tasks, the turn
    from logits to text events, finishing and failing sequences. Subclasses own the batch: how
    waiting sequences are admitted and how one step runs (``_step``), and what a sequence holds
    until it finishes (``_release``)."""

    def __init__(self, runner, tokenizer, *, context_window: int, max_batch_size: int,
                 max_prefill_tokens: int, max_queued_requests: int, eos_token_ids: set[int],
                 max_queued_tokens: int | None = None, max_queue_wait_seconds: float | None = None):
        self.runner = runner
        self.tokenizer = tokenizer
        self.context_window = context_window
        self.max_batch_size = max_batch_size
        self.max_prefill_tokens = max_prefill_tokens
        self.max_queued_requests = max_queued_requests
        self.max_queued_tokens = max_queued_tokens  # None: no limit on waiting prompt tokens
        self.max_queue_wait_seconds = max_queue_wait_seconds  # None: wait as long as it takes
        self.eos_token_ids = eos_token_ids
        self._queued_tokens = 0  # prefill cost of every waiting sequence (guarded by _cv)
        self._unfinished = 0  # sequences submitted and not finished yet (guarded by _cv)
        self._cv = threading.Condition()
        self._waiting: collections.deque[_Sequence] = collections.deque()
        self._tasks: collections.deque[tuple[Callable[[], Any], Future]] = collections.deque()
        self._running: list[_Sequence] = []
        self._stopping = False
        self._parked = False  # sequences wait, none runs: sleep until woken (a claim completed)
        self._thread = threading.Thread(target=self._loop, name="engine", daemon=True)
        self.steps = 0
        self.background: BackgroundWork | None = None  # training micro-steps between serving steps

    # ---- called from other threads -------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        with self._cv:
            self._stopping = True
            self._cv.notify_all()
        if self._thread.is_alive():
            self._thread.join(timeout)

    @property
    def queue_depth(self) -> int:
        return len(self._waiting)

    @property
    def running(self) -> int:
        return len(self._running)

    @property
    def queued_tokens(self) -> int:
        return self._queued_tokens

    @property
    def busy(self) -> bool:
        """Some submitted sequence has not finished (waiting, in a prefill, or running)."""
        return self._unfinished > 0

    def fail_in_flight(self, message: str, code: str = SHUTTING_DOWN) -> Future:
        """End every waiting and running sequence with an error (between two steps)."""
        return self.call(lambda: self._fail_all(message, code))

    def submit(self, *requests: EngineRequest) -> None:
        """Queue the requests of one client request (one per prompt of a list, each with its ``n``
        sequences) all or none: the KV demand is checked over all of them together, so a list of
        prompts cannot claim what the same demand as ``n`` would be refused (KVCacheDemandError),
        and a full queue refuses the whole list (QueueFullError)."""
        seqs = [seq for request in requests for seq in self._sequences(request)]
        self._check_demand(seqs)
        cost = sum(s.prefill_cost for s in seqs)
        with self._cv:
            if self._stopping:
                raise EngineStoppedError("the server is shutting down")
            if len({s.request.id for s in self._waiting}) + len(requests) > self.max_queued_requests:
                raise QueueFullError(f"{self.max_queued_requests} requests are already waiting")
            # an empty queue takes any request, or one larger than the limit could never run
            if (self.max_queued_tokens is not None and self._waiting
                    and self._queued_tokens + cost > self.max_queued_tokens):
                raise QueueFullError(f"{self._queued_tokens} prompt tokens are already waiting "
                                     f"(limit {self.max_queued_tokens})")
            for request in requests:
                request._open = request.n
            self._waiting.extend(seqs)
            self._queued_tokens += cost
            self._unfinished += len(seqs)
            self._cv.notify_all()

    def _sequences(self, request: EngineRequest) -> list[_Sequence]:
        virtual = request.virtual_tokens
        if virtual is None:
            virtual = self.runner.virtual_tokens(request.slot)
        room = self.context_window - len(request.prompt_ids) - virtual
        return [
            _Sequence(
                request=request, index=i, text=IncrementalText(self.tokenizer, request.params.stop),
                generator=make_generator(None if request.params.seed is None else request.params.seed + i,
                                         self.runner.device),
                # max_tokens 0 (echo, to score the prompt alone) ends right after the prompt
                max_new=0 if request.params.max_tokens == 0 else max(1, min(request.params.max_tokens, room)),
                virtual_tokens=virtual,
                waiting_since=request.submitted,
                prompt_logprobs=None if request.params.prompt_logprobs is None else [
                    TokenLogprob(request.prompt_ids[0], None)],
                matcher=None if request.params.grammar is None else request.params.grammar.matcher(),
            )
            for i in range(request.n)
        ]

    def _check_demand(self, seqs: list[_Sequence]) -> None:
        """Raise KVCacheDemandError for a request the cache should not take (the paged engine's)."""

    def set_background(self, work: BackgroundWork) -> None:
        """Run ``work`` between serving steps from now on (see ``gateway.background``)."""
        work.attach(self._cv)
        with self._cv:
            self.background = work
            self._cv.notify_all()

    def call(self, fn: Callable[[], Any]) -> Future:
        """Run ``fn`` on the engine thread between two steps (model state is never shared)."""
        future: Future = Future()
        with self._cv:
            self._tasks.append((fn, future))
            self._cv.notify_all()
        return future

    # ---- engine thread --------------------------------------------------------------------------
    def _loop(self) -> None:
        failed_steps = 0  # in a row
        while True:
            with self._cv:
                if self._parked and not (self._tasks or self._stopping):
                    self._cv.wait(0.05)  # short: the queue timeout is still swept while parked
                while not (self._waiting or self._tasks or self._running or self._stopping
                           or (self.background is not None and self.background.wanted)):
                    self._cv.wait()
                self._parked = False
                if self._stopping and not self._tasks:
                    self._fail_all("the server is shutting down", SHUTTING_DOWN)
                    return
                tasks = list(self._tasks)
                self._tasks.clear()
            for fn, future in tasks:
                try:
                    future.set_result(fn())
                except BaseException as exc:  # noqa: BLE001 - the caller gets it
                    future.set_exception(exc)
            serving, started = bool(self._waiting or self._running), time.perf_counter()
            try:
                self._step()
                failed_steps = 0
            except Exception:  # keep serving: fail the rows of this step, not the process
                failed_steps += 1
                if failed_steps == 1:  # the queue had no part in it: its requests wait on
                    log.exception("engine step failed; failing the running sequences")
                    self._fail_running("internal error while generating", GENERATION_FAILED)
                else:  # failed again with nothing of the first step running: a queued request is the cause
                    log.exception("engine step failed again; failing every sequence, queued ones included")
                    self._fail_all("internal error while generating", GENERATION_FAILED)
            self._parked = bool(self._waiting) and not self._running
            if self.background is not None:
                self.background.after_step(serving, time.perf_counter() - started)

    def _step(self) -> None:
        raise NotImplementedError

    def _release(self, seq: _Sequence) -> None:
        """Free what a finished sequence holds in the batch (its KV)."""

    def _wake(self) -> None:
        with self._cv:
            self._parked = False
            self._cv.notify_all()

    def _admissible(self) -> Iterator[_Sequence]:
        """Waiting sequences, in order, whose adapter holds its device slot: a sequence's first
        visit starts its request's claim; one whose claim failed ends with that error. The caller
        holds ``_cv`` and takes the sequences it admits with ``_take_waiting``."""
        for seq in list(self._waiting):
            claim = seq.request.claim
            if claim is not None:
                try:
                    slot = claim.poll(self._wake)
                except Exception as exc:  # noqa: BLE001 - the request gets it
                    self._take_waiting(seq)
                    self._finish(seq, "error", error=f"the adapter could not be loaded: {exc}",
                                 error_code=ADAPTER_UNAVAILABLE)
                    continue
                if slot is None:
                    continue  # still on its way to the device; later sequences may go first
                seq.request.slot = slot
            yield seq

    def _take_waiting(self, seq: _Sequence) -> None:
        self._waiting.remove(seq)
        self._queued_tokens -= seq.prefill_cost

    def _pop_waiting(self) -> _Sequence:
        seq = self._waiting.popleft()
        self._queued_tokens -= seq.prefill_cost
        return seq

    def _sweep_waiting(self) -> None:
        """Drop cancelled waiting sequences and fail those past the queue timeout (every step,
        even when the batch is full, so neither holds its adapter or its client for long)."""
        limit = self.max_queue_wait_seconds
        now = time.monotonic()
        for _ in range(len(self._waiting)):  # one pass, keeping the order of those that stay
            seq = self._pop_waiting()
            waited = now - seq.waiting_since
            if seq.request.cancelled:
                self._finish(seq, "cancelled")
            elif limit is not None and waited > limit and not seq.tokens:  # a preempted one has streamed
                self._finish(seq, "error", error=(
                    f"the request waited {waited:.1f} s for a free batch row (limit {limit:g} s); "
                    "the server is overloaded, retry later"), error_code=QUEUE_TIMEOUT)
            else:
                self._waiting.append(seq)
                self._queued_tokens += seq.prefill_cost

    def _score_prompt(self, seq: _Sequence, start: int, logits: torch.Tensor) -> None:
        """Record the prompt log-probabilities that ``logits`` (those of the sequence's entries
        ``start ..``, in order) give: entry ``p`` predicts entry ``p + 1``. Positions scored
        already (a preempted sequence computes them again) are skipped."""
        prompt, virtual, scored = seq.request.prompt_ids, seq.virtual_tokens, seq.prompt_logprobs
        if scored is None:
            return
        lo = len(scored) + virtual - 1 - start  # the row predicting the next prompt token to score
        hi = min(len(prompt) + virtual - 1 - start, logits.shape[0])
        if lo < 0 or hi <= lo:
            return
        k = seq.request.params.prompt_logprobs
        targets = prompt[len(scored):len(scored) + hi - lo]
        scored += score_rows(logits[lo:hi], targets, [k] * len(targets))

    def _emit(self, seqs: list[_Sequence], logits: torch.Tensor) -> None:
        if any(s.max_new == 0 for s in seqs):  # only the prompt's log-probabilities were asked for
            for seq in seqs:
                if seq.max_new == 0 and not seq.done:
                    self._finish(seq, "length")
            keep = [i for i, s in enumerate(seqs) if s.max_new > 0]
            seqs, logits = [seqs[i] for i in keep], logits[keep]
            if not seqs:
                return
        params = [s.request.params for s in seqs]
        adjusted = logits
        if any(p.adjusts_logits for p in params):
            adjusted = adjust_logits(logits, params, [s.request.prompt_ids for s in seqs], [s.tokens for s in seqs])
        constrained = [i for i, s in enumerate(seqs) if s.matcher is not None]
        if constrained:  # only the tokens each row's grammar allows
            could = dict(zip(constrained, usable_rows(adjusted[constrained].float()).tolist(), strict=True))
            adjusted = mask_rows(adjusted, [s.matcher for s in seqs])
        tokens = choose_tokens(adjusted, params, [s.generator for s in seqs])
        # a row usable before its mask and not after: the grammar (with the ban on raw control
        # characters in strings) leaves no token, e.g. a pattern only control characters match, or
        # none. The request's doing, not the model's
        for i in (i for i in constrained if could[i] and tokens[i] is NON_FINITE):
            tokens[i] = RowFailure("the output's grammar (response_format, or a tool's parameters) allows no token "
                                   "this model can write at this point: a pattern that only control characters, or "
                                   "nothing, can match?", GRAMMAR_DEAD_END)
        scored = [i for i, (p, t) in enumerate(zip(params, tokens, strict=True))
                  if p.logprobs is not None and not isinstance(t, RowFailure)]
        if scored:  # from the raw logits: the model's distribution, not the sampler's
            rows = score_rows(logits[scored], [tokens[i] for i in scored], [params[i].logprobs for i in scored])
            for i, row in zip(scored, rows, strict=True):
                # the end token keeps its entry, flagged: a completion lists one entry per
                # generated token (lm-evaluation-harness drops the last one of an echoed
                # prompt + 1 token), chat leaves it out (gateway.api.logprob_format)
                end = tokens[i] in self.eos_token_ids
                seqs[i].pending_logprobs.append(replace(row, end=True) if end else row)
        for seq, token in zip(seqs, tokens, strict=True):
            if seq.done:
                continue
            if isinstance(token, RowFailure):  # this row alone: the batch goes on
                self._finish(seq, "error", error=token.message, error_code=token.code or GENERATION_FAILED)
                continue
            if seq.matcher is not None and not seq.matcher.accept_token(token):
                self._finish(seq, "error", error="the output grammar refused the chosen token",
                             error_code=GENERATION_FAILED)
                continue
            seq.tokens.append(token)
            if token in self.eos_token_ids:
                self._finish(seq, "stop", seq.text.flush())
                continue
            try:
                delta, hit_stop = seq.text.push(token)
            except Exception:  # noqa: BLE001 - e.g. a token the tokenizer cannot decode: this row alone
                log.exception("detokenizing a generated token failed; ending that sequence")
                self._finish(seq, "error", error="the generated text could not be decoded",
                             error_code=GENERATION_FAILED)
                continue
            if hit_stop:
                self._finish(seq, "stop", delta)
            elif seq.matcher is not None and seq.matcher.is_terminated():  # the grammar is complete
                self._finish(seq, "stop", delta + seq.text.flush())
            elif len(seq.tokens) >= seq.max_new:
                rest, hit_stop = seq.text.finish()  # the last token's held bytes may end at a stop string
                self._finish(seq, "stop" if hit_stop else "length", delta + rest)
            elif delta:
                self._deliver(seq.request, seq.request.sink,
                              SequenceEvent(seq.index, delta, len(seq.tokens), **self._attached(seq)))

    @staticmethod
    def _attached(seq: _Sequence) -> dict[str, Any]:
        """The log-probabilities an event of ``seq`` carries (taken: each is sent once)."""
        out: dict[str, Any] = {}
        if seq.pending_logprobs:
            out["logprobs"] = tuple(seq.pending_logprobs)
            seq.pending_logprobs = []
        if seq.prompt_logprobs is not None and not seq.prompt_sent:
            out["prompt_logprobs"] = tuple(seq.prompt_logprobs)
            seq.prompt_sent = True
        return out

    def _finish(self, seq: _Sequence, reason: str, text: str = "", error: str | None = None,
                error_code: str | None = None) -> None:
        seq.done = True
        self._release(seq)
        with self._cv:  # reentrant: _admit calls this while holding it
            self._unfinished -= 1
        request = seq.request
        if reason != "cancelled":
            self._deliver(request, request.sink, SequenceEvent(
                seq.index, text, len(seq.tokens), finish_reason=reason, error=error, error_code=error_code,
                **self._attached(seq)))
        request._open -= 1
        if request._open == 0 and request.on_done is not None:
            self._deliver(request, request.on_done)

    @staticmethod
    def _deliver(request: EngineRequest, callback: Callable[..., None], *args: Any) -> None:
        """Call a request's sink or ``on_done``. One that raises (its event loop closed under it)
        cancels its own request; the step, the other rows and the engine thread go on."""
        try:
            callback(*args)
        except Exception:  # noqa: BLE001 - the request's own fault
            log.exception("delivering to request %d failed; cancelling it", request.id)
            request.cancelled = True

    def _fail_all(self, message: str, code: str) -> None:
        self._fail_running(message, code)
        with self._cv:
            waiting = list(self._waiting)
            self._waiting.clear()
            self._queued_tokens = 0
        for seq in waiting:
            if not seq.done:
                self._finish(seq, "error", error=message, error_code=code)

    def _fail_running(self, message: str, code: str) -> None:
        for seq in self._running:
            if not seq.done:
                self._finish(seq, "error", error=message, error_code=code)
        self._running = []
