"""The paged engine against PEFT, the reference: every kind mixed in one packed forward, chunked
prefill, prefix-cache hits, preemption under a tiny KV pool, and a failing adapter that fails
only its own rows. Plus the block manager's bookkeeping."""

from __future__ import annotations

import collections
import copy
import random
import threading
import time
import warnings

import pytest
import torch
from support import build_tiny_llama, make_peft_adapter
from test_runtime_equivalence import VARIANTS, load, prompt_ids, ref_greedy, ref_logits, rel_err

from adapters.runtime import AdapterRuntime
from gateway.engine import EngineRequest, KVCacheDemandError, SequenceEvent
from gateway.kv_blocks import BlockManager, OutOfBlocksError, block_keys
from gateway.paged_attention import KVPool
from gateway.paged_engine import SCORED_CHUNK_TOKENS, PagedEngine
from gateway.paged_runner import PagedRunner, StepItem, virtual_entries
from gateway.sampling import SamplingParams
from gateway.step_budget import StepBudget

TOL = 1e-4
STEPS = 8


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


# prefix tuning needs the paged KV cache (its keys and values go into a row's blocks): paged only
PAGED_VARIANTS = {
    **VARIANTS,
    "prefix4": ("prefix_tuning", {"num_virtual_tokens": 4}),
    "prefix_projected": ("prefix_tuning", {"num_virtual_tokens": 6, "prefix_projection": True,
                                           "encoder_hidden_size": 16}),
}


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    """A runtime holding one adapter of every variant, with PEFT's reference model of each."""
    base = build_tiny_llama()
    root = tmp_path_factory.mktemp("paged")
    runtime = AdapterRuntime(copy.deepcopy(base), max_slots=len(PAGED_VARIANTS) + 1, dtype=torch.float32)
    runtime.kv_prefixes = True  # the runners made below place prefix-tuning keys and values
    slots, refs = {"base": 0}, {"base": base}
    for i, (name, (kind, overrides)) in enumerate(PAGED_VARIANTS.items()):
        refs[name] = make_peft_adapter(base, kind, root / name, seed=10 + i, scale=0.5, **overrides)
        slots[name] = runtime.install(load(runtime, root / name))
    return runtime, slots, refs


def make_runner(runtime, blocks: int = 256, block_size: int = 4) -> PagedRunner:
    config = runtime.model.config
    pool = KVPool(config.num_hidden_layers, blocks, block_size, config.num_key_value_heads,
                  config.hidden_size // config.num_attention_heads, torch.float32, torch.device("cpu"))
    return PagedRunner(runtime.model, runtime, pool)


def make_engine(runtime, tokenizer, *, blocks=256, block_size=4, max_step_tokens=8, **kw) -> PagedEngine:
    options = {"context_window": 128, "max_batch_size": 16, "max_prefill_tokens": 64, "max_queued_requests": 64,
               "eos_token_ids": set(), **kw}
    return PagedEngine(make_runner(runtime, blocks, block_size), tokenizer, blocks=BlockManager(blocks, block_size),
                       max_step_tokens=max_step_tokens, **options)


class Tokens:
    """A request's events (the last one says how it finished); the sampled token ids are read
    from the sequences themselves by ``run_greedy``."""

    def __init__(self):
        self.events: list[SequenceEvent] = []
        self.done = threading.Event()

    def sink(self, event: SequenceEvent) -> None:
        self.events.append(event)

    def on_done(self) -> None:
        self.done.set()

    @property
    def finish(self) -> SequenceEvent:
        return self.events[-1]


def run_greedy(engine: PagedEngine, requests: list[tuple[list[int], int, str]], steps: int = STEPS):
    """Submit every (prompt, slot, cache key) at once and return each one's sampled token ids."""
    sampled: dict[int, list[int]] = {}
    originals = engine._emit

    def spy(seqs, logits):  # record the tokens each sequence samples
        originals(seqs, logits)
        for seq in seqs:
            sampled[seq.request.id] = list(seq.tokens)

    engine._emit = spy
    collectors = []
    for prompt, slot, key in requests:
        c = Tokens()
        request = EngineRequest(prompt_ids=prompt, slot=slot, params=SamplingParams(max_tokens=steps, temperature=0),
                                sink=c.sink, on_done=c.on_done, cache_key=key)
        engine.submit(request)
        collectors.append((request, c))
    engine.start()
    try:
        for _, c in collectors:
            assert c.done.wait(60), "request did not finish"
    finally:
        engine.stop()
    return [sampled.get(r.id, []) for r, _ in collectors], [c for _, c in collectors]


def test_packed_forward_of_every_kind_matches_peft(mixed):
    """One packed forward: a whole prompt of every variant (and the base), each row's logits equal
    PEFT's for its adapter alone."""
    runtime, slots, refs = mixed
    names = list(slots)
    per = 16  # blocks per row, disjoint tables (every kind's row fits: prompt plus virtual tokens)
    runner = make_runner(runtime, blocks=per * len(names))
    prompts = [prompt_ids(5 + 2 * i, seed=40 + i) for i in range(len(names))]
    logits = runner.prefill(prompts, [slots[n] for n in names],
                            [list(range(i * per, (i + 1) * per)) for i in range(len(names))])
    for row, name in enumerate(names):
        assert rel_err(logits[row], ref_logits(refs[name], prompts[row])) <= TOL, name


def test_what_a_blocks_last_owner_left_never_reaches_a_new_row(mixed):
    """Blocks full of NaN (a broken adapter's keys, or memory never written): a row that takes
    them, prefilled and then decoded one token at a time with its last block partly filled,
    still gives PEFT's logits (its unwritten positions are zeroed, not merely masked)."""
    runtime, slots, refs = mixed
    runner = make_runner(runtime, blocks=8)
    runner.forward([StepItem(slots["base"], prompt_ids(32, seed=6), 0, list(range(8)))])  # the last owner
    runner.pool.keys.fill_(float("nan"))  # ... whose adapter overflowed
    runner.pool.values.fill_(float("nan"))
    prompt = prompt_ids(6, seed=7)  # block size 4: two blocks, the second half filled
    table = [5, 2, 6]
    logits = runner.forward([StepItem(slots["base"], list(prompt), 0, table)])
    assert rel_err(logits[-1], ref_logits(refs["base"], prompt)) <= TOL
    for step, token in enumerate((3, 9, 4)):  # the third decode token starts block 6
        prompt = prompt + [token]
        logits = runner.forward([StepItem(slots["base"], [token], len(prompt) - 1, table)])
        assert rel_err(logits[-1], ref_logits(refs["base"], prompt)) <= TOL, step


def test_chunked_prefill_with_offset_matches_peft(mixed):
    """A prompt computed in chunks of 3 (the later chunks attend to cached positions) gives PEFT's
    last logits, for a prompt-tuning adapter whose virtual tokens span the first chunks."""
    runtime, slots, refs = mixed
    runner = make_runner(runtime)
    ids = prompt_ids(17, seed=3)
    entries = virtual_entries(runner.virtual_tokens(slots["prompt11"])) + ids
    table = list(range(16))
    for start in range(0, len(entries), 3):
        chunk = entries[start:start + 3]
        logits = runner.forward([StepItem(slots["prompt11"], chunk, start, table,
                                          want_logits=start + len(chunk) == len(entries))])
    assert rel_err(logits[-1], ref_logits(refs["prompt11"], ids)) <= TOL


@pytest.mark.parametrize("name", ["prefix4", "prefix_projected"])
def test_chunked_prefill_of_a_prefix_tuning_row_matches_peft(mixed, name):
    """Prefix tuning's keys and values land in the row's own blocks whichever chunks hold its
    virtual positions (chunks of 3 split them), and later chunks attend to them."""
    runtime, slots, refs = mixed
    runner = make_runner(runtime)
    ids = prompt_ids(10, seed=4)
    entries = virtual_entries(runner.virtual_tokens(slots[name])) + ids
    table = list(range(16))
    for start in range(0, len(entries), 3):
        chunk = entries[start:start + 3]
        logits = runner.forward([StepItem(slots[name], chunk, start, table,
                                          want_logits=start + len(chunk) == len(entries))])
    assert rel_err(logits[-1], ref_logits(refs[name], ids)) <= TOL
    assert rel_err(logits[-1], ref_logits(refs["base"], ids)) > 1e-3


@pytest.mark.parametrize("name", ["base", "lora", "ia3", "prompt11", "prefix4", "dora"])
def test_decode_rows_in_place_and_gathered_in_one_forward_match_peft(mixed, name, monkeypatch):
    """Two decode rows of one adapter in one forward: one whose blocks form three runs (attended
    in place, over views of the pool) and one scattered over more runs than that path takes
    (gathered); each gives PEFT's logits for its prompt plus the decoded token."""
    runtime, slots, refs = mixed
    runner = make_runner(runtime)
    monkeypatch.setattr(runner, "IN_PLACE_MIN_CONTEXT", 1)
    runs_table = list(range(10, 14)) + list(range(30, 33)) + list(range(50, 60))  # 3 runs
    scattered = list(range(100, 240, 7))  # 20 runs of one block
    rows = []
    for table, seed in ((runs_table, 1), (scattered, 2)):
        ids = prompt_ids(41, seed=70 + seed)
        entries = virtual_entries(runner.virtual_tokens(slots[name])) + ids
        first = runner.forward([StepItem(slots[name], entries, 0, table)])
        token = int(first[-1].argmax())
        rows.append((ids + [token], StepItem(slots[name], [token], len(entries), table)))
    items = [item for _, item in rows]
    plan = runner._plan(items)
    assert len(plan.in_place) == 1 and len(plan.in_place[0].runs) == 3 and len(plan.groups) == 1
    logits = runner.forward(items)
    for row, (ids, _) in enumerate(rows):
        assert rel_err(logits[row], ref_logits(refs[name], ids)) <= TOL


def test_engine_greedy_text_in_place_matches_peft(mixed, tiny_tokenizer, monkeypatch):
    """Every variant through the engine with every decode row attended in place (its blocks are
    placed in runs: the block manager grows a row into the block after its last)."""
    monkeypatch.setattr(PagedRunner, "IN_PLACE_MIN_CONTEXT", 1)
    runtime, slots, refs = mixed
    names = list(slots)
    prompts = {n: prompt_ids(6 + 3 * i, seed=80 + i) for i, n in enumerate(names)}
    engine = make_engine(runtime, tiny_tokenizer)
    planned = []
    original = engine.runner._plan
    engine.runner._plan = lambda items: planned.append(original(items)) or planned[-1]
    got, _ = run_greedy(engine, [(prompts[n], slots[n], n) for n in names])
    for name, tokens in zip(names, got, strict=True):
        assert tokens == ref_greedy(refs[name], prompts[name]), name
    assert sum(len(step.in_place) for step in planned) >= len(names) * (STEPS - 1) // 2


def test_engine_greedy_text_matches_peft_with_chunks_and_mixed_kinds(mixed, tiny_tokenizer):
    """Every variant and the base at once through the engine (prefills chunked by a budget of 8
    tokens per step while others decode): each row's greedy tokens equal PEFT's alone."""
    runtime, slots, refs = mixed
    names = list(slots)
    prompts = {n: prompt_ids(6 + 3 * i, seed=60 + i) for i, n in enumerate(names)}
    got, _ = run_greedy(make_engine(runtime, tiny_tokenizer), [(prompts[n], slots[n], n) for n in names])
    for name, tokens in zip(names, got, strict=True):
        assert tokens == ref_greedy(refs[name], prompts[name]), name


def test_adaptive_budget_spreads_a_long_prompt_thin_and_keeps_every_result(mixed, tiny_tokenizer):
    """``max_decode_slowdown`` 1.33 with a step clock where a decode-only step takes 0.1 s and each
    prompt token 0.01 s more: once the probe has priced a token, a long prompt joining decoding
    rows is computed six tokens every other step (the mixed step takes twice the 0.033 s
    allowance, the decode-only one between none); every row's greedy tokens still equal PEFT's."""
    runtime, slots, refs = mixed
    engine = make_engine(runtime, tiny_tokenizer, max_step_tokens=64, max_decode_slowdown=1.33)
    now = [0.0]
    engine.clock = lambda: now[0]
    decode_step_prompt_tokens: list[int] = []  # prompt tokens of each step that had decoding rows
    submitted: set[int] = set()
    forward = engine.runner.forward
    short = {n: prompt_ids(5, seed=300 + i) for i, n in enumerate(("base", "ia3", "prompt5"))}
    long_prompt = prompt_ids(60, seed=310)

    def spy_forward(items):
        decoding = [i for i in items if len(i.entries) == 1 and i.want_logits]
        prompt = sum(len(i.entries) for i in items if i not in decoding)
        if decoding:
            decode_step_prompt_tokens.append(prompt)
        if len(decode_step_prompt_tokens) == 2 and long_request.id not in submitted:
            submitted.add(long_request.id)  # the short rows decode: the long prompt joins
            engine.submit(long_request)
        now[0] += 0.1 + 0.01 * prompt
        return forward(items)

    engine.runner.forward = spy_forward
    long_tokens: list[int] = []
    emit = engine._emit

    def spy_emit(seqs, logits):
        emit(seqs, logits)
        long_tokens[:] = next((list(s.tokens) for s in seqs if s.request is long_request), long_tokens)

    engine._emit = spy_emit
    sink = Tokens()
    long_request = EngineRequest(prompt_ids=long_prompt, slot=slots["lora"], params=SamplingParams(
        max_tokens=STEPS, temperature=0), sink=sink.sink, on_done=sink.on_done, cache_key="lora")
    got, _ = run_greedy(engine, [(p, slots[n], n) for n, p in short.items()], steps=48)
    assert sink.done.wait(60)
    for (name, prompt), tokens in zip(short.items(), got, strict=True):
        assert tokens == ref_greedy(refs[name], prompt, steps=48), name
    assert long_tokens == ref_greedy(refs["lora"], long_prompt)
    steps = decode_step_prompt_tokens
    first = next(i for i, k in enumerate(steps) if k)
    assert steps[first] == StepBudget.PROBE_TOKENS
    # the rest of the prompt, 44 tokens: six every other step, then the last two
    assert steps[first + 1:first + 17] == [0, 6] * 7 + [0, 2]


def test_a_short_prompt_is_not_held_behind_a_long_one_and_the_long_one_keeps_half(mixed, tiny_tokenizer):
    """A budget of 8 prompt tokens a step while a row decodes: a 60-token prompt is mid-prefill
    when a 6-token one arrives. Shortest first, the short one is computed in the next two steps
    (not after the long one's remaining steps); the long one, admitted first, still gets at least
    half of every step's budget. Every row's greedy tokens equal PEFT's."""
    runtime, slots, refs = mixed
    engine = make_engine(runtime, tiny_tokenizer, max_step_tokens=8)
    prompts = {"base": prompt_ids(4, seed=320), "lora": prompt_ids(60, seed=321), "ia3": prompt_ids(6, seed=322)}
    requests, sinks = {}, {}
    for name, prompt in prompts.items():
        sinks[name] = Tokens()
        requests[name] = EngineRequest(prompt_ids=prompt, slot=slots[name], params=SamplingParams(
            max_tokens=40 if name == "base" else STEPS, temperature=0), sink=sinks[name].sink,
            on_done=sinks[name].on_done, cache_key=name)
    sampled: dict[str, list[int]] = {}
    names = {id(r): n for n, r in requests.items()}
    schedule, emit = engine._schedule, engine._emit
    steps: list[dict[str, int]] = []  # prompt tokens per sequence, steps with a decoding row

    def spy_schedule():
        plan = schedule()
        decoding = any(engine._length(s) - s.computed == 1 for s, _ in plan)
        if decoding:
            steps.append({names[id(s.request)]: n for s, n in plan if engine._length(s) - s.computed > 1})
            if len(steps) == 1:  # the base row decodes: the long prompt arrives
                engine.submit(requests["lora"])
            if len(steps) == 4:  # the long prompt is a few steps in: the short one arrives
                engine.submit(requests["ia3"])
        return plan

    def spy_emit(seqs, logits):
        emit(seqs, logits)
        for seq in seqs:
            sampled[names[id(seq.request)]] = list(seq.tokens)

    engine._schedule, engine._emit = spy_schedule, spy_emit
    engine.submit(requests["base"])
    engine.start()
    try:
        for sink in sinks.values():
            assert sink.done.wait(60)
    finally:
        engine.stop()
    for name, prompt in prompts.items():
        steps_of = 40 if name == "base" else STEPS
        assert sampled[name] == ref_greedy(refs[name], prompt, steps=steps_of), name
    # submitted while the fourth step was planned: computed in the fifth and sixth, while the long
    # prompt still had most of its tokens to go (first come first served, it waited for all of them)
    assert [step.get("ia3", 0) for step in steps[4:6]] == [4, 2]
    assert "lora" in steps[8]
    long_steps = [step["lora"] for step in steps if "lora" in step]
    assert sum(long_steps) == 60 and min(long_steps[:-1]) >= 4


# (variant, prompt length, max_tokens): three waves. The first two fill the 16-row batch with
# every kind and the base; the third arrives once a row has left and takes the freed rows.
WAVES = [
    [("base", 7, 9), ("lora", 12, 14), ("ia3", 5, 12), ("prompt5", 9, 11), ("dora", 16, 13),
     ("adalora", 6, 15), ("vera", 10, 12), ("p_tuning_mlp", 4, 14), ("prefix4", 13, 16),
     ("lora_rslora_r8", 8, 3), ("ia3_ff", 11, 13), ("prefix_projected", 3, 12)],
    # while the others decode: the base row's 17 prompt tokens fill most of two steps' 16, so the
    # prefix-tuning row's 6 virtual positions are split over two steps
    [("base", 17, 12), ("prefix_projected", 9, 10), ("prompt11", 6, 10), ("vera_regenerated", 5, 12)],
    [("p_tuning_lstm", 9, 7), ("lora_qv", 14, 5), ("base", 20, 6), ("adalora", 3, 1), ("prefix4", 7, 8),
     ("dora_qv_r8", 5, 4)],
]


def test_one_batch_of_every_kind_with_rows_joining_and_leaving_matches_peft(mixed, tiny_tokenizer):
    """One engine batch of 16 rows holding all eight kinds (LoRA, IA3, prompt tuning, DoRA,
    AdaLoRA, VeRA, P-tuning, prefix tuning) and base rows; rows of different prompt lengths and
    max_tokens are submitted while others decode, leave when done, and later rows take their
    places. Each row's greedy tokens equal PEFT's for its adapter alone."""
    runtime, slots, refs = mixed
    kind_of = {0: "base"} | {slots[name]: kind for name, (kind, _) in PAGED_VARIANTS.items()}
    engine = make_engine(runtime, tiny_tokenizer, max_step_tokens=16)
    requests: list[tuple[str, list[int], EngineRequest, Tokens]] = []

    def submit(wave: int) -> None:
        for i, (name, length, max_tokens) in enumerate(WAVES[wave]):
            c = Tokens()
            request = EngineRequest(prompt_ids=prompt_ids(length, seed=100 * wave + i), slot=slots[name],
                                    params=SamplingParams(max_tokens=max_tokens, temperature=0),
                                    sink=c.sink, on_done=c.on_done, cache_key=name)
            engine.submit(request)
            requests.append((name, request.prompt_ids, request, c))

    sampled: dict[int, list[int]] = {}
    emit = engine._emit

    def spy_emit(seqs, logits):  # the tokens each sequence has sampled so far
        emit(seqs, logits)
        for seq in seqs:
            sampled[seq.request.id] = list(seq.tokens)

    steps: list[dict] = []  # per forward: its rows' adapter slots and its row count
    joined: list[int] = []  # the forward at which the third wave was submitted
    split: list[StepItem] = []  # prefix-tuning chunks that start inside the virtual positions
    forward = engine.runner.forward

    def spy_forward(items):  # runs on the engine thread: later waves join at chosen points
        finished = sum(c.done.is_set() for *_, c in requests)
        steps.append({"slots": {item.slot for item in items}, "rows": len(items)})
        split.extend(i for i in items if kind_of[i.slot] == "prefix_tuning"
                     and 0 < i.start < runtime.prefixes[i.slot].shape[1])
        if len(steps) == 3:
            submit(1)  # the first rows decode by now
        if finished and len(requests) == len(WAVES[0]) + len(WAVES[1]):
            joined.append(len(steps))
            submit(2)  # a row has left
        return forward(items)

    engine._emit, engine.runner.forward = spy_emit, spy_forward
    submit(0)
    engine.start()
    try:
        for _ in range(3):
            for *_, c in list(requests):
                assert c.done.wait(60), "request did not finish"
    finally:
        engine.stop()

    assert len(requests) == sum(map(len, WAVES))
    kinds = {"base", "lora", "ia3", "prompt_tuning", "dora", "adalora", "vera", "p_tuning", "prefix_tuning"}
    assert any(s["rows"] == engine.max_batch_size and {kind_of[slot] for slot in s["slots"]} == kinds
               for s in steps), "no forward held rows of all kinds in a batch of 16"
    # the third wave, submitted after a row left, ran in the same forwards as first-wave rows
    early = {slots[name] for name, *_ in WAVES[0]} - {slots[name] for name, *_ in WAVES[1] + WAVES[2]}
    late = {slots[name] for name, *_ in WAVES[2]} - {slots[name] for name, *_ in WAVES[0] + WAVES[1]}
    assert joined and all(late.isdisjoint(s["slots"]) for s in steps[:joined[0]])
    assert any(late & s["slots"] and early & s["slots"] for s in steps[joined[0]:])
    assert split, "no prefix-tuning row had its virtual positions split over two steps (retune WAVES)"
    for name, prompt, request, c in requests:
        assert c.finish.finish_reason == "length", name
        assert sampled[request.id] == ref_greedy(refs[name], prompt, steps=request.params.max_tokens), name
    engine.blocks.check()
    assert engine.blocks.used == 0


def test_prefix_cache_hits_only_the_same_adapter_and_keeps_results(mixed, tiny_tokenizer):
    runtime, slots, refs = mixed
    shared = prompt_ids(24, seed=5)
    engine = make_engine(runtime, tiny_tokenizer, max_step_tokens=64)
    first, _ = run_greedy(engine, [(shared + [7, 8], slots["lora"], "lora-v1")])
    assert engine.blocks.hit_tokens == 0
    assert engine.blocks.cached > 0  # the finished sequence's full blocks stay for reuse

    engine2 = make_engine(runtime, tiny_tokenizer, max_step_tokens=64)
    engine2.blocks, engine2.runner = engine.blocks, engine.runner  # same pool, a new thread
    again, _ = run_greedy(engine2, [(shared + [9, 10], slots["lora"], "lora-v1")])
    assert engine.blocks.hit_tokens == 24  # six full blocks of the shared prefix
    assert again[0] == ref_greedy(refs["lora"], shared + [9, 10])

    engine3 = make_engine(runtime, tiny_tokenizer, max_step_tokens=64)
    engine3.blocks, engine3.runner = engine.blocks, engine.runner
    other, _ = run_greedy(engine3, [(shared + [9, 10], slots["ia3"], "ia3-v1")])
    assert engine.blocks.hit_tokens == 24  # another adapter never reuses those blocks
    assert other[0] == ref_greedy(refs["ia3"], shared + [9, 10])
    engine.blocks.check()


def test_preemption_under_a_tiny_pool_keeps_every_result(mixed, tiny_tokenizer):
    """A pool of 40 blocks of 4 tokens (160 positions) cannot hold eight rows of ~30 positions:
    rows are preempted and recomputed, and every row still gives PEFT's greedy tokens."""
    runtime, slots, refs = mixed
    names = ["lora", "ia3", "prompt5", "base", "lora_qv", "ia3_ff", "prompt11", "lora_rslora_r8"]
    prompts = {n: prompt_ids(14 + i, seed=80 + i) for i, n in enumerate(names)}
    engine = make_engine(runtime, tiny_tokenizer, blocks=40, max_step_tokens=16, context_window=48)
    got, collectors = run_greedy(engine, [(prompts[n], slots[n], n) for n in names], steps=12)
    assert engine.preemptions > 0
    for name, tokens in zip(names, got, strict=True):
        assert tokens == ref_greedy(refs[name], prompts[name], steps=12), name
    assert all(c.finish.finish_reason == "length" for c in collectors)
    engine.blocks.check()
    assert engine.blocks.used == 0  # every block went back


def test_a_request_that_could_need_more_than_its_share_of_the_pool_is_refused(mixed, tiny_tokenizer):
    """One request's choices at their longest (prompt + max_tokens each) may need at most
    max_request_blocks: n 4 of 8 + 24 positions is 32 blocks of 4, over a bound of 24."""
    runtime, slots, _ = mixed
    engine = make_engine(runtime, tiny_tokenizer, blocks=48, context_window=64, max_request_blocks=24)

    def submit(n: int, max_tokens: int) -> None:
        engine.submit(EngineRequest(prompt_ids=prompt_ids(8, seed=3), slot=slots["lora"], n=n, sink=lambda e: None,
                                    on_done=lambda: None, params=SamplingParams(max_tokens=max_tokens)))

    with pytest.raises(KVCacheDemandError, match=r"could need 128 positions .* \(96\); lower n or max_tokens"):
        submit(4, 24)
    assert engine.queue_depth == 0  # nothing of it was queued
    submit(3, 24)  # 3 x 8 blocks: at the bound
    assert engine.queue_depth == 3


def test_a_prompt_that_fills_the_context_window_fits_a_share_of_one_window(mixed, tiny_tokenizer):
    """The last token a sequence may generate ends it, so its keys and values are never computed:
    a 64-token prompt in a 64-token window (one token to generate) needs 64 positions, which the
    bound of one window holds. Counting one position more refused it ("lower n or max_tokens",
    which the client cannot)."""
    runtime, slots, _ = mixed
    engine = make_engine(runtime, tiny_tokenizer, blocks=16, context_window=64, max_request_blocks=16)
    got, collectors = run_greedy(engine, [(prompt_ids(64, seed=5), slots["lora"], "lora")], steps=16)
    assert len(got[0]) == 1 and collectors[0].finish.finish_reason == "length"
    engine.blocks.check()


class FakeClock:
    """The engine modules' ``time``: ``monotonic`` moves only when a test says so."""

    def __init__(self):
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now

    @staticmethod
    def perf_counter() -> float:
        return time.perf_counter()


@pytest.fixture
def clock(monkeypatch):
    import gateway.engine
    import gateway.paged_engine

    fake = FakeClock()
    monkeypatch.setattr(gateway.engine, "time", fake)
    monkeypatch.setattr(gateway.paged_engine, "time", fake)
    return fake


def _steps_take_a_second(engine: PagedEngine, clock: FakeClock) -> None:
    forward = engine.runner.forward

    def slow(items):
        clock.now += 1.0
        return forward(items)

    engine.runner.forward = slow


def _step_until_done(engine: PagedEngine, collectors: list[Tokens], limit: int = 400) -> None:
    for _ in range(limit):
        if all(c.done.is_set() for c in collectors):
            return
        engine._step()
    raise AssertionError("the requests did not finish")


def test_choices_held_back_for_their_first_choices_prefill_are_not_timed_out(mixed, tiny_tokenizer, clock):
    """n 2 of a 64-token prompt computed 4 tokens a step (16 steps of 1 s): the second choice
    waits for the first one's cached blocks, not for a batch row, so the 5 s queue timeout does
    not fail it (it did, as "the server is overloaded", while the same request with n 1 passed)."""
    runtime, slots, _ = mixed
    engine = make_engine(runtime, tiny_tokenizer, max_prefill_tokens=4, max_queue_wait_seconds=5.0)
    _steps_take_a_second(engine, clock)
    c = Tokens()
    engine.submit(EngineRequest(prompt_ids=prompt_ids(64, seed=9), slot=slots["lora"], n=2, sink=c.sink,
                                on_done=c.on_done, params=SamplingParams(max_tokens=4, temperature=0),
                                cache_key="lora", submitted=clock.now))
    _step_until_done(engine, [c])
    assert sorted((e.index, e.finish_reason) for e in c.events if e.finish_reason) == [(0, "length"), (1, "length")]
    assert clock.now - 1000.0 >= 16  # the prefill did outlast the timeout
    engine.blocks.check()


def test_a_sequence_preempted_in_its_prefill_waits_afresh(mixed, tiny_tokenizer, clock):
    """B, admitted beside A's decoding, is preempted mid-prefill when A's growth runs the 16-block
    pool dry, well past the 12 s queue timeout since B was submitted. Back in the queue it waits
    for A to finish (a few steps), and that wait is what the timeout measures: B is served."""
    runtime, slots, _ = mixed
    engine = make_engine(runtime, tiny_tokenizer, blocks=16, context_window=64, max_step_tokens=2,
                         max_queue_wait_seconds=12.0)
    _steps_take_a_second(engine, clock)
    a, b = Tokens(), Tokens()
    engine.submit(EngineRequest(prompt_ids=prompt_ids(4, seed=1), slot=slots["lora"], sink=a.sink, on_done=a.on_done,
                                params=SamplingParams(max_tokens=28, temperature=0), submitted=clock.now))
    for _ in range(3):
        engine._step()
    engine.submit(EngineRequest(prompt_ids=prompt_ids(40, seed=2), slot=slots["lora"], sink=b.sink, on_done=b.on_done,
                                params=SamplingParams(max_tokens=4, temperature=0), submitted=clock.now))
    submitted = clock.now
    preempted_after = None
    while preempted_after is None:
        assert not b.done.is_set(), "B finished without a preemption: the pool is not tight enough"
        before = engine.preemptions
        engine._step()
        if engine.preemptions > before:
            preempted_after = clock.now - submitted
    assert preempted_after > 12.0
    _step_until_done(engine, [a, b])
    assert [e.finish_reason for e in a.events if e.finish_reason] == ["length"]
    assert [(e.finish_reason, e.error_code) for e in b.events if e.finish_reason] == [("length", None)]
    # the prefix-cache statistics count each prompt once (B's 9 full blocks), not again at its
    # re-admission: the hit ratio is the clients' reuse
    assert engine.blocks.hit_tokens == 0 and engine.blocks.query_tokens == 36
    engine.blocks.check()


def test_admission_counts_the_blocks_it_promised_in_the_same_pass(mixed, tiny_tokenizer):
    """Two 36-token prompts each fit a 16-block pool (4 tokens a block) alone, not together. The
    blocks are taken only when the step allocates, so admission must count what it promised:
    admitting both at once made the step preempt one of them."""
    runtime, slots, refs = mixed
    engine = make_engine(runtime, tiny_tokenizer, blocks=16, context_window=64)
    prompts = [prompt_ids(36, seed=s) for s in (41, 42)]
    got, _ = run_greedy(engine, [(p, slots["lora"], "lora") for p in prompts], steps=4)
    assert engine.preemptions == 0
    for prompt, tokens in zip(prompts, got, strict=True):
        assert tokens == ref_greedy(refs["lora"], prompt, steps=4)
    engine.blocks.check()


def test_the_choices_of_one_request_compute_their_shared_prompt_once(mixed, tiny_tokenizer):
    """n 4 of a 40-token prompt: the first choice computes the prompt, the others take its cached
    blocks (all but the last entry, whose logits each choice needs) and give the same greedy tokens."""
    runtime, slots, refs = mixed
    engine = make_engine(runtime, tiny_tokenizer, blocks=128, context_window=128)
    prompt = prompt_ids(40, seed=77)
    computed = []
    forward = engine.runner.forward

    def spy(items):
        computed.append(sum(len(i.entries) for i in items if i.start < len(prompt)))
        return forward(items)

    engine.runner.forward = spy
    c = Tokens()
    sampled: dict[int, list[int]] = {}
    emit = engine._emit

    def spy_emit(seqs, logits):
        emit(seqs, logits)
        for seq in seqs:
            sampled[seq.index] = list(seq.tokens)

    engine._emit = spy_emit
    engine.submit(EngineRequest(prompt_ids=prompt, slot=slots["lora"], n=4, sink=c.sink, on_done=c.on_done,
                                params=SamplingParams(max_tokens=4, temperature=0), cache_key="lora"))
    engine.start()
    try:
        assert c.done.wait(60)
    finally:
        engine.stop()
    assert sum(computed) <= 40 + 3 * 4  # the prompt once, then a block's worth (the last entry's) per copy
    assert engine.blocks.hit_tokens == 3 * 36
    reference = ref_greedy(refs["lora"], prompt, steps=4)
    assert [sampled[i] for i in range(4)] == [reference] * 4
    engine.blocks.check()


def test_scored_positions_are_bounded_per_step_over_all_sequences(mixed, tiny_tokenizer):
    """Several prompts scored at once (echo with logprobs) keep every position's logits: one step
    takes at most SCORED_CHUNK_TOKENS of them in all, however many sequences score."""
    runtime, slots, _ = mixed
    engine = make_engine(runtime, tiny_tokenizer, blocks=512, context_window=512, max_prefill_tokens=2048)
    scored_per_forward = []
    forward = engine.runner.forward

    def spy(items):
        scored_per_forward.append(sum(len(i.entries) for i in items if i.all_logits))
        return forward(items)

    engine.runner.forward = spy
    collectors = []
    for i in range(4):
        c = Tokens()
        engine.submit(EngineRequest(prompt_ids=prompt_ids(200, seed=60 + i), slot=slots["lora"], sink=c.sink,
                                    on_done=c.on_done, params=SamplingParams(max_tokens=0, prompt_logprobs=1)))
        collectors.append(c)
    engine.start()
    try:
        for c in collectors:
            assert c.done.wait(60)
    finally:
        engine.stop()
    assert max(scored_per_forward) <= SCORED_CHUNK_TOKENS
    assert sum(scored_per_forward) >= 4 * 199  # every prompt was scored (none cut)


@pytest.mark.parametrize("seed", range(4))
def test_random_traffic_with_preemption_prefix_hits_and_cancellations_keeps_every_result(mixed, tiny_tokenizer,
                                                                                           seed):
    """Seeded random traffic through a pool too small for it: requests of every kind arrive at
    random forwards, most extending a prompt an earlier request of the same adapter used (prefix
    hits), some asking for two choices, some cancelled a few forwards after they arrive. Rows are
    preempted and recomputed. Every choice that runs to its end gives PEFT's greedy tokens for its
    adapter; a cancelled one's tokens are a prefix of them; afterwards no block is in use and the
    block manager's books balance."""
    runtime, slots, refs = mixed
    rng = random.Random(seed)
    names = ["base", *PAGED_VARIANTS]
    stems = {name: [prompt_ids(rng.randrange(8, 20), seed=1000 * seed + i)] for i, name in enumerate(names)}
    plan = []  # (arrival forward, adapter, prompt, max_tokens, choices, cancel after this many forwards or None)
    for i in range(28):
        name = rng.choice(names)
        stem = rng.choice([p for p in stems[name] if len(p) < 32])
        prompt = stem + prompt_ids(rng.randrange(1, 9), seed=7000 * seed + i)
        stems[name].append(prompt)  # a later request may extend this one's prompt
        cancel = rng.randrange(0, 8) if rng.random() < 0.2 else None
        plan.append((rng.randrange(0, 16), name, prompt, rng.randrange(2, 21), 1 + (rng.random() < 0.2), cancel))
    plan.sort(key=lambda p: p[0])
    engine = make_engine(runtime, tiny_tokenizer, blocks=16, max_step_tokens=12, context_window=64)

    submitted: list[tuple[tuple, EngineRequest, Tokens, int]] = []  # (plan entry, request, events, forward)
    sampled: dict[tuple[int, int], list[int]] = {}
    lock = threading.Lock()
    emit, forward = engine._emit, engine.runner.forward
    forwards = [0]

    def submit_due(now: int, force: bool = False) -> None:
        """Submit the next planned request if it is due (or ``force``): one arrival per forward at most."""
        with lock:
            if len(submitted) == len(plan) or not (force or plan[len(submitted)][0] <= now):
                return
            entry = plan[len(submitted)]
            _, name, prompt, max_tokens, n, _ = entry
            c = Tokens()
            request = EngineRequest(prompt_ids=prompt, slot=slots[name], n=n, sink=c.sink, on_done=c.on_done,
                                    params=SamplingParams(max_tokens=max_tokens, temperature=0),
                                    cache_key=name if name != "base" else "")
            engine.submit(request)
            submitted.append((entry, request, c, now))

    def spy_emit(seqs, logits):
        emit(seqs, logits)
        for seq in seqs:
            sampled[seq.request.id, seq.index] = list(seq.tokens)

    def spy_forward(items):  # the engine thread: arrivals and cancellations land between forwards
        forwards[0] += 1
        submit_due(forwards[0])
        for (*_, cancel), request, _, at in submitted:
            if cancel is not None and forwards[0] - at >= cancel:
                request.cancelled = True
        return forward(items)

    engine._emit, engine.runner.forward = spy_emit, spy_forward
    submit_due(0)
    engine.start()
    try:
        while len(submitted) < len(plan) or not all(c.done.is_set() for _, _, c, _ in submitted):
            if not engine.busy:  # idle before every arrival came: the next one arrives now
                submit_due(forwards[0], force=True)
            for *_, c, _ in list(submitted):
                assert c.done.wait(60), "request did not finish"
    finally:
        engine.stop()

    assert engine.preemptions > 0, "no row was preempted (retune the pool)"
    assert engine.blocks.hit_tokens > 0, "no prefix-cache hit (retune the prompts)"
    ended = collections.Counter()
    for (_, name, prompt, max_tokens, n, _), request, c, _ in submitted:
        reference = ref_greedy(refs[name], prompt, steps=max_tokens)
        finishes = {e.index: e.finish_reason for e in c.events if e.finish_reason is not None}
        for index in range(n):
            tokens = sampled.get((request.id, index), [])
            reason = finishes.get(index, "cancelled")  # a cancelled choice sends no event
            ended[reason] += 1
            if reason == "length":
                assert tokens == reference, (name, index)
            else:
                assert reason == "cancelled" and request.cancelled, (name, reason)
                assert tokens == reference[:len(tokens)], (name, index)
    assert ended["length"] > 0
    engine.blocks.check()
    assert engine.blocks.used == 0  # every block went back


def _break_by_shape(bank, slot):  # its matmul raises in the forward
    w = bank.weights[slot]
    bank.weights[slot] = w._replace(b_t=w.b_t[:, :3])


def _break_by_overflow(bank, slot):  # its logits are inf: sampling refuses the row
    w = bank.weights[slot]
    bank.weights[slot] = w._replace(b_t=w.b_t * float("inf"))


@pytest.mark.parametrize("breakage", [_break_by_shape, _break_by_overflow])
def test_broken_adapter_fails_alone(tiny_tokenizer, tmp_path, breakage):
    """An adapter whose forward raises, or whose output is not finite, ends its own rows with an
    error; the rows of other adapters in the same batch finish with the tokens they give alone."""
    base = build_tiny_llama()
    runtime = AdapterRuntime(copy.deepcopy(base), max_slots=4, dtype=torch.float32)
    good_ref = make_peft_adapter(base, "lora", tmp_path / "good", seed=1)
    make_peft_adapter(base, "lora", tmp_path / "bad", seed=2)
    good = runtime.install(load(runtime, tmp_path / "good"))
    bad = runtime.install(load(runtime, tmp_path / "bad"))
    breakage(runtime.layer("model.layers.1.mlp.down_proj").banks["lora"], bad)

    prompts = [prompt_ids(9, seed=1), prompt_ids(7, seed=2), prompt_ids(8, seed=3)]
    got, collectors = run_greedy(make_engine(runtime, tiny_tokenizer),
                                 [(prompts[0], good, "g"), (prompts[1], bad, "b"), (prompts[2], 0, "")])
    assert collectors[1].finish.error_code == "generation_failed"
    assert got[0] == ref_greedy(good_ref, prompts[0])
    assert got[2] == ref_greedy(base, prompts[2])


def test_poison_temperature_is_served_greedily():
    assert SamplingParams(max_tokens=1, temperature=1e-300).greedy


# ---- block manager ---------------------------------------------------------------------------------
def test_blocks_are_shared_cached_then_evicted_lru():
    m = BlockManager(num_blocks=4, block_size=2)
    keys = block_keys("a", [1, 2, 3, 4, 5], 2)
    assert len(keys) == 2
    first = [m.allocate(), m.allocate()]
    for block, key in zip(first, keys, strict=True):
        m.publish(block, key)
    assert m.match_prefix(keys) == first  # shared while the first holder runs
    m.release(first)
    m.release(first)
    assert (m.used, m.cached, m.available) == (0, 2, 4)
    assert m.match_prefix(block_keys("b", [1, 2, 3, 4], 2)) == []  # another adapter: no hit
    taken = [m.allocate() for _ in range(3)]  # two free, then the least recently released cached one
    # a sequence's blocks are released last first: the chain's tail is evicted before its head,
    # so what stays cached is still a prefix a request can match
    assert first[1] in taken and first[0] not in taken
    assert m.match_prefix(keys) == [first[0]]
    with pytest.raises(OutOfBlocksError):
        m.allocate(), m.allocate()
    m.check()


def test_a_sequence_grows_into_the_next_block_and_starts_where_it_has_room():
    m = BlockManager(num_blocks=16, block_size=4)
    a = [m.allocate(room=4)]
    b = [m.allocate(room=4, avoid=lambda: [(a[-1] + 1, a[-1] + 4)])]
    assert a == [0] and b == [4]  # b starts past the room a is expected to grow into
    for _ in range(3):
        a.append(m.allocate(after=a[-1]))
    assert a == [0, 1, 2, 3]
    a.append(m.allocate(after=a[-1], room=2, avoid=lambda: [(b[-1] + 1, b[-1] + 4)]))
    assert a[-1] == 8  # block 4 is b's, 5-7 are where b grows: the lowest run of 2 past them
    m.release(b)
    assert m.allocate(room=20) == 9  # no run that long: the longest one (9-15, not 4-7)
    assert m.allocate(avoid=lambda: [(0, 16)]) == 10  # everything avoided: still the longest run (10-15)
    m.check()


def test_contiguity_outranks_keeping_cached_blocks():
    """A pool full of cached blocks (the steady state) still hands out runs, not the scattered
    least recently released blocks."""
    m = BlockManager(num_blocks=12, block_size=2)
    blocks = [m.allocate(after=None, room=12)]
    for _ in range(11):
        blocks.append(m.allocate(after=blocks[-1]))
    keys = block_keys("a", list(range(24)), 2)
    for block, key in zip(blocks, keys, strict=True):
        m.publish(block, key)
    m.release(blocks)  # released last first: block 11 is the least recently released
    assert (m.cached, m.available) == (12, 12)
    m.match_prefix(keys[:1])  # block 0 holds a prefix a new request shares: referenced again
    run = [m.allocate(room=4, avoid=lambda: [(1, 4)])]  # room for 4 past where block 0 would grow
    for _ in range(3):
        run.append(m.allocate(after=run[-1]))  # growth takes the next block, though it is cached
    assert run == [7, 8, 9, 10]  # within the older half of the 11 cached blocks (11 .. 7, released first)
    assert m.cached == 12 - 1 - 4 and m.match_prefix(keys[7:8]) == []  # those four are forgotten
    assert m.match_prefix(keys[:4]) == [0, 1, 2, 3]  # the others still hit
    m.check()


def test_a_new_run_spares_the_most_recently_cached_blocks_when_it_can():
    m = BlockManager(num_blocks=8, block_size=2)
    blocks = [m.allocate(room=8)]
    for _ in range(7):
        blocks.append(m.allocate(after=blocks[-1]))
    keys = block_keys("a", list(range(16)), 2)
    for block, key in zip(blocks, keys, strict=True):
        m.publish(block, key)
    m.release(blocks[:4])  # 0-3 released first: the older half
    m.release(blocks[4:])
    assert m.allocate(room=2) == 0  # the lowest run among the older half
    assert m.match_prefix(keys[4:5]) == [4]  # a prefix served a moment ago survived
    m.check()


def test_block_manager_invariants_under_random_use():
    rng = random.Random(0)
    m = BlockManager(num_blocks=16, block_size=2)
    held: list[list[int]] = []
    for _ in range(2000):
        op = rng.random()
        if op < 0.4:
            tokens = [rng.randrange(3) for _ in range(rng.randrange(1, 9))]
            keys = block_keys("x", tokens, 2)
            blocks = m.match_prefix(keys)
            try:
                for index in range(len(blocks), len(keys)):
                    blocks.append(m.allocate())
                    m.publish(blocks[-1], keys[index])
            except OutOfBlocksError:
                m.release(blocks)
                continue
            held.append(blocks)
        elif held:
            m.release(held.pop(rng.randrange(len(held))))
        m.check()
    for blocks in held:
        m.release(blocks)
    assert m.used == 0
    m.check()


# ---- pool size from settings ----------------------------------------------------------------------
def test_kv_pool_size_in_tokens_or_bytes(tmp_path):
    from pydantic import ValidationError

    from gateway.engines import kv_pool_tokens
    from gateway.settings import Settings

    cpu, per_token = torch.device("cpu"), 1000
    by_bytes = Settings(data_dir=tmp_path, kv_cache_bytes="1MiB")
    assert by_bytes.kv_cache_bytes == 2**20
    assert kv_pool_tokens(by_bytes, cpu, per_token, context_window=64) == 2**20 // per_token
    assert kv_pool_tokens(Settings(data_dir=tmp_path, kv_cache_bytes=999), cpu, per_token, 64) == 1  # then refused
    assert kv_pool_tokens(Settings(data_dir=tmp_path, kv_cache_tokens=300), cpu, per_token, 64) == 300
    assert kv_pool_tokens(Settings(data_dir=tmp_path), cpu, per_token, 64) == 4 * 64
    with pytest.raises(ValidationError, match="not both"):
        Settings(data_dir=tmp_path, kv_cache_tokens=300, kv_cache_bytes="1MiB")
    with pytest.raises(ValidationError):
        Settings(data_dir=tmp_path, kv_cache_bytes="lots")


def test_a_pool_set_under_one_context_window_is_refused_from_the_config(tmp_path):
    from gateway.engines import check_kv_pool, kv_bytes_per_token
    from gateway.settings import Settings

    config = build_tiny_llama().config  # 2 layers, 2 KV heads of 8: 256 bytes a token in float32
    assert kv_bytes_per_token(config, torch.float32) == 256 and kv_bytes_per_token(config, torch.bfloat16) == 128

    def check(**settings) -> None:
        check_kv_pool(Settings(data_dir=tmp_path, **settings), config, torch.float32, context_window=256)

    check(kv_cache_bytes="64KiB")
    check(kv_cache_tokens=250)  # rounded up to whole 16-token blocks: 256
    check()  # sized from memory at start, after the load
    check(kv_cache="padded", kv_cache_tokens=1)  # no pool
    with pytest.raises(ValueError, match=r"kv_cache_bytes=16.0KiB: the KV pool would hold 64 tokens .* at least "
                                         r"256 tokens"):
        check(kv_cache_bytes="16KiB")
    with pytest.raises(ValueError, match="kv_cache_tokens=100: .* 112 tokens"):
        check(kv_cache_tokens=100)


def test_serve_refuses_a_pool_too_small_before_the_model_loads(monkeypatch, tmp_path):
    from gateway import app, cli

    def no_model(*args, **kwargs):
        raise AssertionError("the model must not load")

    monkeypatch.setattr(app, "create_app", no_model)
    build_tiny_llama().config.save_pretrained(tmp_path / "model")
    with pytest.raises(SystemExit, match="refusing to start: kv_cache_bytes=16.0KiB: the KV pool would hold 64"):
        cli.main(["serve", "--data-dir", str(tmp_path / "data"), "--device", "cpu", "--model", str(tmp_path / "model"),
                  "--kv-cache-bytes", "16KiB"])


def test_attention_the_paged_cache_does_not_apply_is_refused(tmp_path):
    """A sliding window narrower than the context window, or capped attention logits, would be
    silently dropped by the paged attention: refused, with the padded engine named; a window as
    wide as the context never binds and is served."""
    from transformers import Gemma2Config, MistralConfig, Qwen2Config

    from gateway.engines import check_paged_attention
    from gateway.settings import Settings

    def check(config, kv_cache: str = "paged") -> None:
        check_paged_attention(Settings(data_dir=tmp_path, kv_cache=kv_cache), config, config.max_position_embeddings)

    check(build_tiny_llama().config)
    check(MistralConfig(sliding_window=None))
    check(MistralConfig(sliding_window=4096, max_position_embeddings=4096))
    check(Qwen2Config(sliding_window=4096))  # use_sliding_window is off: every layer attends in full
    check(MistralConfig(sliding_window=4096), kv_cache="padded")
    with pytest.raises(ValueError, match=r"sliding window of 4096 tokens, narrower than its context window \(32768\)"
                                         r".*kv_cache=padded"):
        check(MistralConfig(sliding_window=4096, max_position_embeddings=32768))
    with pytest.raises(ValueError, match="sliding window of 1024 tokens"):
        check(Qwen2Config(use_sliding_window=True, sliding_window=1024, max_window_layers=1, num_hidden_layers=2))
    with pytest.raises(ValueError, match=r"attn_logit_softcapping=50.0"):
        check(Gemma2Config())


def test_serve_refuses_a_sliding_window_model_before_it_loads(monkeypatch, tmp_path):
    from transformers import MistralConfig

    from gateway import app, cli

    def no_model(*args, **kwargs):
        raise AssertionError("the model must not load")

    monkeypatch.setattr(app, "create_app", no_model)
    MistralConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                  num_key_value_heads=1, sliding_window=64, max_position_embeddings=256).save_pretrained(tmp_path / "m")
    with pytest.raises(SystemExit, match="refusing to start: this model attends within a sliding window of 64"):
        cli.main(["serve", "--data-dir", str(tmp_path / "data"), "--device", "cpu", "--model", str(tmp_path / "m")])


def test_a_pool_under_one_context_window_is_refused(mixed, tiny_tokenizer):
    runtime, _, _ = mixed
    with pytest.raises(ValueError, match="less than one context window"):
        make_engine(runtime, tiny_tokenizer, blocks=1, block_size=4)
