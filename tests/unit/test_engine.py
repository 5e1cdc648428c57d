"""The engine's step loop on a tiny model: batching many adapters gives the results of running
each request alone; max_tokens, n, seeds, cancellation, queue limits; plus the incremental
detokenizer (stop strings) and the sampler."""

from __future__ import annotations

import copy
import threading
import warnings
from dataclasses import dataclass, field

import pytest
import torch
from support import build_tiny_llama, make_peft_adapter

from adapters.kinds.base import AdapterLimits
from adapters.peft_io import read_adapter
from adapters.runtime import AdapterRuntime
from gateway.detokenize import IncrementalText
from gateway.engine import (
    GENERATION_FAILED, QUEUE_TIMEOUT, SHUTTING_DOWN, Engine, EngineRequest, EngineStoppedError, QueueFullError,
    SequenceEvent,
)
from gateway.kv_blocks import BlockManager
from gateway.model_runner import ModelRunner
from gateway.padded_engine import PaddedEngine
from gateway.paged_attention import KVPool
from gateway.paged_engine import PagedEngine
from gateway.paged_runner import PagedRunner
from gateway.sampling import SamplingParams, choose_tokens, make_generator, sample_row

TIMEOUT = 60


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


@dataclass
class Collector:
    """A request's sink and on_done: gathers events, signals completion."""

    events: list[SequenceEvent] = field(default_factory=list)
    done: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)
    on_event: object = None

    def sink(self, event: SequenceEvent) -> None:
        with self.lock:
            self.events.append(event)
        if self.on_event:
            self.on_event(event)

    def on_done(self) -> None:
        self.done.set()

    def wait(self) -> None:
        assert self.done.wait(TIMEOUT), "request did not finish"

    def choices(self) -> dict[int, tuple[str, int, str | None]]:
        """index -> (text, completion tokens, finish reason)."""
        out: dict[int, list] = {}
        for e in self.events:
            text, _, _ = out.get(e.index, ("", 0, None))
            out[e.index] = (text + e.text, e.completion_tokens, e.finish_reason)
        return {k: tuple(v) for k, v in out.items()}


@pytest.fixture(scope="module", params=["paged", "padded"])
def setup(request, tiny_tokenizer, tmp_path_factory):
    """A runtime with four adapters installed (LoRA r4, IA3, prompt tuning, LoRA r8), and which
    engine the tests of this module run on (each runs on both)."""
    base = build_tiny_llama(vocab_size=len(tiny_tokenizer))
    root = tmp_path_factory.mktemp("engine_adapters")
    model = copy.deepcopy(base)
    runtime = AdapterRuntime(model, max_slots=8, dtype=torch.float32)
    specs = [("lora", {}), ("ia3", {}), ("prompt_tuning", {"num_virtual_tokens": 6}),
             ("lora", {"r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"]})]
    slots = []
    for i, (kind, overrides) in enumerate(specs):
        folder = root / f"a{i}"
        make_peft_adapter(base, kind, folder, seed=30 + i, scale=0.5, **overrides)
        slots.append(runtime.install(read_adapter(folder, runtime.base_info, AdapterLimits(), torch.float32)))
    return runtime, request.param, slots


def make_engine(setup, tokenizer, *, eos=frozenset({2}), block_size=4, blocks=128, max_step_tokens=8,
                **kw) -> Engine:
    """The paged engine gets small blocks and a small step budget, so that prompts are prefilled
    in several chunks while others decode and sequences span many blocks."""
    runtime, kind, _ = setup
    options = {"context_window": 256, "max_batch_size": 8, "max_prefill_tokens": 512,
               "max_queued_requests": 64, **kw}
    if kind == "padded":
        return PaddedEngine(ModelRunner(runtime.model, runtime), tokenizer, eos_token_ids=set(eos), **options)
    config = runtime.model.config
    pool = KVPool(config.num_hidden_layers, blocks, block_size, config.num_key_value_heads,
                  config.hidden_size // config.num_attention_heads, torch.float32, torch.device("cpu"))
    return PagedEngine(PagedRunner(runtime.model, runtime, pool), tokenizer, eos_token_ids=set(eos),
                       blocks=BlockManager(blocks, block_size), max_step_tokens=max_step_tokens, **options)


@pytest.fixture
def engine_factory(setup, tiny_tokenizer):
    started: list[Engine] = []

    def factory(**kw) -> Engine:
        engine = make_engine(setup, tiny_tokenizer, **kw)
        engine.start()
        started.append(engine)
        return engine

    yield factory
    for engine in started:
        engine.stop()


def submit(engine: Engine, prompt: list[int], slot: int, params: SamplingParams, n: int = 1,
           on_event=None) -> tuple[EngineRequest, Collector]:
    col = Collector(on_event=on_event)
    request = EngineRequest(prompt_ids=prompt, slot=slot, params=params, sink=col.sink, n=n, on_done=col.on_done)
    engine.submit(request)
    return request, col


def encode(tokenizer, text: str) -> list[int]:
    return tokenizer.encode(text)


PROMPTS = ["hello world, how are you?", "the quick brown fox", "What is two plus two?",
           "user assistant system", "the lazy dog", "hello"]


def test_concurrent_requests_equal_each_alone(setup, tiny_tokenizer, engine_factory):
    _, _, slots = setup
    plan = list(zip(PROMPTS, [slots[0], slots[1], slots[2], slots[3], 0, slots[0]], strict=True))
    params = SamplingParams(max_tokens=12, temperature=0.0)

    alone_engine = engine_factory()
    alone = []
    for text, slot in plan:
        _, col = submit(alone_engine, encode(tiny_tokenizer, text), slot, params)
        col.wait()
        alone.append(col.choices())

    # a small batch and prefill budget so sequences join and leave a running batch
    engine = engine_factory(max_batch_size=4, max_prefill_tokens=12)
    cols = [submit(engine, encode(tiny_tokenizer, text), slot, params)[1] for text, slot in plan]
    for col in cols:
        col.wait()
    together = [col.choices() for col in cols]
    assert together == alone
    for result in alone:
        assert result[0][2] in ("stop", "length")
    # the adapters matter: not every request produced the same text
    assert len({r[0][0] for r in alone}) > 1


def test_max_tokens_finishes_with_length(setup, tiny_tokenizer, engine_factory):
    _, _, slots = setup
    engine = engine_factory(eos=frozenset())  # nothing ends the sequence early
    for max_tokens, slot in [(1, 0), (5, slots[0]), (9, slots[2])]:
        _, col = submit(engine, encode(tiny_tokenizer, "hello world"), slot,
                        SamplingParams(max_tokens=max_tokens, temperature=0.0))
        col.wait()
        (text, tokens, reason), = col.choices().values()
        assert reason == "length"
        assert tokens == max_tokens
        finals = [e for e in col.events if e.finish_reason]
        assert len(finals) == 1 and finals[0] is col.events[-1]


def test_max_tokens_capped_by_context_window(setup, tiny_tokenizer, engine_factory):
    _, _, slots = setup
    engine = engine_factory(eos=frozenset(), context_window=20)
    prompt = encode(tiny_tokenizer, "hello world, how are you?")  # 13 tokens
    _, col = submit(engine, prompt, slots[2], SamplingParams(max_tokens=100, temperature=0.0))  # +6 virtual
    col.wait()
    (_, tokens, reason), = col.choices().values()
    assert reason == "length" and tokens == 1


def test_n_choices_with_seed_are_reproducible(setup, tiny_tokenizer, engine_factory):
    _, _, slots = setup
    engine = engine_factory(eos=frozenset())
    prompt = encode(tiny_tokenizer, "the quick brown fox")

    def run(seed):
        _, col = submit(engine, prompt, slots[0], SamplingParams(max_tokens=10, temperature=1.0, seed=seed), n=3)
        col.wait()
        return col.choices()

    first = run(1234)
    assert sorted(first) == [0, 1, 2]
    assert all(reason == "length" and tokens == 10 for _, tokens, reason in first.values())
    assert run(1234) == first
    assert len({text for text, _, _ in first.values()}) > 1  # each choice has its own generator
    assert run(99) != first


def test_seeded_sampling_unaffected_by_batch_neighbours(setup, tiny_tokenizer, engine_factory):
    _, _, slots = setup
    params = SamplingParams(max_tokens=8, temperature=1.0, seed=7)
    prompt = encode(tiny_tokenizer, "hello world")
    engine = engine_factory(eos=frozenset())
    _, col = submit(engine, prompt, slots[1], params)
    col.wait()
    alone = col.choices()
    others = [submit(engine, encode(tiny_tokenizer, t), s, SamplingParams(max_tokens=8, temperature=0.7))[1]
              for t, s in [("the lazy dog", slots[0]), ("hello", 0)]]
    _, col = submit(engine, prompt, slots[1], params)
    for c in others + [col]:
        c.wait()
    assert col.choices() == alone


def test_cancel_running_request(setup, tiny_tokenizer, engine_factory):
    engine = engine_factory(eos=frozenset())
    holder: dict[str, EngineRequest] = {}

    def cancel_on_first(event):
        holder["request"].cancelled = True

    col = Collector(on_event=cancel_on_first)
    request = EngineRequest(prompt_ids=encode(tiny_tokenizer, "hello world"), slot=0,
                            params=SamplingParams(max_tokens=200, temperature=0.0), sink=col.sink,
                            on_done=col.on_done)
    holder["request"] = request
    engine.submit(request)
    col.wait()
    assert all(e.finish_reason is None for e in col.events)  # cancelled: no finish event
    assert max(e.completion_tokens for e in col.events) < 200
    # the engine keeps serving afterwards
    _, other = submit(engine, encode(tiny_tokenizer, "hello"), 0, SamplingParams(max_tokens=3, temperature=0.0))
    other.wait()
    assert engine.running == 0 or other.done.is_set()


def test_cancel_waiting_request(setup, tiny_tokenizer):
    engine = make_engine(setup, tiny_tokenizer)
    request, col = submit(engine, encode(tiny_tokenizer, "hello"), 0, SamplingParams(max_tokens=5), n=2)
    request.cancelled = True
    engine.start()
    try:
        col.wait()
        assert col.events == []
    finally:
        engine.stop()


def test_queue_full(setup, tiny_tokenizer):
    engine = make_engine(setup, tiny_tokenizer, max_queued_requests=2)  # never started: nothing drains
    params = SamplingParams(max_tokens=3)
    submit(engine, [5, 6], 0, params, n=3)  # n sequences count as one request
    submit(engine, [5, 6], 0, params)
    assert engine.queue_depth == 4
    with pytest.raises(QueueFullError):
        submit(engine, [5, 6], 0, params)
    assert engine.queue_depth == 4


def test_stopped_engine_refuses_and_fails_waiting(setup, tiny_tokenizer):
    engine = make_engine(setup, tiny_tokenizer)
    engine.start()
    engine.stop()
    with pytest.raises(EngineStoppedError):
        submit(engine, [5, 6], 0, SamplingParams(max_tokens=3))


def test_queued_tokens_limit(setup, tiny_tokenizer):
    _, _, slots = setup
    engine = make_engine(setup, tiny_tokenizer, max_queued_tokens=20)  # never started: nothing drains
    params = SamplingParams(max_tokens=3)
    submit(engine, [5] * 12, 0, params)
    assert engine.queued_tokens == 12
    with pytest.raises(QueueFullError, match="prompt tokens"):
        submit(engine, [5] * 9, 0, params)
    with pytest.raises(QueueFullError):  # n sequences each need their prefill: 2 x 5 tokens
        submit(engine, [5] * 5, 0, params, n=2)
    with pytest.raises(QueueFullError):  # the prompt-tuning adapter's 6 virtual tokens count: 3 + 6
        submit(engine, [5] * 3, slots[2], params)
    submit(engine, [5] * 8, 0, params)  # exactly at the limit
    assert engine.queued_tokens == 20 and engine.queue_depth == 2


def test_queued_tokens_limit_admits_any_request_into_an_empty_queue(setup, tiny_tokenizer):
    engine = make_engine(setup, tiny_tokenizer, max_queued_tokens=4)
    submit(engine, [5] * 10, 0, SamplingParams(max_tokens=3))  # larger than the limit, but alone
    assert engine.queued_tokens == 10
    with pytest.raises(QueueFullError):
        submit(engine, [5], 0, SamplingParams(max_tokens=3))


def test_queued_tokens_return_to_zero(setup, tiny_tokenizer, engine_factory):
    _, _, slots = setup
    engine = engine_factory(max_queued_tokens=1000)
    cancelled, cancelled_col = submit(engine, [5, 6, 7], 0, SamplingParams(max_tokens=2), n=2)
    cancelled.cancelled = True
    cols = [submit(engine, encode(tiny_tokenizer, text), slot, SamplingParams(max_tokens=4))[1]
            for text, slot in [("hello", slots[2]), ("the lazy dog", slots[0])]]
    for col in [cancelled_col, *cols]:
        col.wait()
    assert engine.queued_tokens == 0 and engine.queue_depth == 0 and not engine.busy


def _hold_engine_on_first_event(engine: Engine, prompt: list[int], slot: int, max_tokens: int):
    """Submit a request whose first event blocks the engine thread until ``gate`` is set."""
    gate, reached = threading.Event(), threading.Event()

    def hold(event):
        if not reached.is_set():
            reached.set()
            assert gate.wait(TIMEOUT)

    request, col = submit(engine, prompt, slot, SamplingParams(max_tokens=max_tokens, temperature=0.0),
                          on_event=hold)
    assert reached.wait(TIMEOUT), "the request produced no event"
    return request, col, gate


def test_queue_timeout_fails_a_waiting_request_even_with_a_full_batch(setup, tiny_tokenizer, engine_factory):
    engine = engine_factory(eos=frozenset(), max_batch_size=1, max_queue_wait_seconds=30.0)
    # the sweep runs within two steps of the gate opening; 30 tokens keep the row taken until then
    _, running, gate = _hold_engine_on_first_event(engine, encode(tiny_tokenizer, "hello world"), 0, 30)
    seen_running_done: list[bool] = []
    expired = Collector(on_event=lambda e: seen_running_done.append(running.done.is_set()))
    request = EngineRequest(prompt_ids=[5, 6, 7], slot=0, params=SamplingParams(max_tokens=4), sink=expired.sink,
                            on_done=expired.on_done, n=2)
    request.submitted -= 31.0  # it has waited past the limit (no sleeping in tests)
    engine.submit(request)
    fresh_request, fresh = submit(engine, [5, 6], 0, SamplingParams(max_tokens=2))  # within the limit
    gate.set()
    expired.wait()
    assert [(e.index, e.finish_reason, e.error_code) for e in expired.events] == [
        (0, "error", QUEUE_TIMEOUT), (1, "error", QUEUE_TIMEOUT)]
    assert "retry later" in expired.events[0].error and expired.events[0].completion_tokens == 0
    assert seen_running_done == [False, False]  # failed while the batch row was still taken
    running.wait()
    fresh.wait()
    (_, tokens, reason), = fresh.choices().values()
    assert reason == "length" and tokens == 2 and not fresh_request.cancelled
    assert engine.queued_tokens == 0


def test_no_queue_timeout_by_default(setup, tiny_tokenizer, engine_factory):
    engine = engine_factory(eos=frozenset())
    col = Collector()
    request = EngineRequest(prompt_ids=[5, 6], slot=0, params=SamplingParams(max_tokens=2), sink=col.sink,
                            on_done=col.on_done)
    request.submitted -= 10_000.0
    engine.submit(request)
    col.wait()
    assert col.choices()[0][2] == "length"


def test_fail_in_flight_ends_running_and_waiting(setup, tiny_tokenizer, engine_factory):
    engine = engine_factory(eos=frozenset(), max_batch_size=1)
    _, running, gate = _hold_engine_on_first_event(engine, encode(tiny_tokenizer, "hello world"), 0, 200)
    _, waiting = submit(engine, [5, 6], 0, SamplingParams(max_tokens=50))
    assert engine.busy
    done = engine.fail_in_flight("the server is shutting down")
    gate.set()
    done.result(TIMEOUT)
    for col in (running, waiting):
        col.wait()
        final = col.events[-1]
        assert (final.finish_reason, final.error_code) == ("error", SHUTTING_DOWN)
    assert running.events[-1].completion_tokens < 200
    assert not engine.busy and engine.running == 0 and engine.queued_tokens == 0
    _, after = submit(engine, [5, 6], 0, SamplingParams(max_tokens=2))  # it keeps serving
    after.wait()
    assert after.choices()[0][2] == "length"


def test_a_forward_that_raises_for_one_adapter_fails_its_request_alone(setup, tiny_tokenizer, engine_factory,
                                                                      monkeypatch):
    """A LoRA adapter whose weights make its matmul raise, admitted together with an IA3 request:
    the LoRA request ends with an error, the IA3 one is served, nothing stays in flight, and the
    engine goes on serving. (The padded engine took both from the queue and lost them when the
    prefill raised: they never finished, and held their key's and adapter's slots for good.)"""
    runtime, _, slots = setup
    bank = runtime.layer(next(iter(runtime._layers))).banks["lora"]
    w = bank.weights[slots[0]]
    monkeypatch.setitem(bank.weights, slots[0], w._replace(b_t=w.b_t[:, :3]))
    engine = make_engine(setup, tiny_tokenizer, eos=frozenset())
    broken, ok = Collector(), Collector()
    for slot, col in ((slots[0], broken), (slots[1], ok)):  # queued before the thread starts: admitted together
        engine.submit(EngineRequest(prompt_ids=encode(tiny_tokenizer, "hello world"), slot=slot, sink=col.sink,
                                    on_done=col.on_done, params=SamplingParams(max_tokens=4, temperature=0.0)))
    engine.start()
    try:
        broken.wait()
        ok.wait()
        assert [(e.finish_reason, e.error_code) for e in broken.events] == [("error", GENERATION_FAILED)]
        assert ok.choices()[0][1:] == (4, "length")
        assert not engine.busy
        monkeypatch.setitem(bank.weights, slots[0], w)
        _, after = submit(engine, encode(tiny_tokenizer, "hello"), slots[0], SamplingParams(max_tokens=2))
        after.wait()
        assert after.choices()[0][2] == "length"
    finally:
        engine.stop()


def _run_with_failing_steps(engine: Engine, tokenizer, monkeypatch, failures: int) -> tuple[Collector, Collector]:
    """One request running (a batch of one), one queued behind it; then the engine's next
    ``failures`` steps raise (a bug in a step). Returns both once they ended."""
    _, running, gate = _hold_engine_on_first_event(engine, encode(tokenizer, "hello world"), 0, 30)
    _, queued = submit(engine, [5, 6, 7], 1, SamplingParams(max_tokens=3, temperature=0.0))
    real, left = engine._step, [failures]

    def step():
        if left[0] > 0:
            left[0] -= 1
            raise RuntimeError("a step that fails")
        real()

    monkeypatch.setattr(engine, "_step", step)
    gate.set()
    running.wait()
    queued.wait()
    return running, queued


def test_a_failed_step_fails_its_running_rows_and_the_queue_waits_on(setup, tiny_tokenizer, engine_factory,
                                                                    monkeypatch):
    """A step that raises ends the rows it ran with an error; requests still queued behind a full
    batch had no part in it and are served after it (they failed with it before)."""
    engine = engine_factory(eos=frozenset(), max_batch_size=1)
    running, queued = _run_with_failing_steps(engine, tiny_tokenizer, monkeypatch, failures=1)
    assert (running.events[-1].finish_reason, running.events[-1].error_code) == ("error", GENERATION_FAILED)
    assert queued.choices()[0][1:] == (3, "length")
    assert not engine.busy and engine.queued_tokens == 0


def test_steps_that_keep_failing_fail_the_queue_too(setup, tiny_tokenizer, engine_factory, monkeypatch):
    """A second failure in a row, with the first step's rows gone, points at a queued request:
    every sequence ends with an error (no endless loop of failing steps), and the engine then
    serves new requests."""
    engine = engine_factory(eos=frozenset(), max_batch_size=1)
    for col in _run_with_failing_steps(engine, tiny_tokenizer, monkeypatch, failures=2):
        assert (col.events[-1].finish_reason, col.events[-1].error_code) == ("error", GENERATION_FAILED)
    assert not engine.busy and engine.queued_tokens == 0
    _, after = submit(engine, [5, 6], 0, SamplingParams(max_tokens=2))
    after.wait()
    assert after.choices()[0][2] == "length"


def test_a_sink_that_raises_cancels_its_own_request_alone(setup, tiny_tokenizer, engine_factory):
    """A request whose sink raises (its event loop closed under it) is cancelled; the request
    beside it is served, and the engine thread lives on (it died when failing everything made the
    same sink raise again)."""
    engine = engine_factory(eos=frozenset())
    calls: list[SequenceEvent] = []
    done = threading.Event()

    def raising_sink(event: SequenceEvent) -> None:
        calls.append(event)
        raise RuntimeError("Event loop is closed")

    engine.submit(EngineRequest(prompt_ids=encode(tiny_tokenizer, "hello world"), slot=0, sink=raising_sink,
                                on_done=done.set, params=SamplingParams(max_tokens=50, temperature=0.0)))
    _, ok = submit(engine, encode(tiny_tokenizer, "the lazy dog"), 0, SamplingParams(max_tokens=8, temperature=0.0))
    assert done.wait(TIMEOUT)
    ok.wait()
    assert ok.choices()[0][1:] == (8, "length")
    assert len(calls) == 1 and engine._thread.is_alive() and not engine.busy
    _, after = submit(engine, [5, 6], 0, SamplingParams(max_tokens=2))
    after.wait()


def test_engine_call_runs_on_engine_thread(setup, tiny_tokenizer, engine_factory):
    engine = engine_factory()
    assert engine.call(lambda: threading.current_thread().name).result(TIMEOUT) == "engine"
    with pytest.raises(ZeroDivisionError):
        engine.call(lambda: 1 / 0).result(TIMEOUT)


def test_stop_string_ends_generation(setup, tiny_tokenizer, engine_factory):
    _, _, slots = setup
    engine = engine_factory(eos=frozenset())
    prompt = encode(tiny_tokenizer, "the quick brown fox")
    _, col = submit(engine, prompt, slots[0], SamplingParams(max_tokens=16, temperature=0.0))
    col.wait()
    (full, _, _), = col.choices().values()
    cut = next((i for i in range(2, len(full)) if full[i:i + 2].strip() and full.find(full[i:i + 2]) == i), None)
    assert cut is not None, f"the fixed-seed model's text is too short to pick a stop string: {full!r}"
    stop = full[cut:cut + 2]
    _, col = submit(engine, prompt, slots[0], SamplingParams(max_tokens=16, temperature=0.0, stop=(stop,)))
    col.wait()
    (text, _, reason), = col.choices().values()
    assert reason == "stop"
    assert text == full[:cut]


# ---- IncrementalText ---------------------------------------------------------------------------

class CharTokenizer:
    """Token id = code point; decode joins them (U+FFFD stands in for a partial character)."""

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(i) for i in ids)


def feed(text: IncrementalText, s: str) -> tuple[list[str], bool]:
    deltas = []
    for ch in s:
        delta, hit = text.push(ord(ch))
        deltas.append(delta)
        if hit:
            return deltas, True
    return deltas, False


def test_incremental_text_no_stop():
    text = IncrementalText(CharTokenizer())
    deltas, hit = feed(text, "abc")
    assert deltas == ["a", "b", "c"] and not hit
    assert text.flush() == ""


def test_incremental_text_holds_back_partial_stop_then_releases():
    text = IncrementalText(CharTokenizer(), stop=["END"])
    deltas, hit = feed(text, "xyE")
    assert deltas == ["x", "y", ""] and not hit  # "E" might start "END"
    deltas, hit = feed(text, "N")
    assert deltas == [""] and not hit
    deltas, hit = feed(text, "x")
    assert deltas == ["ENx"] and not hit  # it did not
    deltas, hit = feed(text, "EN")
    assert deltas == ["", ""]
    assert text.flush() == "EN"  # at the end, held text is released


def test_incremental_text_stop_returns_text_before_it():
    text = IncrementalText(CharTokenizer(), stop=["END", "zz"])
    deltas, hit = feed(text, "abENDcd")
    assert hit and "".join(deltas) == "ab"
    assert text.flush() == ""


def test_incremental_text_earliest_of_several_stops():
    text = IncrementalText(CharTokenizer(), stop=["bcd", "cd"])
    deltas, hit = feed(text, "abcd")
    assert hit and "".join(deltas) == "a"


def test_incremental_text_waits_for_partial_character():
    text = IncrementalText(CharTokenizer())
    assert text.push(ord("a")) == ("a", False)
    assert text.push(0xFFFD) == ("", False)


def test_incremental_text_empty_stop_ignored():
    text = IncrementalText(CharTokenizer(), stop=["", "q"])
    deltas, hit = feed(text, "ab")
    assert deltas == ["a", "b"] and not hit


def test_incremental_text_stop_spanning_tokens(tiny_tokenizer):
    ids = tiny_tokenizer.encode("the quick brown fox jumps")
    pieces = [tiny_tokenizer.decode([i]) for i in ids]
    assert "ck bro" not in pieces and len(ids) > 5  # the stop string spans several tokens
    text = IncrementalText(tiny_tokenizer, stop=["ck bro"])
    out, hit = [], False
    for i in ids:
        delta, hit = text.push(i)
        out.append(delta)
        if hit:
            break
    assert hit
    assert "".join(out) == "the qui"
    # nothing of the stop string was ever sent
    assert all("c" not in d for d in out)


def test_incremental_text_real_tokenizer_flush(tiny_tokenizer):
    ids = tiny_tokenizer.encode("hello world, how are you?")
    text = IncrementalText(tiny_tokenizer, stop=["you!"])
    out = [text.push(i)[0] for i in ids]
    assert "".join(out) + text.flush() == "hello world, how are you?"
    assert not "".join(out).endswith("you")  # "you" might have become "you!"


# ---- sampling ----------------------------------------------------------------------------------

def test_greedy_is_argmax():
    logits = torch.randn(5, 50, generator=torch.Generator().manual_seed(0))
    params = [SamplingParams(max_tokens=1, temperature=0.0)] * 5
    assert choose_tokens(logits, params, [None] * 5) == logits.argmax(-1).tolist()


def test_tiny_top_p_is_argmax():
    logits = torch.randn(50, generator=torch.Generator().manual_seed(1))
    for seed in range(20):
        params = SamplingParams(max_tokens=1, temperature=1.0, top_p=1e-6)
        assert sample_row(logits, params, make_generator(seed, torch.device("cpu"))) == int(logits.argmax())


def test_top_p_keeps_only_the_nucleus():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    params = SamplingParams(max_tokens=1, temperature=1.0, top_p=0.7)
    gen = make_generator(0, torch.device("cpu"))
    seen = {sample_row(logits, params, gen) for _ in range(200)}
    assert seen == {0, 1}


def test_seeded_sampling_reproducible():
    logits = torch.randn(3, 100, generator=torch.Generator().manual_seed(2))
    params = [SamplingParams(max_tokens=1, temperature=1.0, seed=5)] * 3

    def run():
        gens = [make_generator(5 + i, torch.device("cpu")) for i in range(3)]
        return [choose_tokens(logits, params, gens) for _ in range(10)]

    assert run() == run()
    assert make_generator(None, torch.device("cpu")) is None


def test_mixed_greedy_and_sampled_rows():
    logits = torch.randn(2, 100, generator=torch.Generator().manual_seed(3))
    params = [SamplingParams(max_tokens=1, temperature=0.0), SamplingParams(max_tokens=1, temperature=1.0)]
    gens = [None, make_generator(1, torch.device("cpu"))]
    for _ in range(10):
        assert choose_tokens(logits, params, gens)[0] == int(logits[0].argmax())
