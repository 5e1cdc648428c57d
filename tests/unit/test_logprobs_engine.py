"""Log-probabilities, penalties and logit_bias inside the engines' batched step, against PEFT:
prompt and generated logprobs equal ``log_softmax`` of PEFT's logits for the base and every
adapter kind (paged engine with chunked prefill, and the padded baseline); rows asking for
logprobs or penalties share a batch with plain rows of other adapters and give what they give
alone; prompt scoring is complete after a prefix-cache hit would have skipped positions and
after preemption; penalties equal a reference computed by hand on PEFT's logits."""

from __future__ import annotations

import copy
import threading
import warnings

import pytest
import torch
from test_paged_engine import make_engine, mixed  # noqa: F401 - ``mixed`` is a fixture
from test_runtime_equivalence import prompt_ids

from gateway.engine import EngineRequest, SequenceEvent
from gateway.logprobs import TokenLogprob
from gateway.model_runner import ModelRunner
from gateway.padded_engine import PaddedEngine
from gateway.sampling import SamplingParams

TOL = 1e-4
STEPS = 16  # long enough for each penalty case to meet a repeated token


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


class Collector:
    def __init__(self):
        self.events: list[SequenceEvent] = []
        self.done = threading.Event()

    @property
    def logprobs(self) -> list[TokenLogprob]:
        return [e for ev in self.events for e in ev.logprobs]

    @property
    def prompt_logprobs(self) -> list[TokenLogprob] | None:
        sent = [ev.prompt_logprobs for ev in self.events if ev.prompt_logprobs is not None]
        assert len(sent) <= 1, "the prompt's logprobs are sent once"
        return list(sent[0]) if sent else None

    @property
    def tokens(self) -> list[int]:
        return [e.token for e in self.logprobs]


def submit(engine, prompt: list[int], slot: int, key: str, params: SamplingParams) -> Collector:
    c = Collector()
    engine.submit(EngineRequest(prompt_ids=prompt, slot=slot, params=params, sink=c.events.append,
                                on_done=c.done.set, cache_key=key))
    return c


def run(engine, jobs: list[tuple[list[int], int, str, SamplingParams]]) -> list[Collector]:
    collectors = [submit(engine, *job) for job in jobs]
    engine.start()
    try:
        for c in collectors:
            assert c.done.wait(60), "request did not finish"
    finally:
        engine.stop()
    for c in collectors:
        assert c.events[-1].error is None, c.events[-1].error
    return collectors


@torch.no_grad()
def ref_logprobs(model, ids: list[int]) -> torch.Tensor:
    """``[len(ids), vocab]``: PEFT's log_softmax at every position of ``ids`` (prompt tuning's
    virtual positions in front are cut off)."""
    logits = model(input_ids=torch.tensor([ids])).logits[0, -len(ids):].float()
    return torch.log_softmax(logits, dim=-1)


def check_against_ref(entries: list[TokenLogprob], ref: torch.Tensor, targets: list[int], k: int, name: str):
    """``entries[i]`` scores ``targets[i]`` from ``ref[i]``: value within TOL (relative), the
    same top-k tokens in the same order."""
    assert [e.token for e in entries] == targets, name
    if not targets:
        return
    got = torch.tensor([e.logprob for e in entries])
    want = ref.gather(-1, torch.tensor(targets).unsqueeze(-1)).squeeze(-1)
    assert float((got - want).abs().max() / want.abs().max()) <= TOL, name
    if k:
        values, ids = ref.topk(k, dim=-1)
        assert [[t for t, _ in e.top] for e in entries] == ids.tolist(), name
        got_top = torch.tensor([[v for _, v in e.top] for e in entries])
        assert float((got_top - values).abs().max() / values.abs().max()) <= TOL, name


def check_request(c: Collector, model, prompt: list[int], k: int, prompt_k: int | None, name: str):
    generated = c.tokens
    ref = ref_logprobs(model, prompt + generated)
    check_against_ref(c.logprobs, ref[len(prompt) - 1:len(prompt) - 1 + len(generated)], generated, k, name)
    if prompt_k is not None:
        scored = c.prompt_logprobs
        assert scored[0] == TokenLogprob(prompt[0], None), name  # nothing predicts the first token
        check_against_ref(scored[1:], ref[:len(prompt) - 1], prompt[1:], prompt_k, name)


def test_paged_logprobs_of_every_kind_match_peft_in_one_batch(mixed, tiny_tokenizer):
    """Every variant and the base in one batch, prefill chunked by 8 tokens a step: generated and
    prompt logprobs (top 5 / top 3) equal PEFT's log_softmax, top-k order identical."""
    runtime, slots, refs = mixed
    names = list(slots)
    prompts = {n: prompt_ids(9 + 2 * i, seed=100 + i) for i, n in enumerate(names)}
    params = SamplingParams(max_tokens=5, temperature=0, logprobs=5, prompt_logprobs=3)
    got = run(make_engine(runtime, tiny_tokenizer), [(prompts[n], slots[n], n, params) for n in names])
    for name, c in zip(names, got, strict=True):
        assert len(c.tokens) == 5
        check_request(c, refs[name], prompts[name], 5, 3, name)


def test_padded_engine_logprobs_match_peft(mixed, tiny_tokenizer):
    """The padded baseline (left-padded prefill of all positions) scores the same way."""
    runtime, slots, refs = mixed
    names = ["base", "lora", "ia3", "prompt11"]
    prompts = {n: prompt_ids(7 + 3 * i, seed=120 + i) for i, n in enumerate(names)}
    engine = PaddedEngine(ModelRunner(runtime.model, runtime), tiny_tokenizer, context_window=128,
                          max_batch_size=8, max_prefill_tokens=256, max_queued_requests=16, eos_token_ids=set())
    params = SamplingParams(max_tokens=3, temperature=0, logprobs=2, prompt_logprobs=4)
    got = run(engine, [(prompts[n], slots[n], n, params) for n in names])
    for name, c in zip(names, got, strict=True):
        check_request(c, refs[name], prompts[name], 2, 4, name)


def test_max_tokens_zero_scores_the_prompt_alone(mixed, tiny_tokenizer):
    runtime, slots, refs = mixed
    prompt = prompt_ids(13, seed=7)
    params = SamplingParams(max_tokens=0, temperature=0, logprobs=1, prompt_logprobs=1)
    (c,) = run(make_engine(runtime, tiny_tokenizer), [(prompt, slots["prompt5"], "p5", params)])
    assert c.tokens == [] and c.events[-1].finish_reason == "length" and c.events[-1].completion_tokens == 0
    check_request(c, refs["prompt5"], prompt, 1, 1, "prompt5")


def test_prompt_scoring_takes_no_prefix_cache_hit(mixed, tiny_tokenizer):
    """A prompt whose blocks are cached still has every position scored: the scoring request
    computes them again instead of taking the hit."""
    runtime, slots, refs = mixed
    prompt = prompt_ids(26, seed=9)
    engine = make_engine(runtime, tiny_tokenizer, max_step_tokens=64)
    run(engine, [(prompt, slots["lora"], "lora-v1", SamplingParams(max_tokens=2, temperature=0))])
    assert engine.blocks.cached > 0
    again = make_engine(runtime, tiny_tokenizer, max_step_tokens=64)
    again.blocks, again.runner = engine.blocks, engine.runner  # same pool and cache, a new thread
    params = SamplingParams(max_tokens=2, temperature=0, prompt_logprobs=2)
    (c,) = run(again, [(prompt, slots["lora"], "lora-v1", params)])
    assert engine.blocks.hit_tokens == 0
    assert len(c.prompt_logprobs) == len(prompt)
    check_request(c, refs["lora"], prompt, 0, 2, "lora")
    engine.blocks.check()


def test_prompt_scoring_survives_preemption(mixed, tiny_tokenizer):
    """A tiny pool preempts rows mid-prompt and mid-generation: every prompt is still scored
    once, completely, with PEFT's values."""
    runtime, slots, refs = mixed
    names = ["lora", "ia3", "prompt5", "base", "lora_qv", "ia3_ff", "prompt11", "lora_rslora_r8"]
    prompts = {n: prompt_ids(14 + i, seed=140 + i) for i, n in enumerate(names)}
    engine = make_engine(runtime, tiny_tokenizer, blocks=36, max_step_tokens=16, context_window=48)
    params = SamplingParams(max_tokens=10, temperature=0, logprobs=1, prompt_logprobs=1)
    got = run(engine, [(prompts[n], slots[n], n, params) for n in names])
    assert engine.preemptions > 0
    for name, c in zip(names, got, strict=True):
        check_request(c, refs[name], prompts[name], 1, 1, name)
    assert engine.blocks.used == 0


def penalized_greedy(model, prompt: list[int], steps: int, *, presence=0.0, frequency=0.0, repetition=1.0,
                     bias=()) -> list[int]:
    """Greedy decoding with the penalties applied by hand, token by token, on PEFT's logits."""
    out: list[int] = []
    for _ in range(steps):
        logits = model(input_ids=torch.tensor([prompt + out])).logits[0, -1].float().clone()
        for token in set(prompt + out):
            value = logits[token]
            logits[token] = value / repetition if value > 0 else value * repetition
        for token in set(out):
            logits[token] -= frequency * out.count(token) + presence
        for token, b in bias:
            logits[token] += b
        out.append(int(logits.argmax()))
    return out


@torch.no_grad()
def test_penalties_and_bias_match_a_hand_reference_in_a_mixed_batch(mixed, tiny_tokenizer):
    """Rows with each penalty, a logit_bias, logprobs, and plain rows, of different adapters in
    one batch: each gives what PEFT's logits give with the penalty applied by hand, and what it
    gives alone; logprobs stay the model's own (before the penalties)."""
    runtime, slots, refs = mixed
    steps = STEPS
    cases = [
        ("base", dict(), {}),
        ("lora", dict(frequency_penalty=1.5), dict(frequency=1.5)),
        ("ia3", dict(presence_penalty=2.0, logprobs=3), dict(presence=2.0)),
        ("prompt5", dict(repetition_penalty=1.8), dict(repetition=1.8)),
        ("lora_qv", dict(logit_bias=((17, 6.0), (42, -100.0))), dict(bias=((17, 6.0), (42, -100.0)))),
        ("ia3_ff", dict(frequency_penalty=-1.0, presence_penalty=0.5, repetition_penalty=1.2),
         dict(frequency=-1.0, presence=0.5, repetition=1.2)),
        ("lora_rslora_r8", dict(logprobs=2), {}),
    ]
    prompts = {name: prompt_ids(8 + i, seed=160 + i) for i, (name, _, _) in enumerate(cases)}
    jobs = [(prompts[name], slots[name], name, SamplingParams(max_tokens=steps, temperature=0, logprobs=0, **kw)
             if "logprobs" not in kw else SamplingParams(max_tokens=steps, temperature=0, **kw))
            for name, kw, _ in cases]
    together = run(make_engine(runtime, tiny_tokenizer), jobs)
    for (name, kw, manual), c, job in zip(cases, together, jobs, strict=True):
        assert c.tokens == penalized_greedy(refs[name], prompts[name], steps, **manual), name
        (alone,) = run(make_engine(runtime, tiny_tokenizer), [job])
        assert alone.tokens == c.tokens, name
        assert [e.logprob for e in alone.logprobs] == pytest.approx([e.logprob for e in c.logprobs], rel=TOL), name
        k = job[3].logprobs
        check_request(c, refs[name], prompts[name], k, None, name)  # raw distribution, penalties aside


def test_penalty_cases_change_the_greedy_choice(mixed):
    """Guards the test above: each penalty case picks other tokens than plain greedy would (so
    matching the hand reference says something)."""
    _, _, refs = mixed
    cases = [("lora", dict(frequency=1.5)), ("ia3", dict(presence=2.0)), ("prompt5", dict(repetition=1.8)),
             ("lora_qv", dict(bias=((17, 6.0), (42, -100.0)))),
             ("ia3_ff", dict(frequency=-1.0, presence=0.5, repetition=1.2))]
    for i, (name, manual) in enumerate(cases, start=1):
        prompt = prompt_ids(8 + i, seed=160 + i)
        assert penalized_greedy(refs[name], prompt, STEPS, **manual) != penalized_greedy(refs[name], prompt, STEPS), name


def test_scored_prompts_are_computed_in_bounded_chunks(mixed, tiny_tokenizer, monkeypatch):
    """A scored prompt's chunks stay within SCORED_CHUNK_TOKENS (their logits are all kept), and
    the scores are still complete and right."""
    import gateway.paged_engine as paged

    monkeypatch.setattr(paged, "SCORED_CHUNK_TOKENS", 5)
    runtime, slots, refs = mixed
    engine = make_engine(runtime, tiny_tokenizer, max_step_tokens=64)
    sizes = []
    forward = engine.runner.forward
    engine.runner.forward = lambda items: (sizes.extend(len(i.entries) for i in items if i.all_logits), forward(items))[1]
    prompt = prompt_ids(23, seed=11)
    (c,) = run(engine, [(prompt, slots["prompt11"], "p11", SamplingParams(max_tokens=2, temperature=0,
                                                                           prompt_logprobs=1))])
    assert sizes and max(sizes) <= 5
    check_request(c, refs["prompt11"], prompt, 0, 1, "prompt11")
