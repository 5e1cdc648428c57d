"""The five figures of the engine issue, every baseline measured in the same run, in-process on
the same NF4 base (CPU by default) and the same adapter files:

1. mixed ratio: C concurrent requests on C distinct adapters of mixed kinds / the same C requests
   on one adapter (a rank-16 LoRA);
2. adapter cost: the same mixed run / the base model alone at the same batch;
3. against PEFT one request at a time with ``set_adapter``: at C, and how it grows at larger C;
4. against PEFT's own mixed batch (``adapter_names=``, LoRA only) at P distinct LoRA adapters,
   both serving the same P LoRA adapters;
5. cold start: the first request on a rank-16 LoRA that is only on disk (registered, then pushed
   out of the CPU tier) minus the same request warm, on time to first token.

Every request has the same prompt length and generates exactly ``--output-tokens`` (greedy, EOS
ignored). Writes JSON and a PNG; prints the figures.

Full run (the issue's sizes):  python -m loadtest.baselines --adapters-dir .bench-adapters
Smoke run:  python -m loadtest.baselines --concurrency 2 --growth 3 --peft-mixed-adapters 2 \\
    --output-tokens 2 --prompt-tokens 8 --serial-requests 2 --cold-adapters 1
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import logging
import random
import statistics
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from gateway.base_model import load_base, materialize_embedded
from gateway.settings import EMBEDDED_MODEL
from loadtest.bench_adapters import make_adapter_set, mixed_kinds
from loadtest.harness import InProcessGateway, bench_settings, quiet_logging, random_prompt
from loadtest.peft_baseline import PeftLoraServer
from loadtest.plots import plot_baselines

log = logging.getLogger("loadtest.baselines")
TARGETS = {"mixed_ratio": 0.9, "adapter_cost": 0.85, "vs_peft_serial": 5.0, "vs_peft_mixed": 1.4,
           "cold_start_extra_ms": 50.0}


def _median_run(runs: list[dict]) -> dict:
    best = sorted(runs, key=lambda r: r["tokens_per_s"])[len(runs) // 2]
    return {**best, "repeats_tokens_per_s": [r["tokens_per_s"] for r in runs]}


async def measure_ours(args, model_dir: Path, data_dir: Path, sets: dict[str, list[Path]],
                       prompts: list[list[int]]) -> tuple[dict, dict]:
    mixed, lora, cold, filler = sets["mixed"], sets["lora"], sets["cold"], sets["filler"]
    levels = [args.concurrency, *args.growth]
    # one CPU-tier place: registering the filler pushes the cold adapters out to disk
    settings = bench_settings(data_dir, str(model_dir), max_batch_size=max(*levels, args.peft_mixed_adapters),
                              device_adapters=len(mixed) + len(lora) + len(cold) + 1, cpu_adapters=1)
    gw = InProcessGateway(settings, load_base(settings))
    await gw.start()
    try:
        mixed_ids = [f"mixed-{i:03d}" for i in range(len(mixed))]
        lora_ids = [f"lora-{i:03d}" for i in range(len(lora))]
        for name, folder in [*zip(mixed_ids, mixed, strict=True), *zip(lora_ids, lora, strict=True)]:
            await gw.register(name, folder)
        await gw.warm(mixed_ids + lora_ids)
        c, out = args.concurrency, args.output_tokens
        plans = {f"ours_base_{c}": [gw.base_name] * c, f"ours_one_lora_{c}": [mixed_ids[0]] * c}
        plans.update({f"ours_mixed_{n}": mixed_ids[:n] for n in levels})
        plans[f"ours_lora_{args.peft_mixed_adapters}"] = lora_ids[:args.peft_mixed_adapters]
        await gw.closed_batch([gw.base_name, mixed_ids[0]], prompts[:2], 2)  # warm-up
        runs: dict[str, list[dict]] = {name: [] for name in plans}
        for _ in range(args.repeats):  # interleaved, so drift in machine load hits every run alike
            for name, models in plans.items():
                runs[name].append(await gw.closed_batch(models, prompts[:len(models)], out))
                log.info("%s: %.1f tok/s", name, runs[name][-1]["tokens_per_s"])
        cold_result = await measure_cold(gw, cold, filler[0], prompts[0], out)
        return {name: _median_run(r) for name, r in runs.items()}, cold_result
    finally:
        await gw.close()


async def measure_cold(gw: InProcessGateway, cold: list[Path], filler: Path, prompt: list[int], out: int) -> dict:
    cold_ids = [f"cold-{i:03d}" for i in range(len(cold))]
    for name, folder in zip(cold_ids, cold, strict=True):
        await gw.register(name, folder)
    await gw.register("filler", filler)  # the CPU tier holds one adapter: now the cold ones are on disk only
    samples = []
    for name in cold_ids:
        tier = gw.tier(name)
        if tier != "disk":
            raise RuntimeError(f"{name} should be only on disk before its first request, but is in {tier}")
        first = await gw.generate(name, prompt, out)
        warm = [await gw.generate(name, prompt, out) for _ in range(3)]
        warm_ttft = statistics.median(w.ttft_s for w in warm)
        samples.append({"adapter": name, "cold_ttft_s": round(first.ttft_s, 4), "warm_ttft_s": round(warm_ttft, 4),
                        "extra_ms": round((first.ttft_s - warm_ttft) * 1000, 1)})
        log.info("cold start %s: %+.1f ms", name, samples[-1]["extra_ms"])
    return {"samples": samples, "extra_ms": statistics.median(s["extra_ms"] for s in samples)}


def measure_peft(args, model_dir: Path, data_dir: Path, lora: list[Path], prompts: list[list[int]]) -> dict:
    settings = bench_settings(data_dir, str(model_dir), max_batch_size=1, device_adapters=1)
    base = load_base(settings)
    pad = base.tokenizer.pad_token_id if base.tokenizer.pad_token_id is not None else base.tokenizer.eos_token_id
    server = PeftLoraServer(base.model, lora[:args.peft_mixed_adapters], pad)
    out, c, p = args.output_tokens, args.concurrency, args.peft_mixed_adapters
    server.serial(prompts[:1], 2)  # warm-up
    plans = {"peft_serial": lambda: server.serial(prompts[:args.serial_requests], out)}
    for n in sorted({min(c, p), p}):  # the mixed batch at C too, for context
        plans[f"peft_mixed_{n}"] = lambda n=n: server.mixed_batch(prompts[:n], out)
    runs: dict[str, list[dict]] = {name: [] for name in plans}
    for _ in range(args.repeats):
        for name, run in plans.items():
            runs[name].append(run())
            log.info("%s: %.1f tok/s", name, runs[name][-1]["tokens_per_s"])
    return {name: _median_run(r) for name, r in runs.items()}


def figures(args, runs: dict, cold: dict) -> list[dict]:
    c, p = args.concurrency, args.peft_mixed_adapters
    tps = {name: run["tokens_per_s"] for name, run in runs.items()}
    serial = tps["peft_serial"]
    out = [
        {"name": f"1. mixed ratio ({c} mixed-kind / {c} on one LoRA)", "key": "mixed_ratio",
         "value": tps[f"ours_mixed_{c}"] / tps[f"ours_one_lora_{c}"]},
        {"name": f"2. adapter cost ({c} mixed / base, batch {c})", "key": "adapter_cost",
         "value": tps[f"ours_mixed_{c}"] / tps[f"ours_base_{c}"]},
    ]
    for n in [c, *args.growth]:
        out.append({"name": f"3. vs PEFT serial set_adapter ({n} mixed concurrent)", "key": "vs_peft_serial",
                    "value": tps[f"ours_mixed_{n}"] / serial, "headline": n == c})
    out.append({"name": f"4. vs PEFT mixed batch ({p} LoRA, adapter_names=)", "key": "vs_peft_mixed",
                "value": tps[f"ours_lora_{p}"] / tps[f"peft_mixed_{p}"]})
    out.append({"name": "5. cold start extra (rank-16 LoRA from disk, TTFT)", "key": "cold_start_extra_ms",
                "value": cold["extra_ms"], "unit": "ms"})
    for figure in out:
        figure.setdefault("unit", "x")
        figure["target"] = TARGETS[figure["key"]]
        figure["value"] = round(figure["value"], 3)
        value, target = figure["value"], figure["target"]
        figure["met"] = value <= target if figure["unit"] == "ms" else value >= target
    out.append({"name": "(context) base batch / PEFT serial: the ceiling of figure 3", "key": "ceiling",
                "value": round(tps[f"ours_base_{c}"] / serial, 3), "unit": "x (no target)"})
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=EMBEDDED_MODEL, help="base model folder (default: embedded SmolLM2)")
    parser.add_argument("--data-dir", type=Path, default=Path("./data"), help="where the embedded model lives")
    parser.add_argument("--adapters-dir", type=Path, help="keep the generated adapters here (default: a temp dir)")
    parser.add_argument("--out", type=Path, default=Path("loadtest/results/baselines"), help="JSON/PNG path stem")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--growth", type=int, nargs="*", default=[32, 64])
    parser.add_argument("--peft-mixed-adapters", type=int, default=32)
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--output-tokens", type=int, default=24)
    parser.add_argument("--serial-requests", type=int, default=16)
    parser.add_argument("--cold-adapters", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    quiet_logging()
    model_dir = materialize_embedded(args.data_dir) if args.model == EMBEDDED_MODEL else Path(args.model)
    with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
        adapters_dir = args.adapters_dir or Path(tmp) / "adapters"
        levels = [args.concurrency, *args.growth]
        sets = {
            "mixed": make_adapter_set(model_dir, adapters_dir, mixed_kinds(max(levels)), "mixed", seed=args.seed),
            "lora": make_adapter_set(model_dir, adapters_dir, ["lora16"] * args.peft_mixed_adapters, "lora",
                                     seed=args.seed + 1),
            "cold": make_adapter_set(model_dir, adapters_dir, ["lora16"] * args.cold_adapters, "cold",
                                     seed=args.seed + 2),
            "filler": make_adapter_set(model_dir, adapters_dir, ["ia3"], "filler", seed=args.seed + 3),
        }
        rng = random.Random(args.seed)
        vocab = json.loads((model_dir / "config.json").read_text())["vocab_size"]
        count = max(*levels, args.peft_mixed_adapters, args.serial_requests)
        prompts = [random_prompt(rng, args.prompt_tokens, vocab) for _ in range(count)]
        ours, cold = asyncio.run(measure_ours(args, model_dir, Path(tmp) / "gateway-data", sets, prompts))
        gc.collect()
        # on a thread of its own, as our engine's step loop runs: the main thread's OpenMP team
        # behaves differently (several times slower on a loaded 2-core machine), which would
        # skew the comparison
        with ThreadPoolExecutor(1, thread_name_prefix="peft") as pool:
            peft = pool.submit(measure_peft, args, model_dir, Path(tmp) / "gateway-data", sets["lora"],
                               prompts).result()
    runs = {**ours, **peft}
    result = {
        "title": f"{model_dir.name} NF4 on CPU: {args.prompt_tokens}-token prompts, {args.output_tokens} new tokens",
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "runs": runs, "cold_start": cold, "figures": figures(args, runs, cold),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=2))
    plot_baselines(result, args.out.with_suffix(".png"))
    lines = [f"{f['name']}: {f['value']} {f['unit']}"
             + (f"  (target {f['target']}: {'met' if f['met'] else 'MISSED'})" if "target" in f else "")
             for f in result["figures"]]
    sys.stdout.write("\n".join(lines) + f"\nwrote {args.out.with_suffix('.json')} and .png\n")


if __name__ == "__main__":
    main()
