"""The engine-v2 figures (issue 11), through HTTP against real gateway subprocesses, each engine
(``GATEWAY_KV_CACHE=padded`` and ``paged``) in the same run, every figure against a baseline
measured on the same server just before or after:

1. long neighbour: decode time per token of 12 short streams while a ~2,000-token prompt joins
   their batch (the window from its submission to its last token) / the same 12 alone;
2. shared prefix: time to first token with a ~1,500-token system prompt the same adapter just
   served / with a fresh one of the same length;
3. context growth: decode time per token of 8 streams at ~1,500 tokens of context / at ~40, with
   attention's share of the arithmetic at both lengths (from the model config);
4. mixed ranks and kinds: 32 adapters of all eight kinds (LoRA, DoRA, AdaLoRA and VeRA of ranks
   4-64, IA3, prompt tuning, P-tuning, prefix tuning) / the same 32 requests on the most expensive
   single adapter of the mix, found by measuring each candidate alone (the costliest low-rank delta
   and one adapter of each virtual-token kind; throughput; prefix tuning needs the paged KV cache,
   so the padded engine's mix leaves it out); and rank-8 traffic with an idle rank-256 adapter
   pinned on the device / without it (a server of its own, so no larger rank was ever installed
   there; on the paged engine A B A B ... A, the adapter deleted and registered again in turn, each
   "with" against the mean of the two "without" beside it, the median over those pairs);
5. KV memory: pool bytes held by the running sequences / bytes their live tokens need, at 32
   streams of mixed lengths, from the ``gateway_kv_*`` gauges (paged engine; for the padded one,
   the client-side estimate rows x longest / sum of lengths, a lower bound);
6. the S-LoRA trace (``loadtest.trace``) over 64 adapters: throughput and p99 latency of
   ``paged`` / ``padded``, same trace.

Servers are ``loadtest.bench_server`` (EOS ignored: every request generates exactly its
``max_tokens``). Prompts are random single-token words, fresh for every measurement unless reuse
is the point (figure 2). Decode times are gaps between streamed chunks as the client sees them.
Results: ``loadtest/results/engine_bench.{json,png}``; the figures are printed as ratios.

Full run (about 14 min on 2 idle CPU cores):  python -m loadtest.engine_bench --adapters-dir loadtest/results/adapters
Quick check of the kit (about 5 min):     python -m loadtest.engine_bench --quick
Some figures only:                        python -m loadtest.engine_bench --figures 1 3 --engines paged
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import secrets
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from loadtest import engine_figures as ef
from loadtest.bench_adapters import low_rank_spec, make_adapter_set
from loadtest.http_load import StreamResult, WordPrompts, admin, closed_batch, register_folder, scrape, stream
from loadtest.server import running_gateway, stop_servers_on_sigterm
from loadtest.trace import make_trace, summarize

log = logging.getLogger("loadtest.engine_bench")
ENGINES = ("padded", "paged")
# 16 adapters in turn, every kind among the first 8 (so a --quick mix of 8 holds them all, and
# lora8-attn, figure 2's adapter): LoRA, DoRA, AdaLoRA and VeRA of ranks 4-64 (all linear layers or
# attention only), IA3, prompt tuning, P-tuning, prefix tuning. The most expensive is dora64-attn
# (a rank-64 delta plus DoRA's rescale).
MIX_KINDS = ("lora8-attn", "dora8-attn", "ia3", "adalora16-all", "prompt16", "vera32-attn", "ptuning16", "prefix16",
             "lora64-attn", "dora16-all", "lora4-all", "adalora8-attn", "vera64-attn", "lora32-attn", "dora64-attn",
             "lora8-all")
PAGED_ONLY_KINDS = ("prefix16",)  # the padded engine refuses prefix tuning (its keys go into KV blocks)
IDLE_KINDS = ("lora8-all", "lora8-all", "lora8-all", "lora256-all")


@dataclass
class Server:
    engine: str  # asked for
    client: httpx.AsyncClient
    key: str
    base: str  # the base model's served name
    paged_kv: bool = False  # the server reports gateway_kv_* gauges (the paged engine runs)
    notes: list[str] = field(default_factory=list)


# ---- shared measurement ------------------------------------------------------------------------------

async def settle(server: Server, timeout: float = 60.0) -> None:
    """Wait until the server runs and queues nothing (closed streams are cancelled there within a
    step, but a measurement must not start before), so every measurement starts from idle."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        metrics = await scrape(server.client)
        if not metrics.get("gateway_running_sequences") and not metrics.get("gateway_queue_depth"):
            return
        await asyncio.sleep(0.1)
    log.warning("%s server still busy after %.0f s; measuring anyway", server.engine, timeout)


async def decode_phase(server: Server, models: list[str], prompts: list[str], *, warm_chunks: int,
                       measure_chunks: int, cap: int, during: Callable[[], Awaitable[object]] | None = None,
                       sampler: Callable[[list[StreamResult]], Awaitable[object]] | None = None) -> dict:
    """Start one stream per prompt (``max_tokens=cap``), wait until each has ``warm_chunks``
    chunks, then measure until ``during()`` returns (or each has ``measure_chunks`` more), then
    close every stream. ``sampler(results)`` runs concurrently with the measurement."""
    await settle(server)
    stop, warm, done = asyncio.Event(), asyncio.Event(), asyncio.Event()
    live: list[StreamResult | None] = [None] * len(prompts)  # each stream's result, from its first chunk

    async def one(i: int) -> StreamResult:
        def on_chunk(result: StreamResult) -> None:
            live[i] = result
            fewest = min(len(r.arrivals) if r else 0 for r in live)
            if fewest >= warm_chunks:
                warm.set()
            if fewest >= warm_chunks + measure_chunks:
                done.set()
        return await stream(server.client, models[i], cap, prompt=prompts[i], stop=stop, on_chunk=on_chunk)

    tasks = [asyncio.create_task(one(i)) for i in range(len(prompts))]
    try:
        await _first(warm.wait(), tasks)
        start = time.perf_counter()
        sampling = asyncio.create_task(sampler(list(live))) if sampler else None
        outcome = await during() if during is not None else await _first(done.wait(), tasks)
        end = time.perf_counter()
        sampled = await sampling if sampling is not None else None
    finally:
        stop.set()
        for task in tasks:  # closing a stream cancels its request on the server
            task.cancel()
        finished = await asyncio.gather(*tasks, return_exceptions=True)
    errors = [r for r in finished if isinstance(r, Exception)]
    if errors:
        raise errors[0]
    ran_out = [r.end for r in finished if isinstance(r, StreamResult) and not r.cancelled]
    end = min([end, *ran_out])  # a stream that generated all its tokens ends the window
    arrivals = [r.arrivals if r else [] for r in live]
    return {"time_per_token_s": ef.time_per_token(arrivals, start, end),
            "gaps": len(ef.window_intervals(arrivals, start, end)), "window_s": end - start,
            "during": outcome, "sampled": sampled}


async def _first(event_wait: Awaitable[object], tasks: list[asyncio.Task]) -> None:
    """Wait for ``event_wait``; raise at once if a stream fails first."""
    waiter = asyncio.ensure_future(event_wait)
    while not waiter.done():
        await asyncio.wait([waiter, *tasks], return_when=asyncio.FIRST_COMPLETED)
        for task in tasks:
            if task.done() and task.exception() is not None:
                waiter.cancel()
                raise task.exception()
        if all(t.done() for t in tasks) and not waiter.done():
            waiter.cancel()
            raise RuntimeError("every stream ended before the measurement could start or finish")


def abba(modes: tuple[str, str], repeats: int) -> list[str]:
    """Both sides of a figure interleaved, in turn A B, B A, A B ...: drift in machine load and
    the first run's warm-up hit both sides alike."""
    return [m for r in range(repeats) for m in (modes if r % 2 == 0 else modes[::-1])]


def _median_key(runs: list[dict], key: str) -> float | None:
    return ef.median(r[key] for r in runs)


# ---- figures -----------------------------------------------------------------------------------------

async def fig_long_neighbour(server: Server, args, words: WordPrompts) -> list[dict]:
    n, runs = args.short_streams, {"alone": [], "with_long": []}
    warm_chunks = 3
    for mode in abba(("with_long", "alone"), args.repeats):
        prompts = [words.make(args.short_prompt) for _ in range(n)]
        during, chunks = None, args.decode_tokens
        if mode == "alone" and runs["with_long"]:
            # alone for as many decode steps as the streams made beside the long prompt, so their
            # contexts grow alike on both sides (a longer context costs time of its own) and the
            # ratio is the neighbour's effect only
            steps = round(ef.median(r["gaps"] / n for r in runs["with_long"]))
            chunks = min(max(chunks, steps), args.stream_cap - warm_chunks - 1)
        if mode == "with_long":
            long_prompt = words.make(args.long_prompt)

            async def during(long_prompt=long_prompt) -> dict:
                r = await stream(server.client, server.base, args.long_output, prompt=long_prompt)
                return {"ttft_s": r.ttft_s, "latency_s": r.latency_s, "prompt_tokens": r.prompt_tokens}
        runs[mode].append(await decode_phase(server, [server.base] * n, prompts, warm_chunks=warm_chunks,
                                             measure_chunks=chunks, cap=args.stream_cap, during=during))
        log.info("long neighbour %s: %s", mode, _brief(runs[mode][-1]))
    alone, with_long = _median_key(runs["alone"], "time_per_token_s"), _median_key(runs["with_long"],
                                                                                     "time_per_token_s")
    # what the streams' steadiness cost the long prompt: its time to first token
    long_ttft = ef.median(r["during"]["ttft_s"] for r in runs["with_long"])
    budget = (f"adaptive, max_decode_slowdown {args.max_decode_slowdown}" if args.max_decode_slowdown
              else f"fixed, max_step_tokens {args.max_step_tokens or 'default'}")
    return [ef.figure("long_neighbour", f"1. long neighbour ({n} short streams, +1 of {args.long_prompt} tokens "
                      "/ alone, time per token)", ef.ratio(with_long, alone), engine=server.engine,
                      alone_s=alone, with_long_s=with_long, long_ttft_s=long_ttft, runs=_strip(runs),
                      note=(f"{budget}; " if server.engine == "paged" else "")
                      + (f"the long prompt's first token after {long_ttft:.1f} s" if long_ttft is not None else ""))]


async def fig_shared_prefix(server: Server, args, words: WordPrompts, adapter: str) -> list[dict]:
    def messages(system: str) -> list[dict]:
        return [{"role": "system", "content": system}, {"role": "user", "content": words.make(12)}]

    async def ttft(system: str) -> float:
        await settle(server)
        r = await stream(server.client, adapter, 2, messages=messages(system))
        return r.ttft_s

    current = words.make(args.prefix_tokens)
    await ttft(current)  # serves it: its blocks are cached from now on
    hits, misses = [], []
    for _ in range(args.repeats * 2):
        hits.append(await ttft(current))
        current = words.make(args.prefix_tokens)
        misses.append(await ttft(current))  # fresh, and cached for the next hit
        log.info("shared prefix: hit %.3f s, miss %.3f s", hits[-1], misses[-1])
    hit, miss = ef.median(hits), ef.median(misses)
    metrics = await scrape(server.client)
    extra = {}
    if "gateway_prefix_cache_query_tokens_total" in metrics:
        extra["prefix_cache_hit_rate"] = ef.ratio(metrics.get("gateway_prefix_cache_hit_tokens_total"),
                                                  metrics["gateway_prefix_cache_query_tokens_total"])
    return [ef.figure("shared_prefix", f"2. shared prefix (TTFT, {args.prefix_tokens}-token system prompt just "
                      f"served / fresh, adapter {adapter})", ef.ratio(hit, miss), engine=server.engine,
                      hit_ttft_s=hit, miss_ttft_s=miss, hits_s=hits, misses_s=misses, **extra)]


async def fig_context_growth(server: Server, args, words: WordPrompts, config: dict) -> list[dict]:
    n, runs = args.context_streams, {"short": [], "long": []}
    lengths = {"short": args.short_context, "long": args.long_context}
    for mode in abba(("short", "long"), args.repeats):
        prompts = [words.make(lengths[mode]) for _ in range(n)]
        runs[mode].append(await decode_phase(server, [server.base] * n, prompts, warm_chunks=2,
                                             measure_chunks=args.decode_tokens, cap=args.stream_cap))
        log.info("context growth %s: %s", mode, _brief(runs[mode][-1]))
    short, long = _median_key(runs["short"], "time_per_token_s"), _median_key(runs["long"], "time_per_token_s")
    shape = ef.ModelShape.from_config(config)
    # mid-window context: the prompt plus the tokens generated before and during the window
    mid = args.decode_tokens // 2 + 2
    share = ef.attention_share_report(shape, args.short_context + mid, args.long_context + mid)
    # bytes a step reads: NF4 weights once, every row's KV (float32 on CPU, bfloat16 on CUDA)
    element = 4 if args.device == "cpu" else 2
    for which in ("short", "long"):
        need = ef.decode_step_bytes(shape, batch=n, context=share[f"{which}_context"],
                                    weight_bytes_per_param=ef.NF4_WEIGHT_BYTES, head_bytes_per_param=element,
                                    kv_element_bytes=element)
        share[f"kv_bytes_share_{which}"] = round(need["kv"] / need["total"], 4)
    return [ef.figure("context_growth", f"3. context growth ({n} streams at {args.long_context} / at "
                      f"{args.short_context} tokens, time per token)", ef.ratio(long, short),
                      engine=server.engine, short_s=short, long_s=long, attention=share, runs=_strip(runs),
                      note=(f"attention is {share['attention_share_short']:.0%} / {share['attention_share_long']:.0%}"
                            f" of the FLOPs (alone it explains {share['flops_ratio_long_over_short']:.2f}x); the KV "
                            f"cache {share['kv_bytes_share_short']:.0%} / {share['kv_bytes_share_long']:.0%} of the "
                            "bytes read per step"))]


def served_mix(mix: dict[str, str], engine: str) -> dict[str, str]:
    """The adapters of the mix that ``engine`` serves (all of them on the paged one)."""
    return {i: kind for i, kind in mix.items() if engine == "paged" or kind not in PAGED_ONLY_KINDS}


FAMILY_ORDER = ("LoRA", "DoRA", "AdaLoRA", "VeRA", "IA3", "prompt tuning", "P-tuning", "prefix tuning")


def _family(kind: str) -> str:
    """The PEFT method of a bench kind name, as the figure's title names it."""
    spec = low_rank_spec(kind)
    if spec is not None:
        return FAMILY_ORDER[("lora", "dora", "adalora", "vera").index(spec[0])]
    return {"ia3": "IA3", "prompt16": "prompt tuning", "ptuning16": "P-tuning", "prefix16": "prefix tuning"}[kind]


def heaviest_low_rank(ids: list[str], mix: dict[str, str], config: dict) -> str:
    """The low-rank adapter of ``ids`` whose delta costs most per token (from the model's shapes)."""
    shape = ef.ModelShape.from_config(config)
    costs = {i: ef.low_rank_cost(*spec, shape) for i in ids if (spec := low_rank_spec(mix[i]))}
    return max(costs, key=costs.get)


def single_candidates(ids: list[str], mix: dict[str, str], config: dict) -> list[str]:
    """The adapters of ``ids`` that may be the mix's most expensive one, each measured alone: the
    costliest low-rank delta, and one adapter of each virtual-token kind (its 16 virtual tokens are
    prompt positions every request of it computes or attends over; IA3 costs a scale per channel)."""
    virtual: dict[str, str] = {}
    for i in ids:
        if low_rank_spec(mix[i]) is None and mix[i] != "ia3":
            virtual.setdefault(mix[i], i)
    return [heaviest_low_rank(ids, mix, config), *virtual.values()]


async def fig_mixed_ranks(server: Server, args, words: WordPrompts, mix: dict[str, str], config: dict) -> list[dict]:
    """The mix / the same requests all on its most expensive single adapter, which is measured, not
    assumed: each candidate alone (``single_candidates``), the slowest one is the denominator."""
    ids = list(mix)[:args.mixed_adapters]
    plans = {"mixed": ids, **{f"single {c}": [c] * len(ids) for c in single_candidates(ids, mix, config)}}
    runs: dict[str, list[dict]] = {mode: [] for mode in plans}
    for mode in abba(tuple(plans), args.repeats):
        models = plans[mode]
        prompts = [words.make(args.batch_prompt) for _ in ids]
        await settle(server)
        runs[mode].append(await closed_batch(server.client, models, prompts, args.batch_output))
        log.info("mixed ranks %s: %.1f tok/s", mode, runs[mode][-1]["tokens_per_s"])
    mixed = _median_key(runs["mixed"], "tokens_per_s")
    singles = {mode.removeprefix("single "): _median_key(runs[mode], "tokens_per_s") for mode in plans if mode != "mixed"}
    heaviest = min(singles, key=lambda i: singles[i] if singles[i] is not None else float("inf"))
    single = singles[heaviest]
    families = sorted({_family(mix[i]) for i in ids}, key=FAMILY_ORDER.index)
    shape = ef.ModelShape.from_config(config)

    def cost(adapter: str) -> int:  # multiply-adds per token of a low-rank adapter; 0 for the others
        spec = low_rank_spec(mix[adapter])
        return ef.low_rank_cost(*spec, shape) if spec else 0

    weights = ef.adapter_weight_bytes_report([cost(i) for i in ids], cost(heaviest_low_rank(ids, mix, config)), shape,
                                             element_bytes=4 if args.device == "cpu" else 2)
    return [ef.figure("mixed_ranks", f"4a. mixed ranks and kinds ({len(ids)} adapters: {', '.join(families)} / all "
                      f"on the slowest alone, {heaviest}, throughput)", ef.ratio(mixed, single), engine=server.engine,
                      mixed_tokens_per_s=mixed, single_tokens_per_s=single, heaviest=heaviest,
                      singles_tokens_per_s=singles, kinds=families, adapter_weights=weights, runs=runs,
                      note=(f"a decode step of the mix reads {weights['mix_over_base']:.1f}x the base's weight bytes "
                            f"in adapter weights; memory-bound, no kernel beats "
                            f"{weights['bandwidth_bound_ratio']:.2f}x"))]


async def fig_idle_rank256(server: Server, args, words: WordPrompts, idle: dict[str, str],
                           idle_dir: Path) -> list[dict]:
    big = next(i for i, kind in idle.items() if kind == "lora256-all")
    small = [i for i, kind in idle.items() if kind != "lora256-all"]
    models = [small[i % len(small)] for i in range(args.idle_requests)]
    # The padded engine's banks grow but never shrink: one "without", then one "with". The paged
    # engine frees an adapter's weights when it is deleted, so there the adapter comes and goes,
    # A B A B ... A, and each "with" is read against the mean of the two "without" beside it: drift
    # over the run (a warming or busier machine) cannot pass for a cost of the idle adapter, and the
    # median over the pairs keeps one noisy batch from deciding the figure.
    order = ["without"] + ["with", "without"] * args.idle_cycles if server.engine == "paged" else ["without", "with"]
    runs: dict[str, list[dict]] = {"without": [], "with": []}
    visits: list[float | None] = []  # each visit's median throughput, in ``order``
    for index, mode in enumerate(order):
        if mode == "with":
            if index > 1:  # deleted by the "without" before: register it again from its files
                await register_folder(server.client, server.key, big, idle_dir / big)
                await asyncio.to_thread(os.sync)  # its blobs reach the disk now, not during the measurement
            await admin(server.client, server.key, "POST", f"/admin/adapters/{big}/pin")
            tier = (await admin(server.client, server.key, "GET", f"/admin/adapters/{big}"))["tier"]
            if tier != "device":
                raise RuntimeError(f"{big} should be on the device once pinned, but is in {tier}")
        elif index > 0:
            await admin(server.client, server.key, "DELETE", f"/admin/adapters/{big}")
        visit = []
        for _ in range(args.repeats):
            prompts = [words.make(args.batch_prompt) for _ in models]
            await settle(server)
            visit.append(await closed_batch(server.client, models, prompts, args.idle_output))
            log.info("idle rank 256 %s: %.1f tok/s", mode, visit[-1]["tokens_per_s"])
        runs[mode].extend(visit)
        visits.append(_median_key(visit, "tokens_per_s"))
    pairs = ef.bracketed_ratios(order, visits, "with")
    without, with_big = _median_key(runs["without"], "tokens_per_s"), _median_key(runs["with"], "tokens_per_s")
    return [ef.figure("idle_rank256", f"4b. idle rank-256 resident ({args.idle_requests} rank-8 requests of "
                      f"{args.idle_output} tokens with / without, throughput, median over pairs)",
                      ef.median(pairs), engine=server.engine, with_tokens_per_s=with_big,
                      without_tokens_per_s=without, pair_ratios=pairs, runs=runs)]


async def fig_kv_memory(server: Server, args, words: WordPrompts) -> list[dict]:
    import random

    rng = random.Random(args.seed + 5)
    lengths = [rng.randint(*args.kv_prompt_range) for _ in range(args.kv_streams)]
    prompts = [words.make(n) for n in lengths]

    async def sample(live: list[StreamResult]) -> dict:
        paged, padded = [], []
        for _ in range(args.kv_samples):
            metrics = await scrape(server.client)
            paged.append(ef.kv_pool_overhead(metrics))
            # what a left-padded cache holds now: every row as long as the longest
            padded.append(ef.padded_overhead([p + len(r.arrivals) for p, r in zip(lengths, live, strict=True)]))
            await asyncio.sleep(args.kv_interval)
        return {"paged": paged, "padded_estimate": padded, "last_metrics": {
            k: v for k, v in metrics.items() if k.startswith(("gateway_kv_", "gateway_engine_"))}}

    run = await decode_phase(server, [server.base] * len(prompts), prompts, warm_chunks=2,
                             measure_chunks=10**9, cap=args.stream_cap,
                             during=lambda: asyncio.sleep(args.kv_samples * args.kv_interval + 0.5),
                             sampler=sample)
    sampled = run["sampled"]
    measured = ef.median(sampled["paged"])
    estimate = ef.median(sampled["padded_estimate"])
    value, note = measured, "from gateway_kv_* gauges"
    if measured is None:
        value, note = estimate, "no gateway_kv_* gauges: client-side estimate rows x longest / sum (lower bound)"
    return [ef.figure("kv_memory", f"5. KV memory ({args.kv_streams} streams of {args.kv_prompt_range[0]}-"
                      f"{args.kv_prompt_range[1]} tokens: pool in use / live tokens)", value, engine=server.engine,
                      note=note, padded_estimate=estimate, samples=sampled)]


async def run_trace(server: Server, args, words: WordPrompts, mix: dict[str, str]) -> dict:
    ids = list(mix)[:args.trace_adapters]
    trace = make_trace(n_adapters=len(ids), alpha=args.trace_alpha, rate=args.trace_rate,
                       requests=args.trace_requests, input_range=tuple(args.trace_input),
                       output_range=tuple(args.trace_output), seed=args.seed)
    prompts = [words.make(r.input_tokens) for r in trace]
    await settle(server)
    loop = asyncio.get_running_loop()
    start = loop.time()
    tasks = []
    for request, prompt in zip(trace, prompts, strict=True):  # open loop: arrivals never wait for answers
        delay = start + request.arrival_s - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(stream(server.client, ids[request.adapter], request.output_tokens,
                                                prompt=prompt)))
    results = await asyncio.gather(*tasks)
    summary = summarize(results, loop.time() - start)
    log.info("trace on %s: %s", server.engine, summary)
    return {"summary": summary, "latencies_s": [round(r.latency_s, 4) for r in results],
            "ttfts_s": [round(r.ttft_s, 4) for r in results if r.ttft_s is not None]}


def trace_figures(traces: dict[str, dict]) -> list[dict]:
    if not {"padded", "paged"} <= traces.keys():
        return []
    old, new = traces["padded"]["summary"], traces["paged"]["summary"]
    return [ef.figure("trace_throughput", "6. S-LoRA trace throughput (paged / padded, tokens/s)",
                      ef.ratio(new["tokens_per_s"], old["tokens_per_s"]), engine="paged/padded"),
            ef.figure("trace_p99", "6. S-LoRA trace p99 latency (paged / padded, lower is better)",
                      ef.ratio(new["latency_p99_s"], old["latency_p99_s"]), engine="paged/padded")]


def _brief(run: dict) -> str:
    tpt = run["time_per_token_s"]
    return f"{'n/a' if tpt is None else f'{tpt * 1000:.1f} ms'}/token over {run['gaps']} gaps in {run['window_s']:.1f} s"


def _strip(runs: dict[str, list[dict]]) -> dict:
    return {mode: [{k: v for k, v in r.items() if k != "sampled"} for r in rs] for mode, rs in runs.items()}


# ---- servers -----------------------------------------------------------------------------------------

def server_env(args, engine: str, data_dir: Path, key: str, adapters: Path | None, device_adapters: int) -> dict:
    env = {"GATEWAY_MODEL": str(args.model_dir), "GATEWAY_DATA_DIR": str(data_dir), "GATEWAY_ADMIN_KEY": key,
           "GATEWAY_DEVICE": args.device, "GATEWAY_KV_CACHE": engine, "GATEWAY_MAX_BATCH_SIZE": str(args.max_batch_size),
           "GATEWAY_MAX_DEVICE_ADAPTERS": str(device_adapters),
           "GATEWAY_MAX_CPU_ADAPTERS": str(max(64, device_adapters)), "GATEWAY_MAX_QUEUED_REQUESTS": "10000",
           "GATEWAY_MAX_QUEUED_TOKENS": "100000000", "GATEWAY_MAX_QUEUE_WAIT_SECONDS": "3600",
           "GATEWAY_SLOT_WAIT_SECONDS": "600", "GATEWAY_MAX_TOKENS_LIMIT": str(max(4096, args.stream_cap)),
           # the rank-256 LoRA of figure 4b on every linear layer of a 1B base is ~0.8 GB in float32
           "GATEWAY_MAX_ADAPTER_BYTES": str(4 * 2**30),
           "GATEWAY_SHUTDOWN_GRACE_SECONDS": "2",  # nothing to drain: the client closed its streams
           "GATEWAY_LOG_LEVEL": "warning", "HF_HUB_DISABLE_PROGRESS_BARS": "1", "TQDM_DISABLE": "1"}
    if adapters is not None:
        env["GATEWAY_ADAPTERS_DIR"] = str(adapters)
    if engine == "paged":
        env["GATEWAY_PREFIX_CACHING"] = "true"
        for name, value in (("GATEWAY_KV_CACHE_TOKENS", args.kv_cache_tokens),
                            ("GATEWAY_KV_BLOCK_SIZE", args.kv_block_size),
                            ("GATEWAY_MAX_STEP_TOKENS", args.max_step_tokens),
                            ("GATEWAY_MAX_DECODE_SLOWDOWN", args.max_decode_slowdown)):
            if value is not None:
                env[name] = str(value)
    for item in args.server_env:
        name, _, value = item.partition("=")
        env[name] = value
    return env


@contextlib.asynccontextmanager
async def open_server(args, engine: str, work: Path, name: str, adapters: Path | None, device_adapters: int):
    key = secrets.token_hex(16)
    env = server_env(args, engine, work / f"{name}-{engine}", key, adapters, device_adapters)
    log_path = args.out.parent / f"engine_bench-{name}-{engine}.log"
    log.info("starting the %s server (%s engine); log in %s", name, engine, log_path)
    with running_gateway(env, log_path, timeout=600, module="loadtest.bench_server") as url:
        async with httpx.AsyncClient(base_url=url, timeout=3600) as client:
            base = (await client.get("/v1/models")).json()["data"][0]["id"]
            server = Server(engine=engine, client=client, key=key, base=base)
            server.paged_kv = ef.has_paged_kv(await scrape(client))
            if engine == "paged" and not server.paged_kv:
                server.notes.append("no gateway_kv_* gauges: this 'paged' server ran the padded engine")
                log.warning("the 'paged' server reports no KV pool: the engine without paged KV ran")
            await stream(client, base, 2, prompt="warm up")
            yield server


async def warm(server: Server, ids: list[str]) -> None:
    for adapter in ids:  # onto the device now, so no measurement includes a load
        await admin(server.client, server.key, "POST", f"/admin/adapters/{adapter}/load")


async def guarded(results: list[dict], figure_no: str, engine: str, work: Awaitable[list[dict]],
                  checkpoint: Callable[[], None] = lambda: None) -> None:
    """Run one figure; its failure is recorded and printed, the others go on. ``checkpoint``
    saves what is measured so far (a run cut short by a time limit keeps it)."""
    try:
        results.extend(await work)
    except Exception as exc:  # noqa: BLE001 - fail soft per figure, with the reason kept
        log.exception("figure %s on %s failed", figure_no, engine)
        results.append(ef.figure(f"figure_{figure_no}", f"{figure_no}. (failed)", None, engine=engine,
                                 error=f"{type(exc).__name__}: {exc}"))
    checkpoint()


async def run_core(args, servers: dict[str, Server], words: WordPrompts, sets: dict, config: dict,
                   figures: list[dict], traces: dict, checkpoint: Callable[[], None]) -> None:
    """Figures 1-6 on every engine's core server, figure by figure (each figure on every engine
    before the next: a run cut short keeps whole before/after pairs, and drift hits both)."""
    wanted = set(args.figures)
    lora = next(i for i, k in sets["mix"].items() if k == "lora8-attn")
    plan = [("1", lambda s: fig_long_neighbour(s, args, words)),
            ("2", lambda s: fig_shared_prefix(s, args, words, lora)),
            ("3", lambda s: fig_context_growth(s, args, words, config)),
            ("5", lambda s: fig_kv_memory(s, args, words)),
            ("4", lambda s: _after(warm(s, list(served_mix(sets["mix"], s.engine))[:args.mixed_adapters]),
                                   lambda: fig_mixed_ranks(s, args, words, served_mix(sets["mix"], s.engine),
                                                           config)))]
    for number, make in plan:
        if number in wanted:
            for engine, server in servers.items():
                await guarded(figures, "4a" if number == "4" else number, engine, make(server), checkpoint)
    if "6" in wanted:
        for engine, server in servers.items():
            try:
                mix = served_mix(sets["mix"], engine)
                await warm(server, list(mix)[:args.trace_adapters])
                traces[engine] = await run_trace(server, args, words, mix)
            except Exception as exc:  # noqa: BLE001 - fail soft
                log.exception("trace on %s failed", engine)
                traces[engine] = {"error": f"{type(exc).__name__}: {exc}"}
            checkpoint()


async def _after(first: Awaitable[object], then: Callable[[], Awaitable[list[dict]]]) -> list[dict]:
    await first
    return await then()


async def run_all(args, work: Path, words: WordPrompts, sets: dict, config: dict) -> dict:
    figures: list[dict] = []
    traces: dict[str, dict] = {}
    info: dict[str, dict] = {}
    partial = args.out.with_suffix(".partial.json")

    def checkpoint() -> None:
        partial.write_text(json.dumps({"figures": figures, "traces": traces}, indent=2, default=str))

    if set(args.figures) & set("123456"):  # one core server per engine, both up at once
        async with contextlib.AsyncExitStack() as stack:
            servers = {e: await stack.enter_async_context(open_server(args, e, work, "core", sets["mix_dir"],
                                                                      args.trace_adapters + 1))
                       for e in args.engines}
            info = {e: {"paged_kv": s.paged_kv, "notes": s.notes} for e, s in servers.items()}
            await run_core(args, servers, words, sets, config, figures, traces, checkpoint)
    if {"4", "4b"} & set(args.figures):  # figure 4b: servers where no rank above 8 was ever installed before
        async with contextlib.AsyncExitStack() as stack:
            servers = {e: await stack.enter_async_context(open_server(args, e, work, "idle", sets["idle_dir"],
                                                                      len(IDLE_KINDS)))
                       for e in args.engines}
            for engine, server in servers.items():
                await guarded(figures, "4b", engine, _after(
                    warm(server, [i for i, k in sets["idle"].items() if k != "lora256-all"]),
                    lambda server=server: fig_idle_rank256(server, args, words, sets["idle"], sets["idle_dir"])),
                    checkpoint)
    figures.extend(trace_figures({e: t for e, t in traces.items() if "summary" in t}))
    figures.sort(key=lambda f: (f["name"][:3], f["engine"]))
    return {"figures": figures, "traces": traces, "servers": info}


# ---- command line ------------------------------------------------------------------------------------

QUICK = {"repeats": 1, "short_streams": 4, "short_prompt": 16, "long_prompt": 256, "long_output": 4,
         "decode_tokens": 6, "prefix_tokens": 256, "context_streams": 3, "short_context": 24, "long_context": 256,
         "mixed_adapters": 8, "batch_prompt": 8, "batch_output": 4, "idle_requests": 4, "idle_cycles": 2,
         "idle_output": 4, "kv_streams": 6,
         "kv_prompt_range": [8, 128], "kv_samples": 3, "trace_adapters": 8, "trace_requests": 8,
         "trace_rate": 4.0, "trace_input": [8, 48], "trace_output": [2, 8], "stream_cap": 256}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from gateway.settings import EMBEDDED_MODEL

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--figures", nargs="+", default=["1", "2", "3", "4", "5", "6"], choices=[*"123456", "4b"],
                   help="4 is both 4a and 4b; 4b alone skips the core servers")
    p.add_argument("--engines", nargs="+", default=list(ENGINES), choices=ENGINES)
    p.add_argument("--quick", action="store_true", help="tiny sizes: checks the kit end to end in minutes")
    p.add_argument("--model", default=EMBEDDED_MODEL, help="base model folder (default: embedded SmolLM2)")
    p.add_argument("--dummy-weights", action="store_true",
                   help="random weights at the shapes of --model's config (a folder with config and tokenizer)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda", "auto"])
    p.add_argument("--data-dir", type=Path, default=Path("./data"), help="where the embedded model lives")
    p.add_argument("--adapters-dir", type=Path, help="keep the generated adapters here (default: a temp dir)")
    p.add_argument("--out", type=Path, default=Path("loadtest/results/engine_bench"), help="JSON/PNG path stem")
    p.add_argument("--repeats", type=int, default=1,
                   help="runs of each side of figures 1, 3, 4 (ABBA order); figure 2 takes 2 x this many pairs")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-batch-size", type=int, default=32)
    p.add_argument("--stream-cap", type=int, default=1024, help="max_tokens of streams the client closes itself")
    p.add_argument("--decode-tokens", type=int, default=16, help="decode steps measured in figures 1 and 3")
    g = p.add_argument_group("figure 1")
    g.add_argument("--short-streams", type=int, default=12)
    g.add_argument("--short-prompt", type=int, default=32)
    g.add_argument("--long-prompt", type=int, default=2000)
    g.add_argument("--long-output", type=int, default=16)
    p.add_argument_group("figure 2").add_argument("--prefix-tokens", type=int, default=1500)
    g = p.add_argument_group("figure 3")
    g.add_argument("--context-streams", type=int, default=8)
    g.add_argument("--short-context", type=int, default=40)
    g.add_argument("--long-context", type=int, default=1500)
    g = p.add_argument_group("figure 4")
    g.add_argument("--mixed-adapters", type=int, default=32)
    g.add_argument("--idle-requests", type=int, default=16)
    g.add_argument("--idle-cycles", type=int, default=4,
                   help="figure 4b on the paged engine: times the idle adapter is added and deleted again")
    g.add_argument("--idle-output", type=int, default=64,
                   help="figure 4b: tokens per request (long enough that one batch outlasts the VM's jitter)")
    g.add_argument("--batch-prompt", type=int, default=32)
    g.add_argument("--batch-output", type=int, default=16)
    g = p.add_argument_group("figure 5")
    g.add_argument("--kv-streams", type=int, default=32)
    g.add_argument("--kv-prompt-range", type=int, nargs=2, default=[16, 384], metavar=("MIN", "MAX"))
    g.add_argument("--kv-samples", type=int, default=8)
    g.add_argument("--kv-interval", type=float, default=0.25)
    g = p.add_argument_group("figure 6")
    g.add_argument("--trace-adapters", type=int, default=64)
    g.add_argument("--trace-alpha", type=float, default=0.5, help="popularity skew (1 uniform, smaller skewed)")
    g.add_argument("--trace-rate", type=float, default=1.0, help="Poisson arrivals per second")
    g.add_argument("--trace-requests", type=int, default=40)
    g.add_argument("--trace-input", type=int, nargs=2, default=[8, 256], metavar=("MIN", "MAX"))
    g.add_argument("--trace-output", type=int, nargs=2, default=[8, 48], metavar=("MIN", "MAX"))
    g = p.add_argument_group("paged engine settings (passed to the 'paged' server when given)")
    g.add_argument("--kv-cache-tokens", type=int, default=32768)
    g.add_argument("--kv-block-size", type=int)
    g.add_argument("--max-step-tokens", type=int)
    g.add_argument("--max-decode-slowdown", type=float, help="the adaptive prompt budget (default: fixed)")
    p.add_argument("--server-env", nargs="*", default=[], metavar="GATEWAY_X=VALUE",
                   help="more settings for every server")
    args = p.parse_args(argv)
    if args.quick:
        defaults = {a.dest: a.default for a in p._actions}  # noqa: SLF001 - only flags left at their default
        for name, value in QUICK.items():
            if getattr(args, name) == defaults[name]:
                setattr(args, name, value)
    args.mixed_adapters = min(args.mixed_adapters, args.trace_adapters) if "6" in args.figures else args.mixed_adapters
    return args


def make_sets(args, adapters_dir: Path) -> dict:
    count = max(args.mixed_adapters, args.trace_adapters if "6" in args.figures else 0)
    kinds = [MIX_KINDS[i % len(MIX_KINDS)] for i in range(count)]
    mix_dir, idle_dir = adapters_dir / "mix", adapters_dir / "idle"
    mix = make_adapter_set(args.model_dir, mix_dir, kinds, "mix", seed=args.seed)
    idle = make_adapter_set(args.model_dir, idle_dir, list(IDLE_KINDS), "idle", seed=args.seed + 1)
    return {"mix_dir": mix_dir, "idle_dir": idle_dir,
            "mix": {f.name: k for f, k in zip(mix, kinds, strict=True)},
            "idle": {f.name: k for f, k in zip(idle, IDLE_KINDS, strict=True)}}


def main(argv: list[str] | None = None) -> dict:
    from gateway.base_model import materialize_dummy, materialize_embedded
    from gateway.settings import EMBEDDED_MODEL
    from loadtest.harness import quiet_logging

    args = parse_args(argv)
    quiet_logging()
    # a SIGTERM (a time limit) unwinds like an exception, so every gateway server started is stopped
    stop_servers_on_sigterm()
    args.model_dir = materialize_embedded(args.data_dir) if args.model == EMBEDDED_MODEL else Path(args.model)
    if args.dummy_weights:  # written once into the data dir; adapters and servers then load that folder
        args.model_dir = materialize_dummy(str(args.model_dir), args.data_dir)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    config = json.loads((args.model_dir / "config.json").read_text())
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="engine-bench-") as tmp:
        sets = make_sets(args, args.adapters_dir or Path(tmp) / "adapters")
        words = WordPrompts.from_model_dir(args.model_dir, seed=args.seed)
        outcome = asyncio.run(run_all(args, Path(tmp), words, sets, config))
    result = {"title": f"{args.model_dir.name} on {args.device}: engine v2 figures"
                       + (" (quick sizes)" if args.quick else ""),
              "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
              "seconds": round(time.monotonic() - started, 1), **outcome}
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=2, default=str))
    args.out.with_suffix(".partial.json").unlink(missing_ok=True)  # the whole result is written
    try:
        from loadtest.plots import plot_engine_bench

        plot_engine_bench(result, args.out.with_suffix(".png"))
        wrote = f"{args.out.with_suffix('.json')} and .png"
    except ImportError:  # matplotlib is optional (the loadtest extra)
        wrote = f"{args.out.with_suffix('.json')} (no PNG: matplotlib is not installed)"
    lines = [ef.format_figure(f) for f in result["figures"]]
    for engine, info in result["servers"].items():
        lines += [f"[{engine}] note: {n}" for n in info.get("notes", [])]
    for engine, trace in result["traces"].items():
        if "summary" in trace:
            s = trace["summary"]
            lines.append(f"[{engine}] 6. trace: {s['tokens_per_s']} tok/s, latency p50 {s['latency_p50_s']} s, "
                         f"p99 {s['latency_p99_s']} s, TTFT p99 {s['ttft_p99_s']} s")
        else:
            lines.append(f"[{engine}] 6. trace ERROR: {trace.get('error')}")
    sys.stdout.write("\n".join(lines) + f"\n({result['seconds']} s) wrote {wrote}\n")
    return result


if __name__ == "__main__":
    main()
