"""``adapter-gateway train``: the gateway's trainer, offline, on the base model from the settings.

Same dataset validation (same messages), same config, same run and export as a job in the
server; progress goes to stderr, a JSON summary to stdout. Checkpoints go to ``OUT/.checkpoints``
and a rerun with the same data and config resumes from them; they are removed on success.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path
from typing import TextIO

from adapters.errors import AdapterValidationError, DatasetValidationError
from adapters.kinds.base import AdapterLimits
from adapters.peft_io import read_adapter
from adapters.runtime import AdapterRuntime
from adapters.training.config import TrainingConfig
from adapters.training.prepare import check_device, check_limits, describe_problems, prepare_dataset
from adapters.training.trainer import Progress, TrainingRun
from gateway.settings import Settings

CHECKPOINTS = ".checkpoints"
BAR_WIDTH = 30


class TrainingFailed(Exception):
    """Offline training cannot proceed; the message is for the operator."""


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


class ProgressBar:
    """One line, redrawn in place on a terminal; occasional plain lines otherwise (logs, CI)."""

    def __init__(self, stream: TextIO, min_interval: float = 0.2, plain_interval: float = 5.0):
        self.stream = stream
        self.tty = stream.isatty()
        self.interval = min_interval if self.tty else plain_interval
        self.last = 0.0

    def update(self, p: Progress, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self.last < self.interval:
            return
        self.last = now
        done = p.step / max(1, p.total_steps)
        filled = int(done * BAR_WIDTH)
        loss = f"{p.last_loss:.4f}" if p.last_loss is not None else "-"
        line = (f"[{'#' * filled}{'.' * (BAR_WIDTH - filled)}] {p.phase:<11} step {p.step}/{p.total_steps} "
                f"epoch {p.epoch:.2f} loss {loss} {p.tokens_per_second:.0f} tok/s ETA {_duration(p.eta_seconds)}")
        self.stream.write(("\r" + line) if self.tty else line + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()


def train_offline(settings: Settings, data_path: Path, config: TrainingConfig, out: Path,
                  stderr: TextIO = sys.stderr) -> dict:
    """Train, export ``out`` in PEFT format, validate it like an upload, and return a summary."""
    from gateway.base_model import load_base  # heavy imports only when training

    limits = AdapterLimits(max_lora_rank=settings.max_lora_rank, max_virtual_tokens=settings.max_virtual_tokens,
                           max_adapter_bytes=settings.max_adapter_bytes)
    try:
        check_limits(config, limits)
        data = data_path.read_bytes()
    except (ValueError, OSError) as exc:
        raise TrainingFailed(str(exc)) from None
    if len(data) > settings.max_training_dataset_bytes:
        raise TrainingFailed(f"the dataset is {len(data)} bytes; the limit is {settings.max_training_dataset_bytes}")
    base = load_base(settings)
    try:
        prepared = prepare_dataset(data, base.tokenizer, config, max_lines=settings.max_training_dataset_lines,
                                   context_window=base.context_window)
        check_limits(config, limits, n_train=len(prepared.train))
        check_device(config, next(base.model.parameters()).device)
    except DatasetValidationError as exc:
        raise TrainingFailed(f"invalid dataset: {describe_problems(exc)}") from None
    except ValueError as exc:
        raise TrainingFailed(str(exc)) from None
    for line, reason in prepared.problems:
        stderr.write(f"skipped line {line}: {reason}\n")
    runtime = AdapterRuntime(base.model, max_slots=1, dtype=base.dtype)
    run = TrainingRun(runtime, base.tokenizer, config, prepared.train, prepared.eval, out / CHECKPOINTS)
    if run.resume():
        stderr.write(f"resuming from the checkpoint at step {run.progress.step}\n")
    bar = ProgressBar(stderr)
    started = time.monotonic()
    while run.micro_step():
        bar.update(run.progress)
    bar.update(run.progress, force=True)
    bar.close()
    run.export(out)
    try:
        read_adapter(out, runtime.base_info, limits, base.dtype)  # validated like any upload
    except AdapterValidationError as exc:
        raise TrainingFailed(f"the trained adapter does not pass validation: {exc}") from None
    shutil.rmtree(out / CHECKPOINTS, ignore_errors=True)
    p = run.progress
    return {"out": str(out), "kind": config.kind.value, "steps": p.step, "epochs": round(p.epoch, 3),
            "train_examples": len(prepared.train), "eval_examples": len(prepared.eval),
            "skipped_lines": len(prepared.problems), "eval_loss_before": p.eval_loss_before,
            "eval_loss_after": p.eval_loss_after, "final_train_loss": p.last_loss,
            "tokens_per_second": round(p.tokens_per_second, 1), "seconds": round(time.monotonic() - started, 1)}


def config_from_flags(values: dict, config_file: Path | None) -> TrainingConfig:
    """Merge a JSON config file with flags (flags win); comma-separated lists become lists."""
    merged: dict = {}
    if config_file is not None:
        try:
            merged = json.loads(config_file.read_text())
        except (OSError, ValueError) as exc:
            raise TrainingFailed(f"cannot read the config file {config_file}: {exc}") from None
        if not isinstance(merged, dict):
            raise TrainingFailed(f"the config file {config_file} must hold a JSON object")
    for name, value in values.items():
        if value is None:
            continue
        if name in ("target_modules", "feedforward_modules") and value != "all-linear":
            value = [v.strip() for v in value.split(",") if v.strip()]
        merged[name] = value
    return TrainingConfig.model_validate(merged)
