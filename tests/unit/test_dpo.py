"""DPO on a tiny random Llama: the loss and its gradients equal TRL's ``DPOTrainer`` on the same
batch and weights (reference = the bare base, or a registered adapter frozen), for LoRA, IA3 and
prompt tuning; preference data in both shapes; a run that learns to prefer; resume."""

from __future__ import annotations

import copy
import json
import warnings
from functools import partial

import pytest
import torch
from support import build_tiny_llama, make_peft_adapter, peft_config

from adapters.errors import DatasetValidationError
from adapters.kinds.base import AdapterLimits
from adapters.peft_io import read_adapter
from adapters.preference_data import parse_preference_dataset, tokenize_preferences
from adapters.runtime import AdapterRuntime
from adapters.training.config import TrainingConfig
from adapters.training.dpo import DpoObjective, dpo_loss, frozen_reference
from adapters.training.prepare import prepare_dataset
from adapters.training.trainable import trainable_from_weights
from adapters.training.trainer import TrainingRun, adapter_forward, collate

KINDS = ["lora", "ia3", "prompt_tuning"]
RTOL = 1e-5


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT / TRL notices about tiny models
        yield


@pytest.fixture(scope="module")
def base():
    model = build_tiny_llama()
    with torch.no_grad():
        model.lm_head.weight.mul_(30)  # sharper logits: log-prob differences well above float noise
    return model


def pairs_bytes(n: int = 6, shape: str = "pairs") -> bytes:
    rows = []
    for i in range(n):
        prompt, good, bad = f"the quick fox number {i}?", "how are you?", f"the lazy dog {i}"
        if shape == "pairs":
            rows.append({"prompt": prompt, "chosen": good, "rejected": bad})
        else:
            rows.append({"input": {"messages": [{"role": "user", "content": prompt}]},
                         "preferred_output": [{"role": "assistant", "content": good}],
                         "non_preferred_output": [{"role": "assistant", "content": bad}]})
    return "\n".join(json.dumps(r) for r in rows).encode()


def examples(tokenizer, n: int = 3):
    return tokenize_preferences(parse_preference_dataset(pairs_bytes(n)), tokenizer, max_seq_len=128)


def _peft_key(name: str) -> str:
    """A PEFT parameter name as the trainable adapter's (module path with dashes, tensor kind)."""
    name = name.removeprefix("base_model.model.")
    for marker, ours in ((".lora_A.default.weight", "A"), (".lora_B.default.weight", "B"),
                         (".ia3_l.default", "scales")):
        if name.endswith(marker):
            module = name[:-len(marker)]
            return f"{ours}.{module.replace('.', '-')}"
    if name == "prompt_encoder.default.embedding.weight":
        return "prompt"
    raise AssertionError(f"unexpected trainable PEFT parameter {name}")


def _trl_loss_and_grads(start, kind: str, policy_peft, inputs, tokenizer, beta: float, tmp_path,
                        sft_weight: float = 0.0):
    """TRL's DPO loss and gradients. ``start``: a plain model (TRL adds a new adapter; the reference
    is the base with adapters disabled) or a PeftModel (TRL copies its adapter as the frozen "ref").
    Then the policy's weights are loaded into the trained adapter, as after some steps."""
    from datasets import Dataset
    from peft import PeftModel
    from trl import DPOConfig, DPOTrainer

    losses = {"loss_type": ["sigmoid", "sft"], "loss_weights": [1.0, sft_weight]} if sft_weight else {
        "loss_type": ["sigmoid"]}
    args = DPOConfig(output_dir=str(tmp_path / "trl"), beta=beta, report_to="none", use_cpu=True, bf16=False,
                     fp16=False, per_device_train_batch_size=len(inputs["input_ids"]) // 2, **losses)
    dummy = Dataset.from_list([{"prompt": "hello", "chosen": " world", "rejected": " fox"}])
    trainer = DPOTrainer(model=start, ref_model=None, args=args, train_dataset=dummy, processing_class=tokenizer,
                         peft_config=None if isinstance(start, PeftModel) else peft_config(kind))
    model = trainer.model
    with torch.no_grad():
        if isinstance(start, PeftModel):
            # TRL 1.16 copies the start adapter into "ref" by names holding ".default.", which IA3's
            # vectors ("...ia3_l.default") do not: its IA3 reference stays at ones. Copy as TRL means to.
            for name, param in model.named_parameters():
                if name.endswith(".default"):
                    model.get_parameter(name.removesuffix(".default") + ".ref").copy_(param)
        for name, param in policy_peft.named_parameters():
            if param.requires_grad:
                model.get_parameter(name).copy_(param)
    model.train()
    loss = trainer.compute_loss(model, inputs)
    loss.backward()
    grads = {_peft_key(n): p.grad.detach().clone() for n, p in model.named_parameters()
             if p.requires_grad and ".ref." not in n}
    return loss.detach(), grads


def _collated_for_trl(batch, pad_id: int):
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    rows = [{"prompt_ids": ex.prompt_ids, "chosen_ids": ex.chosen_ids, "rejected_ids": ex.rejected_ids}
            for ex in batch]
    return DataCollatorForPreference(pad_token_id=pad_id)(rows)


def _assert_close(ours: torch.Tensor, theirs: torch.Tensor, what: str) -> None:
    assert ours.numel() == theirs.numel(), what
    ours, theirs = ours.reshape(-1), theirs.reshape(-1)  # PEFT keeps IA3 vectors as [out, 1] or [1, in]
    scale = float(theirs.abs().max())
    assert scale > 0, f"{what}: TRL's value is zero, the comparison would prove nothing"
    error = float((ours - theirs).abs().max()) / scale
    assert error <= RTOL, f"{what}: relative error {error:.2e}"


@pytest.mark.parametrize("kind,reference,sft_weight", [
    *((kind, reference, 0.0) for kind in KINDS for reference in ("base", "adapter")),
    *((kind, "base", 0.7) for kind in KINDS),  # RPO: DPO plus the chosen answers' NLL
])
def test_loss_and_gradients_equal_trl(base, kind, reference, sft_weight, tiny_tokenizer, tmp_path):
    """Same batch (our tokenization, TRL's collator), same weights: same loss and same gradients."""
    beta = 0.3
    policy_peft = make_peft_adapter(base, kind, tmp_path / "policy", seed=1)
    runtime = AdapterRuntime(copy.deepcopy(base), max_slots=2, dtype=torch.float32)

    def read(folder):
        return read_adapter(folder, runtime.base_info, AdapterLimits(), torch.float32)

    initial, start = None, copy.deepcopy(base)
    if reference == "adapter":  # SFT then DPO: the run starts from a registered adapter, its reference
        start = make_peft_adapter(base, kind, tmp_path / "ref", seed=2)
        initial = read(tmp_path / "ref")
    batch = examples(tiny_tokenizer)
    pad_id = tiny_tokenizer.pad_token_id

    policy = trainable_from_weights(read(tmp_path / "policy"), runtime.device).train()
    objective = DpoObjective(beta, frozen_reference(initial, runtime.device), forward=partial(adapter_forward, runtime),
                             collate=partial(collate, pad_id=pad_id, device=runtime.device), sft_weight=sft_weight)
    out = objective.batch_loss(policy, batch)
    out.mean.backward()
    ours = {n: p.grad for n, p in policy.named_parameters()}

    trl_loss, theirs = _trl_loss_and_grads(start, kind, policy_peft, _collated_for_trl(batch, pad_id),
                                           tiny_tokenizer, beta, tmp_path, sft_weight)
    _assert_close(out.mean.detach(), trl_loss, "loss")
    assert sorted(ours) == sorted(theirs)
    for name in ours:
        _assert_close(ours[name], theirs[name], f"gradient of {name}")


def test_loss_matches_the_formula_and_rewards():
    chosen, rejected = torch.tensor([-3.0, -5.0]), torch.tensor([-4.0, -4.0])
    ref_chosen, ref_rejected = torch.tensor([-3.5, -4.5]), torch.tensor([-3.5, -4.5])
    terms = dpo_loss(chosen, rejected, ref_chosen, ref_rejected, beta=0.5)
    # pair 0: ratios +0.5 / -0.5 -> margin 1.0; pair 1: -0.5 / +0.5 -> margin -1.0
    expected = -torch.nn.functional.logsigmoid(torch.tensor([0.5, -0.5]))
    assert torch.allclose(terms.losses, expected)
    assert torch.allclose(terms.chosen_rewards, torch.tensor([0.25, -0.25]))
    assert torch.allclose(terms.rejected_rewards, torch.tensor([-0.25, 0.25]))


def test_both_shapes_tokenize_alike_and_bad_lines_are_named(tiny_tokenizer):
    ours = tokenize_preferences(parse_preference_dataset(pairs_bytes(2, "pairs")), tiny_tokenizer, max_seq_len=128)
    openai = tokenize_preferences(parse_preference_dataset(pairs_bytes(2, "openai")), tiny_tokenizer,
                                  max_seq_len=128)
    assert [(e.prompt_ids, e.chosen_ids, e.rejected_ids) for e in ours] == \
           [(e.prompt_ids, e.chosen_ids, e.rejected_ids) for e in openai]
    rendered = tiny_tokenizer.decode(ours[0].chosen_ids)
    assert rendered == "how are you?<|im_end|>\n"  # the answer turn as supervised training labels it
    conversational = json.dumps({"prompt": [{"role": "user", "content": "hi"}],
                                 "chosen": [{"role": "assistant", "content": "a"}],
                                 "rejected": [{"role": "assistant", "content": "b"}]}).encode()
    assert parse_preference_dataset(conversational)[0].prompt == [{"role": "user", "content": "hi"}]
    cases = {
        b'{"prompt": "a", "chosen": "x", "rejected": "x"}': "line 1: chosen and rejected are the same answer",
        b'{"prompt": "a", "chosen": 3, "rejected": "x"}': "line 1: field 'chosen' must be a string or an array",
        pairs_bytes(1, "pairs") + b"\n" + pairs_bytes(1, "openai"): "line 2: mixes the two preference shapes",
    }
    for data, expected in cases.items():
        with pytest.raises(DatasetValidationError) as error:
            parse_preference_dataset(data)
        assert expected in str(error.value), error.value
    with pytest.raises(DatasetValidationError) as too_long:
        tokenize_preferences(parse_preference_dataset(pairs_bytes(1)), tiny_tokenizer, max_seq_len=8)
    assert "too long after tokenization" in str(too_long.value)


@pytest.mark.parametrize("kind", KINDS)
def test_a_dpo_run_learns_to_prefer_and_reports_rewards(base, kind, tiny_tokenizer):
    lr = {"lora": 3e-2, "ia3": 3e-1, "prompt_tuning": 1e-1}[kind]
    extra = {"lora": {"lora_dropout": 0.0}, "ia3": {}, "prompt_tuning": {"num_virtual_tokens": 4}}[kind]
    cfg = TrainingConfig(kind=kind, objective="dpo", beta=0.5, batch_size=4, epochs=6, learning_rate=lr,
                         eval_fraction=0.25, max_seq_len=128, seed=3, **extra)
    prepared = prepare_dataset(pairs_bytes(12), tiny_tokenizer, cfg)
    assert prepared.format == "preference" and len(prepared.train) == 9 and len(prepared.eval) == 3
    runtime = AdapterRuntime(copy.deepcopy(base), max_slots=2, dtype=torch.float32)
    run = TrainingRun(runtime, tiny_tokenizer, cfg, prepared.train, prepared.eval)
    while run.micro_step():
        pass
    p = run.progress
    if kind != "prompt_tuning":  # a new LoRA / IA3 changes nothing yet: the policy is the reference
        assert p.eval_loss_before == pytest.approx(0.6931, abs=1e-3)  # log 2
    assert p.eval_loss_after < p.eval_loss_before
    steps = [step for step, _ in p.train_metrics]
    assert steps == list(range(1, p.total_steps + 1))
    last = p.train_metrics[-1][1]
    assert set(last) == {"chosen_reward", "rejected_reward", "reward_margin", "preference_accuracy"}
    assert last["reward_margin"] == pytest.approx(last["chosen_reward"] - last["rejected_reward"], abs=1e-6)
    assert [step for step, _ in p.eval_metrics] == [0, p.total_steps]
    assert p.eval_metrics[-1][1]["reward_margin"] > max(0.0, p.eval_metrics[0][1]["reward_margin"])
    assert p.eval_metrics[-1][1]["preference_accuracy"] == 1.0
    assert all(param.grad is None for param in runtime.model.parameters())


def test_dpo_needs_preference_data_and_resumes_exactly(base, tiny_tokenizer, tmp_path):
    sft = json.dumps({"prompt": "a", "completion": "b"}).encode()
    cfg = TrainingConfig(kind="lora", objective="dpo", batch_size=2, max_steps=4, checkpoint_every=2,
                         eval_fraction=0.0, max_seq_len=128, lora_dropout=0.1, learning_rate=1e-2)
    with pytest.raises(DatasetValidationError) as wrong:
        prepare_dataset(sft, tiny_tokenizer, cfg)
    assert wrong.value.problems[0][0] == 1 and "expected a preference record" in wrong.value.problems[0][1]
    prepared = prepare_dataset(pairs_bytes(6), tiny_tokenizer, cfg)

    def new_run(folder):
        runtime = AdapterRuntime(copy.deepcopy(base), max_slots=2, dtype=torch.float32)
        return TrainingRun(runtime, tiny_tokenizer, cfg, prepared.train, [], folder)

    whole = new_run(tmp_path / "whole")
    while whole.micro_step():
        pass
    first = new_run(tmp_path / "split")
    while first.progress.step < 2:
        first.micro_step()
    second = new_run(tmp_path / "split")
    assert second.resume() and second.progress.train_metrics == first.progress.train_metrics
    while second.micro_step():
        pass
    assert second.progress.train_loss == whole.progress.train_loss
    assert second.progress.train_metrics == whole.progress.train_metrics
    for (name, a), (_, b) in zip(whole.adapter.named_parameters(), second.adapter.named_parameters()):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("name", ["dora", "adalora", "vera", "p_tuning", "prefix"])
def test_dpo_trains_every_other_trainable_kind(base, name, tiny_tokenizer):
    """Nothing in DPO knows the kind: the kinds trained since (their own forward hooks, AdaLoRA's
    regularization and rank allocator, prefixes as past keys and values) train on preferences too."""
    from test_train_new_kinds import VARIANTS

    from adapters.training.prepare import check_limits

    cfg = TrainingConfig(**{**VARIANTS[name], "objective": "dpo", "beta": 0.5, "batch_size": 4, "epochs": 6,
                            "eval_fraction": 0.25, "max_seq_len": 128, "seed": 3})
    prepared = prepare_dataset(pairs_bytes(12), tiny_tokenizer, cfg)
    check_limits(cfg, AdapterLimits(), len(prepared.train))
    runtime = AdapterRuntime(copy.deepcopy(base), max_slots=2, dtype=torch.float32)
    run = TrainingRun(runtime, tiny_tokenizer, cfg, prepared.train, prepared.eval)
    while run.micro_step():
        pass
    p = run.progress
    assert p.eval_loss_after < p.eval_loss_before
    assert [step for step, _ in p.train_metrics] == list(range(1, p.total_steps + 1))
    assert p.eval_metrics[-1][1]["reward_margin"] > p.eval_metrics[0][1]["reward_margin"]


def test_sft_weight_is_dpo_only():
    from pydantic import ValidationError

    from adapters.training.config import TrainingConfig

    with pytest.raises(ValidationError, match="sft_weight applies to objective 'dpo' only"):
        TrainingConfig(kind="lora", sft_weight=0.5)
    assert TrainingConfig(kind="lora", objective="dpo", sft_weight=0.5).sft_weight == 0.5


def test_the_format_sniff_reads_one_line_within_the_line_limit():
    """The sniff that tells a preference file from a supervised one split the whole file into lines
    (a copy of every line at once: ~25 bytes per uploaded byte, hundreds of MB for a 32 MB file of
    short lines) and parsed a first line past the line limit whole."""
    import tracemalloc

    from adapters.preference_data import first_record

    pair = {"prompt": "p", "chosen": "c", "rejected": "r"}
    assert first_record(b"\n \n" + json.dumps(pair).encode() + b"\n{\n", 1024) == pair
    assert first_record(json.dumps({**pair, "pad": "x" * 2000}).encode(), 1024) is None  # past the limit
    short_lines = b"ab\n" * 1_000_000
    tracemalloc.start()
    try:
        first_record(short_lines, 1024)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1_000_000  # one line read, not a million
