"""Preference training (DPO) through the gateway on a task with a clear right answer, beside TRL.

Task: each prompt asks to extract a person from a sentence; the preferred answer is exactly
``{"name": ..., "city": ..., "age": ...}``, the other the same facts in prose. Both answers are
built here, nothing is downloaded. In one run the benchmark:

1. starts a gateway (NF4 base), scores the base: the share of held-out prompts (people never seen
   in training) answered the preferred way, greedy, three ways from strict to loose: the answer is
   exactly a JSON object with the keys name, city and age; it opens with such an object (text may
   follow); it opens with a JSON object of any keys (the contrast the pairs teach: JSON, not prose);
2. trains one adapter per kind with DPO through ``POST /admin/training-jobs`` (objective ``dpo``,
   the reference is the frozen base) and scores each served adapter the same way, with its
   training tokens/s and its final held-out reward margin and preference accuracy;
3. stops the gateway and trains the same data with TRL's ``DPOTrainer`` (``loss_type="sigmoid"``, or
   ``["sigmoid", "sft"]`` weighted ``[1, --sft-weight]`` when the runs add the SFT term,
   a PEFT adapter of the same kind and settings, the same NF4 base, steps, batch size, learning
   rate, schedule, beta and clipping), scores it the same way, and reports its preference rate
   and tokens/s beside ours (ratios within this run).

Usage (smoke): python -m loadtest.dpo_bench --train 16 --test 4 --max-steps 2 --kinds lora
Full run:      python -m loadtest.dpo_bench
Prints JSON and writes it (and a PNG when matplotlib is installed) next to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import secrets
import sys
import tempfile
import time
from pathlib import Path

import httpx

from loadtest.server import running_gateway, stop_servers_on_sigterm
from loadtest.train_bench import CITIES, INSTRUCTION, KIND_CONFIG, NAMES, TEMPLATES, peft_config_for, submit_job, wait_job

log = logging.getLogger("dpo_bench")
KEYS = {"name", "city", "age"}
MAX_ANSWER_TOKENS = 48


def make_task(n_train: int, n_test: int, seed: int = 0) -> tuple[list[dict], list[str]]:
    """Preference records (OpenAI's format) and held-out prompts about people never seen in training."""
    rng = random.Random(seed)
    people = [(n, c) for n in NAMES for c in CITIES]
    rng.shuffle(people)
    test_people, train_people = people[:n_test], people[n_test:]

    def prompt(name: str, city: str, age: int) -> str:
        return INSTRUCTION + rng.choice(TEMPLATES).format(name=name, city=city, age=age)

    records = []
    for i in range(n_train):
        name, city = train_people[i % len(train_people)]
        age = rng.randint(18, 90)
        records.append({
            "input": {"messages": [{"role": "user", "content": prompt(name, city, age)}]},
            "preferred_output": [{"role": "assistant", "content": json.dumps({"name": name, "city": city, "age": age})}],
            "non_preferred_output": [{"role": "assistant", "content": f"{name} is {age} years old and lives in {city}."}],
        })
    return records, [prompt(n, c, rng.randint(18, 90)) for n, c in test_people]


def _person(value) -> bool:
    return isinstance(value, dict) and set(value) == KEYS


def preferred_way(answer: str) -> bool:
    """The answer is the JSON object, nothing else."""
    try:
        return _person(json.loads(answer.strip()))
    except ValueError:
        return False


def _leading_value(answer: str):
    """The JSON value the answer opens with (whatever follows it), or None."""
    try:
        return json.JSONDecoder().raw_decode(answer.strip())[0]
    except ValueError:
        return None


def leads_with_object(answer: str) -> bool:
    """The answer opens with the JSON object of exactly those keys, text may follow it."""
    return _person(_leading_value(answer))


def opens_with_json_object(answer: str) -> bool:
    """The answer opens with a JSON object of any keys: the contrast DPO's pairs teach (JSON
    against prose); the exact keys and the stop after the object are what they share."""
    return isinstance(_leading_value(answer), dict)


def score(answers: list[str]) -> dict:
    def rate(test) -> float:
        return round(sum(map(test, answers)) / len(answers), 4)

    return {"preference_rate": rate(preferred_way), "leads_with_object_rate": rate(leads_with_object),
            "json_object_rate": rate(opens_with_json_object), "n": len(answers), "answers": answers}


def gateway_answers(client: httpx.Client, model: str, prompts: list[str]) -> list[str]:
    answers = []
    for prompt in prompts:
        response = client.post("/v1/chat/completions", json={
            "model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": MAX_ANSWER_TOKENS,
            "temperature": 0})
        response.raise_for_status()
        answers.append(response.json()["choices"][0]["message"]["content"])
    return answers


def dpo_config(kind: str, args: argparse.Namespace, **extra) -> dict:
    """The supervised task's settings of ``kind`` with its learning rate times ``--lr-scale``: at
    the supervised rates DPO drives the margin up until the answers degenerate (names and keys
    turn to noise), the likelihood of the preferred answer falling with that of the other."""
    settings = dict(KIND_CONFIG[kind])
    settings["learning_rate"] *= args.lr_scale
    return {"kind": kind, "objective": "dpo", "beta": args.beta, "sft_weight": args.sft_weight,
            "max_steps": args.max_steps, "batch_size": args.batch_size, "eval_fraction": 0.1, "seed": args.seed,
            "max_seq_len": 256, "checkpoint_every": 10_000, **settings, **extra}


def gateway_phase(args: argparse.Namespace, model_dir: Path, work: Path, data: bytes, test: list[str]) -> dict:
    admin_key = secrets.token_hex(16)
    env = {"GATEWAY_MODEL": str(model_dir), "GATEWAY_SERVED_MODEL_NAME": "base", "GATEWAY_DEVICE": args.device,
           "GATEWAY_DATA_DIR": str(work / "data"), "GATEWAY_ADMIN_KEY": admin_key}
    result: dict = {"kinds": {}}
    with running_gateway(env, work / "gateway.log") as url, \
            httpx.Client(base_url=url, timeout=600) as client, \
            httpx.Client(base_url=url, timeout=600, headers={"Authorization": f"Bearer {admin_key}"}) as admin:
        result["base"] = score(gateway_answers(client, "base", test))
        for kind in args.kinds:
            started = time.perf_counter()
            job_id = submit_job(admin, data, dpo_config(kind, args, adapter_id=f"dpo-{kind}"))
            job = wait_job(admin, job_id, lambda j: j["state"] == "succeeded")
            p = job["progress"]
            final = p["eval_metrics"][-1][1] if p["eval_metrics"] else {}
            result["kinds"][kind] = {
                "job_seconds": round(time.perf_counter() - started, 1), "steps": p["step"],
                "tokens_per_second": p["tokens_per_second"], "eval_loss_before": p["eval_loss_before"],
                "eval_loss_after": p["eval_loss_after"], "eval_reward_margin": final.get("reward_margin"),
                "eval_preference_accuracy": final.get("preference_accuracy"),
                **score(gateway_answers(client, job["adapter_id"], test))}
            log.info("%s: %s", kind, result["kinds"][kind])
    return result


def trl_reference(args: argparse.Namespace, model_dir: Path, kind: str, records: list[dict], test: list[str],
                  work: Path) -> dict:
    """The same pairs trained with TRL's DPOTrainer on the same NF4 base, scored the same way."""
    import torch
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    from adapters.training.config import TrainingConfig
    from gateway.base_model import load_base
    from gateway.settings import Settings

    base = load_base(Settings(model=str(model_dir), device=args.device, data_dir=model_dir.parent))
    cfg = TrainingConfig.model_validate(dpo_config(kind, args))
    rows = [{"prompt": r["input"]["messages"], "chosen": r["preferred_output"],
             "rejected": r["non_preferred_output"]} for r in records]
    losses = ({"loss_type": ["sigmoid", "sft"], "loss_weights": [1.0, cfg.sft_weight]} if cfg.sft_weight
              else {"loss_type": ["sigmoid"]})
    config = DPOConfig(output_dir=str(work / f"trl-{kind}"), beta=cfg.beta, **losses, max_steps=cfg.max_steps,
                       per_device_train_batch_size=cfg.batch_size, learning_rate=cfg.lr, lr_scheduler_type="linear",
                       warmup_steps=0, weight_decay=cfg.weight_decay, max_grad_norm=cfg.max_grad_norm, seed=cfg.seed,
                       report_to="none", save_strategy="no", logging_steps=1, use_cpu=args.device == "cpu",
                       bf16=False, fp16=False, max_length=cfg.max_seq_len)
    trainer = DPOTrainer(model=base.model, args=config, train_dataset=Dataset.from_list(rows),
                         processing_class=base.tokenizer,
                         peft_config=peft_config_for(kind, cfg, base.model.config.model_type, cfg.max_steps))
    output = trainer.train()
    seconds = output.metrics["train_runtime"]
    tokens = getattr(trainer, "_total_train_tokens", 0)
    model = trainer.model.eval()
    answers = []
    with torch.no_grad():
        for prompt in test:
            text = base.tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                                      tokenize=False)
            ids = torch.tensor([base.tokenizer.encode(text, add_special_tokens=False)], device=base.device)
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=MAX_ANSWER_TOKENS,
                                 do_sample=False, pad_token_id=base.tokenizer.pad_token_id or base.tokenizer.eos_token_id)
            answers.append(base.tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True))
    return {"tokens_per_second": round(tokens / seconds, 2) if seconds else None, "train_seconds": round(seconds, 1),
            **score(answers)}


def compare(result: dict) -> None:
    for kind, ours in result["kinds"].items():
        ref = result["trl_reference"].get(kind)
        if ref and ref.get("tokens_per_second"):
            ours["tokens_per_second_ratio_vs_trl"] = round(ours["tokens_per_second"] / ref["tokens_per_second"], 3)
            ours["preference_rate_minus_trl"] = round(ours["preference_rate"] - ref["preference_rate"], 4)


def plot(result: dict, path: Path) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(8, 4))
    names = ["base", *(f"ours {k}" for k in result["kinds"]), *(f"TRL {k}" for k in result["trl_reference"])]
    rates = [result["base"]["preference_rate"], *(k["preference_rate"] for k in result["kinds"].values()),
             *(k["preference_rate"] for k in result["trl_reference"].values())]
    ax.bar(names, rates)
    ax.set_ylim(0, 1)
    ax.set_title("held-out prompts answered the preferred way (JSON)")
    fig.tight_layout()
    fig.savefig(path)
    return str(path)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", type=Path, help="safetensors model folder (default: the embedded SmolLM2, "
                        "materialized into --cache-dir)")
    parser.add_argument("--cache-dir", type=Path, default=Path("data"))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--kinds", nargs="+", default=["lora", "ia3", "prompt_tuning"], choices=list(KIND_CONFIG),
                        help="kinds to train (any of: %(choices)s)")
    parser.add_argument("--train", type=int, default=256, help="preference pairs (10%% held out for eval metrics)")
    parser.add_argument("--test", type=int, default=50, help="held-out prompts scored")
    parser.add_argument("--max-steps", type=int, default=60)
    parser.add_argument("--batch-size", type=int, default=8, help="pairs per step")
    parser.add_argument("--beta", type=float, default=0.1)
    parser.add_argument("--sft-weight", type=float, default=0.0,
                        help="RPO: weight of the preferred answers' NLL added to the DPO loss (both sides)")
    parser.add_argument("--lr-scale", type=float, default=0.2,
                        help="times the supervised task's learning rate of each kind (both sides)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-reference", action="store_true", help="skip the TRL reference runs")
    parser.add_argument("--out", type=Path, default=Path("loadtest/results/dpo_bench.json"))
    args = parser.parse_args(argv)
    stop_servers_on_sigterm()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)

    if args.model_dir is None:
        from gateway.base_model import materialize_embedded

        args.model_dir = materialize_embedded(args.cache_dir)
    records, test = make_task(args.train, args.test, args.seed)
    data = "\n".join(json.dumps(r) for r in records).encode()
    with tempfile.TemporaryDirectory(prefix="dpo-bench-") as tmp:
        result = {"args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                  **gateway_phase(args, args.model_dir, Path(tmp), data, test)}
        result["trl_reference"] = {}
        for kind in [] if args.no_reference else args.kinds:
            result["trl_reference"][kind] = trl_reference(args, args.model_dir, kind, records, test, Path(tmp))
            log.info("TRL %s: %s", kind, result["trl_reference"][kind])  # a long run shows each as it ends
    compare(result)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    result["plot"] = plot(result, args.out.with_suffix(".png"))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
