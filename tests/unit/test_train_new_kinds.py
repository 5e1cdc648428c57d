"""Training DoRA, AdaLoRA, VeRA, P-tuning and prefix tuning with the embedded trainer, on a tiny
random Llama: the trainable forward equals PEFT's on PEFT's own adapters, the encoders and the
AdaLoRA rank allocator equal PEFT's step by step, a short run lowers the eval loss, and the export
loads in ``PeftModel.from_pretrained`` with the logits the gateway serves. Through the jobs API:
a new kind trained, registered and served; bad hyperparameters refused with 400s."""

from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch
from support import make_peft_adapter, peft_config
from test_paged_engine import make_runner
from test_runtime_equivalence import load, prompt_ids, rel_err
from test_trainer import dataset_bytes, make_runtime, run_to_end
from test_training_api import jsonl, make_client, rows, submit, wait_for

from adapters.kinds.adalora import TrainableAdaLora
from adapters.kinds.base import AdapterKind
from adapters.training.config import TrainingConfig
from adapters.training.prepare import prepare_dataset
from adapters.training.trainable import build_trainable, trainable_from_weights
from adapters.training.trainer import TrainingRun, adapter_forward, causal_lm_loss_sum
from gateway.paged_runner import StepItem, virtual_entries

TOL = 1e-4
# job settings per variant: learning rates that move a tiny model in a few steps
VARIANTS = {
    "dora": {"kind": "dora", "learning_rate": 3e-2, "lora_dropout": 0.0},
    "dora_dropout": {"kind": "dora", "learning_rate": 3e-2, "lora_dropout": 0.1, "target_modules": ["q_proj", "v_proj"]},
    "adalora": {"kind": "adalora", "learning_rate": 5e-2, "lora_dropout": 0.0, "init_r": 6, "target_r": 2,
                "tinit": 2, "tfinal": 3, "deltaT": 2},
    "vera": {"kind": "vera", "learning_rate": 1e-1, "r": 16, "projection_prng_key": 5},
    "vera_regenerated": {"kind": "vera", "learning_rate": 1e-1, "r": 16, "save_projection": False,
                         "target_modules": ["q_proj", "v_proj", "down_proj"]},
    "p_tuning": {"kind": "p_tuning", "learning_rate": 1e-2, "num_virtual_tokens": 4},
    "p_tuning_lstm": {"kind": "p_tuning", "learning_rate": 1e-2, "num_virtual_tokens": 4,
                      "encoder_reparameterization_type": "LSTM", "encoder_hidden_size": 16, "encoder_num_layers": 2},
    "prefix": {"kind": "prefix_tuning", "learning_rate": 3e-2, "num_virtual_tokens": 4},
    "prefix_projection": {"kind": "prefix_tuning", "learning_rate": 1e-2, "num_virtual_tokens": 3,
                          "prefix_projection": True, "encoder_hidden_size": 24},
}
PEFT_MADE = {"dora": ("dora", {}), "adalora": ("adalora", {}), "vera": ("vera", {}),
             "p_tuning": ("p_tuning", {"num_virtual_tokens": 6}), "prefix": ("prefix_tuning", {"num_virtual_tokens": 5})}


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


@pytest.fixture(scope="module")
def base():
    from support import build_tiny_llama

    model = build_tiny_llama()
    with torch.no_grad():  # sharper logits: a few steps move the eval loss visibly (as test_trainer)
        model.lm_head.weight.mul_(30)
    return model


def config(name: str, **overrides) -> TrainingConfig:
    return TrainingConfig(**{"batch_size": 4, "max_seq_len": 64, "eval_fraction": 0.25, "seed": 3,
                             **VARIANTS[name], **overrides})


def served_logits(runtime, slot: int, ids: list[int]) -> torch.Tensor:
    """Last-position logits of ``ids`` through the gateway's paged runner (every kind, prefixes included)."""
    runner = make_runner(runtime)
    entries = virtual_entries(runner.virtual_tokens(slot)) + ids
    return runner.forward([StepItem(slot, entries, 0, list(range(16)), want_logits=True)])[-1]


@pytest.mark.parametrize("name", list(PEFT_MADE))
def test_trainable_forward_matches_peft(base, name, tmp_path):
    kind, overrides = PEFT_MADE[name]
    reference = make_peft_adapter(base, kind, tmp_path / name, **overrides)
    runtime = make_runtime(base)
    adapter = trainable_from_weights(load(runtime, tmp_path / name), runtime.device).eval()
    ids = torch.tensor([[5, 17, 42, 99, 150, 7, 33]])
    with torch.no_grad():
        ours, _ = adapter_forward(runtime, adapter, ids, torch.ones_like(ids))
        ref = reference(input_ids=ids).logits
    assert ours.shape == ref.shape
    assert rel_err(ours, ref) < 1e-5


@pytest.mark.parametrize("name,peft_kind,overrides", [
    ("p_tuning", "p_tuning", {"num_virtual_tokens": 4, "encoder_hidden_size": 16}),
    ("p_tuning_lstm", "p_tuning", {"num_virtual_tokens": 4, "encoder_hidden_size": 16,
                                   "encoder_reparameterization_type": "LSTM", "encoder_num_layers": 2}),
    ("prefix_projection", "prefix_tuning", {"num_virtual_tokens": 3, "prefix_projection": True,
                                            "encoder_hidden_size": 24}),
])
def test_encoders_match_peft_in_training_mode(base, tiny_tokenizer, name, peft_kind, overrides):
    """The trainable encoders have PEFT's layout: PEFT's encoder weights copied in by name give
    the same training-mode logits (so gradients flow through the same function)."""
    from peft import get_peft_model

    peft_model = get_peft_model(copy.deepcopy(base), peft_config(peft_kind, **overrides))
    runtime = make_runtime(base)
    cfg = config(name, encoder_hidden_size=16) if name != "prefix_projection" else config(name)
    adapter = build_trainable(cfg, runtime, tiny_tokenizer)
    encoder = peft_model.prompt_encoder["default"]
    missing = adapter.load_state_dict(encoder.state_dict(), strict=True)
    assert not missing.missing_keys and not missing.unexpected_keys
    ids = torch.tensor([[5, 17, 42, 99, 150, 7, 33]])
    with torch.no_grad():
        ours, _ = adapter_forward(runtime, adapter.eval(), ids, torch.ones_like(ids))
        ref = peft_model.eval()(input_ids=ids).logits
    assert rel_err(ours[:, -ids.shape[1]:], ref[:, -ids.shape[1]:]) < 1e-5


def test_adalora_allocator_follows_peft_step_by_step(base, tiny_tokenizer):
    """Same init, data and AdamW: after every step our A / E / B and rank pattern equal those of
    PEFT's AdaLoraModel driven by ``update_and_allocate`` (budget schedule, masking, final mask,
    orthogonal regularization in the loss)."""
    from peft import get_peft_model

    schedule = {"init_r": 4, "target_r": 2, "tinit": 1, "tfinal": 2, "deltaT": 2, "beta1": 0.85, "beta2": 0.85,
                "orth_reg_weight": 0.5}
    total = 8
    targets = ["q_proj", "v_proj", "down_proj"]
    peft_model = get_peft_model(copy.deepcopy(base), peft_config(
        "adalora", **schedule, total_step=total, lora_alpha=8, lora_dropout=0.0, target_modules=targets,
        task_type="CAUSAL_LM"))  # PeftModelForCausalLM: its forward adds the orthogonal regularization
    runtime = make_runtime(base)
    shapes = {n: s for n, s in runtime.base_info.linear_shapes.items() if n.rsplit(".", 1)[-1] in targets}
    ours = TrainableAdaLora(shapes, {n: 4 for n in shapes}, schedule, 8.0, 0.0, total, 0, runtime.device)
    theirs = {}
    with torch.no_grad():
        for name in shapes:
            layer = peft_model.base_model.model.get_submodule(name)
            key = name.replace(".", "-")
            for mine, part in ((ours.A, "lora_A"), (ours.E, "lora_E"), (ours.B, "lora_B")):
                getattr(layer, part)["default"].normal_(0, 0.3)  # E nonzero: every part gets gradients
                mine[key].copy_(getattr(layer, part)["default"])
            theirs[name] = layer
    cfg = config("adalora", eval_fraction=0.0)
    prepared = prepare_dataset(dataset_bytes(8), tiny_tokenizer, cfg)
    from adapters.training.trainer import collate

    ids, labels, mask = collate(prepared.train[:4], 0, runtime.device)
    opt_ours = torch.optim.AdamW(ours.parameters(), lr=0.05)
    opt_theirs = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=0.05)
    for step in range(total):
        logits, _ = adapter_forward(runtime, ours.train(), ids, mask, labels)
        loss_sum, count = causal_lm_loss_sum(logits, labels)
        (loss_sum / count + ours.regularization()).backward()
        opt_ours.step()
        ours.after_optimizer_step(step, total)
        opt_ours.zero_grad()
        peft_model.train()(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
        opt_theirs.step()
        peft_model.base_model.update_and_allocate(step)
        opt_theirs.zero_grad()
        for name, layer in theirs.items():
            key = name.replace(".", "-")
            for mine, part in ((ours.A, "lora_A"), (ours.E, "lora_E"), (ours.B, "lora_B")):
                assert torch.allclose(mine[key].detach(), getattr(layer, part)["default"].detach(), atol=1e-5,
                                      rtol=1e-4), (step, name, part)
    pattern = peft_model.peft_config["default"].rank_pattern
    assert pattern is not None and ours.rank_pattern is not None
    assert {k.replace(".default", ""): v for k, v in pattern.items()} == {
        f"{n}.lora_E": mask for n, mask in ours.rank_pattern.items()}
    assert sum(sum(m) for m in ours.rank_pattern.values()) == 2 * len(shapes)  # the target budget


def test_prefix_tuning_with_a_projection_defaults_to_a_smaller_learning_rate():
    """Through the MLP every weight moves every prefix entry: the default of plain prefix tuning
    (1e-2) made both PEFT's loop and ours diverge on the strict-format benchmark (loss 1.05 -> 7.1
    in three steps); 1e-3 does not. A job that sets its own rate keeps it; so does the OpenAI
    API's multiplier, applied to the default of the adapter's settings."""
    from gateway.fine_tuning.plan import FineTuningJobCreate, plan_job

    assert TrainingConfig(kind="prefix_tuning").lr == 1e-2
    assert TrainingConfig(kind="prefix_tuning", prefix_projection=True).lr == 1e-3
    assert TrainingConfig(kind="prefix_tuning", prefix_projection=True, learning_rate=5e-3).lr == 5e-3
    assert TrainingConfig(kind="lora").lr == 2e-4
    body = FineTuningJobCreate(model="base", training_file="file-1", adapter={
        "kind": "prefix_tuning", "prefix_projection": True}, method={
        "type": "supervised", "supervised": {"hyperparameters": {"learning_rate_multiplier": 2}}})
    assert plan_job(body).config.lr == pytest.approx(2e-3)


@pytest.mark.parametrize("name", ["dora", "adalora", "vera", "p_tuning", "p_tuning_lstm", "prefix",
                                  "prefix_projection"])
def test_training_steps_follow_peft_own_loop(base, tiny_tokenizer, name):
    """Our run and PEFT's own training loop (``get_peft_model``, HF's loss from ``labels``, AdamW,
    the same schedule and clipping; AdaLoRA's ``update_and_allocate``), started from the same
    weights and fed the same batches, report the same training loss step after step. The step
    benchmark (``loadtest.train_step_bench``) runs exactly this pairing on the real base."""
    from peft import get_peft_model

    from loadtest.train_bench import peft_config_for
    from loadtest.train_step_bench import PeftLoop, copy_peft_init
    from adapters.training.trainer import micro_batch_indices

    steps = 6
    cfg = config(name, max_steps=steps, eval_fraction=0.0, lr_schedule="linear", warmup_steps=1)
    prepared = prepare_dataset(dataset_bytes(16), tiny_tokenizer, cfg)
    runtime = make_runtime(base)
    run = TrainingRun(runtime, tiny_tokenizer, cfg, prepared.train, [])
    torch.manual_seed(0)
    peft_model = get_peft_model(copy.deepcopy(base), peft_config_for(cfg.kind.value, cfg, "llama", steps))
    copy_peft_init(run, peft_model, cfg.kind.value, runtime.base_info, torch.float32)
    loop = PeftLoop(peft_model, cfg, cfg.kind.value, steps, 0, runtime.device)
    for step in range(steps):
        run.micro_step()
        theirs, _ = loop.train_step([prepared.train[i] for i in micro_batch_indices(cfg, len(prepared.train), step)])
        ours = run.progress.train_loss[-1][1]
        assert ours == pytest.approx(theirs, rel=1e-3), (step, ours, theirs)
    assert run.progress.train_loss[-1][1] < 0.98 * run.progress.train_loss[0][1]  # the run moved


@pytest.mark.parametrize("name", list(VARIANTS))
def test_a_short_run_lowers_eval_loss_and_exports_what_peft_loads(base, name, tiny_tokenizer, tmp_path):
    from peft import PeftModel

    runtime = make_runtime(base)
    cfg = config(name, max_steps=10, lr_schedule="constant")
    prepared = prepare_dataset(dataset_bytes(), tiny_tokenizer, cfg)
    run = TrainingRun(runtime, tiny_tokenizer, cfg, prepared.train, prepared.eval)
    run_to_end(run)
    p = run.progress
    assert p.step == 10 and p.eval_loss_after < 0.95 * p.eval_loss_before, (p.eval_loss_before, p.eval_loss_after)
    run.export(tmp_path / "out")
    saved = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert saved["peft_type"] == {"dora": "LORA", "adalora": "ADALORA", "vera": "VERA", "p_tuning": "P_TUNING",
                                  "prefix_tuning": "PREFIX_TUNING"}[cfg.kind.value]

    weights = load(runtime, tmp_path / "out")
    assert weights.kind is cfg.kind
    runtime.kv_prefixes = True  # served by the paged runner, which places prefix keys and values
    slot = runtime.install(weights)
    reference = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "out").eval()
    for seed in (1, 2):
        ids = prompt_ids(9, seed=seed)
        with torch.no_grad():
            expected = reference(input_ids=torch.tensor([ids])).logits[0, -1]
        assert rel_err(served_logits(runtime, slot, ids), expected) <= TOL
        assert rel_err(expected, base(input_ids=torch.tensor([ids])).logits[0, -1]) > 1e-3  # it learned something
    if cfg.kind is AdapterKind.ADALORA:  # pruned to the target budget, as PEFT's resize at save
        assert sum(m.a.shape[0] for m in weights.modules.values()) == 2 * len(weights.modules)
    if cfg.kind is AdapterKind.VERA:
        assert ("base_model.vera_A" in weights.shared) is False and set(weights.shared) == {"vera_A", "vera_B"}


def test_resume_of_adalora_restores_the_allocator(base, tiny_tokenizer, tmp_path):
    cfg = config("adalora", max_steps=8, checkpoint_every=3)
    prepared = prepare_dataset(dataset_bytes(), tiny_tokenizer, cfg)
    runtime = make_runtime(base)
    whole = TrainingRun(runtime, tiny_tokenizer, cfg, prepared.train, prepared.eval, tmp_path / "a")
    run_to_end(whole)
    first = TrainingRun(runtime, tiny_tokenizer, cfg, prepared.train, prepared.eval, tmp_path / "b")
    while first.progress.step < 4:
        first.micro_step()
    first.close()
    second = TrainingRun(runtime, tiny_tokenizer, cfg, prepared.train, prepared.eval, tmp_path / "b")
    assert second.resume() and second.progress.step == 3
    run_to_end(second)
    assert second.adapter.rank_pattern == whole.adapter.rank_pattern
    for (name, p), (_, q) in zip(whole.adapter.named_parameters(), second.adapter.named_parameters(), strict=True):
        assert torch.allclose(p, q, atol=1e-6), name


# ---- through the jobs API ------------------------------------------------------------------------

@pytest.fixture
def client(tmp_path):
    with make_client(tmp_path) as c:
        yield c


@pytest.mark.parametrize("kind,extra", [("vera", {"r": 16}), ("prefix_tuning", {"num_virtual_tokens": 3})])
def test_job_trains_registers_and_serves_a_new_kind(client, kind, extra):
    response = submit(client, jsonl(rows()), kind=kind, adapter_id=f"fox-{kind}".replace("_", "-"), max_steps=3,
                      batch_size=4, eval_fraction=0.25, learning_rate=0.05, **extra)
    assert response.status_code == 201, response.text
    job = wait_for(client, response.json()["id"], lambda j: j["state"] in ("succeeded", "failed", "cancelled"))
    assert job["state"] == "succeeded", job
    listed = client.get(f"/admin/adapters/{job['adapter_id']}", headers={"Authorization": "Bearer " + "k" * 24})
    assert listed.status_code == 200 and listed.json()["kind"] == kind, listed.text
    reply = client.post("/v1/chat/completions", json={"model": job["adapter_id"], "max_tokens": 3,
                                                       "messages": [{"role": "user", "content": "hello world"}]})
    assert reply.status_code == 200, reply.text


@pytest.mark.parametrize("config_fields,param,words", [
    ({"kind": "adalora", "init_r": 4, "target_r": 4}, "config", "target_r (4) must be below init_r"),
    ({"kind": "adalora", "init_r": 300}, "config", "init_r 300 is above"),
    ({"kind": "adalora", "tinit": 5, "tfinal": 5, "max_steps": 8}, "config", "leaves no budgeting phase"),
    # 7 training examples, 3 epochs of 2 steps: 6 steps, and 3 >= 6 - 3
    ({"kind": "adalora", "tinit": 3, "tfinal": 3}, "config", "leaves no budgeting phase"),
    ({"kind": "adalora", "beta1": 1.0}, "config.beta1", "less than 1"),
    ({"kind": "adalora", "deltaT": 0}, "config.deltaT", "greater than or equal to 1"),
    ({"kind": "vera", "r": 300}, "config", "r 300 is above"),
    ({"kind": "vera", "use_rslora": True}, "config", "use_rslora do(es) not apply to kind 'vera'"),
    ({"kind": "lora", "projection_prng_key": 3}, "config", "applies to: vera"),
    ({"kind": "dora", "num_virtual_tokens": 3}, "config", "num_virtual_tokens do(es) not apply"),
    ({"kind": "p_tuning", "encoder_reparameterization_type": "GRU"}, "config.encoder_reparameterization_type",
     "'MLP' or 'LSTM'"),
    ({"kind": "p_tuning", "encoder_num_layers": 3}, "config", "apply to the LSTM prompt encoder only"),
    ({"kind": "p_tuning", "num_virtual_tokens": 600}, "config", "max_virtual_tokens"),
    ({"kind": "prefix_tuning", "encoder_hidden_size": 8}, "config", "with prefix_projection: true only"),
    ({"kind": "prefix_tuning", "prompt_init_text": "hi"}, "config", "prompt_init_text do(es) not apply"),
    ({"kind": "lora", "optimizer": "paged_adamw"}, "config", "needs a CUDA device"),
    ({"kind": "lora", "optimizer": "sgd"}, "config.optimizer", "'adamw' or 'paged_adamw'"),
])
def test_bad_hyperparameters_get_clear_400s(client, config_fields, param, words):
    response = submit(client, jsonl(rows()), **config_fields)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and words in error["message"], error
    assert client.get("/admin/training-jobs", headers={"Authorization": "Bearer " + "k" * 24}).json()["data"] == []
