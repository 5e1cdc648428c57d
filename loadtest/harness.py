"""Our gateway in this process, driven through ``GenerationService`` exactly as the HTTP routes
drive it, minus HTTP (so the comparison with PEFT, also in-process, is fair). EOS is ignored:
every request generates exactly its ``max_tokens``, as the S-LoRA workload asks."""

from __future__ import annotations

import asyncio
import logging
import random
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

from gateway.app import build_gateway
from gateway.base_model import LoadedBase
from gateway.protocol import CompletionRequest
from gateway.sampling import SamplingParams
from gateway.settings import Settings


@dataclass(frozen=True)
class Timing:
    ttft_s: float | None  # submission to first generated token
    latency_s: float  # submission to last token
    tokens: int


def quiet_logging() -> None:
    """Benchmark progress at INFO; the gateway's own (adapter loads, evictions) only when it warns."""
    from transformers.utils import logging as hf_logging

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("loadtest").setLevel(logging.INFO)
    hf_logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning)  # deprecations inside transformers/peft


def random_prompt(rng: random.Random, length: int, vocab_size: int) -> list[int]:
    """Token ids clear of the special tokens at the start of the vocabulary."""
    return [rng.randrange(1000, vocab_size) for _ in range(length)]


def bench_settings(data_dir: Path, model: str, *, max_batch_size: int, device_adapters: int,
                   cpu_adapters: int = 64) -> Settings:
    return Settings(model=model, data_dir=data_dir, device="cpu", max_batch_size=max_batch_size,
                    max_device_adapters=device_adapters, max_cpu_adapters=cpu_adapters,
                    max_queued_requests=100_000, max_queued_tokens=10_000_000, max_queue_wait_seconds=3600,
                    max_tokens_limit=4096, max_n=1)


class InProcessGateway:
    def __init__(self, settings: Settings, base: LoadedBase):
        self.gateway = build_gateway(settings, base)
        self.service = self.gateway.service
        self.registry = self.gateway.registry
        self.base_name = self.service.base_name
        self.vocab_size = len(base.tokenizer)

    async def start(self) -> None:
        self.gateway.engine.eos_token_ids = set()  # fixed output lengths
        self.gateway.engine.start()
        await self.registry.start()

    async def close(self) -> None:
        await asyncio.to_thread(self.gateway.engine.stop)
        await self.registry.close()

    async def register(self, name: str, folder: Path) -> None:
        await self.registry.register(name, folder, replace=True)

    async def warm(self, names: list[str]) -> None:
        """Bring adapters onto the device so that a measurement does not include loading them."""
        for name in names:
            await self.registry.load(name)

    def tier(self, name: str) -> str:
        return self.registry.get(name).describe()["tier"]

    async def generate(self, model: str, prompt: list[int], max_tokens: int) -> Timing:
        body = CompletionRequest(model=model, prompt="", max_tokens=max_tokens, temperature=0)
        record = self.service.begin(body, {}, "completions")
        generation = await self.service.start(record, [prompt], SamplingParams(max_tokens=max_tokens,
                                                                               temperature=0.0), 1, "prompt")
        async for event in generation.events():
            if event.error:
                raise RuntimeError(f"request on {model} failed: {event.error}")
        end = time.monotonic()
        ttft = None if record.first_token is None else record.first_token - record.start
        return Timing(ttft_s=ttft, latency_s=end - record.start, tokens=generation.total_completion_tokens)

    async def complete(self, model: str, prompt: list[int], max_tokens: int) -> str:
        """The greedy text of one request (for equivalence checks: EOS ignored, as in ``generate``)."""
        body = CompletionRequest(model=model, prompt="", max_tokens=max_tokens, temperature=0)
        record = self.service.begin(body, {}, "completions")
        generation = await self.service.start(record, [prompt], SamplingParams(max_tokens=max_tokens,
                                                                               temperature=0.0), 1, "prompt")
        parts = []
        async for event in generation.events():
            if event.error:
                raise RuntimeError(f"request on {model} failed: {event.error}")
            parts.append(event.text)
        return "".join(parts)

    async def closed_batch(self, models: list[str], prompts: list[list[int]], max_tokens: int) -> dict:
        """Submit every request at once; tokens/s over the wall time until the last one ends."""
        started = time.monotonic()
        timings = await asyncio.gather(*(self.generate(m, p, max_tokens) for m, p in zip(models, prompts,
                                                                                      strict=True)))
        wall = time.monotonic() - started
        tokens = sum(t.tokens for t in timings)
        if tokens != max_tokens * len(models):
            raise RuntimeError(f"expected {max_tokens * len(models)} tokens, got {tokens}")
        return {"requests": len(models), "tokens": tokens, "wall_s": round(wall, 3),
                "tokens_per_s": round(tokens / wall, 2)}
