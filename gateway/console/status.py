"""The live figures of the console's Overview page, from what the gateway already tracks: the
base model, memory, the engine's queue, generated tokens per second, and how many adapters each
tier holds against its capacity."""

from __future__ import annotations

import os
import time
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from gateway.app import Gateway

RATE_WINDOW_SECONDS = 10.0
MAX_RATE_SAMPLES = 256


class TokenRate:
    """Tokens per second over the last ``window`` seconds, from samples of a monotonic total taken
    whenever someone asks (no background task; several open consoles share the samples)."""

    def __init__(self, window: float = RATE_WINDOW_SECONDS, clock: Callable[[], float] = time.monotonic):
        self.window = window
        self.clock = clock
        self._samples: deque[tuple[float, float]] = deque(maxlen=MAX_RATE_SAMPLES)

    def observe(self, total: float) -> float:
        now = self.clock()
        self._samples.append((now, total))
        while len(self._samples) > 2 and self._samples[1][0] <= now - self.window:
            self._samples.popleft()  # keep one sample at or before the window's start
        first_time, first_total = self._samples[0]
        elapsed = now - first_time
        return max(0.0, (total - first_total) / elapsed) if elapsed > 0 else 0.0


def counter_total(counter: Any) -> float:
    """Sum of every labelled series of a prometheus Counter (its ``_total`` samples)."""
    return sum(s.value for metric in counter.collect() for s in metric.samples if s.name.endswith("_total"))


def per_adapter_latency(histogram: Any) -> dict[str, dict[str, float]]:
    """Request count and summed duration by adapter label, from a labelled prometheus Histogram;
    the page turns two readings into the mean latency of the requests between them."""
    out: dict[str, dict[str, float]] = {}
    for metric in histogram.collect():
        for sample in metric.samples:
            adapter = sample.labels.get("adapter")
            if adapter is None:
                continue
            if sample.name.endswith("_count"):
                out.setdefault(adapter, {"count": 0.0, "sum": 0.0})["count"] = sample.value
            elif sample.name.endswith("_sum"):
                out.setdefault(adapter, {"count": 0.0, "sum": 0.0})["sum"] = sample.value
    return out


def memory(device: torch.device, model: torch.nn.Module) -> dict[str, Any]:
    info: dict[str, Any] = {"model_bytes": sum(p.numel() * p.element_size() for p in model.parameters())}
    if device.type == "cuda" and torch.cuda.is_available():
        index = device.index if device.index is not None else torch.cuda.current_device()
        info.update(device_allocated_bytes=torch.cuda.memory_allocated(index),
                    device_reserved_bytes=torch.cuda.memory_reserved(index),
                    device_total_bytes=torch.cuda.get_device_properties(index).total_memory)
    try:
        with open("/proc/self/statm") as f:
            info["process_rss_bytes"] = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        info["process_rss_bytes"] = None  # not Linux
    return info


def gateway_status(gateway: Gateway, rate: TokenRate) -> dict[str, Any]:
    settings = gateway.settings
    adapters = [entry.describe() for entry in gateway.registry.entries()]
    tiers = {"device": 0, "cpu": 0, "disk": 0, "missing": 0}
    for adapter in adapters:
        tiers[adapter["tier"]] = tiers.get(adapter["tier"], 0) + 1
    jobs = gateway.training.list() if gateway.training is not None else []
    running_jobs = [j for j in jobs if j.state == "running"]
    return {
        "object": "console.status",
        "base_model": {"name": gateway.service.base_name, "device": str(gateway.base.device),
                       "dtype": str(gateway.base.dtype).removeprefix("torch."),
                       "quantization": settings.quantization, "context_window": gateway.base.context_window},
        "memory": memory(gateway.base.device, gateway.base.model),
        "engine": {"queue_depth": gateway.engine.queue_depth, "running_sequences": gateway.engine.running,
                   "tokens_per_second": round(rate.observe(counter_total(gateway.metrics.generated_tokens)), 2),
                   "ready": gateway.ready, "draining": gateway.draining},
        "tiers": {"device": {"used": tiers["device"], "capacity": settings.max_device_adapters},
                  "cpu": {"used": tiers["cpu"], "capacity": settings.max_cpu_adapters},
                  "disk": {"used": tiers["disk"] + tiers["device"] + tiers["cpu"], "capacity": None,
                           "bytes": sum(a["size_bytes"] for a in adapters)},
                  "missing": tiers["missing"]},
        "adapters": len(adapters),
        "experiments": len(gateway.experiments.list()) if gateway.experiments is not None else 0,
        "training": {"jobs": len(jobs), "running": len(running_jobs),
                     "tokens_per_second": round(sum(j.progress.get("tokens_per_second", 0.0) for j in running_jobs), 2)},
        "started": gateway.started, "uptime_seconds": int(time.time()) - gateway.started,
    }
