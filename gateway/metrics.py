"""Every Prometheus collector of the serving path and the registry, on one per-app registry.

Label cardinality is bounded: the ``adapter`` label is only ever a registered adapter id or the
base model's name (a request for an unknown model is refused before it is counted), and a deleted
adapter's series are removed with it. The ``key`` label is an inference key's configured *name*
(from settings, so bounded), never the key itself.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from adapters.tiers import TierEvents

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
LOAD_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)


class GatewayMetrics(TierEvents):
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("gateway_requests", "Inference requests finished, by adapter.", ["adapter"],
                                registry=r)
        self.errors = Counter("gateway_request_errors", "Inference requests that failed, by adapter and error type.",
                              ["adapter", "type"], registry=r)
        self.ttft = Histogram("gateway_time_to_first_token_seconds", "Time from request to first token.",
                              ["adapter"], buckets=LATENCY_BUCKETS, registry=r)
        self.latency = Histogram("gateway_request_duration_seconds", "Time from request to last token.",
                                 ["adapter"], buckets=LATENCY_BUCKETS, registry=r)
        self.prompt_tokens = Counter("gateway_prompt_tokens", "Prompt tokens processed, by adapter.", ["adapter"],
                                     registry=r)
        self.generated_tokens = Counter("gateway_generated_tokens", "Tokens generated, by adapter.", ["adapter"],
                                        registry=r)
        self.adapter_loads = Counter("gateway_adapter_loads", "Adapter loads, by the tier loaded from "
                                     "(disk: into CPU memory; cpu: into a device slot).", ["source"], registry=r)
        self.adapter_load_seconds = Histogram("gateway_adapter_load_seconds", "Time of one adapter load step.",
                                              ["source"], buckets=LOAD_BUCKETS, registry=r)
        self.evictions = Counter("gateway_adapter_evictions", "Adapters evicted, by tier.", ["tier"], registry=r)
        self.tier_lookups = Counter("gateway_adapter_tier_lookups", "Adapter lookups per tier, hit or miss.",
                                    ["tier", "result"], registry=r)
        self.resident_adapters = Gauge("gateway_adapters_resident", "Adapters held per tier.", ["tier"], registry=r)
        self.queue_depth = Gauge("gateway_queue_depth", "Sequences waiting for the engine.", registry=r)
        self.lora_kernel = Gauge("gateway_lora_kernel", "1 for the path that applies LoRA deltas (torch or triton).",
                                 ["kernel"], registry=r)
        self.running_sequences = Gauge("gateway_running_sequences", "Sequences in the running batch.", registry=r)
        self.quarantined_blobs = Gauge("gateway_adapter_blobs_quarantined", "Adapter file folders no database row "
                                       "refers to, moved to adapter-store/quarantine/ at start (never deleted).",
                                       registry=r)
        self.key_requests = Counter("gateway_key_requests", "Requests admitted, by inference key name.", ["key"],
                                    registry=r)
        self.key_rate_limited = Counter("gateway_key_rate_limited", "Requests refused with 429 by a per-key limit, "
                                        "by key name and limit (concurrency, requests, tokens).", ["key", "limit"],
                                        registry=r)
        self.key_tokens = Counter("gateway_key_tokens", "Tokens used, by key name and kind (prompt, completion).",
                                  ["key", "kind"], registry=r)

    # ---- TierEvents ---------------------------------------------------------------------------------
    def lookup(self, tier: str, hit: bool) -> None:
        self.tier_lookups.labels(tier, "hit" if hit else "miss").inc()

    def loaded(self, source: str, seconds: float) -> None:
        self.adapter_loads.labels(source).inc()
        self.adapter_load_seconds.labels(source).observe(seconds)

    def evicted(self, tier: str) -> None:
        self.evictions.labels(tier).inc()

    def resident(self, counts: dict[str, int]) -> None:
        for tier, count in counts.items():
            self.resident_adapters.labels(tier).set(count)

    # ---- requests -----------------------------------------------------------------------------------
    def request_finished(self, adapter: str, *, ttft: float | None, latency: float, prompt_tokens: int,
                         completion_tokens: int, error_type: str | None) -> None:
        self.requests.labels(adapter).inc()
        if error_type is not None:
            self.errors.labels(adapter, error_type).inc()
        if ttft is not None:
            self.ttft.labels(adapter).observe(ttft)
        self.latency.labels(adapter).observe(latency)
        self.prompt_tokens.labels(adapter).inc(prompt_tokens)
        self.generated_tokens.labels(adapter).inc(completion_tokens)

    # ---- per-key ------------------------------------------------------------------------------------
    def key_admitted(self, key: str) -> None:
        self.key_requests.labels(key).inc()

    def key_refused(self, key: str, limit: str) -> None:
        self.key_rate_limited.labels(key, limit).inc()

    def key_used(self, key: str, prompt_tokens: int, completion_tokens: int) -> None:
        self.key_tokens.labels(key, "prompt").inc(prompt_tokens)
        self.key_tokens.labels(key, "completion").inc(completion_tokens)

    def forget_adapter(self, adapter: str) -> None:
        """Drop a deleted adapter's series, so label values stay the registered ids."""
        for family in (self.requests, self.ttft, self.latency, self.prompt_tokens, self.generated_tokens):
            try:
                family.remove(adapter)
            except KeyError:
                pass
        for labels in [k for k in self.errors._metrics if k[0] == adapter]:  # noqa: SLF001 - no public lister
            self.errors.remove(*labels)
