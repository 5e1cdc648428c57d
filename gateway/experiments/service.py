"""Experiments as the gateway runs them: definitions and their state, routing requests to arms,
recording outcomes and feedback, and computing results.

Definitions live in memory (routing never waits on the database) and in the store. Every store
call runs on one worker thread, in submission order: a request's row is queued when its work
ends, before its response is sent, so feedback on that response always finds it.

Capture (an experiment created with ``capture: true``): the prompt and answer of each finished
chat request it routed wait in memory (at most ``capture_pending`` of them, oldest dropped first);
only those that receive feedback are written to the store, and only those make preference files.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, TypeVar

from prometheus_client import CollectorRegistry

from adapters.registry import AdapterRegistry
from gateway.experiments.errors import (
    CompletionNotFoundError, ExperimentConflictError, ExperimentNotFoundError, ExperimentValidationError,
    UnknownArmModelError,
)
from gateway.experiments.assignment import Arm, assign_arm, assign_per_request, validate_weights
from gateway.experiments.metrics import ExperimentMetrics
from gateway.experiments.preferences import PairSummary, jsonl, preference_records
from gateway.experiments.results import experiment_results
from gateway.experiments.store import (
    CANCELLED, CaptureRow, Experiment, ExperimentStore, FeedbackRow, RequestRow, Stickiness,
    Thumbs, UnknownCompletionError,
)
from gateway.generation import Assignment, GenerationService, RequestRecord
from gateway.settings import Settings

log = logging.getLogger(__name__)
T = TypeVar("T")


def subject_hash(salt: str, subject: str) -> str:
    """What is stored about a subject: enough to count distinct subjects, not to recover them."""
    return hashlib.sha256(f"{len(salt)}:{salt}{subject}".encode()).hexdigest()[:16]


class ExperimentService:
    def __init__(self, store: ExperimentStore, metrics: ExperimentMetrics, *, is_model: Callable[[str], bool],
                 max_experiments: int, min_samples: int, default_subject_header: str,
                 capture_max_chars: int = 32768, capture_pending: int = 1024):
        self.store = store
        self.metrics = metrics
        self._is_model = is_model  # an adapter id or the base model's name
        self.max_experiments = max_experiments
        self.min_samples = min_samples
        self.default_subject_header = default_subject_header
        self.capture_max_chars = capture_max_chars  # prompt + answer of one captured request
        self.capture_pending = capture_pending  # captured requests held in memory awaiting feedback
        self._pending: OrderedDict[str, CaptureRow] = OrderedDict()  # completion id -> capture (event loop)
        self._experiments: dict[str, Experiment] = {e.name: e for e in store.load_experiments()}
        self._lock = asyncio.Lock()  # one change of definitions at a time
        self._db = ThreadPoolExecutor(max_workers=1, thread_name_prefix="experiments-db")

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.wrap_future(self._db.submit(fn, *args))

    def close(self) -> None:
        """Finish queued writes, then close the store (blocking)."""
        self._db.shutdown(wait=True)
        self.store.close()

    # ---- names and guards (called by the registry and the routes) -------------------------------
    def name_taken(self, name: str) -> bool:
        return name in self._experiments

    def name_guard(self, adapter_id: str) -> str | None:
        """Registry guard: an adapter id may not be an experiment's name."""
        return f"'{adapter_id}' is the name of an experiment" if self.name_taken(adapter_id) else None

    def delete_guard(self, adapter_id: str) -> str | None:
        """Registry guard: an adapter that receives an experiment's traffic may not be deleted."""
        for experiment in self._experiments.values():
            if adapter_id in experiment.serving_arms():
                return (f"the adapter '{adapter_id}' serves traffic of the {experiment.state} experiment "
                        f"'{experiment.name}'; delete the experiment first")
        return None

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
            try:
                await self._run(self.store.insert_experiment, experiment)
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
            for completion_id in [k for k, row in self._pending.items() if row.experiment == name]:
                del self._pending[completion_id]
        self.metrics.forget(name, [arm.name for arm in experiment.arms])
        log.info("experiment %s deleted", name)

    def _running(self, name: str, consequence: str) -> Experiment:
        experiment = self.get(name)
        if experiment.state != "running":
            raise ExperimentConflictError(f"the experiment '{name}' is {experiment.state}; {consequence}")
        return experiment

    async def _update(self, experiment: Experiment, **changes: Any) -> Experiment:
        updated = Experiment(**{**vars(experiment), **changes, "updated": time.time()})
        await self._run(self.store.update_experiment, updated)
        self._experiments[updated.name] = updated  # replaced whole: readers never see half a change
        log.info("experiment %s: %s", updated.name, ", ".join(f"{k}={v}" for k, v in changes.items()))
        return updated

    async def sync(self) -> None:
        """Replace the definitions in memory by the store's, after changes another replica made:
        every replica then routes a subject to the same arm (assignment depends only on the
        definition). Read under the definitions' lock, so a local change is never half seen."""
        async with self._lock:
            loaded = {e.name: e for e in await self._run(self.store.load_experiments)}
            gone = [e for name, e in self._experiments.items() if name not in loaded]
            self._experiments = loaded  # replaced whole: readers never see half a change
            for completion_id in [k for k, row in self._pending.items() if row.experiment not in loaded]:
                del self._pending[completion_id]
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
        self._db.submit(self.store.add_request, row).add_done_callback(_log_failure)
        capture = record.capture
        if experiment.capture and capture is not None and outcome == "ok" and capture.complete:
            text = "".join(capture.text)
            if text.strip():  # an empty answer is nothing to prefer
                self._pending[record.completion_id] = CaptureRow(record.completion_id, experiment.name,
                                                                 capture.messages, text, record.created)
                while len(self._pending) > self.capture_pending:
                    self._pending.popitem(last=False)

    async def feedback(self, completion_id: str, score: float | None, thumbs: Thumbs | None,
                       api_key_id: str | None = None) -> dict[str, Any]:
        """Keep feedback on a recorded request; a second feedback on the same id replaces the first.
        Only the key that made the request (``api_key_id``; None when no keys are configured) may
        give it feedback: another key is told the id does not exist, so ids cannot be probed."""
        row = FeedbackRow(completion_id, score, thumbs, time.time(), api_key_id)
        try:
            request, replaced = await self._run(self.store.put_feedback, row)
        except UnknownCompletionError:
            raise CompletionNotFoundError(
                f"no request routed by an experiment has the id '{completion_id}'", param="id") from None
        self.metrics.observe_feedback(request.experiment, request.arm, thumbs)
        captured = self._pending.pop(completion_id, None)  # kept only now that it has feedback
        if captured is not None:
            await self._run(self.store.put_capture, captured)
        return {"id": completion_id, "object": "feedback", "experiment": request.experiment, "arm": request.arm,
                "score": score, "thumbs": thumbs, "replaced": replaced}

    async def preference_data(self, name: str) -> tuple[bytes, PairSummary]:
        """A preference file (JSONL, OpenAI's format) of the experiment's captured answers with
        feedback (``gateway.experiments.preferences``). Raises ``ExperimentConflictError`` when the
        experiment does not capture, or its answers make no pair."""
        experiment = self.get(name)
        if not experiment.capture:
            raise ExperimentConflictError(f"the experiment '{name}' does not capture prompts and answers; create "
                                          "one with capture: true to collect preference data")
        records, summary = preference_records(await self._run(self.store.captured_answers, name))
        if not records:
            raise ExperimentConflictError(
                f"the experiment '{name}' has no preference pair yet: {summary.answers} captured answer(s) with "
                f"feedback over {summary.prompts} prompt(s); a pair needs two arms' different answers to the same "
                "prompt whose feedback ranks one above the other (a higher score, or thumbs up over down)")
        return jsonl(records), summary

    async def results(self, name: str) -> dict[str, Any]:
        experiment = self.get(name)
        data = await self._run(self.store.arm_data, name)
        return experiment_results(experiment, data, self.min_samples)


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
        max_experiments=settings.max_experiments, min_samples=settings.experiment_min_samples,
        default_subject_header=settings.experiment_subject_header,
        capture_max_chars=settings.experiment_capture_max_chars, capture_pending=settings.experiment_capture_pending)
    generation.model_router = experiments.route
    generation.observers.append(experiments.observe)
    registry.add_name_guard(experiments.name_guard)
    registry.add_delete_guard(experiments.delete_guard)
    return experiments
