"""From uploaded bytes to the train / eval split a run uses, with every problem by line number.

The same function validates an upload in the API, prepares a job (again, after a restart: the
dataset file is kept and tokenization is deterministic) and feeds the offline CLI, so every
entry point reports the same messages.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from adapters.errors import DatasetValidationError
from adapters.kinds import HANDLERS
from adapters.kinds.base import AdapterLimits
from adapters.preference_data import (
    PREFERENCE_FORMAT, PreferenceExample, first_record, is_preference_record, parse_preference_dataset,
    tokenize_preferences,
)
from adapters.training.config import TrainingConfig
from adapters.training.trainer import total_micro_steps
from adapters.training_data import TrainingExample, parse_dataset, split_train_eval, tokenize_dataset


@dataclass
class PreparedDataset:
    format: str
    train: list[TrainingExample] | list[PreferenceExample]  # PreferenceExample for objective "dpo"
    eval: list[TrainingExample] | list[PreferenceExample]
    problems: list[tuple[int, str]] = field(default_factory=list)


def prepare_dataset(data: bytes, tokenizer, config: TrainingConfig, *, max_lines: int = 100_000,
                    max_line_bytes: int = 1 << 20, context_window: int | None = None,
                    max_piece_tokens: int | None = None) -> PreparedDataset:
    """Parse, tokenize (loss on answers only) and split; raises ``DatasetValidationError`` (with
    every ``(line, reason)``) when nothing is usable, or on any bad line unless ``skip_bad_lines``.
    ``max_piece_tokens``: the most tokens one training forward may hold (``TrainingRun``), so an
    example that alone is larger (virtual tokens included; a preference pair is two rows) is a bad
    line."""
    virtual = HANDLERS[config.kind].training_virtual_tokens(config)
    max_seq_len, limit = config.max_seq_len, "max_seq_len"
    if context_window is not None:
        max_seq_len = min(max_seq_len, context_window - virtual)
        if max_seq_len < 1:
            raise ValueError(f"num_virtual_tokens leaves no room in the context window of {context_window}")
    rows = 2 if config.objective == "dpo" else 1
    if max_piece_tokens is not None and max_piece_tokens // rows - virtual < max_seq_len:
        max_seq_len, limit = max_piece_tokens // rows - virtual, "what the gateway's training_piece_tokens allow:"
        if max_seq_len < 1:
            raise ValueError(f"training_piece_tokens ({max_piece_tokens}) leave no room beside "
                             f"{virtual} virtual tokens")
    strict = not config.skip_bad_lines
    if config.objective == "dpo":
        problems: list[tuple[int, str]] = []
        pairs = parse_preference_dataset(data, max_lines=max_lines, max_line_bytes=max_line_bytes, strict=strict,
                                         problems=problems)
        examples = tokenize_preferences(pairs, tokenizer, max_seq_len=max_seq_len, strict=strict, problems=problems,
                                        limit=limit)
        train, held = split_train_eval(examples, config.eval_fraction, config.seed)
        return PreparedDataset(format=PREFERENCE_FORMAT, train=train, eval=held, problems=problems)
    if is_preference_record(first_record(data, max_line_bytes)):
        raise DatasetValidationError("this is a preference dataset (chosen and rejected answers): train it with "
                                     "objective 'dpo' (method 'dpo' in the fine-tuning API)", [])
    parsed = parse_dataset(data, max_lines=max_lines, max_line_bytes=max_line_bytes, strict=strict)
    tokenized = tokenize_dataset(parsed, tokenizer, max_seq_len=max_seq_len, strict=strict, limit=limit)
    train, held = split_train_eval(tokenized.examples, config.eval_fraction, config.seed)
    return PreparedDataset(format=tokenized.format, train=train, eval=held, problems=tokenized.problems)


def check_limits(config: TrainingConfig, limits: AdapterLimits, n_train: int | None = None) -> None:
    """Refuse, before any work, a config whose result the gateway would refuse to serve (the
    kind's handler knows its limits); with ``n_train`` known, also a schedule that does not fit
    the run's optimizer steps (AdaLoRA's tinit / tfinal)."""
    total = None
    if n_train is not None:
        total = math.ceil(total_micro_steps(config, n_train) / config.grad_accumulation)
    elif config.max_steps is not None:
        total = config.max_steps
    HANDLERS[config.kind].check_training(config, limits, total)


def check_device(config: TrainingConfig, device) -> None:
    """Refuse what the device cannot run: bitsandbytes' paged optimizers page their state between
    GPU and CPU memory through CUDA unified memory, so there is nothing to page on a CPU gateway."""
    if config.optimizer == "paged_adamw" and getattr(device, "type", str(device)) != "cuda":
        raise ValueError(f"optimizer 'paged_adamw' (bitsandbytes' paged AdamW) needs a CUDA device; this gateway "
                         f"trains on {getattr(device, 'type', device)}: use optimizer 'adamw'")


def describe_problems(error: DatasetValidationError, limit: int = 20) -> str:
    """The error's summary plus up to ``limit`` ``line N: reason`` entries."""
    shown = "; ".join(f"line {line}: {reason}" for line, reason in error.problems[:limit])
    more = f"; and {len(error.problems) - limit} more" if len(error.problems) > limit else ""
    return f"{error}. Problems: {shown}{more}" if shown else str(error)
