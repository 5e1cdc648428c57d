"""Training job records in OpenAI's shapes: the job, its events and its checkpoints, and the
names its results are served under. Jobs of the admin API show here too (their model is the base,
their result name the adapter id they registered).

Events are derived from the record, never stored apart: a 'message' event for each stage
(created, started, ended) and a 'metrics' event for each recorded optimizer step (``data``:
``step``, ``train_loss``, ``total_steps``, and ``valid_loss`` where a validation pass ran at that
step; for DPO also ``chosen_reward``, ``rejected_reward``, ``reward_margin`` and
``preference_accuracy``, the step's means over its pairs, and the same prefixed ``valid_`` for a
validation pass). The trainer records no per-step time, so metrics events carry the job's start time. Ids are
derived from what an event is ("<job>-step-12"), so they are stable while the job runs on.

Checkpoints: the trainer keeps only its latest checkpoint, in its own resumable form, and removes
it once the adapter is exported. So a succeeded job has one checkpoint, its final step, served
under ``<fine_tuned_model>:ckpt-step-<N>`` (the same adapter as ``fine_tuned_model``).
"""

from __future__ import annotations

import time
from typing import Any

from gateway.fine_tuning.errors import FineTuningRequestError
from gateway.training.store import CANCELLED, FAILED, RUNNING, SUCCEEDED, TrainingJobRecord

ORGANIZATION = "gateway"
CHECKPOINT_MARK = ":ckpt-step-"


def result_name(record: TrainingJobRecord) -> str | None:
    """The model name a succeeded job's adapter is served under; None before (or without) one."""
    if record.state != SUCCEEDED or record.adapter_id is None:
        return None
    ft = record.fine_tuning
    if ft is None:
        return record.adapter_id  # an admin job: its adapter's id is its name
    return f"ft:{ft.get('base', ft['model'])}:{ft.get('suffix') or ''}:{record.id}"


def final_step(record: TrainingJobRecord) -> int:
    return int(record.progress.get("step") or 0)


def checkpoint_name(record: TrainingJobRecord) -> str | None:
    name = result_name(record)
    return None if name is None else f"{name}{CHECKPOINT_MARK}{final_step(record)}"


def _error(record: TrainingJobRecord) -> dict[str, Any] | None:
    if record.state != FAILED:
        return None
    return {"code": "training_failed", "message": record.error or "the job failed", "param": None}


def job_object(record: TrainingJobRecord, base_name: str) -> dict[str, Any]:
    ft = record.fine_tuning or {}
    config = record.config
    hyper = ft.get("hyperparameters") or {"n_epochs": config.get("epochs"), "batch_size": config.get("batch_size"),
                                          "learning_rate_multiplier": None}
    method = ft.get("method") or {"type": "supervised", "supervised": {"hyperparameters": hyper}}
    progress = record.progress
    eta = progress.get("eta_seconds")
    return {
        "object": "fine_tuning.job", "id": record.id, "created_at": int(record.created),
        "finished_at": int(record.finished) if record.finished else None,
        "model": ft.get("model", base_name), "fine_tuned_model": result_name(record),
        "organization_id": ORGANIZATION, "status": record.state, "error": _error(record),
        "training_file": ft.get("training_file"), "validation_file": ft.get("validation_file"),
        "hyperparameters": hyper, "method": method, "result_files": [],
        "trained_tokens": progress.get("tokens_trained") if record.state == SUCCEEDED else None,
        "seed": config.get("seed", 0), "suffix": ft.get("suffix"), "user_provided_suffix": ft.get("suffix"),
        "metadata": ft.get("metadata"), "integrations": [],
        "estimated_finish": int(time.time() + eta) if record.state == RUNNING and eta else None,
        # extensions: the adapter trained, and the registry id it is served under
        "adapter": ft.get("adapter") or {"kind": config.get("kind")},
        "adapter_id": record.adapter_id,
    }


def _event(record: TrainingJobRecord, what: str, created: float | None, message: str, *, level: str = "info",
           data: dict | None = None) -> dict[str, Any]:
    return {"object": "fine_tuning.job.event", "id": f"ftevent-{record.id}-{what}",
            "created_at": int(created or record.created), "level": level, "message": message,
            "type": "metrics" if data is not None else "message", "data": data or {}}


def events(record: TrainingJobRecord) -> list[dict[str, Any]]:
    """Every event of the job, oldest first."""
    ft = record.fine_tuning or {}
    out = [_event(record, "created", record.created, f"Created fine-tuning job: {record.id}")]
    if ft.get("training_file"):
        out.append(_event(record, "validated", record.created, f"Validated training file: {ft['training_file']}"))
    if record.started:
        out.append(_event(record, "started", record.started, "Fine-tuning job started"))
    progress = record.progress
    total = progress.get("total_steps")
    valid = {int(step): loss for step, loss in progress.get("eval_loss") or []}
    train_metrics = {int(step): metrics for step, metrics in progress.get("train_metrics") or []}
    valid_metrics = {int(step): {f"valid_{name}": value for name, value in metrics.items()}
                     for step, metrics in progress.get("eval_metrics") or []}
    if 0 in valid:
        out.append(_event(record, "step-0", record.started, f"Step 0/{total}: validation loss={valid[0]:.4f}",
                          data={"step": 0, "valid_loss": valid[0], "total_steps": total, **valid_metrics.get(0, {})}))
    for step, loss in progress.get("train_loss") or []:
        step = int(step)
        data = {"step": step, "train_loss": loss, "total_steps": total, **train_metrics.get(step, {})}
        message = f"Step {step}/{total}: training loss={loss:.4f}"
        if "preference_accuracy" in data:
            message += f", reward margin={data['reward_margin']:.4f}, preference accuracy={data['preference_accuracy']:.2f}"
        if step in valid:
            data["valid_loss"] = valid[step]
            data.update(valid_metrics.get(step, {}))
            message += f", validation loss={valid[step]:.4f}"
        out.append(_event(record, f"step-{step}", record.started, message, data=data))
    if record.state == SUCCEEDED:
        name = result_name(record)
        if name is not None:
            out.append(_event(record, "model", record.finished, f"New fine-tuned model created: {name}"))
        elif record.note:
            out.append(_event(record, "note", record.finished, record.note, level="warn"))
        out.append(_event(record, "ended", record.finished, "The job has successfully completed"))
    elif record.state == FAILED:
        out.append(_event(record, "ended", record.finished, f"The job failed: {record.error}", level="error"))
    elif record.state == CANCELLED:
        out.append(_event(record, "ended", record.finished, "The job was cancelled"))
    return out


def checkpoints(record: TrainingJobRecord) -> list[dict[str, Any]]:
    name = checkpoint_name(record)
    if name is None:
        return []
    step = final_step(record)
    progress = record.progress
    losses = progress.get("train_loss") or []
    metrics: dict[str, Any] = {"step": step}
    if losses:
        metrics["train_loss"] = losses[-1][1]
    if progress.get("train_metrics"):
        metrics.update(progress["train_metrics"][-1][1])
    if progress.get("eval_loss_after") is not None:
        metrics["valid_loss"] = progress["eval_loss_after"]
    return [{"object": "fine_tuning.job.checkpoint", "id": f"ftckpt-{record.id}-{step}",
             "created_at": int(record.finished or record.created), "fine_tuned_model_checkpoint": name,
             "fine_tuning_job_id": record.id, "step_number": step, "metrics": metrics}]


def page(items: list[dict[str, Any]], after: str | None, limit: int) -> dict[str, Any]:
    """OpenAI's cursor page: the ``limit`` items following the one whose id is ``after``."""
    start = 0
    if after is not None:
        ids = [item["id"] for item in items]
        if after not in ids:
            raise FineTuningRequestError(f"after: no item with id {after[:80]!r} in this list", param="after")
        start = ids.index(after) + 1
    chunk = items[start:start + limit]
    return {"object": "list", "data": chunk, "has_more": start + limit < len(items)}
