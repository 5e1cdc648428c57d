"""The pure arithmetic of the engine-v2 figures (``loadtest.engine_bench``, ``loadtest.gpu_check``):
ratios against their targets, inter-token intervals inside a time window, Prometheus text parsing,
KV-pool overhead, and the analytical cost model of one decode step (attention's share, bytes read).
No torch, no HTTP: table-tested in ``tests/unit/test_engine_figures.py``."""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

# key -> (target, "max" when the value must stay at or below it, "min" when at or above)
TARGETS: dict[str, tuple[float, str]] = {
    "long_neighbour": (1.10, "max"),
    "shared_prefix": (0.25, "max"),
    "context_growth": (1.40, "max"),
    "mixed_ranks": (0.90, "min"),
    "idle_rank256": (0.97, "min"),
    "kv_memory": (1.15, "max"),
}


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    """``numerator / denominator``; None when either is missing or the denominator is not positive."""
    if numerator is None or denominator is None or not denominator > 0 or math.isnan(numerator):
        return None
    return numerator / denominator


def median(values: Iterable[float | None]) -> float | None:
    present = [v for v in values if v is not None and not math.isnan(v)]
    return statistics.median(present) if present else None


def bracketed_ratios(modes: Sequence[str], values: Sequence[float | None], treated: str) -> list[float | None]:
    """Each ``treated`` value / the mean of the values beside it (the one before, at the end): in an
    alternating A B A B ... A run, drift that moves both neighbours cancels out of the ratio."""
    values = list(values)
    return [ratio(values[i], median(values[max(0, i - 1):i] + values[i + 1:i + 2]))
            for i, mode in enumerate(modes) if mode == treated]


def figure(key: str, name: str, value: float | None, *, engine: str, unit: str = "x", **extra) -> dict:
    """One printed and stored figure: its value (rounded), target, and whether the target is met
    (None when there is no value or no target)."""
    target, direction = TARGETS.get(key, (None, None))
    met = None
    if value is not None and target is not None:
        met = value <= target if direction == "max" else value >= target
    return {"key": key, "name": name, "engine": engine, "unit": unit,
            "value": None if value is None else round(value, 4), "target": target,
            "direction": direction, "met": met, **extra}


def format_figure(fig: dict) -> str:
    value = "n/a" if fig["value"] is None else f"{fig['value']:.3f}"
    line = f"[{fig['engine']}] {fig['name']}: {value} {fig['unit']}"
    if fig.get("target") is not None and fig["value"] is not None:
        sign = "<=" if fig["direction"] == "max" else ">="
        line += f"  (target {sign} {fig['target']}: {'met' if fig['met'] else 'MISSED'})"
    if fig.get("note"):
        line += f"  [{fig['note']}]"
    if fig.get("error"):
        line += f"  ERROR: {fig['error']}"
    return line


# ---- inter-token intervals --------------------------------------------------------------------------

def window_intervals(arrivals: Sequence[Sequence[float]], start: float, end: float) -> list[float]:
    """Gaps between consecutive arrivals of each stream, both ends inside ``[start, end]``.

    ``arrivals[i]`` are the (sorted) times stream ``i`` received text. A gap is one decode step of
    that stream as the client saw it; gaps across the window's edges are left out, so a stall that
    straddles ``start`` counts only once it is inside."""
    gaps: list[float] = []
    for times in arrivals:
        inside = [t for t in times if start <= t <= end]
        gaps.extend(b - a for a, b in zip(inside, inside[1:], strict=False))
    return gaps


def time_per_token(arrivals: Sequence[Sequence[float]], start: float, end: float) -> float | None:
    """Mean decode time per token of the streams inside the window (total gap time / gaps), or None
    when the window holds no gap."""
    gaps = window_intervals(arrivals, start, end)
    return sum(gaps) / len(gaps) if gaps else None


def decoding_window(arrivals: Sequence[Sequence[float]], skip: int = 1) -> tuple[float, float] | None:
    """The span in which every stream is decoding: from the latest ``skip``-th arrival (every stream
    has had its first ``skip`` chunks, so prefills are behind) to the earliest last arrival."""
    if not arrivals or any(len(t) <= skip for t in arrivals):
        return None
    start = max(t[skip - 1] for t in arrivals)
    end = min(t[-1] for t in arrivals)
    return (start, end) if end > start else None


# ---- Prometheus text --------------------------------------------------------------------------------

def parse_metrics(text: str) -> dict[str, float]:
    """Sample name -> value summed over label sets (``gateway_kv_blocks_used``,
    ``gateway_prefix_cache_hit_tokens_total`` …), from a ``/metrics`` body."""
    from prometheus_client.parser import text_string_to_metric_families

    values: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            values[sample.name] = values.get(sample.name, 0.0) + float(sample.value)
    return values


KV_GAUGES = ("gateway_kv_blocks_total", "gateway_kv_blocks_used", "gateway_kv_block_size_tokens",
             "gateway_kv_live_tokens")


def has_paged_kv(metrics: dict[str, float]) -> bool:
    """The paged engine reports its pool; the padded one has none of these gauges."""
    return all(name in metrics for name in KV_GAUGES)


def kv_pool_overhead(metrics: dict[str, float]) -> float | None:
    """Bytes of pool blocks held by running sequences / bytes their live tokens need (the bytes per
    token cancel out): ``blocks_used * block_size / live_tokens``."""
    if not has_paged_kv(metrics):
        return None
    return ratio(metrics["gateway_kv_blocks_used"] * metrics["gateway_kv_block_size_tokens"],
                 metrics["gateway_kv_live_tokens"])


def padded_overhead(lengths: Sequence[int]) -> float | None:
    """What one left-padded cache holds for these rows / what they need: ``rows * longest / sum``.
    A lower bound for the padded engine (a row that joined late pads the others further)."""
    if not lengths:
        return None
    return ratio(len(lengths) * max(lengths), sum(lengths))


# ---- the cost of one decode step, from a model config -----------------------------------------------

NF4_WEIGHT_BYTES = 0.5 + 1 / 64 + 4 / (64 * 256)  # 4 bits; 8-bit absmax per 64; fp32 per 256 absmax (double quant)

@dataclass(frozen=True)
class ModelShape:
    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied_embeddings: bool

    @classmethod
    def from_config(cls, config: dict) -> ModelShape:
        heads = int(config["num_attention_heads"])
        hidden = int(config["hidden_size"])
        return cls(layers=int(config["num_hidden_layers"]), hidden=hidden,
                   intermediate=int(config["intermediate_size"]), heads=heads,
                   kv_heads=int(config.get("num_key_value_heads") or heads),
                   head_dim=int(config.get("head_dim") or hidden // heads), vocab=int(config["vocab_size"]),
                   tied_embeddings=bool(config.get("tie_word_embeddings", False)))

    @property
    def layer_linear_params(self) -> int:
        """q, k, v, o and the gated MLP of one decoder layer (Llama layout)."""
        q_out, kv_out = self.heads * self.head_dim, self.kv_heads * self.head_dim
        attention = self.hidden * q_out + 2 * self.hidden * kv_out + q_out * self.hidden
        return attention + 3 * self.hidden * self.intermediate

    @property
    def lm_head_params(self) -> int:
        return self.hidden * self.vocab

    def kv_bytes_per_token(self, element_bytes: int) -> int:
        return 2 * self.layers * self.kv_heads * self.head_dim * element_bytes


def decode_flops_per_token(shape: ModelShape, context: int) -> dict[str, float]:
    """Multiply-adds x 2 of one decode token: the linear layers (and the LM head) and attention over
    ``context`` cached tokens (q·K and the weighted sum of V, every query head)."""
    linear = 2.0 * (shape.layers * shape.layer_linear_params + shape.lm_head_params)
    attention = 2.0 * 2 * shape.layers * shape.heads * shape.head_dim * context
    return {"linear": linear, "attention": attention, "attention_share": attention / (linear + attention)}


def attention_share_report(shape: ModelShape, short: int, long: int) -> dict:
    """Attention's share of a decode token's arithmetic at both context lengths, and the ratio of
    the totals: what attention alone explains of the context-growth figure."""
    at_short, at_long = decode_flops_per_token(shape, short), decode_flops_per_token(shape, long)
    total_short = at_short["linear"] + at_short["attention"]
    total_long = at_long["linear"] + at_long["attention"]
    return {"short_context": short, "long_context": long,
            "attention_share_short": round(at_short["attention_share"], 4),
            "attention_share_long": round(at_long["attention_share"], 4),
            "flops_ratio_long_over_short": round(total_long / total_short, 4)}


def decode_step_bytes(shape: ModelShape, *, batch: int, context: int, weight_bytes_per_param: float,
                      head_bytes_per_param: float, kv_element_bytes: int) -> dict[str, float]:
    """Bytes one decode step must read at least: every weight once (shared by the batch) and every
    row's KV cache. NF4 weights are ~0.5 byte/param plus their scales; the LM head stays in the
    compute dtype."""
    weights = shape.layers * shape.layer_linear_params * weight_bytes_per_param
    weights += shape.lm_head_params * head_bytes_per_param
    kv = batch * context * shape.kv_bytes_per_token(kv_element_bytes)
    return {"weights": weights, "kv": kv, "total": weights + kv}


def lora_cost(rank: int, targets: Sequence[str], shape: ModelShape) -> int:
    """Multiply-adds per token of one LoRA: ``rank * (in + out)`` over its targeted modules."""
    q_out, kv_out = shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim
    sizes = {"q_proj": shape.hidden + q_out, "k_proj": shape.hidden + kv_out, "v_proj": shape.hidden + kv_out,
             "o_proj": q_out + shape.hidden, "gate_proj": shape.hidden + shape.intermediate,
             "up_proj": shape.hidden + shape.intermediate, "down_proj": shape.intermediate + shape.hidden}
    return rank * shape.layers * sum(sizes[t] for t in targets)


def adapter_weight_bytes_report(mix_costs: Sequence[int], single_cost: int, shape: ModelShape, *,
                                element_bytes: int) -> dict:
    """Weights one decode step of the mix must read against the same batch on one adapter: each
    distinct adapter's A and B once (``rank * (in + out)`` elements, its per-token multiply-adds),
    beside the NF4 base and LM head every step reads anyway. Where a decode step is bound by memory
    (a GPU), ``(base + single) / (base + mix)`` is the best ratio any kernel can reach."""
    base = shape.layers * shape.layer_linear_params * NF4_WEIGHT_BYTES + shape.lm_head_params * element_bytes
    mix, single = sum(mix_costs) * element_bytes, single_cost * element_bytes
    return {"base_bytes": round(base), "mix_adapter_bytes": mix, "single_adapter_bytes": single,
            "mix_over_base": round(mix / base, 3),
            "bandwidth_bound_ratio": round((base + single) / (base + mix), 4)}


def low_rank_cost(family: str, rank: int, targets: Sequence[str], shape: ModelShape) -> int:
    """Multiply-adds per token of one adapter served as a LoRA delta (LoRA, AdaLoRA and VeRA at
    their rank r); DoRA adds one multiply per output channel (its magnitude rescale)."""
    cost = lora_cost(rank, targets, shape)
    if family == "dora":
        q_out, kv_out = shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim
        outputs = {"q_proj": q_out, "k_proj": kv_out, "v_proj": kv_out, "o_proj": shape.hidden,
                   "gate_proj": shape.intermediate, "up_proj": shape.intermediate, "down_proj": shape.hidden}
        cost += shape.layers * sum(outputs[t] for t in targets)
    return cost
