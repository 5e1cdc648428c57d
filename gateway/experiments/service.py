"""Experiments as the gateway runs them: definitions and their state, routing requests to arms,
recording outcomes and feedback, and computing results.

Definitions live in memory (routing never waits on the database) and in the store. Every store
call runs on one worker thread, in submission order: a request's row is queued when its work
ends, before its response is sent, so feedback on that response always finds it (until the row is
pruned, past the experiment's latest ``MAX_STORED_REQUESTS``: feedback on it is then refused as on
an unknown id, while what it counted stays in the results).

Capture (an experiment created with ``capture: true``): the prompt and answer of each finished
chat request it routed wait in memory, one JSON string and the answer each (at most
``capture_pending`` of them and ``PENDING_CAPTURE_BYTES`` in all, oldest dropped first); only those
that receive feedback are written to the store (at most ``MAX_STORED_CAPTURES`` per experiment),
and only those make preference files. What is dropped or refused is logged and counted (results,
``gateway_experiment_captures_dropped_total``).

Heavy work stays off the event loop: results are read and computed on a thread of their own (on
SQLite with a connection of their own, so they never hold up the writes of requests and feedback;
per-arm totals and a bounded sample, see ``store.arm_data``), shared by concurrent callers and
reused for a while after; preference files are built in a worker thread, against the files' limits.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import math
import secrets
import sys
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, TypeVar

from prometheus_client import CollectorRegistry

from adapters.registry import AdapterRegistry
from adapters.sql import DatabaseUnavailableError, Transaction
from gateway.experiments.errors import (
    CompletionNotFoundError, ExperimentConflictError, ExperimentNotFoundError, ExperimentValidationError,
    UnknownArmModelError,
)
from gateway.experiments.assignment import Arm, assign_arm, assign_per_request, validate_weights
from gateway.experiments.metrics import ExperimentMetrics
from gateway.experiments.preferences import PairSummary, rate, select_pairs, write_jsonl
from gateway.experiments.results import experiment_results
from gateway.experiments.store import (
    CANCELLED, MAX_STORED_CAPTURES, MAX_STORED_REQUESTS, CaptureRow, Experiment, ExperimentStore, FeedbackRow,
    RequestRow, Stickiness, Thumbs, UnknownCompletionError, experiments_in,
)
from gateway.generation import Assignment, GenerationService, RequestRecord
from gateway.settings import Settings

log = logging.getLogger(__name__)
T = TypeVar("T")
# Memory the captures awaiting feedback may hold in all (counted as the Python size of their texts
# plus PENDING_ENTRY_BYTES each), besides their number (capture_pending): 1024 requests of 32768
# characters fit. Oldest dropped first.
PENDING_CAPTURE_BYTES = 64 * 1024 * 1024
PENDING_ENTRY_BYTES = 512  # the row object, its id and its place in the ordered dict
# feedback on an id not recorded yet, with replicas sharing a database: retried this long, this often
SHARED_RECORDING_LAG_SECONDS = 2.0
UNRECORDED_ROWS = 10_000  # request rows kept while the database cannot be reached
FEEDBACK_RETRY_SECONDS = 0.1
CAPTURE_PAGE = 256  # captured answers one read of a preference file's first pass brings back
# Results read per-arm totals and each arm's latest timings (milliseconds, however long the
# experiment ran): one computation serves every caller for RESULTS_REUSE times as long as it took
# (at most RESULTS_MAX_AGE_S), so pollers, however many, keep the reading thread busy a fifth of the
# time at most.
RESULTS_REUSE = 4.0
RESULTS_MAX_AGE_S = 30.0


def subject_hash(salt: str, subject: str) -> str:
    """What is stored about a subject: enough to count distinct subjects, not to recover them."""
    return hashlib.sha256(f"{len(salt)}:{salt}{subject}".encode()).hexdigest()[:16]


class ExperimentService:
    def __init__(self, store: ExperimentStore, metrics: ExperimentMetrics, *, is_model: Callable[[str], bool],
                 max_experiments: int, min_samples: int, default_subject_header: str,
                 capture_max_chars: int = 32768, capture_pending: int = 1024, recording_lag_seconds: float = 0.0,
                 is_adapter: Callable[[str], bool] | None = None):
        self.store = store
        # with the registry in the same database: the name and the arms that are adapters are
        # checked against its rows as the experiment is written
        self._is_adapter = is_adapter
        # replicas sharing one database: a request's row is written after its answer went out, so
        # feedback sent at once to another replica may arrive first; it waits up to this long
        self.recording_lag_seconds = recording_lag_seconds
        self.metrics = metrics
        self._is_model = is_model  # an adapter id or the base model's name
        self.max_experiments = max_experiments
        self.min_samples = min_samples
        self.default_subject_header = default_subject_header
        self.capture_max_chars = capture_max_chars  # prompt + answer of one captured request
        self.capture_pending = capture_pending  # captured requests held in memory awaiting feedback
        # completion id -> (capture, its bytes); all of these are read and changed on the event loop only
        self._pending: OrderedDict[str, tuple[CaptureRow, int]] = OrderedDict()
        self._pending_bytes = 0
        self._pending_of: Counter[str] = Counter()  # experiment -> its captures pending
        self._dropped: dict[str, Counter[str]] = {}  # experiment -> reason ("evicted", "limit") -> count
        self._preference_builds = asyncio.Semaphore(1)  # one file in memory at a time
        self._experiments: dict[str, Experiment] = {e.name: e for e in store.load_experiments()}
        self._lock = asyncio.Lock()  # one change of definitions at a time
        self._db = ThreadPoolExecutor(max_workers=1, thread_name_prefix="experiments-db")
        self._unrecorded: list[RequestRow] = []  # rows the database refused (unreachable): written later
        # results: their own thread (and, on SQLite, connection), so a long read does not hold up writes
        self._reads = ThreadPoolExecutor(max_workers=1, thread_name_prefix="experiments-results")
        # name -> (definition it was computed for, monotonic time it is good until, results)
        self._results: dict[str, tuple[Experiment, float, dict[str, Any]]] = {}
        # name -> (definition, its computation in flight)
        self._results_running: dict[str, tuple[Experiment, asyncio.Future]] = {}

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.wrap_future(self._db.submit(fn, *args))

    def close(self) -> None:
        """Finish queued writes, then close the store (blocking)."""
        self._reads.shutdown(wait=True)
        self._db.shutdown(wait=True)
        self.store.close()

    # ---- names and guards (called by the registry and the routes) -------------------------------
    def name_taken(self, name: str) -> bool:
        return name in self._experiments

    def name_guard(self, adapter_id: str) -> str | None:
        """Registry guard: an adapter id may not be an experiment's name."""
        return f"'{adapter_id}' is the name of an experiment" if self.name_taken(adapter_id) else None

    @staticmethod
    def name_row_guard(tx: Transaction, adapter_id: str) -> str | None:
        """``name_guard`` on the database, inside the registration's transaction: an experiment
        another replica created under the name a moment ago counts too."""
        taken = tx.one("SELECT 1 FROM experiments WHERE name = ?", (adapter_id,))
        return f"'{adapter_id}' is the name of an experiment" if taken else None

    def delete_guard(self, adapter_id: str) -> str | None:
        """Registry guard: an adapter that receives an experiment's traffic may not be deleted."""
        return _serving_reason(self._experiments.values(), adapter_id)

    @staticmethod
    def delete_row_guard(tx: Transaction, adapter_id: str) -> str | None:
        """``delete_guard`` on the database's experiments, inside the adapter delete's transaction:
        one another replica created on the adapter a moment ago counts too."""
        return _serving_reason(experiments_in(tx), adapter_id)

    # ---- definitions ----------------------------------------------------------------------------
    def get(self, name: str) -> Experiment:
        try:
            return self._experiments[name]
        except KeyError:
            raise ExperimentNotFoundError(f"the experiment '{name}' does not exist") from None

    def list(self) -> list[Experiment]:
        return sorted(self._experiments.values(), key=lambda e: (e.created, e.name))

    async def create(self, name: str, arms: list[Arm], stickiness: Stickiness, subject_header: str | None = None,
                     salt: str | None = None, capture: bool = False) -> Experiment:
        _check_arms(arms)
        async with self._lock:
            # checks and the in-memory insert run without an await between them, so the registry's
            # guards see the experiment from the moment its arms were found registered
            for arm in arms:
                if not self._is_model(arm.name):
                    raise UnknownArmModelError(f"the arm '{arm.name}' is neither a registered adapter nor the "
                                               "base model", param="arms")
            if name in self._experiments:
                raise ExperimentConflictError(f"an experiment named '{name}' exists", param="name")
            if self._is_model(name):
                raise ExperimentConflictError(f"'{name}' is already the name of a model; experiments and models share "
                                    "one namespace", param="name")
            if len(self._experiments) >= self.max_experiments:
                raise ExperimentConflictError(f"{self.max_experiments} experiments exist, the limit; delete one first")
            now = time.time()
            header = (subject_header or self.default_subject_header).lower() if stickiness == "header" else None
            experiment = Experiment(name=name, salt=salt if salt is not None else secrets.token_hex(8), arms=arms,
                                    stickiness=stickiness, subject_header=header, state="running", created=now,
                                    updated=now, capture=capture)
            self._experiments[name] = experiment
            adapters = None if self._is_adapter is None else [arm.name for arm in arms if self._is_adapter(arm.name)]
            try:
                await self._run(self.store.insert_experiment, experiment, adapters, self.max_experiments)
            except BaseException:
                del self._experiments[name]
                raise
        log.info("experiment %s created: %s", name, ", ".join(f"{a.name}={a.weight:g}" for a in arms))
        return experiment

    async def set_weights(self, name: str, weights: Mapping[str, float]) -> Experiment:
        """Change some or all arms' weights of a running experiment (ramp up or down)."""
        async with self._lock:
            experiment = self._running(name, "its weights cannot change")
            unknown = sorted(set(weights) - {arm.name for arm in experiment.arms})
            if unknown:
                raise ExperimentValidationError(f"the experiment '{name}' has no arm '{unknown[0]}'", param="weights")
            arms = [Arm(arm.name, weights.get(arm.name, arm.weight)) for arm in experiment.arms]
            _check_arms(arms)
            return await self._update(experiment, arms=arms)

    async def stop(self, name: str) -> Experiment:
        """End the experiment: the control arm serves all of its traffic, nothing more is recorded."""
        async with self._lock:
            experiment = self._running(name, "it cannot be stopped")
            return await self._update(experiment, state="stopped")

    async def promote(self, name: str, arm: str) -> Experiment:
        """End the experiment with a winner: that arm serves all of its traffic from now on."""
        async with self._lock:
            experiment = self.get(name)
            if experiment.state == "promoted":
                raise ExperimentConflictError(
                    f"the experiment '{name}' was already promoted ('{experiment.winner}' won)")
            if arm not in {a.name for a in experiment.arms}:
                raise ExperimentValidationError(f"the experiment '{name}' has no arm '{arm}'", param="arm")
            if not self._is_model(arm):
                raise ExperimentConflictError(f"the arm '{arm}' is no longer registered", param="arm")
            return await self._update(experiment, state="promoted", winner=arm)

    async def delete(self, name: str) -> None:
        """Remove the experiment, its recorded requests and feedback; its name is free again."""
        async with self._lock:
            experiment = self.get(name)
            await self._run(self.store.delete_experiment, name)
            del self._experiments[name]
            self._forget_captures({name})
        self.metrics.forget(name, [arm.name for arm in experiment.arms])
        log.info("experiment %s deleted", name)

    def _running(self, name: str, consequence: str) -> Experiment:
        experiment = self.get(name)
        if experiment.state != "running":
            raise ExperimentConflictError(f"the experiment '{name}' is {experiment.state}; {consequence}")
        return experiment

    async def _update(self, experiment: Experiment, **changes: Any) -> Experiment:
        # a version stamp: never equal to the one read, even within the clock's resolution
        stamp = max(time.time(), math.nextafter(experiment.updated, math.inf))
        updated = Experiment(**{**vars(experiment), **changes, "updated": stamp})
        if not await self._run(self.store.update_experiment, updated, experiment.updated):
            await self._reload()  # another replica changed or deleted it since this one last read it
            raise ExperimentConflictError(f"the experiment '{experiment.name}' was changed on another replica "
                                          "meanwhile; read it again and retry")
        self._experiments[updated.name] = updated  # replaced whole: readers never see half a change
        log.info("experiment %s: %s", updated.name, ", ".join(f"{k}={v}" for k, v in changes.items()))
        return updated

    async def sync(self) -> None:
        """Replace the definitions in memory by the store's, after changes another replica made:
        every replica then routes a subject to the same arm (assignment depends only on the
        definition). Read under the definitions' lock, so a local change is never half seen."""
        async with self._lock:
            await self._reload()
        if self._unrecorded:  # the database answers again (a resync follows a reconnect)
            await self._run(self._record, None)

    async def _reload(self) -> None:
        """``sync``'s work, under the definitions' lock the caller holds."""
        loaded = {e.name: e for e in await self._run(self.store.load_experiments)}
        gone = [e for name, e in self._experiments.items() if name not in loaded]
        self._experiments = loaded  # replaced whole: readers never see half a change
        self._forget_captures({e.name for e in gone})
        for experiment in gone:
            self.metrics.forget(experiment.name, [arm.name for arm in experiment.arms])
            log.info("experiment %s deleted by another replica", experiment.name)

    # ---- routing --------------------------------------------------------------------------------
    def resolve(self, name: str, subject: str | None) -> str:
        """The arm (a model name) serving ``subject`` in experiment ``name``; a None subject draws per request."""
        experiment = self.get(name)
        return self._assign(experiment, subject).arm

    def route(self, model: str, user: str | None, headers: Mapping[str, str]) -> Assignment | None:
        """The generation service's model router: None unless ``model`` names an experiment."""
        experiment = self._experiments.get(model)
        if experiment is None:
            return None
        if experiment.stickiness == "user":
            subject = user
        elif experiment.stickiness == "header":
            subject = headers.get(experiment.subject_header or self.default_subject_header)
        else:
            subject = None
        return self._assign(experiment, subject or None)

    def _assign(self, experiment: Experiment, subject: str | None) -> Assignment:
        if experiment.state != "running":
            return Assignment(experiment.name, experiment.serving_arms()[0], None)
        capture = self.capture_max_chars if experiment.capture else 0
        if subject is None:  # no subject: each request draws its arm by weight
            return Assignment(experiment.name, assign_per_request(experiment.arms).name, None, capture)
        arm = assign_arm(experiment.name, experiment.salt, subject, experiment.arms)
        return Assignment(experiment.name, arm.name, subject_hash(experiment.salt, subject), capture)

    # ---- outcomes and feedback ------------------------------------------------------------------
    def observe(self, record: RequestRecord) -> None:
        """Generation observer: keep the outcome of a request a running experiment routed."""
        experiment = self._experiments.get(record.experiment or "")
        if experiment is None or experiment.state != "running" or record.arm not in experiment.serving_arms():
            return  # results cover the randomized phase only (and not a deleted experiment's namesake)
        outcome = "ok" if record.error_type is None else "cancelled" if record.error_type == CANCELLED else "error"
        self.metrics.observe_request(experiment.name, record.arm, outcome, record.ttft_s, record.latency_s)
        row = RequestRow(completion_id=record.completion_id, experiment=experiment.name, arm=record.arm,
                         subject=record.subject, endpoint=record.endpoint, ttft_s=record.ttft_s,
                         latency_s=record.latency_s, prompt_tokens=record.prompt_tokens,
                         completion_tokens=record.completion_tokens, error_type=record.error_type,
                         created=record.created, api_key_id=record.api_key_id)
        self._db.submit(self._record, row).add_done_callback(_log_failure)
        capture = record.capture
        if experiment.capture and capture is not None and outcome == "ok" and capture.complete:
            text = "".join(capture.text)
            if text.strip():  # an empty answer is nothing to prefer
                # one compact string, not the parsed messages: 1024 one-character messages are
                # ~30 KB as JSON but ~200 KB as dicts
                row = CaptureRow(record.completion_id, experiment.name,
                                 json.dumps(capture.messages, ensure_ascii=False), text, record.created)
                self._hold(row)

    def _record(self, row: RequestRow | None) -> None:
        """Write the request rows an unreachable database refused before (oldest first), then
        ``row``; on the database thread, so rows keep their order. A row refused again waits,
        with those after it, for the next write or sync (``UNRECORDED_ROWS`` at most, the oldest
        dropped past it): an outage of the shared database lost every row served meanwhile."""
        pending, self._unrecorded = self._unrecorded + ([row] if row is not None else []), []
        for i, item in enumerate(pending):
            try:
                self.store.add_request(item)
            except DatabaseUnavailableError as exc:
                self._unrecorded = pending[i:][-UNRECORDED_ROWS:]
                dropped = len(pending) - i - len(self._unrecorded)
                log.warning("experiment requests not recorded yet (%d waiting%s): %s", len(self._unrecorded),
                            f", {dropped} oldest dropped" if dropped else "", exc)
                return
        if row is None and pending:
            log.info("experiment requests recorded again after the database came back (%d)", len(pending))

    # ---- captures awaiting feedback (event loop) ------------------------------------------------
    def _hold(self, row: CaptureRow) -> None:
        size = (sys.getsizeof(row.messages_json) + sys.getsizeof(row.completion) + sys.getsizeof(row.completion_id)
                + PENDING_ENTRY_BYTES)
        self._release(row.completion_id)  # the same id again (never in practice): its old size goes
        self._pending[row.completion_id] = (row, size)
        self._pending_bytes += size
        self._pending_of[row.experiment] += 1
        while len(self._pending) > self.capture_pending or self._pending_bytes > PENDING_CAPTURE_BYTES:
            evicted = self._release(next(iter(self._pending)))  # the oldest
            if evicted is not None:
                self._count_drop(evicted.experiment, "evicted")

    def _release(self, completion_id: str) -> CaptureRow | None:
        held = self._pending.pop(completion_id, None)
        if held is None:
            return None
        row, size = held
        self._pending_bytes -= size
        self._pending_of[row.experiment] -= 1
        if self._pending_of[row.experiment] <= 0:
            del self._pending_of[row.experiment]
        return row

    def _forget_captures(self, names: set[str]) -> None:
        for completion_id in [k for k, (row, _) in self._pending.items() if row.experiment in names]:
            self._release(completion_id)
        for name in names:
            self._dropped.pop(name, None)
            self._results.pop(name, None)

    def _count_drop(self, experiment: str, reason: str) -> None:
        counts = self._dropped.setdefault(experiment, Counter())
        counts[reason] += 1
        self.metrics.capture_dropped(experiment, reason)
        n = counts[reason]
        if n & (n - 1) == 0 or n % 1024 == 0:  # 1, 2, 4, ... then every 1024th: visible, never a flood
            why = (f"it waited for feedback past the pending limits ({self.capture_pending} requests, "
                   f"{PENDING_CAPTURE_BYTES} bytes)" if reason == "evicted"
                   else f"the experiment holds {MAX_STORED_CAPTURES} captures, the most it may store")
            log.warning("experiment %s: a captured prompt and answer was not kept: %s (%d so far)",
                        experiment, why, n)

    async def feedback(self, completion_id: str, score: float | None, thumbs: Thumbs | None,
                       api_key_id: str | None = None) -> dict[str, Any]:
        """Keep feedback on a recorded request; a second feedback on the same id replaces the first.
        Only the key that made the request (``api_key_id``; None when no keys are configured) may
        give it feedback: another key is told the id does not exist, so ids cannot be probed."""
        row = FeedbackRow(completion_id, score, thumbs, time.time(), api_key_id)
        waited_until = time.monotonic() + self.recording_lag_seconds
        while True:
            try:
                request, replaced = await self._run(self.store.put_feedback, row)
                break
            except UnknownCompletionError:
                if time.monotonic() < waited_until:  # its row may still be on its way (another replica)
                    await asyncio.sleep(FEEDBACK_RETRY_SECONDS)
                    continue
                # a pruned request cannot be told from an unknown one (keeping every pruned id is
                # what the bound avoids), so the one message says both
                raise CompletionNotFoundError(
                    f"no request routed by an experiment has the id '{completion_id}' (or it is too old: an "
                    f"experiment keeps its latest {MAX_STORED_REQUESTS:,} requests, and older ones no longer "
                    "take feedback)", param="id") from None
        self.metrics.observe_feedback(request.experiment, request.arm, thumbs, replaced)
        captured = self._release(completion_id)  # kept only now that it has feedback
        if captured is not None and not await self._run(self.store.put_capture, captured, MAX_STORED_CAPTURES):
            self._count_drop(captured.experiment, "limit")
        return {"id": completion_id, "object": "feedback", "experiment": request.experiment, "arm": request.arm,
                "score": score, "thumbs": thumbs, "replaced": replaced}

    async def preference_data(self, name: str, *, max_bytes: int, max_lines: int,
                              max_line_bytes: int) -> tuple[bytes, PairSummary]:
        """A preference file (JSONL, OpenAI's format) of the experiment's captured answers with
        feedback (``gateway.experiments.preferences``), at most ``max_bytes`` and ``max_lines``
        (the files' limits). Raises ``ExperimentConflictError`` when the experiment does not
        capture or its answers make no pair, ``PreferenceFileTooLargeError`` past a limit."""
        experiment = self.get(name)
        if not experiment.capture:
            raise ExperimentConflictError(f"the experiment '{name}' does not capture prompts and answers; create "
                                          "one with capture: true to collect preference data")
        async with self._preference_builds:
            return await asyncio.to_thread(self._preference_file, name, max_bytes, max_lines, max_line_bytes)

    def _preference_file(self, name: str, max_bytes: int, max_lines: int,
                         max_line_bytes: int) -> tuple[bytes, PairSummary]:
        """Worker thread: reads go through the store's thread (``_db``), a page at a time, so
        requests' rows and feedback are not held up for the whole file."""
        def read(fn: Callable[..., T], *args: Any) -> T:
            return self._db.submit(fn, *args).result()

        rated, after = [], None
        while True:
            page = read(self.store.capture_page, name, after, CAPTURE_PAGE)
            rated.extend(r for r in (rate(a.completion_id, a.arm, a.messages_json, a.completion, a.score, a.thumbs)
                                     for a in page) if r is not None)
            if len(page) < CAPTURE_PAGE:
                break
            after = (page[-1].created, page[-1].completion_id)
        pairs, answers, prompts = select_pairs(rated)
        if not pairs:
            raise ExperimentConflictError(
                f"the experiment '{name}' has no preference pair yet: {answers} captured answer(s) with "
                f"feedback over {prompts} prompt(s); a pair needs two arms' different answers to the same "
                "prompt whose feedback ranks one above the other (a higher score, or thumbs up over down)")
        data, written, skipped = write_jsonl(
            pairs, lambda ids: read(self.store.capture_texts, ids),
            max_bytes=max_bytes, max_lines=max_lines, max_line_bytes=max_line_bytes)
        if not written:
            raise ExperimentConflictError(
                f"the experiment '{name}' has no preference pair that fits a line of the files' limit "
                f"({max_line_bytes} bytes): {skipped} pair(s) over it")
        return data, PairSummary(answers=answers, prompts=prompts, pairs=written, skipped=skipped)

    async def results(self, name: str) -> dict[str, Any]:
        """Per-arm results, read and computed on the results thread (never the event loop); callers
        at the same time share one computation, and it is reused for ``RESULTS_REUSE`` times what it
        cost (see the constant). A change of the definition (weights, stop, promote) recomputes."""
        experiment = self.get(name)
        cached = self._results.get(name)
        if cached is not None and cached[0] is experiment and time.monotonic() < cached[1]:
            results = cached[2]
        else:
            shared = self._results_running.get(name)
            if shared is not None and shared[0] is experiment:
                running = shared[1]
            else:  # none yet, or one for a definition since changed
                running = asyncio.ensure_future(self._compute_results(experiment))
                self._results_running[name] = (experiment, running)
                running.add_done_callback(lambda done: self._results_running.pop(name, None)
                                          if self._results_running.get(name, (None, None))[1] is done else None)
            results = await asyncio.shield(running)  # one caller going away does not cancel the others'
        results = {**results}
        if experiment.capture:  # this replica's counts, read fresh
            dropped = self._dropped.get(name, Counter())
            results["capture"] = {**results["capture"], "refused": dropped["limit"],
                                  "pending": self._pending_of.get(name, 0), "evicted": dropped["evicted"]}
        return results

    async def _compute_results(self, experiment: Experiment) -> dict[str, Any]:
        name = experiment.name
        await self._run(lambda: None)  # every request and feedback queued before this call is written

        def compute() -> dict[str, Any]:
            results = experiment_results(experiment, self.store.arm_data(name), self.min_samples)
            if experiment.capture:
                results["capture"] = {"stored": self.store.capture_count(name), "max_stored": MAX_STORED_CAPTURES}
            return results

        started = time.monotonic()
        results = await asyncio.wrap_future(self._reads.submit(compute))
        done = time.monotonic()
        results["computed"] = int(time.time())
        if self._experiments.get(name) is experiment:  # not deleted or changed meanwhile
            self._results[name] = (experiment, done + min(RESULTS_REUSE * (done - started), RESULTS_MAX_AGE_S),
                                   results)
        return results


def describe(experiment: Experiment) -> dict[str, Any]:
    total = math.fsum(arm.weight for arm in experiment.arms)
    serving = experiment.serving_arms()
    return {
        "id": experiment.name, "object": "experiment", "state": experiment.state,
        "arms": [{"name": a.name, "weight": a.weight, "share": a.weight / total} for a in experiment.arms],
        "control": experiment.control, "winner": experiment.winner, "serving": serving,
        "stickiness": experiment.stickiness, "subject_header": experiment.subject_header, "salt": experiment.salt,
        "capture": experiment.capture,
        "created": int(experiment.created), "updated": int(experiment.updated),
    }


def _check_arms(arms: list[Arm]) -> None:
    try:
        validate_weights(arms)
    except ValueError as exc:
        raise ExperimentValidationError(str(exc), param="arms") from None


def _serving_reason(experiments: Iterable[Experiment], adapter_id: str) -> str | None:
    for experiment in experiments:
        if adapter_id in experiment.serving_arms():
            return (f"the adapter '{adapter_id}' serves traffic of the {experiment.state} experiment "
                    f"'{experiment.name}'; delete the experiment first")
    return None


def _log_failure(future: Future) -> None:
    if (exc := future.exception()) is not None:
        log.error("could not record an experiment request: %s", exc)


def attach_experiments(store: ExperimentStore, settings: Settings, generation: GenerationService, registry: AdapterRegistry,
                       prometheus: CollectorRegistry) -> ExperimentService:
    """Build the experiment service on the gateway's experiment store and hook it into the generation
    service (routing, outcomes) and the registry (name and delete guards)."""
    experiments = ExperimentService(
        store, ExperimentMetrics(prometheus),
        is_model=lambda name: name == generation.base_name or name in registry,
        is_adapter=lambda name: name != generation.base_name and name in registry,
        max_experiments=settings.max_experiments, min_samples=settings.experiment_min_samples,
        default_subject_header=settings.experiment_subject_header,
        capture_max_chars=settings.experiment_capture_max_chars, capture_pending=settings.experiment_capture_pending,
        recording_lag_seconds=SHARED_RECORDING_LAG_SECONDS if settings.database_url else 0.0)
    generation.model_router = experiments.route
    generation.observers.append(experiments.observe)
    registry.add_name_guard(experiments.name_guard, experiments.name_row_guard)
    registry.add_delete_guard(experiments.delete_guard, experiments.delete_row_guard)
    return experiments
