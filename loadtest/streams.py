"""Tokens per second for 1 stream and for N concurrent streams against a running gateway.

Usage: python -m loadtest.streams [--url http://127.0.0.1:8000] [--concurrency 1 8] [--max-tokens 64]
Without --url it starts a gateway on the embedded default model. Prints JSON; the ratio of
aggregate throughput at each concurrency to the single stream is measured in the same run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

from loadtest.server import running_gateway

PROMPTS = ["Write a short story about a lighthouse keeper.", "Explain how rain forms, step by step.",
           "List ten uses for a paper clip.", "Describe a walk through a busy market.",
           "Give advice to someone learning to cook.", "Explain what a database index is.",
           "Describe the life cycle of a butterfly.", "Write a letter to a future self."]


async def one_stream(client: httpx.AsyncClient, model: str, prompt: str, max_tokens: int) -> dict:
    started = time.perf_counter()
    first = None
    usage = None
    body = {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
            "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
    async with client.stream("POST", "/v1/chat/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if first is None and chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                first = time.perf_counter() - started
            if chunk.get("usage"):
                usage = chunk["usage"]
    return {"ttft_s": first, "seconds": time.perf_counter() - started, "tokens": usage["completion_tokens"]}


async def run_level(url: str, model: str, concurrency: int, max_tokens: int) -> dict:
    async with httpx.AsyncClient(base_url=url, timeout=600) as client:
        started = time.perf_counter()
        results = await asyncio.gather(*(one_stream(client, model, PROMPTS[i % len(PROMPTS)], max_tokens)
                                         for i in range(concurrency)))
        wall = time.perf_counter() - started
    tokens = sum(r["tokens"] for r in results)
    return {"concurrency": concurrency, "tokens": tokens, "wall_s": round(wall, 3),
            "tokens_per_s": round(tokens / wall, 2),
            "per_stream_tokens_per_s": round(statistics.mean(r["tokens"] / r["seconds"] for r in results), 2),
            "ttft_p50_s": round(statistics.median(r["ttft_s"] for r in results if r["ttft_s"]), 3)}


async def measure(url: str, levels: list[int], max_tokens: int) -> dict:
    async with httpx.AsyncClient(base_url=url, timeout=60) as client:
        model = (await client.get("/v1/models")).json()["data"][0]["id"]
    await run_level(url, model, 1, 8)  # warm-up
    rows = [await run_level(url, model, c, max_tokens) for c in levels]
    single = next((r["tokens_per_s"] for r in rows if r["concurrency"] == 1), None)
    for row in rows:
        row["ratio_vs_single_stream"] = round(row["tokens_per_s"] / single, 2) if single else None
    return {"model": model, "max_tokens": max_tokens, "levels": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--data-dir", default="./data")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO)
    if args.url:
        result = asyncio.run(measure(args.url, args.concurrency, args.max_tokens))
    else:
        log_path = Path(tempfile.gettempdir()) / "loadtest-gateway.log"
        with running_gateway({"GATEWAY_DATA_DIR": args.data_dir}, log_path) as url:
            result = asyncio.run(measure(url, args.concurrency, args.max_tokens))
    json.dump(result, sys.stdout, indent=2)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
