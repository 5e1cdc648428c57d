"""The multi-adapter runtime against PEFT, the reference: every kind alone, a mixed batch of
kinds and ranks in one forward, rows joining and leaving a running batch, and slot reuse."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from support import build_tiny_llama, make_peft_adapter

from adapters.kinds.base import AdapterLimits
from adapters.peft_io import read_adapter
from adapters.runtime import AdapterRuntime
from gateway.model_runner import ModelRunner

STEPS = 8
TOL = 1e-4

VARIANTS = {
    "lora": ("lora", {}),
    "lora_rslora_r8": ("lora", {"r": 8, "lora_alpha": 16, "use_rslora": True}),
    "lora_qv": ("lora", {"target_modules": ["q_proj", "v_proj"]}),
    "ia3": ("ia3", {}),
    "ia3_ff": ("ia3", {"target_modules": ["k_proj", "v_proj", "down_proj", "up_proj"],
                       "feedforward_modules": ["down_proj", "up_proj"]}),
    "prompt5": ("prompt_tuning", {"num_virtual_tokens": 5}),
    "prompt11": ("prompt_tuning", {"num_virtual_tokens": 11}),
    "dora": ("dora", {}),
    "dora_qv_r8": ("dora", {"r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"]}),
    "adalora": ("adalora", {}),
    "vera": ("vera", {}),  # projections saved with the adapter
    "vera_regenerated": ("vera", {"save_projection": False, "projection_prng_key": 1234, "r": 4}),
    "p_tuning_mlp": ("p_tuning", {"num_virtual_tokens": 6}),
    "p_tuning_lstm": ("p_tuning", {"num_virtual_tokens": 4, "encoder_reparameterization_type": "LSTM"}),
}


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT: "Position ids are not supported" for prompt tuning
        yield


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    return float((got - ref).abs().max() / ref.abs().max())


def make_runtime(base, max_slots: int = 8):
    model = copy.deepcopy(base)
    runtime = AdapterRuntime(model, max_slots=max_slots, dtype=torch.float32)
    return runtime, ModelRunner(model, runtime)


def load(runtime, folder):
    return read_adapter(folder, runtime.base_info, AdapterLimits(), torch.float32)


def prompt_ids(length: int, seed: int, vocab: int = 320) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (length,), generator=g).tolist()


@torch.no_grad()
def ref_logits(model, ids: list[int]) -> torch.Tensor:
    return model(input_ids=torch.tensor([ids])).logits[0, -1].float()


@torch.no_grad()
def ref_greedy(model, ids: list[int], steps: int = STEPS) -> list[int]:
    x = torch.tensor([ids])
    out = model.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=steps,
                         do_sample=False, eos_token_id=None, pad_token_id=0, min_new_tokens=steps)
    return out[0, len(ids):].tolist()


def greedy(runner: ModelRunner, prompts: list[list[int]], slots: list[int], steps: int = STEPS):
    """Greedy continuation of every row in one batch; returns (first logits, tokens per row)."""
    logits, state = runner.prefill(prompts, slots)
    first = logits.clone()
    tokens = [[t] for t in logits.argmax(-1).tolist()]
    for _ in range(steps - 1):
        logits = runner.decode(state, [row[-1] for row in tokens])
        for row, t in zip(tokens, logits.argmax(-1).tolist(), strict=True):
            row.append(t)
    return first, tokens


@pytest.fixture(scope="module")
def base():
    return build_tiny_llama()


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_single_adapter_matches_peft(base, tmp_path, variant):
    kind, overrides = VARIANTS[variant]
    reference = make_peft_adapter(base, kind, tmp_path / variant, seed=3, **overrides)
    runtime, runner = make_runtime(base)
    slot = runtime.install(load(runtime, tmp_path / variant))
    ids = prompt_ids(9, seed=7)

    logits, tokens = greedy(runner, [ids], [slot])
    assert rel_err(logits[0], ref_logits(reference, ids)) <= TOL
    assert tokens[0] == ref_greedy(reference, ids)
    # the adapter changes something (otherwise the test proves nothing)
    base_logits, _ = runner.prefill([ids], [0])
    assert rel_err(logits[0], base_logits[0]) > 1e-3


@pytest.fixture(scope="module")
def mixed(base, tmp_path_factory):
    """A runtime holding LoRA r4, LoRA r8 (different rank), IA3 and prompt tuning, with the
    PEFT reference of each; slot 0 is paired with the plain base model."""
    root = tmp_path_factory.mktemp("mixed")
    specs = {
        "lora4": ("lora", {}, 11),
        "ia3": ("ia3", {"target_modules": ["k_proj", "v_proj", "down_proj", "up_proj"],
                        "feedforward_modules": ["down_proj", "up_proj"]}, 12),
        "prompt": ("prompt_tuning", {"num_virtual_tokens": 5}, 13),
        "lora8": ("lora", {"r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj", "o_proj"]}, 14),
    }
    runtime, runner = make_runtime(base)
    refs = {0: base}
    for name, (kind, overrides, seed) in specs.items():
        reference = make_peft_adapter(base, kind, root / name, seed=seed, **overrides)
        slot = runtime.install(load(runtime, root / name))
        refs[slot] = reference
    return runtime, runner, refs


def test_mixed_batch_matches_each_adapter_alone(mixed):
    runtime, runner, refs = mixed
    slots = [1, 0, 2, 3, 4, 0]
    prompts = [prompt_ids(n, seed=20 + i) for i, n in enumerate([7, 3, 12, 5, 9, 10])]
    logits, tokens = greedy(runner, prompts, slots)
    for row, (slot, ids) in enumerate(zip(slots, prompts, strict=True)):
        ref = refs[slot]
        assert rel_err(logits[row], ref_logits(ref, ids)) <= TOL, f"row {row} (slot {slot})"
        assert tokens[row] == ref_greedy(ref, ids), f"row {row} (slot {slot})"


def test_rows_join_and_leave_a_running_batch(mixed):
    runtime, runner, refs = mixed
    total = 10
    prompts = {"a": prompt_ids(6, 40), "b": prompt_ids(11, 41), "c": prompt_ids(4, 42)}
    slots = {"a": 1, "b": 3, "c": 2}
    expected = {k: greedy(runner, [prompts[k]], [slots[k]], total)[1][0] for k in prompts}
    # running each alone through the runner equals PEFT too
    for k in prompts:
        assert expected[k] == ref_greedy(refs[slots[k]], prompts[k], total)

    got: dict[str, list[int]] = {}
    order = ["a", "b"]
    logits, state = runner.prefill([prompts[k] for k in order], [slots[k] for k in order])
    for k, t in zip(order, logits.argmax(-1).tolist(), strict=True):
        got[k] = [t]

    def step():
        out = runner.decode(state, [got[k][-1] for k in order])
        for k, t in zip(order, out.argmax(-1).tolist(), strict=True):
            got[k].append(t)

    for _ in range(3):
        step()
    logits_c, state_c = runner.prefill([prompts["c"]], [slots["c"]])
    got["c"] = [int(logits_c[0].argmax())]
    state = runner.merge(state, state_c)
    order.append("c")
    for _ in range(3):
        step()
    state = runner.select(state, [1, 2])  # "a" leaves
    order = ["b", "c"]
    while len(got["c"]) < total:
        step()
    got["b"] = got["b"][:total]

    assert got["a"] == expected["a"][: len(got["a"])]
    assert len(got["a"]) == 7
    assert got["b"] == expected["b"]
    assert got["c"] == expected["c"]


def test_select_keeps_the_longest_row_padding_free(mixed):
    """After the long row leaves, leading all-padding columns are dropped and results hold."""
    runtime, runner, refs = mixed
    short, long_ = prompt_ids(3, 50), prompt_ids(14, 51)
    expected = greedy(runner, [short], [4], 5)[1][0]
    logits, state = runner.prefill([long_, short], [1, 4])
    tokens = [int(logits[1].argmax())]
    state = runner.select(state, [1])
    assert state.mask.shape[1] == len(short)
    for _ in range(4):
        tokens.append(int(runner.decode(state, [tokens[-1]])[0].argmax()))
    assert tokens == expected


def test_install_uninstall_reinstall_same_slot(base, tmp_path):
    runtime, runner = make_runtime(base, max_slots=2)
    ids = prompt_ids(8, 60)
    base_logits = runner.prefill([ids], [0])[0][0]
    for kind, overrides in [("lora", {}), ("ia3", {}), ("prompt_tuning", {"num_virtual_tokens": 4})]:
        folder = tmp_path / kind
        make_peft_adapter(base, kind, folder, seed=5, **overrides)
        weights = load(runtime, folder)
        slot = runtime.install(weights)
        first = runner.prefill([ids], [slot])[0][0]
        assert rel_err(first, base_logits) > 1e-3
        runtime.uninstall(slot)
        assert runtime.kind_of(slot) is None
        after = runner.prefill([ids], [slot])[0][0]
        assert rel_err(after, base_logits) <= 1e-6, f"{kind}: uninstalled slot is not the base"
        again = runtime.install(weights, slot=slot)
        assert again == slot
        assert rel_err(runner.prefill([ids], [slot])[0][0], first) <= 1e-6
        runtime.uninstall(slot)


def test_slot_reused_by_another_kind_leaves_nothing_behind(base, tmp_path):
    """A LoRA slot later used by IA3 must not keep the LoRA delta (and vice versa)."""
    runtime, runner = make_runtime(base, max_slots=1)
    ids = prompt_ids(8, 61)
    ref_lora = make_peft_adapter(base, "lora", tmp_path / "l", seed=8)
    ref_ia3 = make_peft_adapter(base, "ia3", tmp_path / "i", seed=9)
    slot = runtime.install(load(runtime, tmp_path / "l"))
    runtime.uninstall(slot)
    runtime.install(load(runtime, tmp_path / "i"), slot=slot)
    assert rel_err(runner.prefill([ids], [slot])[0][0], ref_logits(ref_ia3, ids)) <= TOL
    runtime.uninstall(slot)
    runtime.install(load(runtime, tmp_path / "l"), slot=slot)
    assert rel_err(runner.prefill([ids], [slot])[0][0], ref_logits(ref_lora, ids)) <= TOL


def test_install_refuses_taken_or_out_of_range_slot(base, tmp_path):
    runtime, _ = make_runtime(base, max_slots=2)
    make_peft_adapter(base, "lora", tmp_path / "l")
    weights = load(runtime, tmp_path / "l")
    slot = runtime.install(weights)
    with pytest.raises(ValueError):
        runtime.install(weights, slot=slot)
    with pytest.raises(ValueError):
        runtime.install(weights, slot=0)
    with pytest.raises(ValueError):
        runtime.install(weights, slot=3)
    runtime.install(weights)
    with pytest.raises(RuntimeError):
        runtime.install(weights)


@pytest.mark.parametrize("failing, other", [("lora", "ia3"), ("ia3", "lora")])
def test_an_install_that_fails_part_way_leaves_its_slot_clean(base, tmp_path, monkeypatch, failing, other):
    """Kinds write one module at a time. An install that fails at its third module (out of device
    memory, say) gives its slot back; the first two modules must not stay there. The adapter of
    the other kind installed in that slot next is served beside a row of the failed kind (whose
    banks then run for the whole batch) and still matches PEFT."""
    from adapters.kinds.ia3 import Ia3Bank
    from adapters.kinds.lora import LoraBank

    runtime, runner = make_runtime(base, max_slots=2)
    refs = {kind: make_peft_adapter(base, kind, tmp_path / kind, seed=11) for kind in (failing, other)}
    bank = {"lora": LoraBank, "ia3": Ia3Bank}[failing]
    write, writes = bank.write, []

    def fail_third(self, *args, **kwargs):
        writes.append(1)
        if len(writes) == 3:
            raise torch.OutOfMemoryError("simulated: out of device memory")
        return write(self, *args, **kwargs)

    monkeypatch.setattr(bank, "write", fail_third)
    with pytest.raises(torch.OutOfMemoryError):
        runtime.install(load(runtime, tmp_path / failing))
    monkeypatch.setattr(bank, "write", write)
    assert runtime.free_slots == [1, 2]
    reused = runtime.install(load(runtime, tmp_path / other))
    assert reused == 1
    beside = runtime.install(load(runtime, tmp_path / failing))
    ids = [prompt_ids(8, 62), prompt_ids(8, 63)]
    logits = runner.prefill(ids, [reused, beside])[0]
    assert rel_err(logits[0], ref_logits(refs[other], ids[0])) <= TOL
    assert rel_err(logits[1], ref_logits(refs[failing], ids[1])) <= TOL
