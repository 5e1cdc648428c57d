"""The trainer on a tiny random Llama: the trainable slot against PEFT, gradients, loss masking,
learning, exact resume from a checkpoint, and export that PEFT loads with the served logits."""

from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch
import torch.nn.functional as F
from support import build_tiny_llama, make_peft_adapter

from adapters.kinds.base import AdapterLimits
from adapters.peft_io import read_adapter
from adapters.runtime import AdapterRuntime
from adapters.training.checkpoint import CheckpointError
from adapters.training.config import TrainingConfig, learning_rate_at
from adapters.training.prepare import prepare_dataset
from adapters.training.trainable import build_trainable, trainable_from_weights
from adapters.training.trainer import (
    TrainingRun, adapter_forward, causal_lm_loss_sum, collate, example_rows, split_pieces,
)
from adapters.training_data import IGNORE_INDEX
from gateway.model_runner import ModelRunner

KINDS = ["lora", "ia3", "prompt_tuning"]
FAST = {"lora": {"learning_rate": 3e-2, "lora_dropout": 0.0}, "ia3": {"learning_rate": 3e-1},
        "prompt_tuning": {"learning_rate": 1e-1, "num_virtual_tokens": 4}}


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT: "Position ids are not supported" for prompt tuning
        yield


@pytest.fixture(scope="module")
def base():
    model = build_tiny_llama()
    with torch.no_grad():  # random init keeps logits within about +-0.6: too flat to learn a task in a few steps
        model.lm_head.weight.mul_(30)
    return model


def make_runtime(base):
    model = copy.deepcopy(base)
    return AdapterRuntime(model, max_slots=4, dtype=torch.float32)


def dataset_bytes(n: int = 12) -> bytes:
    colours = ["red", "blue", "green", "white", "black", "brown"]
    rows = [{"prompt": f"the {colours[i % 6]} fox number {i}", "completion": "how are you?"} for i in range(n)]
    return "\n".join(json.dumps(r) for r in rows).encode()


def config(kind: str, **overrides) -> TrainingConfig:
    return TrainingConfig(**{"kind": kind, "batch_size": 4, "max_seq_len": 64, "eval_fraction": 0.25,
                             "seed": 3, **FAST[kind], **overrides})


def run_to_end(run: TrainingRun, limit: int = 10_000) -> None:
    for _ in range(limit):
        if not run.micro_step():
            return
    raise AssertionError("the run did not finish")


@pytest.mark.parametrize("kind", KINDS)
def test_trainable_forward_matches_peft(base, kind, tmp_path):
    reference = make_peft_adapter(base, kind, tmp_path / kind)
    runtime = make_runtime(base)
    weights = read_adapter(tmp_path / kind, runtime.base_info, AdapterLimits(), torch.float32)
    adapter = trainable_from_weights(weights, runtime.device).eval()
    ids = torch.tensor([[5, 17, 42, 99, 150, 7, 33]])
    with torch.no_grad():
        ours, _ = adapter_forward(runtime, adapter, ids, torch.ones_like(ids))
        ref = reference(input_ids=ids).logits
    assert ours.shape == ref.shape
    assert float((ours - ref).abs().max() / ref.abs().max()) < 1e-5


@pytest.mark.parametrize("kind", KINDS)
def test_gradients_reach_only_adapter_parameters(base, kind, tiny_tokenizer):
    runtime = make_runtime(base)
    cfg = config(kind)
    prepared = prepare_dataset(dataset_bytes(), tiny_tokenizer, cfg)
    run = TrainingRun(runtime, tiny_tokenizer, cfg, prepared.train, prepared.eval)
    ids, labels, mask = collate(prepared.train[:4], 0, runtime.device)
    with torch.enable_grad():
        logits, labels = adapter_forward(runtime, run.adapter, ids, mask, labels)
        loss_sum, count = causal_lm_loss_sum(logits, labels)
        (loss_sum / count).backward()
    assert all(p.grad is None for p in runtime.model.parameters())
    grads = {name: p.grad for name, p in run.adapter.named_parameters()}
    if kind == "lora":  # B starts at zero, so only B gets a gradient on the first step
        grads = {n: g for n, g in grads.items() if n.startswith("B.")}
    assert grads and all(g is not None and float(g.abs().sum()) > 0 for g in grads.values())


def test_loss_counts_only_answer_tokens(base, tiny_tokenizer):
    runtime = make_runtime(base)
    cfg = config("lora", eval_fraction=0.0)
    prepared = prepare_dataset(dataset_bytes(4), tiny_tokenizer, cfg)
    example = prepared.train[0]
    answer = tiny_tokenizer("how are you?", add_special_tokens=False)["input_ids"]
    labelled = [t for t in example.labels if t != IGNORE_INDEX]
    assert labelled[:len(answer)] == answer  # the answer (then the turn's closing tokens)
    assert example.labels[0] == IGNORE_INDEX and len(labelled) < len(example.input_ids)
    ids, labels, mask = collate([example], 0, runtime.device)
    adapter = build_trainable(cfg, runtime, tiny_tokenizer).eval()
    with torch.no_grad():
        logits, labels = adapter_forward(runtime, adapter, ids, mask, labels)
        loss_sum, count = causal_lm_loss_sum(logits, labels)
        hf_loss = runtime.model(input_ids=ids, labels=labels).loss  # transformers' own masking
    assert count == len(labelled)
    assert torch.allclose(loss_sum / count, hf_loss, rtol=1e-5)


def _self_allocations(fn, size: int) -> list[tuple[str, int]]:
    """The ops of ``fn()`` (forward and backward) that themselves allocate at least ``size / 2``
    bytes, by the profiler's memory accounting (bytes, not time: no timing in tests)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    return [(e.name, e.self_cpu_memory_usage) for e in prof.events() if e.self_cpu_memory_usage >= size // 2]


def test_the_loss_copies_no_logits():
    """Forward and backward of the loss allocate the log-softmax, its gradient and the logits'
    gradient, nothing more the size of the logits: shifting the logits instead of the labels cost
    a copy forward and a zero-filled tensor backward (time the trainer spent beyond PEFT's loop)."""
    logits = torch.randn(4, 40, 700, requires_grad=True)
    labels = torch.randint(0, 700, (4, 40))
    labels[:, :10] = IGNORE_INDEX

    def step():
        loss, count = causal_lm_loss_sum(logits, labels)
        (loss / count).backward()

    big = _self_allocations(step, logits.nbytes)
    assert len(big) <= 3, big
    expected = F.cross_entropy(logits[:, :-1].reshape(-1, 700), labels[:, 1:].reshape(-1), reduction="sum")
    loss, count = causal_lm_loss_sum(logits, labels)
    assert count == 4 * 30 and torch.allclose(loss, expected, rtol=1e-6)


def test_dropout_draws_once_and_is_seeded(base, tiny_tokenizer):
    """Dropout keeps a share 1 - p of the entries scaled by 1 / (1 - p), repeats with the seed, and
    allocates the mask and the output only (two passes over the activations, as ``nn.Dropout``)."""
    runtime = make_runtime(base)
    x = torch.randn(8, 64, 48)
    draws = []
    for _ in range(2):
        adapter = build_trainable(config("lora", lora_dropout=0.25), runtime, tiny_tokenizer).train()
        draws.append(adapter._dropout(x, 0.25))
    kept = draws[0] != 0
    assert torch.equal(draws[0], draws[1])
    assert abs(kept.float().mean().item() - 0.75) < 0.02
    assert torch.allclose(draws[0][kept], x[kept] / 0.75)
    big = _self_allocations(lambda: adapter._dropout(x, 0.25), x.nbytes)
    assert sum(n for _, n in big) <= 2 * x.nbytes, big
    assert adapter.eval()._dropout(x, 0.25) is x


@pytest.mark.parametrize("kind", KINDS)
def test_a_few_steps_reduce_eval_loss(base, kind, tiny_tokenizer):
    runtime = make_runtime(base)
    cfg = config(kind, max_steps=15, lr_schedule="constant")
    prepared = prepare_dataset(dataset_bytes(), tiny_tokenizer, cfg)
    run = TrainingRun(runtime, tiny_tokenizer, cfg, prepared.train, prepared.eval)
    run_to_end(run)
    p = run.progress
    assert p.step == 15 and p.phase == "done" and len(p.train_loss) == 15
    assert p.eval_loss_after < 0.9 * p.eval_loss_before
    assert p.tokens_trained > 0 and p.tokens_per_second > 0


def test_resume_from_checkpoint_is_exact(base, tiny_tokenizer, tmp_path):
    cfg = config("lora", lora_dropout=0.2, max_steps=6, grad_accumulation=2, checkpoint_every=2,
                 lr_schedule="cosine", warmup_steps=2)
    prepared = prepare_dataset(dataset_bytes(), tiny_tokenizer, cfg)
    runtime = make_runtime(base)

    whole = TrainingRun(runtime, tiny_tokenizer, cfg, prepared.train, prepared.eval, tmp_path / "a")
    run_to_end(whole)

    first = TrainingRun(runtime, tiny_tokenizer, cfg, prepared.train, prepared.eval, tmp_path / "b")
    while first.progress.step < 3:  # checkpoint at step 2; step 3 is lost with the "crash"
        first.micro_step()
    first.close()
    second = TrainingRun(runtime, tiny_tokenizer, cfg, prepared.train, prepared.eval, tmp_path / "b")
    assert second.resume() and second.progress.step == 2
    run_to_end(second)

    for (name, p), (_, q) in zip(whole.adapter.named_parameters(), second.adapter.named_parameters(), strict=True):
        assert torch.equal(p, q), name
    assert second.progress.train_loss == whole.progress.train_loss
    assert second.progress.eval_loss_after == whole.progress.eval_loss_after


def test_resume_refuses_a_checkpoint_of_another_config(base, tiny_tokenizer, tmp_path):
    cfg = config("ia3", max_steps=2, checkpoint_every=1)
    prepared = prepare_dataset(dataset_bytes(), tiny_tokenizer, cfg)
    runtime = make_runtime(base)
    run_to_end(TrainingRun(runtime, tiny_tokenizer, cfg, prepared.train, prepared.eval, tmp_path))
    other = TrainingRun(runtime, tiny_tokenizer, cfg.model_copy(update={"learning_rate": 0.5}),
                        prepared.train, prepared.eval, tmp_path)
    with pytest.raises(CheckpointError, match="different config or dataset"):
        other.resume()


@pytest.mark.parametrize("kind", KINDS)
def test_export_loads_in_peft_with_the_served_logits(base, kind, tiny_tokenizer, tmp_path):
    from peft import PeftModel

    runtime = make_runtime(base)
    cfg = config(kind, max_steps=4)
    prepared = prepare_dataset(dataset_bytes(), tiny_tokenizer, cfg)
    run = TrainingRun(runtime, tiny_tokenizer, cfg, prepared.train, prepared.eval)
    run_to_end(run)
    run.export(tmp_path / "out")

    weights = read_adapter(tmp_path / "out", runtime.base_info, AdapterLimits(), torch.float32)
    slot = runtime.install(weights)
    ids = [5, 17, 42, 99, 150, 7, 33]
    served, _ = ModelRunner(runtime.model, runtime).prefill([ids], [slot])
    reference = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "out").eval()
    with torch.no_grad():
        expected = reference(input_ids=torch.tensor([ids])).logits[0, -1]
        trained, _ = adapter_forward(runtime, run.adapter.eval(), torch.tensor([ids]), torch.ones(1, 7, dtype=torch.long))
    assert float((served[0] - expected).abs().max() / expected.abs().max()) < 1e-4
    assert float((trained[0, -1] - expected).abs().max() / expected.abs().max()) < 1e-4


def test_schedules():
    cfg = TrainingConfig(learning_rate=1.0, warmup_steps=2, lr_schedule="linear")
    assert [learning_rate_at(cfg, s, 6) for s in range(6)] == [0.0, 0.5, 1.0, 0.75, 0.5, 0.25]
    cosine = cfg.model_copy(update={"lr_schedule": "cosine"})
    assert learning_rate_at(cosine, 4, 6) == pytest.approx(0.5)
    constant = cfg.model_copy(update={"lr_schedule": "constant"})
    assert learning_rate_at(constant, 5, 6) == 1.0


@pytest.mark.parametrize("kind", KINDS)
def test_a_run_starts_from_given_weights_and_continues_them(base, kind, tiny_tokenizer):
    cfg = config(kind, max_steps=3, lr_schedule="constant")
    prepared = prepare_dataset(dataset_bytes(), tiny_tokenizer, cfg)
    first = TrainingRun(make_runtime(base), tiny_tokenizer, cfg, prepared.train, prepared.eval)
    run_to_end(first)
    trained = first.weights()
    second = TrainingRun(make_runtime(base), tiny_tokenizer, cfg.model_copy(update={"init_adapter": "first"}),
                         prepared.train, prepared.eval, initial=trained)
    start = second.weights()
    for before, after in zip(trained.tensors(), start.tensors(), strict=True):
        torch.testing.assert_close(after, before, rtol=0, atol=0)
    second.micro_step()  # the eval before training: the first run's loss at its end
    assert second.progress.eval_loss_before == pytest.approx(first.progress.eval_loss_after, rel=1e-5)
    other = "ia3" if kind != "ia3" else "lora"
    with pytest.raises(ValueError, match="start from"):
        TrainingRun(make_runtime(base), tiny_tokenizer, config(other), prepared.train, prepared.eval, initial=trained)


@pytest.mark.parametrize("kind", [*KINDS, "adalora", "dpo"])
def test_a_micro_batch_in_pieces_trains_as_the_whole_batch(base, kind, tiny_tokenizer):
    """With ``max_piece_tokens`` a micro-batch is forwarded a few rows per ``micro_step()``, so one
    unit of work on the engine thread stays small; the losses, the eval losses and the weights
    after every optimizer step equal those of the whole batch at once (grad accumulation and
    AdaLoRA's regularization included). DPO is run without its SFT term (taken per piece)."""
    from test_dpo import pairs_bytes

    if kind == "dpo":
        cfg = TrainingConfig(kind="lora", objective="dpo", beta=0.5, batch_size=4, learning_rate=3e-2,
                             lora_dropout=0.0, max_seq_len=128, seed=3, max_steps=3, eval_fraction=0.25)
        data = pairs_bytes(12)
    else:
        extra = {"adalora": {"learning_rate": 3e-2, "lora_dropout": 0.0, "init_r": 6, "target_r": 2, "tinit": 1,
                             "tfinal": 1, "deltaT": 1}}.get(kind, {})
        cfg = config(kind, max_steps=3, grad_accumulation=2, **extra) if not extra else TrainingConfig(
            kind=kind, batch_size=4, max_seq_len=64, eval_fraction=0.25, seed=3, max_steps=3, grad_accumulation=2,
            **extra)
        data = dataset_bytes()
    prepared = prepare_dataset(data, tiny_tokenizer, cfg)
    whole = TrainingRun(make_runtime(base), tiny_tokenizer, cfg, prepared.train, prepared.eval)
    run_to_end(whole)
    longest = max(example_rows(e)[0] * example_rows(e)[1] for e in prepared.train) + 4
    pieces = TrainingRun(make_runtime(base), tiny_tokenizer, cfg, prepared.train, prepared.eval,
                         max_piece_tokens=longest)
    units = 0
    while pieces.micro_step():
        units += 1
    assert units > whole.progress.step * cfg.grad_accumulation * 2  # the micro-batches did split
    for (name, p), (_, q) in zip(whole.adapter.named_parameters(), pieces.adapter.named_parameters(), strict=True):
        # summing in another order moves gradients by ~1e-7; Adam's normalized steps carry that into
        # the weights as up to ~1e-4 of their size after a few steps (a wrong scale would be gross)
        assert torch.allclose(p, q, rtol=1e-3, atol=1e-4), name
    ours, theirs = pieces.progress, whole.progress
    assert [s for s, _ in ours.train_loss] == [s for s, _ in theirs.train_loss]
    assert [v for _, v in ours.train_loss] == pytest.approx([v for _, v in theirs.train_loss], rel=1e-5)
    assert ours.eval_loss_before == pytest.approx(theirs.eval_loss_before, rel=1e-5)
    assert ours.eval_loss_after == pytest.approx(theirs.eval_loss_after, rel=1e-5)
    assert ours.tokens_trained == theirs.tokens_trained


def test_pieces_hold_at_most_their_tokens():
    from adapters.preference_data import PreferenceExample
    from adapters.training_data import TrainingExample

    rows = [TrainingExample(input_ids=[1] * n, labels=[1] * n, line=i) for i, n in enumerate([5, 9, 3, 9, 2])]
    assert [[e.line for e in p] for p in split_pieces(rows, 18)] == [[0, 1], [2, 3], [4]]
    assert [[e.line for e in p] for p in split_pieces(rows, 18, virtual=1)] == [[0], [1], [2], [3], [4]]
    assert split_pieces(rows, None) == [rows]
    assert [[e.line for e in p] for p in split_pieces(rows, 4)] == [[0], [1], [2], [3], [4]]  # one each, at least
    pair = PreferenceExample(prompt_ids=[1] * 4, chosen_ids=[2] * 3, rejected_ids=[3] * 5, line=1)
    assert example_rows(pair) == (2, 9) and len(split_pieces([pair, pair], 35)) == 2
