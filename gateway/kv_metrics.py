"""Prometheus figures of the paged KV cache, read from the engine at scrape time (the engine
keeps the counts; nothing is pushed from the step loop)."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from gateway.paged_engine import PagedEngine


class KVCacheCollector(Collector):
    def __init__(self, engine: PagedEngine):
        self.engine = engine

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        engine, blocks = self.engine, self.engine.blocks
        gauges = (
            ("gateway_kv_blocks_total", "Blocks in the KV pool.", blocks.num_blocks),
            ("gateway_kv_blocks_used", "KV blocks referenced by running sequences.", blocks.used),
            ("gateway_kv_blocks_cached", "Unreferenced KV blocks kept for prefix reuse (evicted first).",
             blocks.cached),
            ("gateway_kv_block_size_tokens", "Positions per KV block.", blocks.block_size),
            ("gateway_kv_live_tokens", "Positions the running sequences hold in the KV cache.", engine.live_tokens),
            ("gateway_kv_bytes_per_token", "Bytes of keys and values one position takes (all layers).",
             engine.runner.pool.bytes_per_token),
            ("gateway_kv_gather_workspace_bytes", "Bytes of the reused buffers KV blocks are gathered into for "
             "attention (grows to the largest gather so far).", engine.runner.pool.workspace_bytes),
            ("gateway_step_prompt_budget_tokens", "Prompt tokens a step may compute beside its decoding rows "
             "(max_step_tokens, or what max_decode_slowdown allows at the costs measured).",
             engine.step_budget.published),
        )
        for name, help_text, value in gauges:
            family = GaugeMetricFamily(name, help_text)
            family.add_metric([], value)
            yield family
        counters = (
            ("gateway_prefix_cache_query_tokens", "Prompt positions looked up in the prefix cache.",
             blocks.query_tokens),
            ("gateway_prefix_cache_hit_tokens", "Prompt positions found in the prefix cache (not recomputed).",
             blocks.hit_tokens),
            ("gateway_engine_preemptions", "Sequences preempted (to be recomputed) because the KV pool ran out.",
             engine.preemptions),
        )
        for name, help_text, value in counters:
            family = CounterMetricFamily(name, help_text)
            family.add_metric([], value)
            yield family
