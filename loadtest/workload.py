"""The S-LoRA workload against the gateway in this process: n adapters of mixed kinds, popularity
``floor(n * X)`` with ``X ~ power(alpha)``, Poisson arrivals at rate R, input and output lengths
drawn from ranges, greedy, outputs of exactly their drawn length. Reports throughput (tokens/s,
requests/s), time to first token and latency p50/p99.

The same trace is replayed on the base model alone in the same run (every request's adapter
dropped), and the ratios adapters / base are printed: what serving n adapters costs.

Example:  python -m loadtest.workload --adapters 64 --alpha 0.5 --rate 0.5 --requests 100
Smoke:    python -m loadtest.workload --adapters 4 --rate 5 --requests 6 --input 8 16 --output 2 4
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import random
import sys
import tempfile
import time
from pathlib import Path

from gateway.base_model import load_base, materialize_embedded
from gateway.settings import EMBEDDED_MODEL
from loadtest.bench_adapters import make_adapter_set, mixed_kinds
from loadtest.harness import InProcessGateway, Timing, bench_settings, quiet_logging, random_prompt
from loadtest.plots import plot_workload
from loadtest.trace import TraceRequest, make_trace, summarize

log = logging.getLogger("loadtest.workload")


async def replay(gw: InProcessGateway, trace: list[TraceRequest], models: list[str],
                 prompts: list[list[int]]) -> tuple[list[Timing], float]:
    """Send every request at its arrival time (open loop: arrivals never wait for answers)."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    tasks = []
    for request, model, prompt in zip(trace, models, prompts, strict=True):
        delay = start + request.arrival_s - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(gw.generate(model, prompt, request.output_tokens)))
    timings = await asyncio.gather(*tasks)
    return list(timings), loop.time() - start


async def run(args, model_dir: Path, data_dir: Path, folders: list[Path]) -> dict:
    trace = make_trace(n_adapters=args.adapters, alpha=args.alpha, rate=args.rate, requests=args.requests,
                       input_range=tuple(args.input), output_range=tuple(args.output), seed=args.seed)
    settings = bench_settings(data_dir, str(model_dir), max_batch_size=args.max_batch_size,
                              device_adapters=max(1, args.adapters), cpu_adapters=max(1, args.adapters))
    gw = InProcessGateway(settings, load_base(settings))
    await gw.start()
    try:
        ids = [f"adapter-{i:03d}" for i in range(args.adapters)]
        for name, folder in zip(ids, folders, strict=True):
            await gw.register(name, folder)
        await gw.warm(ids)  # S-LoRA's swapping is out of scope here: every adapter fits the device
        rng = random.Random(args.seed + 1)
        prompts = [random_prompt(rng, r.input_tokens, gw.vocab_size) for r in trace]
        await gw.closed_batch([gw.base_name, ids[0]], prompts[:2], 2)  # warm-up
        modes = {"adapters": [ids[r.adapter] for r in trace], "base only": [gw.base_name] * len(trace)}
        result: dict = {"modes": {}}
        for mode, models in modes.items():
            started = time.monotonic()
            timings, wall = await replay(gw, trace, models, prompts)
            log.info("%s: replayed %d requests in %.1f s", mode, len(trace), time.monotonic() - started)
            result["modes"][mode] = {
                "summary": summarize(timings, wall),
                "latencies_s": [round(t.latency_s, 4) for t in timings],
                "ttfts_s": [round(t.ttft_s, 4) for t in timings if t.ttft_s is not None],
            }
        return result
    finally:
        await gw.close()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=EMBEDDED_MODEL, help="base model folder (default: embedded SmolLM2)")
    parser.add_argument("--data-dir", type=Path, default=Path("./data"), help="where the embedded model lives")
    parser.add_argument("--adapters-dir", type=Path, help="keep the generated adapters here (default: a temp dir)")
    parser.add_argument("--out", type=Path, default=Path("loadtest/results/workload"), help="JSON/PNG path stem")
    parser.add_argument("--adapters", type=int, default=64, help="n: adapters, kinds mixed in turn")
    parser.add_argument("--alpha", type=float, default=1.0, help="popularity skew (1 uniform, smaller skewed)")
    parser.add_argument("--rate", type=float, default=0.5, help="R: mean arrivals per second (Poisson)")
    parser.add_argument("--requests", type=int, default=100)
    parser.add_argument("--input", type=int, nargs=2, default=[8, 128], metavar=("MIN", "MAX"))
    parser.add_argument("--output", type=int, nargs=2, default=[8, 64], metavar=("MIN", "MAX"))
    parser.add_argument("--max-batch-size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    quiet_logging()
    model_dir = materialize_embedded(args.data_dir) if args.model == EMBEDDED_MODEL else Path(args.model)
    with tempfile.TemporaryDirectory(prefix="workload-") as tmp:
        folders = make_adapter_set(model_dir, args.adapters_dir or Path(tmp) / "adapters", mixed_kinds(args.adapters),
                                   "mixed", seed=args.seed)
        result = asyncio.run(run(args, model_dir, Path(tmp) / "gateway-data", folders))
    adapters, base = result["modes"]["adapters"]["summary"], result["modes"]["base only"]["summary"]
    result["ratios_adapters_over_base"] = {
        "tokens_per_s": round(adapters["tokens_per_s"] / base["tokens_per_s"], 3),
        "latency_p50": round(adapters["latency_p50_s"] / base["latency_p50_s"], 3),
        "latency_p99": round(adapters["latency_p99_s"] / base["latency_p99_s"], 3),
        "ttft_p50": round(adapters["ttft_p50_s"] / base["ttft_p50_s"], 3),
    }
    result["title"] = (f"{model_dir.name} NF4 CPU: {args.adapters} mixed adapters, alpha {args.alpha}, "
                       f"{args.rate} req/s, in {args.input[0]}-{args.input[1]}, out {args.output[0]}-{args.output[1]}")
    result["settings"] = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=2))
    plot_workload(result, args.out.with_suffix(".png"))
    summary = {"title": result["title"], **{m: d["summary"] for m, d in result["modes"].items()},
               "ratios_adapters_over_base": result["ratios_adapters_over_base"]}
    sys.stdout.write(json.dumps(summary, indent=2) + f"\nwrote {args.out.with_suffix('.json')} and .png\n")


if __name__ == "__main__":
    main()
