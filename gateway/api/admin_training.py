"""Admin routes for training jobs (admin key): create from an uploaded JSONL dataset and a JSON
config, list, inspect, follow progress (SSE), cancel and delete. Job errors are typed
(``gateway.training.errors``); ``gateway.errors`` turns them into statuses."""

from __future__ import annotations

import json
import math
from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request, Security
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import ValidationError
from starlette.datastructures import UploadFile

from adapters.errors import DatasetValidationError
from adapters.training.config import TrainingConfig
from adapters.training.prepare import describe_problems
from gateway.auth import admin_key_scheme
from gateway.errors import BadRequestError, PayloadTooLargeError, ServiceUnavailableError
from gateway.training.jobs import TrainingJobs
from gateway.training.store import TERMINAL, TrainingJobRecord
from gateway.waiting import wait_event

router = APIRouter(prefix="/admin/training-jobs", dependencies=[Security(admin_key_scheme)])  # checked by AccessGuard
MAX_CONFIG_FIELD_BYTES = 64 * 1024
KEEPALIVE_SECONDS = 15.0


def get_jobs(request: Request) -> TrainingJobs:
    jobs = getattr(request.app.state.gateway, "training", None)
    if jobs is None:
        raise ServiceUnavailableError("training is not available on this gateway")
    return jobs


JobsDep = Annotated[TrainingJobs, Depends(get_jobs)]


def job_view(record: TrainingJobRecord) -> dict[str, Any]:
    return {"object": "training.job", **record.as_dict()}


def _finite(value: Any) -> Any:
    """``value`` with NaN and infinities as None, as the GET route's JSON has them. JSON has no
    NaN: a diverged run's losses written as ``NaN`` made the console's JSON.parse throw, and its
    live view of the job stopped before the failure."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def _parse_config(text: Any) -> TrainingConfig:
    if text is None:
        return TrainingConfig()
    if not isinstance(text, str):
        raise BadRequestError("config must be a text field holding a JSON object", param="config")
    try:
        return TrainingConfig.model_validate_json(text or "{}")
    except ValidationError as exc:
        first = exc.errors()[0]
        if first.get("type") == "json_invalid":
            raise BadRequestError("config is not valid JSON", param="config") from None
        loc = ".".join(str(p) for p in first.get("loc", ()))
        where = f"config.{loc}" if loc else "config"
        raise BadRequestError(f"invalid value for {where}: {first.get('msg', 'invalid value')}", param=where) from None


async def _read_dataset(upload: Any, max_bytes: int) -> bytes:
    if not isinstance(upload, UploadFile):
        raise BadRequestError("send the dataset as a file field named 'dataset' (JSONL)", param="dataset")
    data = await upload.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise PayloadTooLargeError.over(max_bytes, "the dataset", param="dataset")
    return data


CREATE_BODY = {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
    "type": "object", "required": ["dataset"],
    "properties": {
        "dataset": {"type": "string", "format": "binary", "description": (
            "JSONL: one example per line (chat messages, prompt/completion, or instruction/output)")},
        "config": {"type": "string", "contentMediaType": "application/json", "maxLength": MAX_CONFIG_FIELD_BYTES,
                   "description": "A JSON object with training config fields (all optional)."},
    }}}}}}


@router.post("", status_code=201, openapi_extra=CREATE_BODY)
async def create_job(request: Request, jobs: JobsDep) -> JSONResponse:
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        raise BadRequestError("send multipart/form-data with a 'dataset' file and a 'config' JSON field")
    try:
        form = await request.form(max_files=1, max_fields=1, max_part_size=MAX_CONFIG_FIELD_BYTES)
    except PayloadTooLargeError:
        raise
    except Exception as exc:  # noqa: BLE001 - starlette raises plain HTTP/multipart errors
        raise BadRequestError(f"the multipart form could not be read: {getattr(exc, 'detail', exc)}") from None
    try:
        config = _parse_config(form.get("config"))
        data = await _read_dataset(form.get("dataset"), jobs.limits.max_dataset_bytes)
    finally:
        await form.close()
    try:
        record = await jobs.create(data, config)
    except DatasetValidationError as exc:
        raise BadRequestError(describe_problems(exc), param="dataset", code="invalid_dataset") from None
    except ValueError as exc:
        raise BadRequestError(str(exc), param="config") from None
    return JSONResponse(job_view(record), status_code=201)


@router.get("")
async def list_jobs(jobs: JobsDep) -> dict[str, Any]:
    return {"object": "list", "data": [job_view(r) for r in jobs.list()]}


@router.get("/{job_id}")
async def get_job(job_id: str, jobs: JobsDep) -> dict[str, Any]:
    return job_view(jobs.get(job_id))


@router.post("/{job_id}/cancel")
async def cancel_job(job_id: str, jobs: JobsDep) -> dict[str, Any]:
    """Cancel at any stage; the answer is the job once it ended (``cancelled``). 409 when it had
    already ended: too late, and the message names the adapter a succeeded job registered."""
    return job_view(await jobs.cancel(job_id))


@router.delete("/{job_id}")
async def delete_job(job_id: str, jobs: JobsDep) -> dict[str, Any]:
    """Forget an ended job and remove its files; 409 while it is queued or running (cancel it
    first). The adapter a succeeded job registered is not touched (DELETE /admin/adapters/{id})."""
    await jobs.delete(job_id)
    return {"object": "training.job.deleted", "id": job_id, "deleted": True}


@router.get("/{job_id}/events")
async def job_events(job_id: str, jobs: JobsDep) -> StreamingResponse:
    """Server-sent events: ``event: progress`` with the job (as GET returns it) at every change,
    until the job ends; ``: keep-alive`` comments in quiet stretches."""
    jobs.get(job_id)

    async def stream() -> AsyncIterator[str]:
        last = None
        while True:
            changed = jobs.changed  # taken before reading, so no change is missed
            record = jobs.find(job_id)
            if record is None:  # deleted meanwhile
                return
            payload = json.dumps(_finite(job_view(record)), allow_nan=False)
            if payload != last:
                yield f"event: progress\ndata: {payload}\n\n"
                last = payload
            if record.state in TERMINAL:
                return
            if not await wait_event(changed, KEEPALIVE_SECONDS):
                yield ": keep-alive\n\n"

    return StreamingResponse(stream(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
