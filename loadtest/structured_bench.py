"""Structured outputs under load, through HTTP against a real gateway subprocess.

(a) **Throughput**: N concurrent chat requests, half constrained by a JSON schema and half free,
÷ the same N all free, measured in the same run on the same server. To compare equal work, the
all-free side repeats the same requests with the same prompts and each row's ``max_tokens`` set to
exactly the tokens that row produced in the mixed run; every free row has the end token banned
(``logit_bias`` -100) so it generates exactly its ``max_tokens``. Both sides then run batches of
the same shape for the same number of steps, and the ratio isolates what the grammars cost (the
token masks, the matchers): tokens/s mixed ÷ tokens/s free. Grammars are compiled (and cached) in
a warm-up first; the compile time of each schema on a cold cache is reported separately. With
``--repeats`` R the two sides alternate A B, B A, ... and the ratio is that of the summed times.

(b) **Validity**: every schema of ``loadtest.structured_schemas`` (24) requested on the base model
and on a LoRA adapter (greedy, and in full mode once more sampled at temperature 0.8 with a seed),
several at a time so constrained rows of different schemas share batches; every answer is parsed
and validated with ``jsonschema`` (formats checked by draft 2020-12's ``FORMAT_CHECKER``: date,
date-time, time, email, uuid, ipv4 ...). It reports the valid share and lists each failure.

Usage:
    python -m loadtest.structured_bench --quick     # small sizes, a few minutes on 2 CPU cores
    python -m loadtest.structured_bench             # 16 concurrent, 64 tokens, 2 repeats; sampled too
Results: printed, and written to ``loadtest/results/structured_bench.json`` (``--out``)."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from loadtest.server import running_gateway
from loadtest.structured_schemas import SCHEMAS, BenchSchema

log = logging.getLogger("loadtest.structured_bench")

FREE_PROMPTS = ["Write a short story about a lighthouse keeper.", "Explain how rain forms, step by step.",
                "List ten uses for a paper clip.", "Describe a walk through a busy market.",
                "Give advice to someone learning to cook.", "Explain what a database index is.",
                "Describe the life cycle of a butterfly.", "Write a letter to a future self."]
ADAPTER_KIND = "lora16"  # rank 16 on every linear layer (loadtest.bench_adapters)
SCHEMA_MAX_TOKENS = 256  # every benchmark schema is bounded well below this


@dataclass
class Answer:
    text: str
    completion_tokens: int
    finish_reason: str
    seconds: float


class RequestFailed(RuntimeError):
    pass


def schema_format(bench: BenchSchema) -> dict:
    return {"type": "json_schema", "json_schema": {"name": bench.name, "schema": bench.schema, "strict": True}}


async def chat(client: httpx.AsyncClient, model: str, prompt: str, max_tokens: int, *,
               response_format: dict | None = None, logit_bias: dict | None = None,
               temperature: float = 0.0, seed: int | None = None) -> Answer:
    body: dict[str, Any] = {"model": model, "messages": [{"role": "user", "content": prompt}],
                            "max_tokens": max_tokens, "temperature": temperature}
    if response_format is not None:
        body["response_format"] = response_format
    if logit_bias:
        body["logit_bias"] = logit_bias
    if seed is not None:
        body["seed"] = seed
    started = time.perf_counter()
    response = await client.post("/v1/chat/completions", json=body)
    if response.status_code != 200:
        raise RequestFailed(f"{model}: HTTP {response.status_code}: {response.text[:400]}")
    data = response.json()
    choice = data["choices"][0]
    return Answer(choice["message"]["content"] or "", data["usage"]["completion_tokens"], choice["finish_reason"],
                  time.perf_counter() - started)


# ---- (a) throughput --------------------------------------------------------------------------------

async def _timed(coros) -> tuple[list[Answer], float]:
    started = time.perf_counter()
    answers = await asyncio.gather(*coros)
    return list(answers), time.perf_counter() - started


async def throughput(client: httpx.AsyncClient, model: str, end_ids: list[int], concurrency: int, max_tokens: int,
                     repeats: int) -> dict:
    half = concurrency // 2
    ban_eos = {str(t): -100 for t in end_ids}
    constrained = [SCHEMAS[i % len(SCHEMAS)] for i in range(half)]
    free_prompts = [FREE_PROMPTS[i % len(FREE_PROMPTS)] for i in range(concurrency - half)]

    def mixed():
        return ([chat(client, model, b.prompt, SCHEMA_MAX_TOKENS, response_format=schema_format(b))
                 for b in constrained]
                + [chat(client, model, p, max_tokens, logit_bias=ban_eos) for p in free_prompts])

    # warm-up: compiles and caches the grammars, and gives the token count of each constrained row
    # (greedy, so later runs repeat it unless batch numerics flip a near tie: then the work differs
    # a little, the ratio stays one of tokens/s, and ``equal_work`` says so)
    warm, _ = await _timed(mixed())
    lengths = [a.completion_tokens for a in warm[:half]]

    def all_free():
        return ([chat(client, model, b.prompt, n, logit_bias=ban_eos) for b, n in zip(constrained, lengths, strict=True)]
                + [chat(client, model, p, max_tokens, logit_bias=ban_eos) for p in free_prompts])

    runs: dict[str, list[dict]] = {"mixed": [], "free": []}
    for r in range(repeats):
        for side in (("mixed", "free") if r % 2 == 0 else ("free", "mixed")):
            answers, wall = await _timed(mixed() if side == "mixed" else all_free())
            tokens = sum(a.completion_tokens for a in answers)
            runs[side].append({"wall_s": round(wall, 3), "tokens": tokens, "tokens_per_s": round(tokens / wall, 2)})
    wall = {side: sum(r["wall_s"] for r in rs) for side, rs in runs.items()}
    tokens = {side: sum(r["tokens"] for r in rs) for side, rs in runs.items()}
    ratio = (tokens["mixed"] / wall["mixed"]) / (tokens["free"] / wall["free"])
    return {"concurrency": concurrency, "constrained": half, "free_max_tokens": max_tokens,
            "equal_work": tokens["mixed"] == tokens["free"],
            "constrained_tokens": lengths, "schemas": [b.name for b in constrained], "repeats": repeats,
            "runs": runs, "tokens_per_s": {s: round(tokens[s] / wall[s], 2) for s in wall},
            "ratio": round(ratio, 3), "target": 0.85}


async def compile_times(client: httpx.AsyncClient, model: str, schemas: list[BenchSchema]) -> dict:
    """Time of a 1-token constrained request with a schema never seen (cold grammar cache)
    minus the same request again (warm): the compile cost one new schema adds, off the engine
    thread. A ``description`` unique to this run keeps the cache cold."""
    out = {}
    nonce = f"bench-{time.time_ns()}"
    for bench in schemas:
        fmt = schema_format(bench)
        fmt["json_schema"]["schema"] = {**bench.schema, "description": nonce}
        cold = await chat(client, model, bench.prompt, 1, response_format=fmt)
        warm = await chat(client, model, bench.prompt, 1, response_format=fmt)
        out[bench.name] = round(max(0.0, cold.seconds - warm.seconds), 4)
    return out


# ---- (b) validity ----------------------------------------------------------------------------------

def validate(bench: BenchSchema, text: str) -> list[str]:
    """Why ``text`` is not a valid answer for ``bench`` (empty: valid)."""
    import jsonschema

    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        return [f"not JSON: {exc}"]
    # the draft's own checker: a bare FormatChecker() holds draft 3's "time" (no offset allowed)
    validator = jsonschema.Draft202012Validator(bench.schema,
                                                format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER)
    return [f"{'/'.join(map(str, e.absolute_path)) or '/'}: {e.message}" for e in validator.iter_errors(value)]


async def validity(client: httpx.AsyncClient, models: list[str], sampled: bool, parallel: int) -> dict:
    limiter = asyncio.Semaphore(parallel)
    modes = [("greedy", 0.0, None)] + ([("sampled", 0.8, 1234)] if sampled else [])

    async def one(model: str, bench: BenchSchema, mode: str, temperature: float, seed: int | None) -> dict:
        async with limiter:
            answer = await chat(client, model, bench.prompt, SCHEMA_MAX_TOKENS, response_format=schema_format(bench),
                                temperature=temperature, seed=seed)
        errors = validate(bench, answer.text)
        return {"model": model, "schema": bench.name, "mode": mode, "valid": not errors,
                "finish_reason": answer.finish_reason, "tokens": answer.completion_tokens, "text": answer.text,
                "errors": errors}

    results = await asyncio.gather(*(one(m, b, mode, t, s) for m in models for b in SCHEMAS for mode, t, s in modes))
    valid = sum(r["valid"] for r in results)
    return {"schemas": len(SCHEMAS), "models": models, "modes": [m[0] for m in modes], "requests": len(results),
            "valid": valid, "valid_share": round(valid / len(results), 4),
            "tokens_median": statistics.median(r["tokens"] for r in results),
            "failures": [r for r in results if not r["valid"]],
            "samples": {f"{r['model']}/{r['schema']}/{r['mode']}": r["text"] for r in results}}


# ---- driver -----------------------------------------------------------------------------------------

async def measure(url: str, adapter: str | None, args) -> dict:
    async with httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(1800)) as client:
        models = [m["id"] for m in (await client.get("/v1/models")).json()["data"]]
        base = next(m for m in models if m != adapter)
        end_ids = []  # the end tokens free rows may not take (they generate exactly max_tokens)
        for text in ("<|im_end|>", "<|endoftext|>", "</s>"):
            ids = (await client.post("/tokenize", json={"model": base, "prompt": text})).json().get("tokens", [])
            if len(ids) == 1:
                end_ids.append(ids[0])
        targets = [base] + ([adapter] if adapter else [])
        log.info("validity: %d schemas on %s", len(SCHEMAS), targets)
        started = time.perf_counter()
        valid = await validity(client, targets, sampled=not args.quick, parallel=args.parallel)
        valid["seconds"] = round(time.perf_counter() - started, 1)
        log.info("throughput: %d concurrent, %d repeats", args.concurrency, args.repeats)
        speed = await throughput(client, base, end_ids, args.concurrency, args.max_tokens, args.repeats)
        compiles = await compile_times(client, base, SCHEMAS[:4] if args.quick else SCHEMAS)
    return {"base": base, "adapter": adapter, "quick": args.quick, "throughput": speed, "validity": valid,
            "compile_s": compiles}


def report(result: dict) -> str:
    t, v = result["throughput"], result["validity"]
    lines = [f"(a) {t['concurrency']} concurrent, {t['constrained']} with a JSON schema ÷ all free, same work: "
             f"{t['ratio']:.3f}× (target ≥ {t['target']}) — {t['tokens_per_s']['mixed']} vs "
             f"{t['tokens_per_s']['free']} tok/s over {t['repeats']} repeat(s)"
             + ("" if t["equal_work"] else " (token counts differed between the sides)"),
             f"(b) schema-valid: {v['valid']}/{v['requests']} ({100 * v['valid_share']:.1f}%) across "
             f"{v['schemas']} schemas on {', '.join(v['models'])} ({'/'.join(v['modes'])})"]
    for f in v["failures"]:
        lines.append(f"    FAIL {f['model']} {f['schema']} {f['mode']} ({f['finish_reason']}): "
                     f"{'; '.join(f['errors'])[:200]} — {f['text'][:120]!r}")
    compile_s = list(result["compile_s"].values())
    lines.append(f"grammar compile on a cold cache: median {statistics.median(compile_s) * 1000:.0f} ms, "
                 f"max {max(compile_s) * 1000:.0f} ms over {len(compile_s)} schemas")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    from gateway.settings import EMBEDDED_MODEL

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="8 concurrent, 24 tokens, greedy only, 1 repeat")
    p.add_argument("--url", help="a running gateway (default: start one on --model)")
    p.add_argument("--adapter", help="with --url: an adapter to check validity on")
    p.add_argument("--model", default=EMBEDDED_MODEL, help="base model folder (default: embedded SmolLM2)")
    p.add_argument("--data-dir", type=Path, default=Path("./data"), help="where the embedded model lives")
    p.add_argument("--adapters-dir", type=Path, help="keep the generated LoRA here (default: a temp dir)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda", "auto"])
    p.add_argument("--concurrency", type=int)
    p.add_argument("--max-tokens", type=int, help="tokens of each free row")
    p.add_argument("--repeats", type=int)
    p.add_argument("--parallel", type=int, default=8, help="validity requests in flight at once")
    p.add_argument("--out", type=Path, default=Path("loadtest/results/structured_bench.json"))
    args = p.parse_args(argv)
    args.concurrency = args.concurrency or (8 if args.quick else 16)
    args.max_tokens = args.max_tokens or (24 if args.quick else 64)
    args.repeats = args.repeats or (1 if args.quick else 2)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request otherwise

    if args.url:
        result = asyncio.run(measure(args.url, args.adapter, args))
    else:
        result = run_with_server(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    log.info("written %s", args.out)
    print(report(result))


def run_with_server(args) -> dict:
    from gateway.base_model import materialize_embedded
    from gateway.settings import EMBEDDED_MODEL
    from loadtest.bench_adapters import make_adapter_set

    model_dir = materialize_embedded(args.data_dir) if args.model == EMBEDDED_MODEL else Path(args.model)
    with tempfile.TemporaryDirectory(prefix="structured-bench-") as tmp:
        adapters_dir = args.adapters_dir or Path(tmp) / "adapters"
        folder, = make_adapter_set(model_dir, adapters_dir, [ADAPTER_KIND], prefix="structured")
        env = {"GATEWAY_MODEL": str(model_dir), "GATEWAY_DATA_DIR": str(Path(tmp) / "data"),
               "GATEWAY_ADAPTERS_DIR": str(adapters_dir), "GATEWAY_DEVICE": args.device,
               "GATEWAY_MAX_BATCH_SIZE": str(max(32, args.concurrency)), "GATEWAY_LOG_LEVEL": "warning"}
        log_path = Path(tmp) / "gateway.log"
        try:
            with running_gateway(env, log_path) as url:
                return asyncio.run(measure(url, folder.name, args))
        except Exception:
            log.error("gateway log:\n%s", log_path.read_text(errors="replace")[-4000:] if log_path.exists() else "")
            raise


if __name__ == "__main__":
    main()
