"""lm-evaluation-harness against the real server: a local multiple-choice task (24 questions
shipped in ``lm_eval_tasks/``, no hub, no network) run through lm-eval's ``local-completions``
model on SmolLM2 NF4, for the base and for a LoRA uploaded through the admin API. The same task
scored here from PEFT's own logits (each choice's log-likelihood on the same NF4 base) must give
the same per-choice log-likelihoods, the same chosen answer for every question, and so the same
accuracy."""

from __future__ import annotations

import gc
import json
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
import torch

from gateway.base_model import load_base
from gateway.settings import Settings

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
TASK_DIR = REPO / "tests" / "integration" / "lm_eval_tasks"
QUESTIONS = TASK_DIR / "mc_questions.jsonl"
TASK = "gateway_mc"
ADMIN_KEY = "lm-eval-admin-key-0123456789abcdef"
ADAPTER = "lora-mc"
# The task's prompt and the separator lm-eval puts between it and a choice (its default
# ``target_delimiter``), as gateway_mc.yaml declares them.
PROMPT = "Question: {question}\nAnswer:"
DELIMITER = " "


@dataclass
class Reference:
    """PEFT's log-likelihood of every choice of every question, per model name."""

    base_name: str
    adapter_dir: Path
    loglik: dict[str, list[list[float]]] = field(default_factory=dict)


def load_questions() -> list[dict]:
    return [json.loads(line) for line in QUESTIONS.read_text().splitlines() if line.strip()]


def choice_logliks(model, tokenizer, question: dict) -> list[float]:
    """Sum of log p(continuation token | everything before it) for each choice: the context and
    the context+choice are tokenized whole and the continuation is what the second adds (what
    lm-eval does for causal models). The choices go in one right-padded batch: padding after a
    row's last token changes none of that row's logits."""
    context = PROMPT.format(question=question["question"])
    context_ids = tokenizer(context, add_special_tokens=False).input_ids
    wholes = [tokenizer(context + DELIMITER + c, add_special_tokens=False).input_ids for c in question["choices"]]
    for whole in wholes:
        assert whole[:len(context_ids)] == context_ids, "the context must tokenize the same inside the whole"
    width = max(map(len, wholes))
    ids = torch.tensor([w + [0] * (width - len(w)) for w in wholes])
    mask = torch.tensor([[1] * len(w) + [0] * (width - len(w)) for w in wholes])
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits.float()
    logprobs = torch.log_softmax(logits[:, :-1], dim=-1)  # position t predicts token t+1
    token_lp = logprobs.gather(2, ids[:, 1:, None])[..., 0]
    return [float(token_lp[row, len(context_ids) - 1:len(whole) - 1].sum()) for row, whole in enumerate(wholes)]


def argmax(values: list[float]) -> int:
    return max(range(len(values)), key=values.__getitem__)


@pytest.fixture(scope="module")
def reference(smollm2_dir: Path, tmp_path_factory) -> Reference:
    from peft import LoraConfig, get_peft_model

    root = tmp_path_factory.mktemp("lm-eval-smollm2")
    base = load_base(Settings(model=str(smollm2_dir), data_dir=root / "data", device="cpu"))
    questions = load_questions()
    ref = Reference(base.name, root / ADAPTER)
    ref.loglik[base.name] = [choice_logliks(base.model, base.tokenizer, q) for q in questions]
    torch.manual_seed(4321)
    model = get_peft_model(base.model, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear",
                                                  task_type="CAUSAL_LM"))
    with torch.no_grad():
        for param in (p for p in model.parameters() if p.requires_grad):
            param.copy_(torch.randn_like(param) * 0.04)
    model.eval()
    model.save_pretrained(ref.adapter_dir)
    ref.loglik[ADAPTER] = [choice_logliks(model, base.tokenizer, q) for q in questions]
    del model, base
    gc.collect()
    # the comparison must have teeth: the adapter changes some answers, and no question is a
    # near tie that rounding alone could flip
    base_choices = [argmax(x) for x in ref.loglik[ref.base_name]]
    adapter_choices = [argmax(x) for x in ref.loglik[ADAPTER]]
    assert base_choices != adapter_choices, "the adapter must change at least one answer"
    for name, rows in ref.loglik.items():
        for i, row in enumerate(rows):
            top = sorted(row, reverse=True)
            assert top[0] - top[1] > 1e-2, (name, i, row)
    return ref


@pytest.fixture(scope="module")
def server(reference: Reference, smollm2_dir: Path, tmp_path_factory, launch_server):
    data_dir = tmp_path_factory.mktemp("lm-eval-data")
    server = launch_server(["--model", str(smollm2_dir), "--data-dir", str(data_dir), "--device", "cpu"],
                           env={"GATEWAY_ADMIN_KEY": ADMIN_KEY})
    files = [("files", (p.name, p.read_bytes(), "application/octet-stream"))
             for p in sorted(reference.adapter_dir.iterdir()) if p.is_file()]
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=120) as http:
        response = http.post("/admin/adapters", data={"id": ADAPTER}, files=files)
    assert response.status_code == 201, response.text
    return server


@pytest.fixture(scope="module")
def offline_lm_eval(tmp_path_factory):
    """lm-eval with the hub unreachable by construction: ``datasets`` and ``huggingface_hub`` in
    offline mode, the dataset cache in a temporary folder, and the task's relative data path
    resolved from the repository root."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_DATASETS_OFFLINE", "1")
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setenv("HF_DATASETS_CACHE", str(tmp_path_factory.mktemp("hf-datasets")))
        mp.chdir(REPO)
        import datasets.config
        import lm_eval

        # the environment is read when ``datasets`` is first imported; it may already have been
        mp.setattr(datasets.config, "HF_DATASETS_OFFLINE", True)
        mp.setattr(datasets.config, "HF_HUB_OFFLINE", True, raising=False)
        yield lm_eval


def run_lm_eval(lm_eval, server, model: str, tokenizer_dir: Path) -> dict:
    from lm_eval.tasks import TaskManager

    results = lm_eval.simple_evaluate(
        model="local-completions",
        model_args={"base_url": f"{server.url}/v1/completions", "model": model,
                    # the served model's own tokenizer files (lm-eval counts context tokens
                    # with it); "huggingface" named so that nothing probes for a remote one
                    "tokenizer_backend": "huggingface", "tokenizer": str(tokenizer_dir),
                    "batch_size": 8, "max_retries": 1},
        tasks=[TASK], task_manager=TaskManager(include_path=str(TASK_DIR)), log_samples=True)
    return results


@pytest.mark.parametrize("which", ["base", "adapter"])
def test_lm_eval_accuracy_equals_peft(offline_lm_eval, server, reference: Reference, smollm2_dir: Path,
                                      which: str):
    model = reference.base_name if which == "base" else ADAPTER
    results = run_lm_eval(offline_lm_eval, server, model, smollm2_dir)
    samples = sorted(results["samples"][TASK], key=lambda s: s["doc_id"])
    expected = reference.loglik[model]
    assert len(samples) == len(expected) == len(load_questions())

    served = [[float(r[0]) for r in s["filtered_resps"]] for s in samples]
    for i, (got, want) in enumerate(zip(served, expected, strict=True)):
        assert got == pytest.approx(want, rel=1e-3, abs=1e-3), (model, i, got, want)
    assert [argmax(x) for x in served] == [argmax(x) for x in expected]

    targets = [q["answer"] for q in load_questions()]
    peft_accuracy = sum(argmax(x) == t for x, t in zip(expected, targets, strict=True)) / len(targets)
    assert results["results"][TASK]["acc,none"] == pytest.approx(peft_accuracy, abs=1e-12)
    print(f"{model}: lm-eval accuracy {results['results'][TASK]['acc,none']:.4f}, PEFT {peft_accuracy:.4f}")
