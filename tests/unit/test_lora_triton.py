"""The fused LoRA path (rank-bucketed banks + Triton SGMV kernels) against the torch path and PEFT.

CI has no GPU: the kernels run here in Triton's interpreter, which executes the same kernel code
on CPU tensors (tests/conftest.py turns it on before Triton is imported). tests/unit/test_gpu.py
runs them compiled on CUDA.
"""

import copy
import os

import pytest
import torch
from support import build_tiny_llama, make_peft_adapter

from adapters.kinds.base import AdapterLimits
from adapters.kinds.lora import LoraBank, SlotLora, add_segments
from adapters.kinds.lora_buckets import RankBucket, bucket_rank
from adapters.kinds.lora_kernel import choose_lora_kernel, measure, warm_up
from adapters.peft_io import read_adapter
from adapters.runtime import AdapterRuntime, TokenLayout, token_segments
from gateway.paged_attention import KVPool
from gateway.paged_runner import PagedRunner, StepItem

pytest.importorskip("triton")
pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                reason="Triton's interpreter is off (a GPU is present: test_gpu.py runs the kernels)")
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def interpreted():
    from adapters.kinds import lora_triton

    return lora_triton


def random_slot(rank: int, din: int, dout: int, generator, dora: bool = False, shift: bool = False) -> SlotLora:
    return SlotLora(torch.randn(din, rank, generator=generator), torch.randn(rank, dout, generator=generator),
                    torch.rand(dout, generator=generator) + 0.5 if dora else None,
                    torch.randn(dout, generator=generator) if shift else None)


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("din,dout", [(40, 24), (64, 160)])
def test_kernel_matches_torch_path_over_mixed_runs(interpreted, din, dout):
    """Runs of ranks 4-100 (three buckets) with a DoRA rescale, base rows, a slot absent from this
    layer and a 37-token run spanning three tiles: the kernels give the torch path's result."""
    g = torch.Generator().manual_seed(0)
    ranks = {1: 4, 2: 16, 3: 20, 5: 8, 6: 100}
    weights = {slot: random_slot(r, din, dout, g, dora=slot == 3, shift=slot == 3) for slot, r in ranks.items()}
    buckets: dict[int, RankBucket] = {}
    for slot, w in weights.items():
        key = bucket_rank(w.a_t.shape[1])
        buckets.setdefault(key, RankBucket(key, din, dout, 8, torch.float32, CPU)).add(slot, *w)
    assert sorted(buckets) == [16, 32, 128]
    segments = ((0, 3, 1), (3, 4, 0), (4, 41, 2), (41, 42, 3), (42, 50, 5), (50, 51, 7), (51, 53, 6), (53, 54, 1))
    x = torch.randn(54, din, generator=g)
    y = torch.randn(54, dout, generator=g)
    expected = y.clone()
    add_segments(expected, x, segments, weights)
    tiles = interpreted.segment_tiles(segments, CPU)
    assert tiles.tolist()[:5] == [[0, 3, 1], [4, 41, 2], [20, 41, 2], [36, 41, 2], [41, 42, 3]]
    for bucket in buckets.values():
        interpreted.add_bucket(y, x, tiles, bucket)
    assert relative_error(y, expected) < 1e-5
    assert torch.equal(y[3], expected[3]) and torch.equal(y[50], expected[50])  # base and absent rows untouched


def test_a_bucket_without_rows_in_the_forward_is_never_launched(interpreted, monkeypatch):
    """An idle rank-256 adapter costs rank-8 traffic no kernel launch: only buckets whose adapters
    have tokens in the forward are launched, and the result still equals the torch path's."""
    g = torch.Generator().manual_seed(3)
    din, dout = 32, 48
    fused, plain = LoraBank(torch.float32, CPU, fused=True, slots=4), LoraBank(torch.float32, CPU)
    for slot, rank in {1: 8, 2: 256}.items():
        w = random_slot(rank, din, dout, g)
        for bank in (fused, plain):
            bank.write(slot, w.a_t.T, w.b_t.T)
    launched = []
    real = interpreted.add_bucket
    monkeypatch.setattr(interpreted, "add_bucket",
                        lambda y, x, tiles, bucket: (launched.append(bucket.rank), real(y, x, tiles, bucket)))
    x, y = torch.randn(5, din, generator=g), torch.randn(5, dout, generator=g)
    for slots, buckets in (([1, 1, 0, 1, 1], [16]), ([1, 2, 2, 0, 1], [16, 256])):
        launched.clear()
        layout = TokenLayout(torch.empty(0), token_segments(slots))
        out = fused.transform_output(y.clone(), x, layout)
        assert sorted(launched) == buckets
        assert relative_error(out, plain.transform_output(y.clone(), x, layout)) < 1e-5


def test_fused_bank_lifecycle(interpreted):
    """Slots join and leave: rows are reused, a full stack doubles without disturbing the slots
    already in it, and a bucket whose last adapter leaves is freed."""
    g = torch.Generator().manual_seed(1)
    din, dout = 32, 48
    fused, plain = LoraBank(torch.float32, CPU, fused=True, slots=8), LoraBank(torch.float32, CPU)
    weights = {slot: random_slot(r, din, dout, g) for slot, r in {1: 8, 2: 12, 3: 16, 4: 256}.items()}
    for slot, w in weights.items():
        a, b = w.a_t.T, w.b_t.T
        fused.write(slot, a, b)
        plain.write(slot, a, b)
    assert {k: len(v) for k, v in fused.buckets.items()} == {16: 3, 256: 1}
    assert fused.buckets[16].a.shape[0] == 4  # grew 1 -> 2 -> 4
    layout = TokenLayout(torch.empty(0), token_segments([1, 2, 2, 3, 0, 4]))
    x = torch.randn(6, din, generator=g)
    y = torch.randn(6, dout, generator=g)
    fused_out = fused.transform_output(y.clone(), x, layout)
    assert relative_error(fused_out, plain.transform_output(y.clone(), x, layout)) < 1e-5

    fused.clear(4)
    assert 256 not in fused.buckets  # the rank-256 stack is gone with its adapter
    fused.clear(2)
    plain.clear(4)
    plain.clear(2)
    w = random_slot(4, din, dout, g)
    fused.write(5, w.a_t.T, w.b_t.T)
    plain.write(5, w.a_t.T, w.b_t.T)
    assert fused.buckets[16].rows[5] == 1  # slot 2's row, reused (zeroed, then refilled)
    layout = TokenLayout(torch.empty(0), token_segments([1, 5, 2, 3, 4]))  # 2 and 4 left: no delta
    assert relative_error(fused.transform_output(y[:5].clone(), x[:5], layout),
                          plain.transform_output(y[:5].clone(), x[:5], layout)) < 1e-5


def test_a_failed_write_to_a_new_bucket_leaves_no_bucket(monkeypatch):
    """A rank-256 write whose bucket cannot be filled (out of device memory while the stack grows)
    leaves no empty stack behind; the buckets already there keep their slots."""
    g = torch.Generator().manual_seed(2)
    fused = LoraBank(torch.float32, CPU, fused=True, slots=4)
    small = random_slot(8, 32, 48, g)
    fused.write(1, small.a_t.T, small.b_t.T)
    grow = RankBucket._grow

    def out_of_memory(self, capacity):
        if self.rank == 256:
            raise torch.OutOfMemoryError("simulated: out of device memory")
        return grow(self, capacity)

    monkeypatch.setattr(RankBucket, "_grow", out_of_memory)
    large = random_slot(256, 32, 48, g)
    with pytest.raises(torch.OutOfMemoryError):
        fused.write(2, large.a_t.T, large.b_t.T)
    assert list(fused.buckets) == [16] and fused.buckets[16].rows == {1: 0}
    fused.clear(2)  # the runtime clears a failed install's slot: nothing there, nothing raised
    assert list(fused.buckets) == [16]


def test_paged_forward_with_the_kernel_matches_peft(interpreted, tmp_path):
    """A packed forward (prefill chunks and decode rows of LoRA, DoRA, AdaLoRA and VeRA adapters
    and the base) through a runtime whose banks use the kernel: PEFT's logits for every row."""
    base = build_tiny_llama()
    kinds = ["lora", "dora", "adalora", "vera"]
    references = {k: make_peft_adapter(base, k, tmp_path / k) for k in kinds}
    model = copy.deepcopy(base)
    runtime = AdapterRuntime(model, max_slots=len(kinds), dtype=torch.float32, lora_kernel="triton")
    slots = {k: runtime.install(read_adapter(tmp_path / k, runtime.base_info, AdapterLimits(), torch.float32))
             for k in kinds}
    assert all(b.fused and b.buckets for layer in runtime._layers.values()
               for name, b in layer.banks.items() if name == "lora")
    config = model.config
    pool = KVPool(layers=config.num_hidden_layers, num_blocks=32, block_size=4, kv_heads=config.num_key_value_heads,
                  head_dim=config.hidden_size // config.num_attention_heads, dtype=torch.float32, device=CPU)
    runner = PagedRunner(model, runtime, pool)
    prompts = {"lora": [5, 6, 7, 8, 9], "dora": [11, 12, 13], "adalora": [21, 22, 23, 24], "vera": [31, 32],
               None: [41, 42]}
    tables = {k: list(range(i * 4, i * 4 + 4)) for i, k in enumerate(prompts)}
    items = [StepItem(slots.get(k, 0), ids, 0, tables[k]) for k, ids in prompts.items()]
    runner.forward(items)
    decode = [StepItem(slots.get(k, 0), [50 + i], len(ids), tables[k]) for i, (k, ids) in enumerate(prompts.items())]
    logits = runner.forward(decode)
    for row, (kind, ids) in enumerate(prompts.items()):
        reference = references[kind] if kind else base
        with torch.no_grad():
            ref = reference(input_ids=torch.tensor([ids + [50 + row]])).logits[0, -1]
        assert relative_error(logits[row], ref) < 1e-4, kind


def test_choice_on_cpu():
    assert choose_lora_kernel("auto", CPU, torch.float32, 64).kernel == "torch"
    assert choose_lora_kernel("torch", CPU, torch.float32, 64).kernel == "torch"
    with pytest.raises(ValueError, match="CUDA only"):
        choose_lora_kernel("triton", CPU, torch.float32, 64)
    with pytest.raises(ValueError, match="one of"):
        choose_lora_kernel("fast", CPU, torch.float32, 64)


def test_measurement_compares_both_paths(interpreted):
    """The probe ``auto`` runs on CUDA, here on CPU in the interpreter: both paths timed, the kernel
    agreeing with torch; the choice is whichever measured faster."""
    choice = measure(CPU, torch.float32, 32, repeats=1)
    assert set(choice.timings_ms) == {"torch", "triton"}
    assert "relative error" in choice.reason and "disagrees" not in choice.reason
    faster = min(choice.timings_ms, key=choice.timings_ms.get)
    assert choice.kernel == faster


def test_serve_refuses_a_kernel_this_machine_cannot_run_before_the_model_loads(monkeypatch, tmp_path):
    from gateway import app, cli

    def no_model(*args, **kwargs):
        raise AssertionError("the model must not load")

    monkeypatch.setattr(app, "create_app", no_model)
    with pytest.raises(SystemExit, match="refusing to start: lora_kernel=triton: the Triton LoRA kernel runs on CUDA"):
        cli.main(["serve", "--data-dir", str(tmp_path), "--device", "cpu", "--lora-kernel", "triton"])


def test_warm_up_runs_every_bucket_up_to_the_rank_limit(interpreted, monkeypatch):
    """Start-up compiles each rank bucket's kernels with and without DoRA's rescale: 16, 32, 64 for
    a limit of 40 (its bucket is 64), twice each."""
    launched = []
    real = interpreted.add_bucket

    def recording(y, x, tiles, bucket):
        launched.append((bucket.rank, bucket.rescaled > 0))
        real(y, x, tiles, bucket)

    monkeypatch.setattr(interpreted, "add_bucket", recording)
    assert warm_up(CPU, torch.float32, 32, 40) == 6
    assert launched == [(16, False), (16, True), (32, False), (32, True), (64, False), (64, True)]
