"""Training jobs: validate and queue uploads, run one job at a time on the engine thread between
serving steps, persist every state change, resume after a restart, register the result.

Threads: records are changed on the event loop only. The engine thread runs ``_work`` (one
micro-step of the active run) and reports progress and the end of a run back to the loop with
``call_soon_threadsafe``. Preparing a run (tokenizing, building the adapter, reading the
checkpoint) and exporting it happen in worker threads, so neither serving nor the loop waits.

Cancel wins at every stage: a queued job or one being prepared ends at once (a run built
meanwhile is thrown away), a training one stops before its next micro-step, and one exporting or
registering its adapter ends cancelled after that step (an adapter registered meanwhile is
removed again). Only once the job has succeeded is it too late, and the answer says so.

A failing store (disk full, database locked) never stops the scheduler: the write is logged,
counted, kept and retried every ``retry_seconds`` (``gateway.training.persistence``); a job that
cannot be marked running is failed with the reason, and no new job starts until the store takes
writes again.

Files of a job are kept and removed by ``gateway.training.artifacts``.

Claims: a job runs in the process that claimed it in the store (``TrainingJobStore.claim``: a
lease, renewed every third of ``lease_seconds`` while the job is this process's). With one
process that changes nothing; with replicas sharing the store (``shared``), each job runs once,
a replica that dies leaves its job to another once the lease expires (which resumes it from its
last checkpoint), and a job cancelled on another replica is stopped here at the next renewal.
Records of jobs other replicas run follow the store (``sync``).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import copy
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from pydantic import ValidationError

from adapters.errors import AdapterConflictError, AdapterError, DatasetValidationError
from adapters.kinds.base import AdapterLimits, AdapterWeights
from adapters.sql import DatabaseUnavailableError
from adapters.training.checkpoint import CheckpointError
from adapters.training.config import TrainingConfig
from adapters.training.prepare import PreparedDataset, check_device, check_limits, prepare_dataset
from adapters.training.trainer import TrainingRun
from gateway.background import BackgroundWork
from gateway.training.artifacts import JobArtifacts
from gateway.training.errors import (
    TooManyTrainingJobsError, TrainingJobNotFoundError, TrainingJobStateError, TrainingStoreError,
)
from gateway.training.persistence import JobEndedElsewhereError, RecordWriter
from gateway.waiting import wait_event
from gateway.training.store import (
    CANCELLED, FAILED, QUEUED, RUNNING, SUCCEEDED, TERMINAL, TrainingJobRecord, TrainingJobStore,
)

log = logging.getLogger(__name__)
PROGRESS_EVERY_SECONDS = 0.5  # engine -> loop progress reports
PERSIST_EVERY_SECONDS = 5.0  # progress writes to the store (state changes are written at once)
MAX_PROBLEMS_KEPT = 100
RETRY_SECONDS = 5.0  # a failed store write is tried again this often
TIDY_EVERY_SECONDS = 60.0  # how often ended jobs' files are checked against the retention


@dataclass(frozen=True)
class TrainingLimits:
    max_dataset_bytes: int
    max_dataset_lines: int
    max_line_bytes: int
    max_queued_jobs: int
    context_window: int
    adapter: AdapterLimits
    max_piece_tokens: int | None = None  # the most tokens one training forward holds (TrainingRun)


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
    def __init__(self, *, runtime, tokenizer, store: TrainingJobStore, artifacts: JobArtifacts,
                 limits: TrainingLimits, register: Callable[[str, Path], Awaitable[str]],
                 unregister: Callable[[str], Awaitable[None]], check_adapter_id: Callable[[str], None],
                 duty_cycle: float, retry_seconds: float = RETRY_SECONDS,
                 read_adapter: Callable[[str], AdapterWeights] | None = None, owner: str | None = None,
                 shared: bool = False, lease_seconds: float = 30.0, poll_seconds: float = 5.0):
        """``register(adapter_id, folder)`` validates and registers an exported adapter and returns its id;
        ``unregister(adapter_id)`` removes it again (a cancel that arrived while it was registered);
        ``check_adapter_id`` raises (an ``AdapterError``) when an id could not be registered now;
        ``read_adapter(adapter_id)`` reads a registered adapter's weights (blocking), for jobs that
        start from one (``config.init_adapter``). ``owner`` names this process in job claims;
        ``shared``: other processes run jobs of the same store (see the module docstring), which is
        polled every ``poll_seconds`` besides ``sync`` calls."""
        self.owner = owner or f"gateway-{uuid.uuid4().hex[:12]}"
        self.shared = shared
        self.lease_seconds = lease_seconds
        self.poll_seconds = poll_seconds
        self._lost: set[str] = set()  # jobs this process stopped owning while it ran them
        self._records_lock = asyncio.Lock()  # a sync never sees a record half created or deleted
        self._read_adapter = read_adapter
        self.runtime = runtime
        self.tokenizer = copy.deepcopy(tokenizer)  # worker threads tokenize; serving keeps its own
        self.store = store
        self.artifacts = artifacts
        self.limits = limits
        self.retry_seconds = retry_seconds
        self._register = register
        self._unregister = unregister
        self._check_registry_id = check_adapter_id
        self.background = BackgroundWork(self._work, duty_cycle)
        self._records: dict[str, TrainingJobRecord] = {}
        self._active: _Active | None = None
        self._current: str | None = None  # the job the scheduler works on (preparing .. registering)
        # the jobs this process claimed, newest last (a fleet's replica reports them); bounded
        self.claimed: collections.deque[str] = collections.deque(maxlen=1000)
        self._preparing = False  # its run is being built in a worker thread
        self._cancel_asked: set[str] = set()  # cancels of the current job, honoured at its next stage
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wakeup = asyncio.Event()
        self._changed = asyncio.Event()
        self._scheduler: asyncio.Task | None = None
        self._last_persist: dict[str, float] = {}
        self.writer = RecordWriter(store)  # failed writes are kept and retried, never raised
        self._pending_writes: set[asyncio.Task] = set()
        self.scheduler_errors = 0  # unexpected errors the scheduler survived (a metric)

    # ---- lifecycle ------------------------------------------------------------------------------
    async def start(self) -> None:
        """Load the records; jobs that were queued or running are queued again (running ones resume
        from their last checkpoint when their turn comes). Files no job needs any more are removed."""
        self._loop = asyncio.get_running_loop()
        if not self.shared:  # this process owns the store: every lease is a previous run's
            await asyncio.to_thread(self.store.release_all)
        for record in await asyncio.to_thread(self.store.load_all):
            if record.state == RUNNING and not self.shared:
                record.state = QUEUED
                await self._persist(record)
                log.info("training job %s was interrupted; it will resume from its last checkpoint", record.id)
            self._records[record.id] = record
        # a job whose record does not read keeps its files (adapters.stored_rows)
        await asyncio.to_thread(self.artifacts.remove_orphans, set(self._records) | self.store.unreadable)
        self._scheduler = asyncio.create_task(self._schedule(), name="training-jobs")

    async def close(self) -> None:
        """Stop scheduling; a running job stays 'running' in the store and resumes at the next start."""
        current = self._current
        if self._scheduler is not None:
            self._scheduler.cancel()
            await asyncio.gather(self._scheduler, *self._pending_writes, return_exceptions=True)
        await self.writer.flush()  # a last try; what still fails is logged
        if current is not None and self.shared:  # another replica may take it over at once
            try:
                await asyncio.to_thread(self.store.release, self.owner, current)
            except Exception as exc:  # noqa: BLE001 - the lease then simply expires
                log.warning("training job %s: could not release its lease (%s); it expires in %.0f s", current,
                            exc, self.lease_seconds)
        await asyncio.to_thread(self.store.close)

    # ---- API ------------------------------------------------------------------------------------
    def list(self) -> list[TrainingJobRecord]:
        return sorted(self._records.values(), key=lambda r: (r.created, r.id), reverse=True)

    def find(self, job_id: str) -> TrainingJobRecord | None:
        return self._records.get(job_id)

    def get(self, job_id: str) -> TrainingJobRecord:
        record = self._records.get(job_id)
        if record is None:
            raise TrainingJobNotFoundError(f"the training job {job_id!r} does not exist")
        return record

    @property
    def changed(self) -> asyncio.Event:
        """Set at the next change of any record (then replaced): ``await jobs.changed.wait()``."""
        return self._changed

    async def create(self, data: bytes, config: TrainingConfig, *, validation: bytes | None = None,
                     fine_tuning: dict | None = None) -> TrainingJobRecord:
        """Validate the dataset and config, then queue the job. Raises ``DatasetValidationError``
        (every bad line), ``ValueError`` (config), ``AdapterConflictError``, ``TooManyTrainingJobsError``
        or ``TrainingStoreError`` (nothing is queued, nothing left on disk).

        ``validation``: a separate validation set (its eval loss replaces a held-out share of the
        training data); ``fine_tuning``: what the OpenAI-style API was asked, kept on the record."""
        for what, blob in (("dataset", data), ("validation set", validation or b"")):
            if len(blob) > self.limits.max_dataset_bytes:
                raise DatasetValidationError(
                    f"the {what} is {len(blob)} bytes; the limit is {self.limits.max_dataset_bytes}")
        check_limits(config, self.limits.adapter)
        check_device(config, self.runtime.device)
        job_id = f"train-{uuid.uuid4().hex[:12]}"
        adapter_id = config.adapter_id or job_id
        self._check_room(adapter_id)  # before the dataset is read; again when the job is added
        prepared = await asyncio.to_thread(self._prepare, data, config, validation)
        check_limits(config, self.limits.adapter, n_train=len(prepared.train))  # the schedule against the run
        try:
            await asyncio.to_thread(self.artifacts.write_dataset, job_id, data)
            if validation is not None:
                await asyncio.to_thread(self.artifacts.write_validation, job_id, validation)
        except OSError as exc:
            raise TrainingStoreError(f"the dataset could not be saved: {exc}") from None
        record = TrainingJobRecord(
            id=job_id, state=QUEUED, config=config.model_dump(mode="json", by_alias=True), created=time.time(),
            dataset={"format": prepared.format, "bytes": len(data), "train_examples": len(prepared.train),
                     "eval_examples": len(prepared.eval), "skipped_lines": len(prepared.problems),
                     "problems": [list(p) for p in prepared.problems[:MAX_PROBLEMS_KEPT]]},
            fine_tuning=fine_tuning)
        refused: Exception | None = None
        async with self._records_lock:
            try:  # creates sent together all passed the first check while their datasets were read
                self._check_room(adapter_id)
            except (TooManyTrainingJobsError, AdapterConflictError) as exc:
                refused = exc
            else:
                self._records[job_id] = record  # no await since the check: the next create sees it
                try:  # the limit again in the store: every replica's jobs count
                    saved = await self.writer.insert(record, self.limits.max_queued_jobs)
                except TooManyTrainingJobsError as exc:
                    refused, saved = exc, False
                if not saved:
                    del self._records[job_id]
        if refused is not None:
            await asyncio.to_thread(self.artifacts.remove, job_id)
            raise refused
        if not saved:
            await asyncio.to_thread(self.artifacts.remove, job_id)
            self._notify()
            if isinstance(self.writer.last_exception, DatabaseUnavailableError):
                raise DatabaseUnavailableError(f"the job could not be saved: {self.writer.last_exception}")
            raise TrainingStoreError(f"the job could not be saved: {self.writer.last_error}")
        log.info("training job %s queued (%s, %d examples)", job_id, config.kind.value, len(prepared.train))
        self._notify()
        self._wakeup.set()
        return record

    async def cancel(self, job_id: str) -> TrainingJobRecord:
        """End the job as cancelled, at whatever stage it is (see the module docstring)."""
        record = self.get(job_id)
        if record.state in TERMINAL:
            raise TrainingJobStateError(_too_late(record))
        if job_id != self._current or self._preparing:
            async with self._records_lock:  # a sync must not put back the state it read before this write
                await self._end(record, CANCELLED)  # a run being built meanwhile is thrown away
            return record
        self._cancel_asked.add(job_id)
        active = self._active
        if active is not None and active.record is record:
            active.cancel_requested = True  # the engine thread stops it before its next micro-step
            self.background.wake()
        while record.state not in TERMINAL:
            await self.changed.wait()
        return record

    async def delete(self, job_id: str) -> None:
        """Forget an ended job and remove its files (its registered adapter, if any, stays)."""
        record = self.get(job_id)
        if record.state not in TERMINAL:
            raise TrainingJobStateError(f"the training job {job_id!r} is {record.state}; cancel it first")
        async with self._records_lock:
            await self.writer.delete(job_id)
            self._records.pop(job_id, None)
        self._last_persist.pop(job_id, None)
        await asyncio.to_thread(self.artifacts.remove, job_id)
        log.info("training job %s deleted", job_id)
        self._notify()

    async def sync(self) -> None:
        """Follow the store's records, which other replicas change: their jobs' progress and
        states, jobs they created or deleted. The job this process runs, and records whose write
        is still pending here, stay as they are in memory (they are newer). Record objects are
        updated in place, so whoever holds one sees the change."""
        async with self._records_lock:
            if self.writer.unsaved:
                return
            rows = {r.id: r for r in await asyncio.to_thread(self.store.load_all)}
            gone = [i for i in self._records if i not in rows and i not in self.store.unreadable and i != self._current]
            for job_id in gone:
                del self._records[job_id]
            for job_id, row in rows.items():
                if job_id != self._current:
                    self._adopt(row)
        self._notify()
        self._wakeup.set()

    def _adopt(self, row: TrainingJobRecord) -> TrainingJobRecord:
        record = self._records.get(row.id)
        if record is None:
            self._records[row.id] = record = row
        else:
            vars(record).update(vars(row))
        return record

    def _check_room(self, adapter_id: str) -> None:
        """Refuse a new job past the queue's limit, or one whose adapter id is registered or will be
        by a job queued or running."""
        active = [r for r in self._records.values() if r.state not in TERMINAL]
        if len(active) >= self.limits.max_queued_jobs:
            raise TooManyTrainingJobsError(f"{len(active)} training jobs are queued or running (limit "
                                           f"{self.limits.max_queued_jobs}); wait for one to finish")
        self._check_registry_id(adapter_id)
        for other in active:
            if (other.config.get("adapter_id") or other.id) == adapter_id:
                raise AdapterConflictError(f"the training job {other.id} will register {adapter_id!r} already")

    def _prepare(self, data: bytes, config: TrainingConfig, validation: bytes | None = None) -> PreparedDataset:
        """Tokenize and split; with a separate validation set, all of ``data`` trains and the
        validation set's examples are the eval split (its errors say 'validation file')."""
        def prepare(blob: bytes, cfg: TrainingConfig) -> PreparedDataset:
            return prepare_dataset(blob, self.tokenizer, cfg, max_lines=self.limits.max_dataset_lines,
                                   max_line_bytes=self.limits.max_line_bytes, context_window=self.limits.context_window,
                                   max_piece_tokens=self.limits.max_piece_tokens)

        if validation is None:
            return prepare(data, config)
        whole = config.model_copy(update={"eval_fraction": 0.0})
        train = prepare(data, whole)
        try:
            held = prepare(validation, whole)
        except DatasetValidationError as exc:
            error = DatasetValidationError(f"validation file: {exc}", exc.problems)
            error.param = "validation_file"  # read by gateway.errors
            raise error from None
        return PreparedDataset(format=train.format, train=train.train, eval=held.train,
                               problems=train.problems + held.problems)

    # ---- scheduling (event loop) ----------------------------------------------------------------
    async def _schedule(self) -> None:
        """Run queued jobs one at a time, oldest first. Nothing may end this loop but ``close``."""
        while True:
            try:
                await self._schedule_once()
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - log, count, and carry on after a pause
                self.scheduler_errors += 1
                log.exception("training scheduler error; retrying in %.1f s", self.retry_seconds)
                await asyncio.sleep(self.retry_seconds)

    async def _schedule_once(self) -> None:
        if not await self.writer.flush():
            await self._idle(self.retry_seconds)  # no new job while the store refuses writes
            return
        await self._tidy(list(self._records.values()))
        try:
            if self.shared:
                await self.sync()  # jobs other replicas created (a missed notification heals here too)
            claimed = await asyncio.to_thread(self.store.claim, self.owner, self.lease_seconds, time.time())
        except DatabaseUnavailableError as exc:  # expected while the server is away: no traceback
            log.warning("training jobs: %s; trying again in %.1f s", exc, self.retry_seconds)
            await self._idle(self.retry_seconds)
            return
        if claimed is None:
            await self._idle(self.poll_seconds if self.shared else TIDY_EVERY_SECONDS)
            return
        known = self._records.get(claimed.id)
        if known is not None and known.state in TERMINAL:
            # cancelled while the claim was in flight (the cancel saw no job running, ended it and
            # answered so): the claim read the row before, and adopting it would run the job anyway
            log.info("training job %s ended while it was being claimed; not running it", claimed.id)
            await asyncio.to_thread(self.store.release, self.owner, claimed.id)
            return
        self._current = claimed.id
        self.claimed.append(claimed.id)
        log.info("training job %s claimed by %s", claimed.id, self.owner)
        record = self._adopt(claimed)  # the row as claimed: another replica may have run it before
        lease = asyncio.get_running_loop().create_task(self._keep_lease(record.id))
        try:
            await self._run_job(record)
        except Exception:
            # an unexpected error: give the claim up, so the job is taken again after the pause
            with contextlib.suppress(Exception):
                await asyncio.to_thread(self.store.release, self.owner, record.id)
            raise
        finally:
            lease.cancel()
            self._current, self._preparing = None, False
            self._cancel_asked.discard(record.id)
            self._lost.discard(record.id)

    async def _keep_lease(self, job_id: str) -> None:
        """Renew this process's claim on the job it runs; stop the job when it is no longer ours."""
        while True:
            await asyncio.sleep(self.lease_seconds / 3)
            try:
                mine = await asyncio.to_thread(self.store.renew, self.owner, job_id, self.lease_seconds, time.time())
            except Exception as exc:  # noqa: BLE001 - the job goes on; the lease may still be renewed later
                log.warning("training job %s: cannot renew its lease: %s", job_id, exc)
                continue
            if not mine:
                log.warning("training job %s ended on another replica or was taken over by one; stopping it here",
                            job_id)
                self._lost.add(job_id)
                self._cancel_asked.add(job_id)
                active = self._active
                if active is not None and active.record.id == job_id:
                    active.cancel_requested = True
                    self.background.wake()
                return

    async def _tidy(self, records: list[TrainingJobRecord]) -> None:
        """Remove files ended jobs no longer need; a failure (a folder we may not touch) is logged and
        never keeps jobs from running."""
        try:
            await asyncio.to_thread(self.artifacts.tidy, records)
        except OSError as exc:
            log.warning("cannot remove the files of ended training jobs: %s", exc)

    async def _idle(self, seconds: float) -> None:
        self._wakeup.clear()
        await wait_event(self._wakeup, seconds)

    async def _run_job(self, record: TrainingJobRecord) -> None:
        try:
            config = TrainingConfig.model_validate(record.config)
        except ValidationError as exc:
            # a job stored before a bound tightened (or by a newer release): raising here would make
            # the scheduler take it again and again, and no job after it would ever run
            if record.state not in TERMINAL:
                problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors()[:3])
                await self._end(record, FAILED, f"cannot start: its stored config is no longer valid ({problems})")
            return
        self._preparing = True
        try:
            run = await asyncio.to_thread(self._build_run, record, config)
        except (AdapterError, CheckpointError, DatasetValidationError, OSError, ValueError) as exc:
            if record.state not in TERMINAL:  # unless cancelled meanwhile
                await self._end(record, FAILED, f"cannot start: {exc}")
            return
        except Exception as exc:  # noqa: BLE001 - any failure ends this job, never the gateway
            if record.state not in TERMINAL:
                await self._end(record, FAILED, describe_failure(exc, config))
            return
        finally:
            self._preparing = False
        try:
            if record.state in TERMINAL:  # cancelled while it was being prepared
                return
            record.state, record.started = RUNNING, record.started or time.time()
            record.progress = run.progress.as_dict()
            if not await self._persist(record):
                await self._end(record, FAILED, f"the job could not be marked running, so it was not started: "
                                                f"{self.writer.last_error}")
                return
            active = _Active(record, run, self._loop.create_future())
            active.cancel_requested = record.id in self._cancel_asked  # asked while the state was written
            self._active = active
            self.background.wake()
            try:
                state, error = await asyncio.shield(active.finished)
            finally:
                self._active = None
            if state == SUCCEEDED:
                await self._finish_success(record, config, run)
            else:
                await self._end(record, state, error)
        finally:
            await asyncio.to_thread(run.close)

    def _build_run(self, record: TrainingJobRecord, config: TrainingConfig) -> TrainingRun:
        self.artifacts.pull(record.id)  # with a shared store: the dataset and newest checkpoint of any replica
        data = self.artifacts.dataset(record.id).read_bytes()
        validation_path = self.artifacts.validation(record.id)
        validation = validation_path.read_bytes() if validation_path.is_file() else None
        prepared = self._prepare(data, config, validation)
        initial = None
        if config.init_adapter is not None:
            if self._read_adapter is None:
                raise ValueError("this gateway cannot start training from a registered adapter")
            initial = self._read_adapter(config.init_adapter)
        run = TrainingRun(self.runtime, self.tokenizer, config, prepared.train, prepared.eval,
                          self.artifacts.checkpoints(record.id), initial=initial,
                          max_piece_tokens=self.limits.max_piece_tokens)
        run.checkpoint_saved = lambda: self.artifacts.checkpoint_saved(record.id)
        run.resume()
        return run

    async def _finish_success(self, record: TrainingJobRecord, config: TrainingConfig, run: TrainingRun) -> None:
        out = self.artifacts.export(record.id)
        try:
            await asyncio.to_thread(run.export, out)
            await asyncio.to_thread(self.artifacts.export_written, record.id)
        except OSError as exc:
            await self._end(record, FAILED, f"cannot write the adapter: {exc}")
            return
        if record.id in self._cancel_asked:
            await self._end(record, CANCELLED, None)
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
                adapter_id = await self._register(config.adapter_id or record.id, out)
            except Exception as exc:  # noqa: BLE001 - validation or conflict: the job says why
                await self._end(record, FAILED, f"training finished but registering the adapter failed: {exc}")
                return
            if record.id in self._cancel_asked and await self._withdraw(record, adapter_id):
                return
            record.adapter_id = adapter_id
        await self._end(record, SUCCEEDED)
        if record.adapter_id is not None:
            await self._withdraw_if_ended_elsewhere(record)

    async def _withdraw(self, record: TrainingJobRecord, adapter_id: str) -> bool:
        """A cancel arrived while the adapter was being registered: remove it again (cancel wins);
        False (and a note on the job) when that fails, so the job ends succeeded."""
        try:
            await self._unregister(adapter_id)
        except Exception as exc:  # noqa: BLE001 - e.g. an experiment started using it meanwhile
            record.note = (f"the cancel arrived while the adapter {adapter_id!r} was being registered, and it "
                           f"could not be removed again ({exc}); it stays registered")
            return False
        await self._end(record, CANCELLED, None)
        return True

    async def _withdraw_if_ended_elsewhere(self, record: TrainingJobRecord) -> None:
        """The store did not take this run's success: another replica's cancel committed after the
        last cancel check here, while the adapter was being registered (an ended row is final). The
        stored ending stands, and the adapter goes again, as a local cancel's does."""
        try:
            stored = next((r for r in await asyncio.to_thread(self.store.load_all) if r.id == record.id), None)
        except Exception as exc:  # noqa: BLE001 - the success stands here; a resync adopts the store's view
            log.warning("training job %s: cannot check its stored ending: %s", record.id, exc)
            return
        if stored is None or stored.state not in (CANCELLED, FAILED):
            return
        adapter_id = record.adapter_id
        try:
            await self._unregister(adapter_id)
        except Exception as exc:  # noqa: BLE001 - e.g. an experiment started using it meanwhile
            log.error("training job %s ended %s on another replica while its adapter %s was registered here; the "
                      "adapter could not be removed again (%s): delete it by hand", record.id, stored.state,
                      adapter_id, exc)
        else:
            log.warning("training job %s ended %s on another replica while its adapter %s was registered here; "
                        "the adapter was removed again", record.id, stored.state, adapter_id)
        vars(record).update(vars(stored))
        self._notify()

    async def _end(self, record: TrainingJobRecord, state: str, error: str | None = None) -> None:
        if record.id in self._lost:  # the store says what became of it (another replica's doing)
            self._notify()
            return
        before = copy.deepcopy(record)
        record.state, record.error, record.finished = state, error, time.time()
        try:
            saved = await self._persist(record, notify=False)
        except JobEndedElsewhereError:  # e.g. a cancel here raced the job's success on the replica running it
            rows = {r.id: r for r in await asyncio.to_thread(self.store.load_all)}
            vars(record).update(vars(rows.get(record.id, before)))  # what the store says it became
            self._notify()
            raise TrainingJobStateError(_too_late(record)) from None
        log.log(logging.WARNING if state == FAILED else logging.INFO, "training job %s %s%s", record.id, state,
                f": {error}" if error else "")
        if saved:  # files go only once the store knows the job ended
            await self._tidy([record])
        self._notify()  # waiters (a cancel, event streams) see the job ended, its files tidied

    # ---- persistence ----------------------------------------------------------------------------
    async def _persist(self, record: TrainingJobRecord, notify: bool = True) -> bool:
        """Write the record's latest state; False (logged, counted, retried later) when the store fails."""
        self._last_persist[record.id] = time.monotonic()
        if notify:
            self._notify()
        # the job this process runs is written only while its claim is ours
        return await self.writer.put(record, self.owner if record.id == self._current else None)

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


def _too_late(record: TrainingJobRecord) -> str:
    message = f"the training job {record.id!r} already ended ({record.state})"
    if record.adapter_id is not None:
        message += (f"; its adapter {record.adapter_id!r} is registered and stays so: remove it with "
                    f"DELETE /admin/adapters/{record.adapter_id}")
    return message

