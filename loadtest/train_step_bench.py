"""The bare training step: our trainer against PEFT's own loop, interleaved in one process.

Two copies of the same NF4 base are loaded: one wrapped by the gateway's ``AdapterRuntime`` and
trained by ``TrainingRun.micro_step()`` (what a job runs, with no serving traffic), the other
given to PEFT's ``get_peft_model`` and trained by a plain loop (forward with labels, backward,
clipping, AdamW, the schedule). Both start from the same weights (PEFT's initial adapter copied
into ours), see the same micro-batches in the same order with the same hyperparameters, and
alternate step by step (ours, PEFT's; then PEFT's, ours on the next step), so a noisy machine
slows both sides alike. Per kind it prints:

- the training loss of every step on both sides (the curves must agree: a divergence of ours
  where PEFT's does not diverge is a bug in ours, a divergence of both is the hyperparameters);
- the median and the minimum seconds per step of each side, and PEFT's / ours (the throughput
  ratio: both sides train the same tokens).

The first ``--warmup`` steps of each side are left out of the timing (allocator and autograd
warm-up). With ``--profile`` a cProfile of our steps is written next to ``--out``.

Usage: python -m loadtest.train_step_bench --model-dir data/models/SmolLM2-135M-Instruct \\
           --kinds lora prefix_tuning --steps 20
"""

from __future__ import annotations

import argparse
import cProfile
import json
import logging
import math
import os
import pstats
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from loadtest.train_bench import KIND_CONFIG, make_task, peft_config_for

log = logging.getLogger("train_step_bench")
PROMPT_KINDS = ("prompt_tuning", "p_tuning", "prefix_tuning")


def job_config(kind: str, args: argparse.Namespace) -> dict:
    config = {"kind": kind, "max_steps": args.steps, "batch_size": args.batch_size, "eval_fraction": 0.0,
              "seed": args.seed, "max_seq_len": 256, "checkpoint_every": 10_000, **KIND_CONFIG[kind]}
    if args.lr is not None:
        config["learning_rate"] = args.lr
    for item in args.set:  # e.g. prefix_projection=false
        key, _, value = item.partition("=")
        config[key] = json.loads(value)
    if args.no_dropout:
        if kind in ("lora", "dora", "adalora"):
            config["lora_dropout"] = 0.0
        elif kind == "vera":
            config["vera_dropout"] = 0.0
    return config


def copy_peft_init(run, peft_model, kind: str, base_info, dtype: torch.dtype) -> None:
    """Start our adapter from PEFT's initial weights (same curves are then comparable step by step)."""
    if kind in PROMPT_KINDS:  # our encoders have PEFT's layout (tests/unit/test_train_new_kinds.py)
        state = peft_model.prompt_encoder["default"].state_dict()
        if kind == "prompt_tuning":
            state = {"prompt": state["embedding.weight"]}
    else:
        from adapters.kinds.base import AdapterLimits
        from adapters.peft_io import read_adapter
        from adapters.training.trainable import trainable_from_weights

        with tempfile.TemporaryDirectory() as folder:
            peft_model.save_pretrained(folder)
            weights = read_adapter(Path(folder), base_info, AdapterLimits(max_lora_rank=4096), dtype)
        state = trainable_from_weights(weights, torch.device("cpu")).state_dict()
    with torch.no_grad():
        run.adapter.load_state_dict(state, strict=True)


class PeftLoop:
    """PEFT's model trained as a user would: HF's loss from ``labels``, AdamW, the same schedule."""

    def __init__(self, model, cfg, kind: str, total_steps: int, pad_id: int, device):
        from adapters.training.config import learning_rate_at

        self.model, self.cfg, self.kind, self.pad_id, self.device = model, cfg, kind, pad_id, device
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.schedule = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: learning_rate_at(cfg, s, total_steps) / cfg.lr)
        self.step = 0

    def train_step(self, batch) -> tuple[float, int]:
        from adapters.training.trainer import collate

        self.model.train()
        ids, labels, mask = collate(batch, self.pad_id, self.device)
        loss = self.model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        if self.cfg.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(self.params, self.cfg.max_grad_norm)
        self.optimizer.step()
        if self.kind == "adalora":  # PEFT's rank allocator, between the step and zero_grad
            self.model.base_model.update_and_allocate(self.step)
        self.schedule.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        return float(loss.detach()), int(mask.sum())


def bench_kind(kind: str, args: argparse.Namespace, settings, data: bytes) -> dict:
    from peft import get_peft_model

    from adapters.runtime import AdapterRuntime
    from adapters.training.config import TrainingConfig
    from adapters.training.prepare import prepare_dataset
    from adapters.training.trainer import TrainingRun, micro_batch_indices
    from gateway.base_model import load_base

    ours_base, peft_base = load_base(settings), load_base(settings)  # fresh copies: PEFT edits its model
    cfg = TrainingConfig.model_validate(job_config(kind, args))
    prepared = prepare_dataset(data, ours_base.tokenizer, cfg, context_window=ours_base.context_window)
    runtime = AdapterRuntime(ours_base.model, max_slots=1, dtype=ours_base.dtype)
    run = TrainingRun(runtime, ours_base.tokenizer, cfg, prepared.train, [])
    total = run.progress.total_steps
    torch.manual_seed(cfg.seed)
    peft_model = get_peft_model(peft_base.model, peft_config_for(kind, cfg, peft_base.model.config.model_type, total))
    if not args.own_init:
        copy_peft_init(run, peft_model, kind, runtime.base_info, ours_base.dtype)
    pad = ours_base.tokenizer.pad_token_id or 0
    peft = PeftLoop(peft_model, cfg, kind, total, pad, peft_base.device)
    profiler = cProfile.Profile() if args.profile else None
    ours_s, peft_s, ours_loss, peft_loss, tokens = [], [], [], [], []
    for step in range(total):
        batch = [prepared.train[i] for i in micro_batch_indices(cfg, len(prepared.train), step)]
        order = ("ours", "peft") if step % 2 == 0 else ("peft", "ours")
        for side in order:
            if side == "ours":
                if profiler is not None and step >= args.warmup:
                    profiler.enable()
                started = time.perf_counter()
                run.micro_step()
                ours_s.append(time.perf_counter() - started)
                if profiler is not None:
                    profiler.disable()
                ours_loss.append(run.progress.train_loss[-1][1])
            else:
                started = time.perf_counter()
                loss, n = peft.train_step(batch)
                peft_s.append(time.perf_counter() - started)
                peft_loss.append(loss)
                tokens.append(n)
        log.info("%s step %d/%d: ours %.3f s loss %.4f | PEFT %.3f s loss %.4f", kind, step + 1, total, ours_s[-1],
                 ours_loss[-1], peft_s[-1], peft_loss[-1])
    timed_ours, timed_peft = ours_s[args.warmup:], peft_s[args.warmup:]
    med_ours, med_peft = statistics.median(timed_ours), statistics.median(timed_peft)
    result = {
        "steps": total, "learning_rate": cfg.lr, "tokens_per_step": round(statistics.mean(tokens), 1),
        "ours_s_per_step": {"median": round(med_ours, 4), "min": round(min(timed_ours), 4)},
        "peft_s_per_step": {"median": round(med_peft, 4), "min": round(min(timed_peft), 4)},
        "ours_tokens_per_second": round(statistics.mean(tokens) / med_ours, 1),
        "peft_tokens_per_second": round(statistics.mean(tokens) / med_peft, 1),
        "throughput_ratio_median": round(med_peft / med_ours, 3),
        "throughput_ratio_min": round(min(timed_peft) / min(timed_ours), 3),
        "ours_train_loss": [round(x, 4) for x in ours_loss], "peft_train_loss": [round(x, 4) for x in peft_loss],
        "max_loss_rel_diff": round(max(abs(a - b) / max(abs(b), 1e-8) for a, b in zip(ours_loss, peft_loss)), 5),
    }
    if profiler is not None:
        path = args.out.with_name(f"{args.out.stem}.{kind}.prof.txt")
        with path.open("w") as out:
            pstats.Stats(profiler, stream=out).sort_stats("cumulative").print_stats(40)
        result["profile"] = str(path)
    del run, peft, peft_model, runtime, ours_base, peft_base
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", type=Path, help="safetensors model folder (default: the embedded SmolLM2)")
    parser.add_argument("--cache-dir", type=Path, default=Path("data"))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--kinds", nargs="+", default=["lora"], choices=list(KIND_CONFIG))
    parser.add_argument("--train", type=int, default=120)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2, help="steps per side left out of the timing")
    parser.add_argument("--lr", type=float, help="learning rate for every kind (default: train_bench's per kind)")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=JSON",
                        help="override a job config field for every kind, e.g. --set prefix_projection=false")
    parser.add_argument("--no-dropout", action="store_true", help="dropout 0 (the curves then differ only by "
                        "arithmetic order)")
    parser.add_argument("--own-init", action="store_true", help="our own init instead of PEFT's weights")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--profile", action="store_true", help="cProfile our steps (after warmup)")
    parser.add_argument("--out", type=Path, default=Path("loadtest/results/train_step_bench.json"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    from gateway.settings import Settings

    if args.model_dir is None:
        from gateway.base_model import materialize_embedded

        args.model_dir = materialize_embedded(args.cache_dir)
    settings = Settings(model=str(args.model_dir), device=args.device, data_dir=args.model_dir.parent)
    train, _ = make_task(args.train, 0, args.seed)
    data = "\n".join(json.dumps(r) for r in train).encode()
    result = {"args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
              "load_average_start": os.getloadavg(), "kinds": {}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    for kind in args.kinds:
        result["kinds"][kind] = bench_kind(kind, args, settings, data)
        r = result["kinds"][kind]
        log.info("%s: ratio %.3f (median), %.3f (min); loss ours %s ... %s, PEFT %s ... %s", kind,
                 r["throughput_ratio_median"], r["throughput_ratio_min"], r["ours_train_loss"][:2],
                 r["ours_train_loss"][-2:], r["peft_train_loss"][:2], r["peft_train_loss"][-2:])
        args.out.write_text(json.dumps(result, indent=2))
    result["load_average_end"] = os.getloadavg()
    ratios = [k["throughput_ratio_median"] for k in result["kinds"].values()]
    result["throughput_ratio_geomean"] = round(math.exp(statistics.mean(math.log(r) for r in ratios)), 3)
    args.out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
