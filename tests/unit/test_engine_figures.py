"""The pure parts of the engine benchmark kit (loadtest/engine_figures.py, prompts, arguments):
ratios against targets, windowed inter-token gaps, /metrics parsing, KV overhead, the decode cost
model checked against real module shapes. No timing is asserted."""

import math

import pytest
import torch
from support import build_tiny_llama

from loadtest import engine_figures as ef
from loadtest.http_load import WordPrompts


@pytest.mark.parametrize(("num", "den", "expected"), [(3.0, 2.0, 1.5), (1.0, 0.0, None), (None, 2.0, None),
                                                       (2.0, None, None), (math.nan, 1.0, None), (1.0, -1.0, None)])
def test_ratio(num, den, expected):
    assert ef.ratio(num, den) == expected


@pytest.mark.parametrize(("key", "value", "met"), [("long_neighbour", 1.05, True), ("long_neighbour", 2.1, False),
                                                    ("mixed_ranks", 0.95, True), ("mixed_ranks", 0.5, False),
                                                    ("idle_rank256", 0.97, True), ("kv_memory", None, None),
                                                    ("trace_p99", 0.8, None)])
def test_figure_direction_of_each_target(key, value, met):
    fig = ef.figure(key, "name", value, engine="paged")
    assert fig["met"] is met
    line = ef.format_figure(fig)
    assert ("MISSED" in line) == (met is False)
    assert ("n/a" in line) == (value is None)


def test_window_keeps_only_gaps_with_both_ends_inside():
    arrivals = [[0.0, 1.0, 2.0, 3.5, 5.0], [0.5, 2.5, 4.5]]
    assert ef.window_intervals(arrivals, 1.0, 4.0) == [1.0, 1.5]  # stream 2 has only 2.5 inside
    assert ef.time_per_token(arrivals, 1.0, 4.0) == pytest.approx(1.25)
    assert ef.time_per_token(arrivals, 5.5, 9.0) is None


def test_decoding_window_starts_once_every_stream_decodes():
    arrivals = [[1.0, 2.0, 3.0, 9.0], [4.0, 5.0, 6.0, 7.0]]
    assert ef.decoding_window(arrivals, skip=2) == (5.0, 7.0)
    assert ef.decoding_window([[1.0], [2.0, 3.0]], skip=1) is None  # a stream with nothing after its first
    assert ef.decoding_window([[1.0, 2.0], [5.0, 6.0]], skip=1) is None  # never all at once


METRICS = """# HELP gateway_kv_blocks_used Blocks held.
# TYPE gateway_kv_blocks_used gauge
gateway_kv_blocks_used 10.0
# TYPE gateway_kv_blocks_total gauge
gateway_kv_blocks_total 100.0
# TYPE gateway_kv_block_size_tokens gauge
gateway_kv_block_size_tokens 16.0
# TYPE gateway_kv_live_tokens gauge
gateway_kv_live_tokens 150.0
# TYPE gateway_prefix_cache_hit_tokens counter
gateway_prefix_cache_hit_tokens_total 320.0
# TYPE gateway_requests counter
gateway_requests_total{adapter="a"} 2.0
gateway_requests_total{adapter="b"} 3.0
"""


def test_parse_metrics_sums_label_sets_and_keeps_counter_names():
    values = ef.parse_metrics(METRICS)
    assert values["gateway_requests_total"] == 5.0
    assert values["gateway_prefix_cache_hit_tokens_total"] == 320.0
    assert ef.has_paged_kv(values)
    assert ef.kv_pool_overhead(values) == pytest.approx(160 / 150)


def test_kv_overhead_absent_without_the_paged_gauges():
    values = ef.parse_metrics("# TYPE gateway_queue_depth gauge\ngateway_queue_depth 0.0\n")
    assert not ef.has_paged_kv(values)
    assert ef.kv_pool_overhead(values) is None
    assert ef.kv_pool_overhead({**ef.parse_metrics(METRICS), "gateway_kv_live_tokens": 0.0}) is None


def test_padded_overhead_is_rows_times_longest_over_sum():
    assert ef.padded_overhead([10, 30, 20]) == pytest.approx(90 / 60)
    assert ef.padded_overhead([7]) == 1.0
    assert ef.padded_overhead([]) is None


def test_model_shape_counts_the_linear_weights_of_a_real_llama():
    model = build_tiny_llama(layers=2)
    shape = ef.ModelShape.from_config(model.config.to_dict())
    layer = model.model.layers[0]
    linear = sum(m.weight.numel() for m in layer.modules() if m.__class__.__name__ == "Linear")
    assert shape.layer_linear_params == linear
    assert shape.lm_head_params == model.lm_head.weight.numel()
    assert shape.kv_bytes_per_token(2) == 2 * 2 * 2 * (32 // 4) * 2  # k and v, 2 layers, 2 kv heads of 8, bf16


def test_lora_cost_matches_the_parameters_peft_creates():
    from peft import LoraConfig, get_peft_model

    model = build_tiny_llama()
    shape = ef.ModelShape.from_config(model.config.to_dict())
    targets = ["q_proj", "v_proj", "down_proj"]
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=targets))
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    assert ef.lora_cost(4, targets, shape) == trainable


@pytest.mark.parametrize("family,config", [
    ("lora", {}), ("dora", {"use_dora": True}),
])
def test_low_rank_cost_matches_the_parameters_peft_creates(family, config):
    """A rank-r delta costs its A and B; DoRA adds one magnitude per output channel."""
    from peft import LoraConfig, get_peft_model

    model = build_tiny_llama()
    shape = ef.ModelShape.from_config(model.config.to_dict())
    targets = ["q_proj", "k_proj", "o_proj", "up_proj", "down_proj"]
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=targets, **config))
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    assert ef.low_rank_cost(family, 4, targets, shape) == trainable


SMOLLM2_135M = {"num_hidden_layers": 30, "hidden_size": 576, "intermediate_size": 1536, "num_attention_heads": 9,
                "num_key_value_heads": 3, "vocab_size": 49152}


def test_the_mix_holds_every_kind_and_its_candidates_for_heaviest_are_measured():
    from loadtest.engine_bench import (
        FAMILY_ORDER, MIX_KINDS, _family, heaviest_low_rank, served_mix, single_candidates,
    )

    mix = {f"mix-{i:03d}": MIX_KINDS[i % len(MIX_KINDS)] for i in range(32)}
    assert len(FAMILY_ORDER) == 8 and {_family(k) for k in MIX_KINDS[:8]} == set(FAMILY_ORDER)  # --quick's 8 too
    assert "lora8-attn" in MIX_KINDS[:8]  # figure 2's adapter, in --quick's mix too
    assert mix[heaviest_low_rank(list(mix), mix, SMOLLM2_135M)] == "dora64-attn"
    # the virtual-token kinds' cost is prompt positions, not a delta: one of each is measured alone too
    candidates = [mix[i] for i in single_candidates(list(mix), mix, SMOLLM2_135M)]
    assert candidates == ["dora64-attn", *sorted({"prompt16", "ptuning16", "prefix16"}, key=MIX_KINDS.index)]
    # DoRA's rescale makes it dearer than LoRA and VeRA of its rank and targets, whichever comes first
    same = {"a": "vera64-attn", "b": "lora64-attn", "c": "dora64-attn", "d": "lora16-all", "e": "prefix16"}
    assert heaviest_low_rank(list(same), same, SMOLLM2_135M) == "c"
    wide = {"a": "lora64-attn", "b": "adalora32-all", "c": "ia3", "d": "prompt16"}  # all linear layers: wider
    assert heaviest_low_rank(list(wide), wide, SMOLLM2_135M) == "b"
    assert served_mix(mix, "paged") == mix
    padded = served_mix(mix, "padded")
    assert len(padded) == 30 and "prefix16" not in padded.values()


def test_bench_adapters_of_every_kind_are_served_as_their_kind_and_change_the_output(tmp_path):
    """Each new kind's bench adapter is read by the gateway as that kind, at the bench's rank,
    and moves PEFT's logits away from the base (the noise makes it non-trivial)."""
    import copy

    from peft import PeftModel
    from test_adapter_validation import read

    from adapters.runtime import AdapterRuntime
    from loadtest.bench_adapters import make_adapter

    base = build_tiny_llama()
    info = AdapterRuntime(copy.deepcopy(base), max_slots=1, dtype=torch.float32).base_info
    ids = torch.tensor([[5, 17, 42, 99, 7, 3, 250]])
    with torch.no_grad():
        plain = base(input_ids=ids).logits[0, -1]
    expected = {"dora8-attn": ("dora", 8), "adalora8-all": ("adalora", 8), "vera16-attn": ("vera", 16),
                "ptuning16": ("p_tuning", None), "prefix16": ("prefix_tuning", None)}
    for i, (kind, (served, rank)) in enumerate(expected.items()):
        folder = make_adapter(base, kind, tmp_path / kind, seed=i)
        described = read(folder, info).describe()
        assert described["kind"] == served and described.get("rank") == rank, kind
        if rank is None:
            assert described["num_virtual_tokens"] == 16
        with torch.no_grad():
            logits = PeftModel.from_pretrained(copy.deepcopy(base), folder).eval()(input_ids=ids).logits[0, -1]
        assert ((logits - plain).norm() / plain.norm()).item() > 1e-2, kind


def test_attention_share_grows_with_context():
    config = {"num_hidden_layers": 30, "hidden_size": 576, "intermediate_size": 1536, "num_attention_heads": 9,
              "num_key_value_heads": 3, "vocab_size": 49152}  # SmolLM2-135M
    report = ef.attention_share_report(ef.ModelShape.from_config(config), 40, 1500)
    assert 0 < report["attention_share_short"] < report["attention_share_long"] < 1
    linear = 2 * (30 * 3_538_944 + 576 * 49152)
    attention_long = 2 * 2 * 30 * 9 * 64 * 1500
    assert report["attention_share_long"] == pytest.approx(attention_long / (linear + attention_long), abs=1e-4)
    step = ef.decode_step_bytes(ef.ModelShape.from_config(config), batch=8, context=100, weight_bytes_per_param=0.5,
                                head_bytes_per_param=2, kv_element_bytes=2)
    assert step["kv"] == 8 * 100 * 2 * 30 * 3 * 64 * 2
    assert step["total"] == step["weights"] + step["kv"]


def test_word_prompts_have_exact_token_lengths(tiny_tokenizer):
    words = WordPrompts(tiny_tokenizer, seed=1, min_words=3)
    for n in (1, 7, 40):
        assert len(tiny_tokenizer.encode(words.make(n), add_special_tokens=False)) == n
    with pytest.raises(ValueError, match="single-token words"):
        WordPrompts(tiny_tokenizer)


def test_quick_sizes_leave_explicit_flags_alone():
    from loadtest.engine_bench import parse_args

    args = parse_args(["--quick", "--long-prompt", "999"])
    assert args.long_prompt == 999 and args.short_streams == 4
    assert parse_args([]).short_streams == 12


def test_bench_adapters_leave_the_shared_base_untouched(tmp_path):
    from safetensors.torch import load_file

    from loadtest.bench_adapters import make_adapter

    base = build_tiny_llama()
    before = {k: v.clone() for k, v in base.state_dict().items()}
    kinds = ["lora8-all", "ia3", "prompt16", "lora4-attn", "dora8-attn", "adalora8-all", "vera16-attn", "ptuning16",
             "prefix16"]
    for i, kind in enumerate(kinds):
        folder = make_adapter(base, kind, tmp_path / kind, seed=i)
        assert load_file(folder / "adapter_model.safetensors")
    after = base.state_dict()
    assert sorted(after) == sorted(before)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not any(word in name for name, _ in base.named_modules() for word in ("lora", "ia3", "vera", "prompt"))
    attention = load_file(tmp_path / "lora4-attn" / "adapter_model.safetensors")
    assert not any("mlp" in k for k in attention) and any("o_proj.lora_A" in k for k in attention)


def test_gpu_check_sets_figure_3_against_the_bandwidth_bound():
    from loadtest.gpu_check import NF4_WEIGHT_BYTES, figure3_against_bound

    config = {"num_hidden_layers": 2, "hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4,
              "num_key_value_heads": 2, "vocab_size": 1000}
    fig = ef.figure("context_growth", "3.", 2.0, engine="paged", short_s=0.010, long_s=0.020,
                    attention={"short_context": 42, "long_context": 1502})
    rows = figure3_against_bound([fig, ef.figure("shared_prefix", "2.", 0.2, engine="paged")], config, 1e9)
    assert [r["context"] for r in rows] == [42, 1502]
    shape = ef.ModelShape.from_config(config)
    need = ef.decode_step_bytes(shape, batch=8, context=1502, weight_bytes_per_param=NF4_WEIGHT_BYTES,
                                head_bytes_per_param=2, kv_element_bytes=2)["total"]
    assert rows[1]["bound_ms"] == pytest.approx(need / 1e9 * 1000, rel=1e-3)
    assert rows[1]["step_over_bound"] == pytest.approx(20.0 / rows[1]["bound_ms"], rel=1e-2)
    assert figure3_against_bound([fig], config, None) == []


def test_abba_interleaves_both_sides_in_turn():
    from loadtest.engine_bench import abba

    assert abba(("a", "b"), 3) == ["a", "b", "b", "a", "a", "b"]
    assert abba(("a", "b"), 0) == []


def test_gpu_check_verdicts_tell_failed_from_skipped():
    from loadtest.gpu_check import step_verdict

    assert step_verdict({"passed": False, "rows": {}}) == "FAILED"
    assert step_verdict({"passed": None, "skipped": True}) == "skipped"
    assert step_verdict({"error": "RuntimeError: x"}) == "error: RuntimeError: x"
    assert step_verdict({"passed": True}) == step_verdict({"points": []}) == "ok"


def test_adapter_weight_bytes_bound_the_mixed_ranks_ratio():
    """Four distinct adapters read four adapters' weights a step where one shared adapter reads
    one: with the base's own bytes beside them, that bounds the memory-bound ratio."""
    model = build_tiny_llama(layers=2)
    shape = ef.ModelShape.from_config(model.config.to_dict())
    cost = ef.lora_cost(8, ["q_proj", "v_proj"], shape)
    report = ef.adapter_weight_bytes_report([cost] * 4, cost, shape, element_bytes=2)
    base = 2 * shape.layer_linear_params * ef.NF4_WEIGHT_BYTES + shape.lm_head_params * 2
    assert report["mix_adapter_bytes"] == 4 * report["single_adapter_bytes"] == 4 * cost * 2
    assert report["bandwidth_bound_ratio"] == pytest.approx((base + 2 * cost) / (base + 8 * cost), abs=1e-4)


def test_bracketed_ratios_read_each_treated_run_against_its_neighbours():
    # steady drift from 100 to 60: every "with" equals its neighbours' mean, so no cost is read
    modes = ["without", "with", "without", "with", "without"]
    assert ef.bracketed_ratios(modes, [100, 90, 80, 70, 60], "with") == [1.0, 1.0]
    # a run that ends on the treated side is read against the one before it; a missing side is None
    assert ef.bracketed_ratios(["without", "with"], [50.0, 45.0], "with") == [0.9]
    assert ef.bracketed_ratios(["without", "with", "without"], [None, 45.0, None], "with") == [None]
