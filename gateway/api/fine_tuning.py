"""OpenAI's ``/v1/fine_tuning/jobs`` (admin key: a job trains on the resident model and adds a
served adapter). The jobs are the embedded trainer's, the same ones ``/admin/training-jobs``
shows; ``gateway.fine_tuning`` holds the parsing and the OpenAI shapes."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request, Security

from gateway.auth import admin_key_scheme
from gateway.errors import ServiceUnavailableError
from gateway.fine_tuning.plan import FineTuningJobCreate
from gateway.fine_tuning.service import FineTuning
from gateway.fine_tuning.views import checkpoints, events, job_object, page

router = APIRouter(prefix="/v1/fine_tuning/jobs", dependencies=[Security(admin_key_scheme)])  # AccessGuard checks
Limit = Annotated[int, Query(ge=1, le=100)]


def get_fine_tuning(request: Request) -> FineTuning:
    service = getattr(request.app.state.gateway, "fine_tuning", None)
    if service is None:
        raise ServiceUnavailableError("fine-tuning is not available on this gateway")
    return service


FineTuningDep = Annotated[FineTuning, Depends(get_fine_tuning)]


@router.post("")
async def create_job(body: FineTuningJobCreate, service: FineTuningDep) -> dict[str, Any]:
    """The job, queued (files are validated before the answer: a bad line is a 400 now)."""
    return job_object(await service.create(body), service.base_name)


@router.get("")
async def list_jobs(service: FineTuningDep, after: str | None = None, limit: Limit = 20) -> dict[str, Any]:
    """Newest first; ``after`` is the id of the last job of the previous page."""
    return page([job_object(r, service.base_name) for r in service.jobs.list()], after, limit)


@router.get("/{job_id}")
async def retrieve_job(job_id: str, service: FineTuningDep) -> dict[str, Any]:
    return job_object(service.jobs.get(job_id), service.base_name)


@router.post("/{job_id}/cancel")
async def cancel_job(job_id: str, service: FineTuningDep) -> dict[str, Any]:
    """The job once it ended cancelled; 409 when it had ended already."""
    return job_object(await service.jobs.cancel(job_id), service.base_name)


@router.get("/{job_id}/events")
async def list_events(job_id: str, service: FineTuningDep, after: str | None = None,
                      limit: Limit = 20) -> dict[str, Any]:
    """Newest first (``fine_tuning.job.event``: 'message' and 'metrics' events)."""
    return page(list(reversed(events(service.jobs.get(job_id)))), after, limit)


@router.get("/{job_id}/checkpoints")
async def list_checkpoints(job_id: str, service: FineTuningDep, after: str | None = None,
                           limit: Annotated[int, Query(ge=1, le=100)] = 10) -> dict[str, Any]:
    result = page(checkpoints(service.jobs.get(job_id)), after, limit)
    result["first_id"] = result["data"][0]["id"] if result["data"] else None
    result["last_id"] = result["data"][-1]["id"] if result["data"] else None
    return result
