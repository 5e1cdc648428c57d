"""Training jobs: validate and queue uploads, run one job at a time on the engine thread between
serving steps, persist every state change, resume after a restart, register the result.

Threads: records are changed on the event loop only. The engine thread runs ``_work`` (one
micro-step of the active run) and reports progress and the end of a run back to the loop with
``call_soon_threadsafe``. Preparing a run (tokenizing, building the adapter, reading the
checkpoint) and exporting it happen in worker threads, so neither serving nor the loop waits.

Files of a job live in ``root/<job id>/``: ``dataset.jsonl`` (as uploaded), ``checkpoints/`` and
``adapter/`` (the PEFT export). The dataset is kept so a restart can rebuild the same run.
"""

from __future__ import annotations

import asyncio
import copy
import logging
import shutil
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from adapters.errors import AdapterConflictError, DatasetValidationError
from adapters.kinds.base import AdapterLimits
from adapters.training.checkpoint import CheckpointError
from adapters.training.config import TrainingConfig
from adapters.training.prepare import check_limits, prepare_dataset
from adapters.training.trainer import TrainingRun
from gateway.background import BackgroundWork
from gateway.training.store import (
    CANCELLED, FAILED, QUEUED, RUNNING, SUCCEEDED, TERMINAL, TrainingJobRecord, TrainingJobStore,
)

log = logging.getLogger(__name__)
DATASET_FILE = "dataset.jsonl"
PROGRESS_EVERY_SECONDS = 0.5  # engine -> loop progress reports
PERSIST_EVERY_SECONDS = 5.0  # progress writes to the store (state changes are written at once)
MAX_PROBLEMS_KEPT = 100


@dataclass(frozen=True)
class TrainingLimits:
    max_dataset_bytes: int
    max_dataset_lines: int
    max_line_bytes: int
    max_queued_jobs: int
    context_window: int
    adapter: AdapterLimits


class TrainingJobError(Exception):
    """A job request that cannot be honoured (unknown job, wrong state, too many jobs)."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


class _Active:
    """The job the engine thread is training, and what it reports back."""

    def __init__(self, record: TrainingJobRecord, run: TrainingRun, finished: asyncio.Future):
        self.record = record
        self.run = run
        self.finished = finished  # result: (state, error message or None)
        self.cancel_requested = False
        self.ended = False  # set by the engine thread once the outcome is known
        self.last_report = 0.0


def describe_failure(exc: BaseException, config: TrainingConfig) -> str:
    if isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower():
        return (f"out of memory while training (batch_size {config.batch_size}, max_seq_len "
                f"{config.max_seq_len}); lower them, or use grad_accumulation")
    return f"training failed: {type(exc).__name__}: {str(exc)[:500]}"


class TrainingJobs:
    def __init__(self, *, runtime, tokenizer, store: TrainingJobStore, root: Path, limits: TrainingLimits,
                 register: Callable[[str, Path], Awaitable[str]], check_adapter_id: Callable[[str], None],
                 duty_cycle: float):
        """``register(adapter_id, folder)`` validates and registers an exported adapter and returns its id;
        ``check_adapter_id`` raises (an ``AdapterError``) when an id could not be registered now."""
        self.runtime = runtime
        self.tokenizer = copy.deepcopy(tokenizer)  # worker threads tokenize; serving keeps its own
        self.store = store
        self.root = root
        self.limits = limits
        self._register = register
        self._check_registry_id = check_adapter_id
        self.background = BackgroundWork(self._work, duty_cycle)
        self._records: dict[str, TrainingJobRecord] = {}
        self._active: _Active | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wakeup = asyncio.Event()
        self._changed = asyncio.Event()
        self._scheduler: asyncio.Task | None = None
        self._last_persist: dict[str, float] = {}
        self._store_lock = asyncio.Lock()  # writes reach the store in the order they were made
        self._pending_writes: set[asyncio.Task] = set()

    # ---- lifecycle ------------------------------------------------------------------------------
    async def start(self) -> None:
        """Load the records; jobs that were queued or running are queued again (running ones resume
        from their last checkpoint when their turn comes)."""
        self._loop = asyncio.get_running_loop()
        for record in await asyncio.to_thread(self.store.load_all):
            if record.state == RUNNING:
                record.state = QUEUED
                await self._persist(record)
                log.info("training job %s was interrupted; it will resume from its last checkpoint", record.id)
            self._records[record.id] = record
        self._scheduler = asyncio.create_task(self._schedule(), name="training-jobs")

    async def close(self) -> None:
        """Stop scheduling; a running job stays 'running' in the store and resumes at the next start."""
        if self._scheduler is not None:
            self._scheduler.cancel()
            await asyncio.gather(self._scheduler, *self._pending_writes, return_exceptions=True)
        await asyncio.to_thread(self.store.close)

    # ---- API ------------------------------------------------------------------------------------
    def list(self) -> list[TrainingJobRecord]:
        return sorted(self._records.values(), key=lambda r: (r.created, r.id), reverse=True)

    def get(self, job_id: str) -> TrainingJobRecord:
        record = self._records.get(job_id)
        if record is None:
            raise TrainingJobError(f"the training job {job_id!r} does not exist", status=404)
        return record

    @property
    def changed(self) -> asyncio.Event:
        """Set at the next change of any record (then replaced): ``await jobs.changed.wait()``."""
        return self._changed

    async def create(self, data: bytes, config: TrainingConfig) -> TrainingJobRecord:
        """Validate the dataset and config, then queue the job. Raises ``DatasetValidationError``
        (every bad line), ``ValueError`` (config), ``AdapterConflictError`` or ``TrainingJobError``."""
        if len(data) > self.limits.max_dataset_bytes:
            raise DatasetValidationError(
                f"the dataset is {len(data)} bytes; the limit is {self.limits.max_dataset_bytes}")
        check_limits(config, self.limits.adapter)
        active = [r for r in self._records.values() if r.state not in TERMINAL]
        if len(active) >= self.limits.max_queued_jobs:
            raise TrainingJobError(f"{len(active)} training jobs are queued or running (limit "
                                   f"{self.limits.max_queued_jobs}); wait for one to finish", status=429)
        job_id = f"train-{uuid.uuid4().hex[:12]}"
        adapter_id = config.adapter_id or job_id
        self._check_adapter_id(adapter_id, active)
        prepared = await asyncio.to_thread(self._prepare, data, config)
        folder = self.root / job_id
        await asyncio.to_thread(_write_new, folder / DATASET_FILE, data)
        record = TrainingJobRecord(
            id=job_id, state=QUEUED, config=config.model_dump(mode="json", by_alias=True), created=time.time(),
            dataset={"format": prepared.format, "bytes": len(data), "train_examples": len(prepared.train),
                     "eval_examples": len(prepared.eval), "skipped_lines": len(prepared.problems),
                     "problems": [list(p) for p in prepared.problems[:MAX_PROBLEMS_KEPT]]})
        self._records[job_id] = record
        await self._persist(record)
        log.info("training job %s queued (%s, %d examples)", job_id, config.kind.value, len(prepared.train))
        self._wakeup.set()
        return record

    async def cancel(self, job_id: str) -> TrainingJobRecord:
        record = self.get(job_id)
        if record.state in TERMINAL:
            raise TrainingJobError(f"the training job {job_id!r} already ended ({record.state})", status=409)
        active = self._active
        if active is not None and active.record.id == job_id:
            active.cancel_requested = True  # the engine thread stops it before its next micro-step
            self.background.wake()
            while record.state not in TERMINAL:
                await self.changed.wait()
        else:
            await self._end(record, CANCELLED)
        return record

    def _check_adapter_id(self, adapter_id: str, active: list[TrainingJobRecord]) -> None:
        self._check_registry_id(adapter_id)
        for other in active:
            if (other.config.get("adapter_id") or other.id) == adapter_id:
                raise AdapterConflictError(f"the training job {other.id} will register {adapter_id!r} already")

    def _prepare(self, data: bytes, config: TrainingConfig):
        return prepare_dataset(data, self.tokenizer, config, max_lines=self.limits.max_dataset_lines,
                               max_line_bytes=self.limits.max_line_bytes, context_window=self.limits.context_window)

    # ---- scheduling (event loop) ----------------------------------------------------------------
    async def _schedule(self) -> None:
        while True:
            queued = [r for r in self._records.values() if r.state == QUEUED]
            if not queued:
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            await self._run_job(min(queued, key=lambda r: (r.created, r.id)))

    async def _run_job(self, record: TrainingJobRecord) -> None:
        config = TrainingConfig.model_validate(record.config)
        try:
            run = await asyncio.to_thread(self._build_run, record, config)
        except (CheckpointError, DatasetValidationError, OSError, ValueError) as exc:
            await self._end(record, FAILED, f"cannot start: {exc}")
            return
        except Exception as exc:  # noqa: BLE001 - any failure ends this job, never the gateway
            await self._end(record, FAILED, describe_failure(exc, config))
            return
        record.state, record.started = RUNNING, record.started or time.time()
        record.progress = run.progress.as_dict()
        await self._persist(record)
        active = _Active(record, run, self._loop.create_future())
        self._active = active
        self.background.wake()
        try:
            state, error = await asyncio.shield(active.finished)
            if state == SUCCEEDED:
                await self._finish_success(record, config, run)
            else:
                await self._end(record, state, error)
        finally:
            self._active = None
            await asyncio.to_thread(run.close)

    def _build_run(self, record: TrainingJobRecord, config: TrainingConfig) -> TrainingRun:
        folder = self.root / record.id
        data = (folder / DATASET_FILE).read_bytes()
        prepared = self._prepare(data, config)
        run = TrainingRun(self.runtime, self.tokenizer, config, prepared.train, prepared.eval, folder / "checkpoints")
        run.resume()
        return run

    async def _finish_success(self, record: TrainingJobRecord, config: TrainingConfig, run: TrainingRun) -> None:
        out = self.root / record.id / "adapter"
        try:
            await asyncio.to_thread(run.export, out)
        except OSError as exc:
            await self._end(record, FAILED, f"cannot write the adapter: {exc}")
            return
        p = run.progress
        improved = p.eval_loss_before is None or (p.eval_loss_after is not None and p.eval_loss_after < p.eval_loss_before)
        if not config.register_adapter:
            record.note = "not registered (register: false)"
        elif config.register_only_if_improved and not improved:
            record.note = (f"not registered: eval loss did not improve ({p.eval_loss_before:.4f} -> "
                           f"{p.eval_loss_after:.4f})")
        else:
            try:
                record.adapter_id = await self._register(config.adapter_id or record.id, out)
            except Exception as exc:  # noqa: BLE001 - validation or conflict: the job says why
                await self._end(record, FAILED, f"training finished but registering the adapter failed: {exc}")
                return
        shutil.rmtree(self.root / record.id / "checkpoints", ignore_errors=True)
        await self._end(record, SUCCEEDED)

    async def _end(self, record: TrainingJobRecord, state: str, error: str | None = None) -> None:
        record.state, record.error, record.finished = state, error, time.time()
        log.log(logging.WARNING if state == FAILED else logging.INFO, "training job %s %s%s", record.id, state,
                f": {error}" if error else "")
        await self._persist(record)

    async def _persist(self, record: TrainingJobRecord) -> None:
        self._last_persist[record.id] = time.monotonic()
        self._notify()
        async with self._store_lock:
            await asyncio.to_thread(self.store.put, copy.deepcopy(record))  # the latest state, in order

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    def _on_progress(self, active: _Active, progress: dict) -> None:
        if self._active is not active:
            return
        active.record.progress = progress
        self._notify()
        if time.monotonic() - self._last_persist.get(active.record.id, 0.0) >= PERSIST_EVERY_SECONDS:
            task = asyncio.get_running_loop().create_task(self._persist(active.record))
            self._pending_writes.add(task)
            task.add_done_callback(self._pending_writes.discard)

    # ---- engine thread --------------------------------------------------------------------------
    def _work(self) -> bool:
        """One micro-step of the active run; False when there is nothing (more) to do now."""
        active = self._active
        if active is None or active.ended:
            return False
        outcome: tuple[str, str | None] | None = None
        if active.cancel_requested:
            outcome = (CANCELLED, None)
        else:
            try:
                if not active.run.micro_step():
                    outcome = (SUCCEEDED, None)
            except Exception as exc:  # noqa: BLE001 - the job fails, serving goes on
                log.exception("training job %s failed", active.record.id)
                outcome = (FAILED, describe_failure(exc, active.run.config))
                active.run.optimizer.zero_grad(set_to_none=True)
        now = time.monotonic()
        if outcome is not None or now - active.last_report >= PROGRESS_EVERY_SECONDS:
            active.last_report = now
            self._loop.call_soon_threadsafe(self._on_progress, active, active.run.progress.as_dict())
        if outcome is not None:
            active.ended = True
            self._loop.call_soon_threadsafe(_resolve, active.finished, outcome)
            return False
        return True


def _resolve(future: asyncio.Future, outcome: tuple[str, str | None]) -> None:
    if not future.done():
        future.set_result(outcome)


def _write_new(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(data)
    tmp.replace(path)

