"""Train adapters through the gateway's jobs API on a strict-format task and check them.

Task: each prompt is a sentence about a person; the answer is exactly
``{"name": "<name>", "city": "<city>", "age": <age>}``, a JSON shape the base model never writes
unprompted. For each kind the benchmark, in one run:

1. starts a gateway (NF4 base), measures serving latency p50 while idle;
2. trains one adapter per kind through ``POST /admin/training-jobs`` and scores exact match of
   the served adapter (greedy) on held-out prompts, the base model alongside;
3. measures serving latency p50 while a training job runs (target: at most 1.5x idle);
4. stops the gateway and trains the same kinds with PEFT (``get_peft_model`` and a plain loop)
   on the same NF4 base, data, order and hyperparameters, and scores PEFT's adapter the same way
   (held-out exact match, greedy): exact match, eval loss (ours within 5%) and training tokens/s
   (ours at least 0.9x) side by side, ratios within this run (a markdown table is printed last).
   The load average at the start and end is stored: on a shared machine the tokens/s of the two
   phases, which run one after the other, swing with it.

Usage (smoke): python -m loadtest.train_bench --train 16 --test 4 --max-steps 2 --latency-requests 3
Full run:      python -m loadtest.train_bench
Prints JSON and writes it (and a PNG when matplotlib is installed) next to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import secrets
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

from loadtest.server import running_gateway, stop_servers_on_sigterm

log = logging.getLogger("train_bench")
NAMES = ["Alice", "Bruno", "Chen", "Dana", "Emeka", "Farah", "Goran", "Hana", "Ivan", "Julia", "Kofi", "Lena",
         "Mateo", "Nadia", "Omar", "Priya", "Quinn", "Rosa", "Sven", "Tara", "Umar", "Vera", "Wei", "Yara", "Zoe"]
CITIES = ["Paris", "Lagos", "Lima", "Oslo", "Cairo", "Seoul", "Quito", "Perth", "Dublin", "Hanoi", "Austin", "Porto",
          "Kyoto", "Accra", "Bergen", "Tunis", "Denver", "Leeds", "Malmo", "Cusco"]
TEMPLATES = ["{name} is {age} years old and lives in {city}.", "My neighbour {name}, aged {age}, moved to {city}.",
             "In {city} I met {name}, who just turned {age}.", "{name} ({age}) works in {city}.",
             "Last year {name} celebrated a {age}th birthday in {city}."]
INSTRUCTION = "Extract the person as JSON: "
KIND_CONFIG = {  # per-kind hyperparameters for this task (shared by our run and the PEFT reference)
    "lora": {"r": 8, "lora_alpha": 16, "lora_dropout": 0.05, "learning_rate": 1e-3},
    "ia3": {"learning_rate": 3e-2},
    "prompt_tuning": {"num_virtual_tokens": 16, "learning_rate": 3e-2},
    "dora": {"r": 8, "lora_alpha": 16, "lora_dropout": 0.05, "learning_rate": 1e-3},
    "adalora": {"init_r": 12, "target_r": 8, "lora_alpha": 16, "lora_dropout": 0.05, "learning_rate": 2e-3,
                "tinit": 2, "tfinal": 2, "deltaT": 2},
    "vera": {"r": 256, "learning_rate": 1e-2},
    "p_tuning": {"num_virtual_tokens": 16, "learning_rate": 1e-3},
    "prefix_tuning": {"num_virtual_tokens": 16, "prefix_projection": True, "learning_rate": 1e-3},
}


def make_task(n_train: int, n_test: int, seed: int = 0) -> tuple[list[dict], list[tuple[str, str]]]:
    """Training rows (prompt/completion) and held-out (prompt, expected answer) pairs; held-out
    people use name/city pairs never seen in training."""
    rng = random.Random(seed)
    pairs = [(n, c) for n in NAMES for c in CITIES]
    rng.shuffle(pairs)
    test_pairs, train_pairs = pairs[:n_test], pairs[n_test:]

    def example(name: str, city: str) -> tuple[str, str]:
        age = rng.randint(18, 90)
        prompt = INSTRUCTION + rng.choice(TEMPLATES).format(name=name, city=city, age=age)
        return prompt, json.dumps({"name": name, "city": city, "age": age})

    train = [dict(zip(("prompt", "completion"), example(*train_pairs[i % len(train_pairs)]))) for i in range(n_train)]
    return train, [example(*p) for p in test_pairs]


def chat(client: httpx.Client, model: str, prompt: str, max_tokens: int) -> tuple[str, float]:
    started = time.perf_counter()
    response = client.post("/v1/chat/completions", json={
        "model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
        "temperature": 0})
    response.raise_for_status()
    return response.json()["choices"][0]["message"]["content"], time.perf_counter() - started


def exact_match(client: httpx.Client, model: str, test: list[tuple[str, str]]) -> dict:
    hits, samples = 0, []
    for prompt, expected in test:
        answer, _ = chat(client, model, prompt, 48)
        hits += answer.strip() == expected
        if len(samples) < 3:
            samples.append({"expected": expected, "answer": answer})
    return {"exact_match": round(hits / len(test), 4), "n": len(test), "samples": samples}


def latency_p50(client: httpx.Client, prompts: list[str], requests: int, max_tokens: int) -> float:
    times = [chat(client, "base", prompts[i % len(prompts)], max_tokens)[1] for i in range(requests)]
    return statistics.median(times)


def submit_job(admin: httpx.Client, data: bytes, config: dict) -> str:
    response = admin.post("/admin/training-jobs", files={"dataset": ("task.jsonl", data)},
                          data={"config": json.dumps(config)})
    if response.status_code != 201:
        raise RuntimeError(f"job refused: {response.status_code} {response.text}")
    return response.json()["id"]


def wait_job(admin: httpx.Client, job_id: str, until, timeout: float = 7200) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = admin.get(f"/admin/training-jobs/{job_id}").json()
        if until(job):
            return job
        if job["state"] in ("failed", "cancelled"):
            raise RuntimeError(f"job {job_id} {job['state']}: {job.get('error')}")
        time.sleep(2.0)  # each poll is CPU the job's two threads lose on a small machine
    raise TimeoutError(f"job {job_id} did not finish")


def job_config(kind: str, args: argparse.Namespace, **extra) -> dict:
    return {"kind": kind, "max_steps": args.max_steps, "batch_size": args.batch_size, "eval_fraction": 0.1,
            "seed": args.seed, "max_seq_len": 256, "checkpoint_every": 10_000, **KIND_CONFIG[kind], **extra}


def gateway_phase(args: argparse.Namespace, model_dir: Path, work: Path, data: bytes, test) -> dict:
    admin_key = secrets.token_hex(16)
    env = {"GATEWAY_MODEL": str(model_dir), "GATEWAY_SERVED_MODEL_NAME": "base", "GATEWAY_DEVICE": args.device,
           "GATEWAY_DATA_DIR": str(work / "data"), "GATEWAY_ADMIN_KEY": admin_key,
           "GATEWAY_TRAINING_DUTY_CYCLE": str(args.duty_cycle)}
    result: dict = {"kinds": {}}
    with running_gateway(env, work / "gateway.log") as url, \
            httpx.Client(base_url=url, timeout=600) as client, \
            httpx.Client(base_url=url, timeout=600, headers={"Authorization": f"Bearer {admin_key}"}) as admin:
        prompts = [p for p, _ in test]
        result["latency_idle_p50_s"] = latency_p50(client, prompts, args.latency_requests, args.latency_max_tokens)
        result["base"] = exact_match(client, "base", test)
        for kind in args.kinds:
            started = time.perf_counter()
            job_id = submit_job(admin, data, job_config(kind, args, adapter_id=f"bench-{kind}"))
            job = wait_job(admin, job_id, lambda j: j["state"] == "succeeded")
            p = job["progress"]
            result["kinds"][kind] = {
                "job_seconds": round(time.perf_counter() - started, 1), "steps": p["step"],
                "eval_loss_before": p["eval_loss_before"], "eval_loss_after": p["eval_loss_after"],
                "tokens_per_second": p["tokens_per_second"], **exact_match(client, job["adapter_id"], test)}
            log.info("%s: %s", kind, result["kinds"][kind])
        # serving while a (long) job trains
        job_id = submit_job(admin, data, job_config("lora", args, max_steps=1_000_000, register=False))
        wait_job(admin, job_id, lambda j: j["state"] == "running" and j["progress"].get("step", 0) >= 1)
        result["latency_training_p50_s"] = latency_p50(client, prompts, args.latency_requests,
                                                       args.latency_max_tokens)
        admin.post(f"/admin/training-jobs/{job_id}/cancel")
    result["latency_ratio"] = round(result["latency_training_p50_s"] / result["latency_idle_p50_s"], 3)
    return result


def peft_config_for(kind: str, cfg, model_type: str, total_steps: int):
    """PEFT's config of ``kind`` with the job's hyperparameters (the reference trains the same thing)."""
    from peft import (
        AdaLoraConfig, IA3Config, LoraConfig, PrefixTuningConfig, PromptEncoderConfig, PromptTuningConfig, VeraConfig,
    )

    if kind in ("lora", "dora"):
        return LoraConfig(r=cfg.r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout, use_dora=kind == "dora",
                          target_modules="all-linear", task_type="CAUSAL_LM")
    if kind == "adalora":
        return AdaLoraConfig(init_r=cfg.init_r, target_r=cfg.target_r, tinit=cfg.tinit, tfinal=cfg.tfinal,
                             deltaT=cfg.deltaT, beta1=cfg.beta1, beta2=cfg.beta2, orth_reg_weight=cfg.orth_reg_weight,
                             total_step=total_steps, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                             target_modules="all-linear", task_type="CAUSAL_LM")
    if kind == "vera":
        return VeraConfig(r=cfg.r, projection_prng_key=cfg.projection_prng_key, d_initial=cfg.d_initial,
                          vera_dropout=cfg.vera_dropout, target_modules="all-linear", task_type="CAUSAL_LM")
    if kind == "ia3":
        targets, feedforward = cfg.ia3_targets(model_type)
        return IA3Config(target_modules=targets, feedforward_modules=feedforward, task_type="CAUSAL_LM")
    if kind == "p_tuning":
        return PromptEncoderConfig(num_virtual_tokens=cfg.num_virtual_tokens, encoder_hidden_size=cfg.encoder_hidden_size,
                                   encoder_reparameterization_type=cfg.encoder_reparameterization_type,
                                   task_type="CAUSAL_LM")
    if kind == "prefix_tuning":
        return PrefixTuningConfig(num_virtual_tokens=cfg.num_virtual_tokens, prefix_projection=cfg.prefix_projection,
                                  encoder_hidden_size=cfg.encoder_hidden_size, task_type="CAUSAL_LM")
    return PromptTuningConfig(num_virtual_tokens=cfg.num_virtual_tokens, prompt_tuning_init="SAMPLE_VOCAB",
                              task_type="CAUSAL_LM")


def generate_answers(model, tokenizer, prompts: list[str], max_tokens: int, device) -> list[str]:
    """Greedy answers of a PEFT (or plain transformers) model to chat prompts, rendered with the
    tokenizer's chat template as the gateway renders a chat request."""
    import torch

    answers = []
    with torch.no_grad():
        for prompt in prompts:
            text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                                 tokenize=False)
            ids = torch.tensor([tokenizer.encode(text, add_special_tokens=False)], device=device)
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens,
                                 do_sample=False, pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
            answers.append(tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True))
    return answers


def peft_reference(args: argparse.Namespace, model_dir: Path, kind: str, data: bytes,
                   test: list[tuple[str, str]]) -> dict:
    """The same data, split, order and hyperparameters trained with PEFT on the same NF4 base;
    scored as ours is (held-out exact match, greedy)."""
    import torch
    from peft import get_peft_model

    from adapters.training.config import TrainingConfig, learning_rate_at
    from adapters.training.prepare import prepare_dataset
    from adapters.training.trainer import causal_lm_loss_sum, collate, micro_batch_indices, total_micro_steps
    from gateway.base_model import load_base
    from gateway.settings import Settings

    base = load_base(Settings(model=str(model_dir), device=args.device, data_dir=model_dir.parent))
    cfg = TrainingConfig.model_validate(job_config(kind, args))
    prepared = prepare_dataset(data, base.tokenizer, cfg, context_window=base.context_window)
    torch.manual_seed(cfg.seed)
    total_micro = total_micro_steps(cfg, len(prepared.train))
    total_steps = -(-total_micro // cfg.grad_accumulation)
    model = get_peft_model(base.model, peft_config_for(kind, cfg, base.model.config.model_type, total_steps))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: learning_rate_at(cfg, s, total_steps) / cfg.lr)
    pad = base.tokenizer.pad_token_id or 0
    model.train()
    tokens, seconds = 0, 0.0
    for micro in range(total_micro):
        started = time.perf_counter()
        window_start = (micro // cfg.grad_accumulation) * cfg.grad_accumulation
        window = min(cfg.grad_accumulation, total_micro - window_start)
        batch = [prepared.train[i] for i in micro_batch_indices(cfg, len(prepared.train), micro)]
        ids, labels, mask = collate(batch, pad, base.device)
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        (loss / window).backward()
        if micro + 1 - window_start == window:
            torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            optimizer.step()
            if kind == "adalora":  # PEFT's budget allocator, between the step and zero_grad
                model.base_model.update_and_allocate(micro // cfg.grad_accumulation)
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
        seconds += time.perf_counter() - started
        tokens += int(mask.sum())
    model.eval()
    loss_sum, count = 0.0, 0
    with torch.no_grad():
        eval_examples = prepared.eval[: cfg.eval_batches_max * cfg.batch_size]
        for i in range(0, len(eval_examples), cfg.batch_size):
            ids, labels, mask = collate(eval_examples[i:i + cfg.batch_size], pad, base.device)
            logits = model(input_ids=ids, attention_mask=mask).logits
            if logits.shape[1] != labels.shape[1]:  # prompt tuning: virtual positions come first
                labels = torch.cat([labels.new_full((labels.shape[0], logits.shape[1] - labels.shape[1]), -100),
                                    labels], dim=1)
            s, c = causal_lm_loss_sum(logits, labels)
            loss_sum, count = loss_sum + float(s), count + c
    answers = generate_answers(model, base.tokenizer, [p for p, _ in test], 48, base.device)
    hits = sum(a.strip() == expected for a, (_, expected) in zip(answers, test, strict=True))
    return {"eval_loss_after": loss_sum / max(1, count), "tokens_per_second": round(tokens / seconds, 2),
            "exact_match": round(hits / max(1, len(test)), 4), "n": len(test),
            "samples": [{"expected": e, "answer": a} for a, (_, e) in list(zip(answers, test))[:3]]}


def compare(result: dict) -> None:
    """Ratios per kind, and one side-by-side row per kind (ours | PEFT's) for the table printed."""
    result["side_by_side"] = []
    for kind, ours in result["kinds"].items():
        ref = result["peft_reference"].get(kind)
        if ref and ours["eval_loss_after"] is not None:
            ours["eval_loss_ratio_vs_peft"] = round(ours["eval_loss_after"] / ref["eval_loss_after"], 4)
            ours["tokens_per_second_ratio_vs_peft"] = round(ours["tokens_per_second"] / ref["tokens_per_second"], 3)
        if ref:
            result["side_by_side"].append({
                "kind": kind, "exact_match": [ours["exact_match"], ref.get("exact_match")],
                "eval_loss_after": [round(ours["eval_loss_after"], 4), round(ref["eval_loss_after"], 4)],
                "tokens_per_second": [round(ours["tokens_per_second"], 1), ref["tokens_per_second"]],
                "eval_loss_ratio": ours.get("eval_loss_ratio_vs_peft"),
                "tokens_per_second_ratio": ours.get("tokens_per_second_ratio_vs_peft")})


def side_by_side_table(result: dict) -> str:
    """A markdown table of ``compare``'s rows: ours | PEFT's per figure, and the ratios."""
    lines = ["| kind | exact match ours / PEFT | eval loss ours / PEFT (ratio) | tokens/s ours / PEFT (ratio) |",
             "|---|---|---|---|"]
    for row in result.get("side_by_side", []):
        (em_o, em_p), (l_o, l_p), (t_o, t_p) = row["exact_match"], row["eval_loss_after"], row["tokens_per_second"]
        lines.append(f"| {row['kind']} | {em_o} / {em_p} | {l_o} / {l_p} ({row['eval_loss_ratio']}) | "
                     f"{t_o} / {t_p} ({row['tokens_per_second_ratio']}) |")
    return "\n".join(lines)


def plot(result: dict, path: Path) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    names = ["base", *result["kinds"]]
    left.bar(names, [result["base"]["exact_match"], *(k["exact_match"] for k in result["kinds"].values())])
    left.set_title("held-out exact match")
    left.set_ylim(0, 1)
    right.bar(["idle", "training"], [result["latency_idle_p50_s"], result["latency_training_p50_s"]])
    right.set_title(f"serving p50 latency (s), ratio {result['latency_ratio']}")
    fig.tight_layout()
    fig.savefig(path)
    return str(path)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", type=Path, help="safetensors model folder (default: the embedded SmolLM2, "
                        "materialized into --cache-dir)")
    parser.add_argument("--cache-dir", type=Path, default=Path("data"))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--kinds", nargs="+", default=["lora", "ia3", "prompt_tuning"],
                        choices=list(KIND_CONFIG), help="kinds to train (any of: %(choices)s)")
    parser.add_argument("--train", type=int, default=320, help="training examples (10%% held out for eval loss)")
    parser.add_argument("--test", type=int, default=50, help="held-out prompts for exact match")
    parser.add_argument("--max-steps", type=int, default=80)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--duty-cycle", type=float, default=0.25)
    parser.add_argument("--latency-requests", type=int, default=20)
    parser.add_argument("--latency-max-tokens", type=int, default=16)
    parser.add_argument("--no-reference", action="store_true", help="skip the PEFT reference runs")
    parser.add_argument("--out", type=Path, default=Path("loadtest/results/train_bench.json"))
    args = parser.parse_args(argv)
    stop_servers_on_sigterm()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)

    if args.model_dir is None:
        from gateway.base_model import materialize_embedded

        args.model_dir = materialize_embedded(args.cache_dir)
    train, test = make_task(args.train, args.test, args.seed)
    data = "\n".join(json.dumps(r) for r in train).encode()
    with tempfile.TemporaryDirectory(prefix="train-bench-") as tmp:
        result = {"args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                  "load_average_start": os.getloadavg(), **gateway_phase(args, args.model_dir, Path(tmp), data, test)}
    result["peft_reference"] = {}
    for kind in [] if args.no_reference else args.kinds:
        result["peft_reference"][kind] = peft_reference(args, args.model_dir, kind, data, test)
        log.info("PEFT %s: %s", kind, result["peft_reference"][kind])  # a long run shows each as it ends
    result["load_average_end"] = os.getloadavg()
    compare(result)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    result["plot"] = plot(result, args.out.with_suffix(".png"))
    print(json.dumps(result, indent=2))
    if result["side_by_side"]:
        print(side_by_side_table(result))


if __name__ == "__main__":
    main()
