"""HTTP helpers of the engine benchmarks: streamed requests that record when each chunk of text
arrived, admin calls, ``/metrics`` scrapes, and prompts of an exact token length.

Times are ``time.perf_counter()`` seconds of this process, so the arrivals of concurrent streams
share one clock."""

from __future__ import annotations

import asyncio
import json
import random
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from loadtest.engine_figures import parse_metrics


@dataclass
class StreamResult:
    submitted: float
    arrivals: list[float] = field(default_factory=list)  # one per chunk that carried text
    end: float | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    cancelled: bool = False  # the client closed the stream (``stop`` was set)

    @property
    def ttft_s(self) -> float | None:
        return self.arrivals[0] - self.submitted if self.arrivals else None

    @property
    def latency_s(self) -> float | None:
        return None if self.end is None else self.end - self.submitted

    @property
    def tokens(self) -> int:  # for loadtest.trace.summarize
        return self.completion_tokens or 0


class RequestFailed(RuntimeError):
    pass


async def stream(client: httpx.AsyncClient, model: str, max_tokens: int, *, prompt: str | None = None,
                 messages: list[dict] | None = None, stop: asyncio.Event | None = None,
                 on_chunk=None, extra_body: dict | None = None) -> StreamResult:
    """One streamed greedy request (text completion with ``prompt``, chat with ``messages``).
    Closing early when ``stop`` is set ends it on the server too (a disconnect cancels it).
    ``on_chunk(result)`` runs after each chunk of text; ``extra_body`` adds request fields."""
    body: dict = {"model": model, "max_tokens": max_tokens, "temperature": 0, "stream": True,
                  "stream_options": {"include_usage": True}, **(extra_body or {})}
    if messages is not None:
        path, body["messages"] = "/v1/chat/completions", messages
    else:
        path, body["prompt"] = "/v1/completions", prompt
    result = StreamResult(submitted=time.perf_counter())
    async with client.stream("POST", path, json=body) as response:
        if response.status_code != 200:
            detail = (await response.aread()).decode(errors="replace")[:500]
            raise RequestFailed(f"{path} on {model}: HTTP {response.status_code}: {detail}")
        async for line in response.aiter_lines():
            if stop is not None and stop.is_set():
                result.cancelled = True
                break
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise RequestFailed(f"{path} on {model}: {chunk['error']}")
            choices = chunk.get("choices") or []
            text = (choices[0].get("text") or (choices[0].get("delta") or {}).get("content")) if choices else None
            if text:
                result.arrivals.append(time.perf_counter())
                if on_chunk is not None:
                    on_chunk(result)
            if chunk.get("usage"):
                result.prompt_tokens = chunk["usage"]["prompt_tokens"]
                result.completion_tokens = chunk["usage"]["completion_tokens"]
    result.end = time.perf_counter()
    if not result.cancelled and result.completion_tokens != max_tokens:
        raise RequestFailed(f"expected {max_tokens} tokens on {model}, got {result.completion_tokens} "
                            "(is EOS ignored? start the server with loadtest.bench_server)")
    return result


async def closed_batch(client: httpx.AsyncClient, models: list[str], prompts: list[str], max_tokens: int) -> dict:
    """Every request at once; generated tokens / wall time until the last one ends."""
    started = time.perf_counter()
    results = await asyncio.gather(*(stream(client, m, max_tokens, prompt=p)
                                     for m, p in zip(models, prompts, strict=True)))
    wall = time.perf_counter() - started
    tokens = sum(r.tokens for r in results)
    return {"requests": len(models), "tokens": tokens, "wall_s": round(wall, 3), "tokens_per_s": tokens / wall}


async def admin(client: httpx.AsyncClient, key: str, method: str, path: str) -> dict:
    response = await client.request(method, path, headers={"Authorization": f"Bearer {key}"})
    if response.status_code >= 400:
        raise RequestFailed(f"{method} {path}: HTTP {response.status_code}: {response.text[:300]}")
    return response.json() if response.content else {}


async def register_folder(client: httpx.AsyncClient, key: str, adapter_id: str, folder: Path) -> dict:
    """Register the adapter files in ``folder`` under ``adapter_id`` (an upload, as a client sends them)."""
    files = [("files", (f.name, f.read_bytes())) for f in sorted(folder.iterdir()) if f.is_file()]
    response = await client.post("/admin/adapters", headers={"Authorization": f"Bearer {key}"},
                                 data={"id": adapter_id}, files=files)
    if response.status_code >= 400:
        raise RequestFailed(f"registering {adapter_id}: HTTP {response.status_code}: {response.text[:300]}")
    return response.json()


async def scrape(client: httpx.AsyncClient) -> dict[str, float]:
    response = await client.get("/metrics")
    response.raise_for_status()
    return parse_metrics(response.text)


class WordPrompts:
    """Prompts of exactly N tokens: N words, each one token of the vocabulary (``" word"``) that
    encodes back to itself alone, so the server's tokenizer sees N tokens (plus any it adds)."""

    def __init__(self, tokenizer, seed: int = 0, pool: int = 4000, min_words: int = 100):
        word = re.compile(r" [a-z]{2,12}")
        words = []
        for token_id in range(len(tokenizer)):
            text = tokenizer.decode([token_id])
            if word.fullmatch(text) and tokenizer.encode(text, add_special_tokens=False) == [token_id]:
                words.append(text)
                if len(words) >= pool:
                    break
        if len(words) < min_words:
            raise ValueError("the tokenizer has too few single-token words for prompts of exact length")
        self.words = words
        self.rng = random.Random(seed)

    @classmethod
    def from_model_dir(cls, model_dir: Path, seed: int = 0) -> WordPrompts:
        from transformers import AutoTokenizer

        return cls(AutoTokenizer.from_pretrained(model_dir), seed)

    def make(self, tokens: int) -> str:
        return "".join(self.rng.choice(self.words) for _ in range(tokens))
