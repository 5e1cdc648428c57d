"""One training run on the resident base, advanced one micro-batch at a time.

``TrainingRun.micro_step()`` does one unit of work and returns whether more remains, so the
owner (the engine thread between serving steps, or the offline CLI in a loop) decides when work
happens. Phases: eval loss before training, training micro-batches (the optimizer steps every
``grad_accumulation`` of them, checkpointing every ``checkpoint_every`` steps), eval loss after.
Knows nothing of HTTP or jobs.

With ``max_piece_tokens`` a micro-batch larger than that (rows x longest row, padding and
virtual tokens included) is computed in pieces, one per ``micro_step()``: a step's memory grows
with its tokens (about 3.6 MB a token for SmolLM2 in float32 on a CPU) and, on the engine
thread, no request is served while one runs. The pieces' summed losses are backpropagated and
the gradient divided once by the micro-batch's units, so it equals the whole batch's (DPO's
SFT term excepted: its token mean is taken per piece).

What a batch's loss is comes from the run's objective (``config.objective``): supervised
next-token loss here, preference training in ``adapters.training.dpo``. An objective's
``batch_loss(adapter, examples)`` returns a ``BatchLoss``; its metrics (DPO's rewards) are
averaged per optimizer step and per eval pass into ``Progress.train_metrics`` / ``eval_metrics``.

Determinism: the split, the per-epoch shuffles, the init and the dropout stream all derive from
``config.seed`` and the position in the run, never from global RNG state (serving samples from
that), so a run resumed from a checkpoint continues exactly as an uninterrupted one.
"""

from __future__ import annotations

import gc
import hashlib
import json
import logging
import math
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from adapters.kinds import HANDLERS
from adapters.kinds.base import AdapterWeights
from adapters.peft_io import write_adapter
from adapters.training.checkpoint import (
    CheckpointError, load_latest, optimizer_tensors, restore_optimizer, save_checkpoint,
)
from adapters.training.config import TrainingConfig, learning_rate_at
from adapters.training.dpo import BatchLoss, DpoObjective, frozen_reference
from adapters.training.trainable import TrainableAdapter, build_trainable, trainable_from_weights
from adapters.training_data import IGNORE_INDEX, TrainingExample

log = logging.getLogger(__name__)
HISTORY_LIMIT = 1000  # loss points kept per history (thinned by half when exceeded)


@dataclass
class Progress:
    """A snapshot for job records and progress bars (plain data, JSON-able)."""

    phase: str = "eval_before"  # eval_before | train | eval_after | done
    step: int = 0
    total_steps: int = 0
    epoch: float = 0.0
    train_loss: list[tuple[int, float]] = field(default_factory=list)  # (step, mean loss of the step)
    eval_loss: list[tuple[int, float]] = field(default_factory=list)  # (step, token-weighted eval loss)
    eval_loss_before: float | None = None
    eval_loss_after: float | None = None
    tokens_per_second: float = 0.0
    eta_seconds: float | None = None
    tokens_trained: int = 0
    resumed_from_step: int | None = None  # the checkpoint this process continued from, if any
    # (step, {metric: mean}) of objectives that report more than a loss (DPO's rewards and accuracy)
    train_metrics: list[tuple[int, dict[str, float]]] = field(default_factory=list)
    eval_metrics: list[tuple[int, dict[str, float]]] = field(default_factory=list)

    @property
    def last_loss(self) -> float | None:
        return self.train_loss[-1][1] if self.train_loss else None

    def as_dict(self) -> dict[str, Any]:
        return {"phase": self.phase, "step": self.step, "total_steps": self.total_steps,
                "epoch": round(self.epoch, 4), "train_loss": [list(p) for p in self.train_loss],
                "eval_loss": [list(p) for p in self.eval_loss], "eval_loss_before": self.eval_loss_before,
                "eval_loss_after": self.eval_loss_after, "tokens_per_second": round(self.tokens_per_second, 2),
                "eta_seconds": None if self.eta_seconds is None else round(self.eta_seconds, 1),
                "tokens_trained": self.tokens_trained, "resumed_from_step": self.resumed_from_step,
                "train_metrics": [[s, m] for s, m in self.train_metrics],
                "eval_metrics": [[s, m] for s, m in self.eval_metrics]}


def _append(history: list[tuple[int, Any]], point: tuple[int, Any]) -> None:
    history.append(point)
    if len(history) > HISTORY_LIMIT:
        del history[1:-1:2]  # keep the first and last points and every other one between


def dataset_digest(examples: list) -> str:
    """Of the token content of the examples (any dataclass of token lists; the source line is left out)."""
    h = hashlib.sha256()
    for ex in examples:
        h.update(json.dumps([v for k, v in asdict(ex).items() if k != "line"]).encode())
    return h.hexdigest()


def micro_batches_per_epoch(config: TrainingConfig, n_train: int) -> int:
    return math.ceil(n_train / config.batch_size)


def total_micro_steps(config: TrainingConfig, n_train: int) -> int:
    if config.max_steps is not None:
        return config.max_steps * config.grad_accumulation
    return max(1, math.ceil(config.epochs * micro_batches_per_epoch(config, n_train)))


def micro_batch_indices(config: TrainingConfig, n_train: int, micro: int) -> list[int]:
    """Indices into the training split of global micro-batch ``micro`` (epochs reshuffle by seed)."""
    per_epoch = micro_batches_per_epoch(config, n_train)
    epoch, position = divmod(micro, per_epoch)
    order = list(range(n_train))
    random.Random(config.seed * 1_000_003 + epoch).shuffle(order)
    return order[position * config.batch_size:(position + 1) * config.batch_size]


def example_rows(example) -> tuple[int, int]:
    """(rows, tokens of the longest row) ``example`` adds to a forward, virtual tokens excluded:
    a preference pair is two rows, its prompt with each answer."""
    if isinstance(example, TrainingExample):
        return 1, len(example.input_ids)
    return 2, len(example.prompt_ids) + max(len(example.chosen_ids), len(example.rejected_ids))


def split_pieces(examples: list, max_tokens: int | None, virtual: int = 0) -> list[list]:
    """``examples`` in order, cut into pieces whose forward (rows x longest row, each row padded
    to the longest and led by ``virtual`` tokens) holds at most ``max_tokens``; a piece has at
    least one example (the dataset check refuses one that alone is larger)."""
    if max_tokens is None:
        return [examples]
    pieces: list[list] = []
    piece: list = []
    rows = longest = 0
    for example in examples:
        more, length = example_rows(example)
        if piece and (rows + more) * (max(longest, length) + virtual) > max_tokens:
            pieces.append(piece)
            piece, rows, longest = [], 0, 0
        piece.append(example)
        rows, longest = rows + more, max(longest, length)
    return pieces + [piece] if piece else pieces


def collate(examples: list[TrainingExample], pad_id: int, device: torch.device):
    """Right-padded ``(input_ids, labels, attention_mask)``, each ``[B, T]``."""
    length = max(len(ex.input_ids) for ex in examples)
    ids = torch.full((len(examples), length), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), length), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(examples), length), dtype=torch.long)
    for row, ex in enumerate(examples):
        n = len(ex.input_ids)
        ids[row, :n] = torch.tensor(ex.input_ids)
        labels[row, :n] = torch.tensor(ex.labels)
        mask[row, :n] = 1
    return ids.to(device), labels.to(device), mask.to(device)


def causal_lm_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Summed next-token cross-entropy over labelled positions, and their count.

    The labels move one place left (the last position gets none) rather than the logits one
    place right: slicing ``logits[:, :-1]`` copies ``[B, T, vocab]`` floats (100 MB for 8 rows of
    70 tokens on a 49k vocabulary) and its backward allocates and fills another such tensor, a
    measurable share of a small model's step (as transformers' own loss does it)."""
    shifted = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX).reshape(-1)
    loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), shifted,
                           ignore_index=IGNORE_INDEX, reduction="sum")
    return loss, int((shifted != IGNORE_INDEX).sum())


def prefix_cache(model, prefix: torch.Tensor, rows: int):
    """A transformers cache holding ``prefix [layers * 2, virtual, kv_heads, head_dim]`` as every
    row's past keys (row ``2l``) and values (``2l + 1``) of layer ``l``, as PEFT passes a prefix."""
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    for layer in range(prefix.shape[0] // 2):
        key, value = (prefix[2 * layer + i].transpose(0, 1).unsqueeze(0).expand(rows, -1, -1, -1) for i in (0, 1))
        cache.update(key, value, layer)
    return cache


def adapter_forward(runtime, adapter: TrainableAdapter, ids: torch.Tensor, mask: torch.Tensor,
                    labels: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Logits ``[B, n_virtual + T, vocab]`` of the base with ``adapter`` applied to every row (and
    the labels aligned to them; a prefix adds no logits, only past keys and values). Right
    padding: positions of real tokens are 0, 1, 2 ... after the virtual ones."""
    embeds = runtime.model.get_input_embeddings()(ids)
    rows = ids.shape[0]
    prompt = adapter.prompt_embeddings()
    if prompt is not None:  # virtual tokens in front: attended to, never labelled (as PEFT)
        n = prompt.shape[0]
        embeds = torch.cat([prompt.to(embeds.dtype).unsqueeze(0).expand(rows, -1, -1), embeds], dim=1)
        mask = torch.cat([mask.new_ones(rows, n), mask], dim=1)
        if labels is not None:
            labels = torch.cat([labels.new_full((rows, n), IGNORE_INDEX), labels], dim=1)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    extra = {"use_cache": False}
    prefix = adapter.prefix_key_values(embeds.dtype)
    if prefix is not None:  # past keys and values at positions 0 .. n-1; the tokens follow them
        n = prefix.shape[1]
        positions = positions + n
        mask = torch.cat([mask.new_ones(rows, n), mask], dim=1)
        extra = {"use_cache": True, "past_key_values": prefix_cache(runtime.model, prefix, rows)}
    with runtime.training(adapter):
        logits = runtime.model(inputs_embeds=embeds, attention_mask=mask, position_ids=positions, **extra).logits
    return logits, labels


def make_optimizer(config: TrainingConfig, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    """AdamW, or bitsandbytes' paged AdamW (QLoRA: optimizer state in unified memory that pages to
    the CPU under memory pressure); ``check_device`` has refused paged_adamw off CUDA."""
    lr = learning_rate_at(config, 0, 1)
    if config.optimizer == "paged_adamw":
        import bitsandbytes as bnb

        return bnb.optim.PagedAdamW(params, lr=lr, weight_decay=config.weight_decay)
    return torch.optim.AdamW(params, lr=lr, weight_decay=config.weight_decay)


class SupervisedObjective:
    """Next-token cross-entropy on the labelled (answer) tokens; the mean is over those tokens."""

    metrics: tuple[str, ...] = ()

    def __init__(self, runtime, pad_id: int):
        self.runtime = runtime
        self.pad_id = pad_id

    def batch_loss(self, adapter: TrainableAdapter, examples: list[TrainingExample]) -> BatchLoss:
        ids, labels, mask = collate(examples, self.pad_id, self.runtime.device)
        logits, labels = adapter_forward(self.runtime, adapter, ids, mask, labels)
        loss_sum, count = causal_lm_loss_sum(logits, labels)
        return BatchLoss(loss_sum, count, int(mask.sum()), {})


def build_objective(config: TrainingConfig, runtime, pad_id: int, initial: AdapterWeights | None):
    """The run's objective; DPO's reference is ``initial`` frozen, or the bare base."""
    if config.objective == "dpo":
        return DpoObjective(config.beta, frozen_reference(initial, runtime.device),
                            forward=partial(adapter_forward, runtime),
                            collate=partial(collate, pad_id=pad_id, device=runtime.device),
                            sft_weight=config.sft_weight)
    return SupervisedObjective(runtime, pad_id)


def _config_digest_text(config: TrainingConfig) -> str:
    # a supervised run's digest leaves out the DPO fields, so checkpoints written before they
    # existed still resume after an upgrade
    exclude = {"objective", "beta"} if config.objective == "supervised" else None
    return config.model_dump_json(exclude=exclude)


def _mean_metrics(sums: dict[str, float], units: int) -> dict[str, float]:
    return {name: value / max(1, units) for name, value in sums.items()}


def _add_metrics(into: dict[str, float], sums: dict[str, float]) -> None:
    for name, value in sums.items():
        into[name] = into.get(name, 0.0) + value


@dataclass
class _SplitBatch:
    """A micro-batch computed in pieces: each piece backpropagates its summed loss, and ``finish``
    divides the gradient by the whole micro-batch's units (and by the accumulation window), then
    adds back the gradient earlier micro-batches of the window left (set aside at ``start``)."""

    earlier: list[torch.Tensor | None]
    total: float = 0.0
    units: int = 0
    tokens: int = 0
    metric_sums: dict[str, float] = field(default_factory=dict)

    @classmethod
    def start(cls, params: list[torch.nn.Parameter]) -> _SplitBatch:
        earlier = [p.grad for p in params]
        for p in params:
            p.grad = None
        return cls(earlier)

    def add(self, piece: BatchLoss) -> None:
        self.total += float(piece.total.detach())
        self.units += piece.units
        self.tokens += piece.tokens
        _add_metrics(self.metric_sums, piece.metric_sums)

    def finish(self, params: list[torch.nn.Parameter], adapter: TrainableAdapter,
               window: int) -> tuple[BatchLoss, torch.Tensor]:
        """(the micro-batch's loss as one ``BatchLoss``, its mean plus regularization)."""
        scale = 1.0 / (max(1, self.units) * window)
        for p in params:
            if p.grad is not None:
                p.grad.mul_(scale)
        loss = torch.tensor(self.total / max(1, self.units))
        with torch.enable_grad():
            regularization = adapter.regularization()
            if regularization is not None:
                (regularization / window).backward()
                loss = loss + regularization.detach()
        for p, before in zip(params, self.earlier):
            if before is not None:
                p.grad = before if p.grad is None else p.grad.add_(before)
        whole = BatchLoss(torch.tensor(self.total), self.units, self.tokens, self.metric_sums)
        return whole, loss


class TrainingRun:
    def __init__(self, runtime, tokenizer, config: TrainingConfig, train: list[TrainingExample],
                 eval_examples: list[TrainingExample], checkpoint_dir: Path | None = None,
                 initial: AdapterWeights | None = None, max_piece_tokens: int | None = None):
        """``initial``: the weights to start from (``config.init_adapter``'s), else a fresh init;
        ``max_piece_tokens``: the most tokens one ``micro_step()`` forwards (None: a whole micro-batch)."""
        if not train:
            raise ValueError("no training examples")
        if initial is not None and initial.kind is not config.kind:
            raise ValueError(f"the adapter to start from is {initial.kind.value}, not {config.kind.value}")
        self.runtime = runtime
        self.model = runtime.model
        self.config = config
        self.train_examples = train
        self.eval_examples = eval_examples[: config.eval_batches_max * config.batch_size]
        self.checkpoint_dir = checkpoint_dir
        self.checkpoint_saved: Callable[[], None] | None = None  # after each checkpoint (a shared copy)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.model.requires_grad_(False)  # QLoRA-style: the base is frozen, only the adapter learns
        self.total_micro = total_micro_steps(config, len(train))
        self.progress = Progress(total_steps=math.ceil(self.total_micro / config.grad_accumulation))
        self.adapter: TrainableAdapter | None = (
            build_trainable(config, runtime, tokenizer, self.progress.total_steps) if initial is None
            else trainable_from_weights(initial, runtime.device, config.seed))
        self.params = [p for p in self.adapter.parameters()]
        self.optimizer: torch.optim.Optimizer | None = make_optimizer(config, self.params)
        self.objective = build_objective(config, runtime, self.pad_id, initial)
        self.micro = 0  # micro-batches done
        self.max_piece_tokens = max_piece_tokens
        self._virtual = HANDLERS[config.kind].training_virtual_tokens(config)
        self._pieces: list[list] = []  # the rest of a micro-batch computed in pieces
        self._split: _SplitBatch | None = None  # what its pieces so far added up to
        self._eval_position = 0
        self._eval_sum, self._eval_count = 0.0, 0
        self._eval_metric_sums: dict[str, float] = {}
        self._window_losses: list[float] = []
        self._window_metric_sums: dict[str, float] = {}
        self._window_units = 0
        self._train_seconds = 0.0
        self._micro_at_start, self._tokens_at_start = 0, 0  # where this process took over (resume)
        self._digest = hashlib.sha256(
            (_config_digest_text(config) + dataset_digest(train) + dataset_digest(eval_examples)).encode()
        ).hexdigest()
        if not self.eval_examples:
            self.progress.phase = "train"

    # ---- the unit of work -----------------------------------------------------------------------
    def micro_step(self) -> bool:
        """Do one micro-batch of the current phase; return True while work remains."""
        phase = self.progress.phase
        if phase in ("eval_before", "eval_after"):
            self._eval_micro_step()
        elif phase == "train":
            self._train_micro_step()
        return self.progress.phase != "done"

    @property
    def done(self) -> bool:
        return self.progress.phase == "done"

    def _eval_micro_step(self) -> None:
        bs = self.config.batch_size
        batch = self.eval_examples[self._eval_position:self._eval_position + bs]
        batch = split_pieces(batch, self.max_piece_tokens, self._virtual)[0]  # eval sums add up piece by piece
        self.adapter.eval()
        with torch.no_grad():
            out = self.objective.batch_loss(self.adapter, batch)
        self._eval_sum += float(out.total)
        self._eval_count += out.units
        _add_metrics(self._eval_metric_sums, out.metric_sums)
        self._eval_position += len(batch)
        if self._eval_position < len(self.eval_examples):
            return
        loss = self._eval_sum / max(1, self._eval_count)
        _append(self.progress.eval_loss, (self.progress.step, loss))
        if self._eval_metric_sums:
            _append(self.progress.eval_metrics,
                    (self.progress.step, _mean_metrics(self._eval_metric_sums, self._eval_count)))
        self._eval_position, self._eval_sum, self._eval_count = 0, 0.0, 0
        self._eval_metric_sums = {}
        if self.progress.phase == "eval_before":
            self.progress.eval_loss_before = loss
            self.progress.phase = "train"
        else:
            self.progress.eval_loss_after = loss
            self.progress.phase = "done"

    def _train_micro_step(self) -> None:
        started = time.perf_counter()
        cfg = self.config
        window_start = (self.micro // cfg.grad_accumulation) * cfg.grad_accumulation
        window = min(cfg.grad_accumulation, self.total_micro - window_start)  # the last may be short
        if not self._pieces:
            indices = micro_batch_indices(cfg, len(self.train_examples), self.micro)
            self._pieces = split_pieces([self.train_examples[i] for i in indices], self.max_piece_tokens,
                                        self._virtual)
            if len(self._pieces) > 1:
                self._split = _SplitBatch.start(self.params)
        examples = self._pieces.pop(0)
        self.adapter.train()
        with torch.enable_grad():
            out = self.objective.batch_loss(self.adapter, examples)
            if self._split is None:
                loss = out.mean
                regularization = self.adapter.regularization()  # e.g. AdaLoRA's orthogonality (as PEFT adds it)
                if regularization is not None:
                    loss = loss + regularization
                (loss / window).backward()
            else:
                out.total.backward()
        if self._split is not None:
            self._split.add(out)
            if self._pieces:  # more of this micro-batch to come
                self._train_seconds += time.perf_counter() - started
                return
            out, loss = self._split.finish(self.params, self.adapter, window)
            self._split = None
        self._window_losses.append(float(loss.detach()))
        _add_metrics(self._window_metric_sums, out.metric_sums)
        self._window_units += out.units
        self.micro += 1
        self.progress.tokens_trained += out.tokens
        self.progress.epoch = self.micro / micro_batches_per_epoch(cfg, len(self.train_examples))
        if self.micro - window_start == window:
            self._optimizer_step()
        self._train_seconds += time.perf_counter() - started
        self._update_rates()

    def _optimizer_step(self) -> None:
        cfg, progress = self.config, self.progress
        for group in self.optimizer.param_groups:
            group["lr"] = learning_rate_at(cfg, progress.step, progress.total_steps)
        if cfg.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(self.params, cfg.max_grad_norm)
        self.optimizer.step()
        self.adapter.after_optimizer_step(progress.step, progress.total_steps)  # gradients still there
        self.optimizer.zero_grad(set_to_none=True)
        progress.step += 1
        _append(progress.train_loss, (progress.step, sum(self._window_losses) / len(self._window_losses)))
        if self._window_metric_sums:
            _append(progress.train_metrics, (progress.step, _mean_metrics(self._window_metric_sums, self._window_units)))
        self._window_losses, self._window_metric_sums, self._window_units = [], {}, 0
        finished = progress.step >= progress.total_steps
        if finished:
            progress.phase = "eval_after" if self.eval_examples else "done"
        if self.checkpoint_dir is not None and (progress.step % cfg.checkpoint_every == 0 or finished):
            self.save_checkpoint()

    def _update_rates(self) -> None:
        # rates over the micro-steps of this process (a resumed run starts measuring afresh)
        if self._train_seconds <= 0:
            return
        done_here = self.micro - self._micro_at_start
        tokens_here = self.progress.tokens_trained - self._tokens_at_start
        self.progress.tokens_per_second = tokens_here / self._train_seconds
        if done_here:
            self.progress.eta_seconds = (self.total_micro - self.micro) * self._train_seconds / done_here

    # ---- checkpoints ------------------------------------------------------------------------------
    def save_checkpoint(self) -> None:
        tensors = {f"param.{name}": p for name, p in self.adapter.named_parameters()}
        optim, groups = optimizer_tensors(self.optimizer)
        tensors.update(optim)
        tensors["rng.dropout"] = self.adapter.generator.get_state()
        extra_tensors, extra_state = self.adapter.extra_state()
        tensors.update({f"extra.{k}": v for k, v in extra_tensors.items()})
        state = {"digest": self._digest, "micro": self.micro, "progress": self.progress.as_dict(),
                 "param_groups": groups, "adapter_state": extra_state}
        save_checkpoint(self.checkpoint_dir, self.progress.step, tensors, state)
        log.info("checkpoint at step %d written to %s", self.progress.step, self.checkpoint_dir)
        if self.checkpoint_saved is not None:
            self.checkpoint_saved()

    def resume(self) -> bool:
        """Continue from the latest checkpoint if there is one; False when there is none.

        Raises ``CheckpointError`` when one exists but was written for another config or dataset."""
        if self.checkpoint_dir is None:
            return False
        found = load_latest(self.checkpoint_dir)
        if found is None:
            return False
        tensors, state = found
        if state.get("digest") != self._digest:
            raise CheckpointError("the checkpoint was written for a different config or dataset")
        with torch.no_grad():
            for name, p in self.adapter.named_parameters():
                if f"param.{name}" not in tensors:
                    raise CheckpointError(f"the checkpoint lacks parameter {name}")
                p.copy_(tensors[f"param.{name}"])
        restore_optimizer(self.optimizer, tensors, state["param_groups"])
        self.adapter.generator.set_state(tensors["rng.dropout"])
        self.adapter.load_extra_state({k[len("extra."):]: v for k, v in tensors.items() if k.startswith("extra.")},
                                      state.get("adapter_state") or {})
        saved = state["progress"]
        p = self.progress
        p.step, p.epoch, p.tokens_trained = saved["step"], saved["epoch"], saved["tokens_trained"]
        p.train_loss = [tuple(x) for x in saved["train_loss"]]
        p.eval_loss = [tuple(x) for x in saved["eval_loss"]]
        p.train_metrics = [tuple(x) for x in saved.get("train_metrics", [])]
        p.eval_metrics = [tuple(x) for x in saved.get("eval_metrics", [])]
        p.eval_loss_before, p.eval_loss_after = saved["eval_loss_before"], saved["eval_loss_after"]
        p.phase = saved["phase"] if saved["phase"] != "eval_before" else "train"
        self.micro = state["micro"]
        p.resumed_from_step = p.step
        self._micro_at_start, self._tokens_at_start = self.micro, p.tokens_trained
        log.info("resumed training at step %d of %d", p.step, p.total_steps)
        return True

    # ---- the result --------------------------------------------------------------------------------
    def weights(self) -> AdapterWeights:
        return self.adapter.to_weights()

    def export(self, folder: Path) -> AdapterWeights:
        """Write the adapter in PEFT format into ``folder``."""
        weights = self.weights()
        write_adapter(weights, folder)
        return weights

    def close(self) -> None:
        """Free the adapter, its gradients and the optimizer state (the base stays resident)."""
        self.optimizer = None
        self.adapter = None
        self.objective = None  # DPO's reference adapter goes with it
        self.params = []
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
