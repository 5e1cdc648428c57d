"""Admin routes for A/B experiments between adapters: create, list, read, change weights, stop,
promote a winner, delete, per-arm results, and a preference file from captured answers. All
behind the admin key."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Request, Security
from pydantic import BaseModel, ConfigDict, Field

from gateway.api.feedback import get_experiments
from gateway.api.files import file_object
from gateway.auth import admin_key_scheme
from gateway.errors import NotFoundError, register_domain_error
from gateway.experiments.assignment import Arm
from gateway.experiments.errors import PreferenceFileTooLargeError
from gateway.experiments.service import ExperimentService, describe
from gateway.protocol import NO_NUL

router = APIRouter(prefix="/admin/experiments", dependencies=[Security(admin_key_scheme)])  # checked by AccessGuard
ExperimentsDep = Annotated[ExperimentService, Depends(get_experiments)]
# a 409 like the experiment's other conflicts, with its own code: the data outgrew the files' limits
register_domain_error(PreferenceFileTooLargeError, 409, "conflict_error", "preference_file_too_large")

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"  # the adapter id pattern: both name models
MAX_ARMS = 8
MAX_WEIGHT = 1e6
Weight = Annotated[float, Field(strict=True, ge=0, le=MAX_WEIGHT, allow_inf_nan=False)]


class ArmSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1, max_length=256, description="An adapter id, or the base model's name.")
    weight: Weight = Field(description="Relative share of traffic (normalised over the arms).")


class CreateExperiment(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(pattern=NAME_PATTERN, description="The model name clients send; no adapter may have it.")
    arms: list[ArmSpec] = Field(min_length=2, max_length=MAX_ARMS, description="The first arm is the control.")
    stickiness: Literal["user", "header", "request"] = Field("user", description=(
        "What keeps a subject on one arm: the OpenAI `user` field, a request header, or nothing (each request "
        "draws its arm)."))
    subject_header: str | None = Field(None, pattern=r"^[A-Za-z0-9-]{1,64}$", description=(
        "The header naming the subject when stickiness is 'header' (default: the gateway's setting)."))
    salt: str | None = Field(None, max_length=64, pattern=NO_NUL,
                             description="Hash salt (default: random); a new salt reshuffles.")
    capture: bool = Field(False, description=(
        "Keep the prompt (chat messages) and answer text of requests that receive feedback, for "
        "POST /admin/experiments/{name}/preference-file. Deleted with the experiment."))


class PatchExperiment(BaseModel):
    model_config = ConfigDict(extra="forbid")
    weights: dict[Annotated[str, Field(max_length=256)], Weight] = Field(min_length=1, max_length=MAX_ARMS)


class PromoteExperiment(BaseModel):
    model_config = ConfigDict(extra="forbid")
    arm: str = Field(min_length=1, max_length=256, description="The arm that takes all traffic.")


@router.post("", status_code=201)
async def create_experiment(body: CreateExperiment, experiments: ExperimentsDep) -> dict[str, Any]:
    experiment = await experiments.create(body.name, [Arm(a.name, a.weight) for a in body.arms], body.stickiness,
                                          body.subject_header, body.salt, body.capture)
    return describe(experiment)


@router.get("")
async def list_experiments(experiments: ExperimentsDep) -> dict[str, Any]:
    return {"object": "list", "data": [describe(e) for e in experiments.list()]}


@router.get("/{name}")
async def get_experiment(name: str, experiments: ExperimentsDep) -> dict[str, Any]:
    return describe(experiments.get(name))


@router.patch("/{name}")
async def patch_experiment(name: str, body: PatchExperiment, experiments: ExperimentsDep) -> dict[str, Any]:
    return describe(await experiments.set_weights(name, body.weights))


@router.post("/{name}/stop")
async def stop_experiment(name: str, experiments: ExperimentsDep) -> dict[str, Any]:
    return describe(await experiments.stop(name))


@router.post("/{name}/promote")
async def promote_experiment(name: str, body: PromoteExperiment, experiments: ExperimentsDep) -> dict[str, Any]:
    return describe(await experiments.promote(name, body.arm))


@router.delete("/{name}")
async def delete_experiment(name: str, experiments: ExperimentsDep) -> dict[str, Any]:
    await experiments.delete(name)
    return {"id": name, "object": "experiment", "deleted": True}


@router.get("/{name}/results")
async def experiment_results(name: str, experiments: ExperimentsDep) -> dict[str, Any]:
    return await experiments.results(name)


@router.post("/{name}/preference-file", status_code=201)
async def preference_file(name: str, request: Request, experiments: ExperimentsDep) -> dict[str, Any]:
    """Pairs of arms' answers to the same prompt, ranked by their feedback, as a /v1/files file
    (purpose fine-tune, OpenAI's preference format) for a DPO fine-tuning job. 409 when the
    experiment does not capture, has no pair yet, or its pairs would pass the files' limits (the
    file is built against them, in a worker thread, and never grows past them)."""
    files = request.app.state.gateway.files
    if files is None:
        raise NotFoundError("files are not enabled on this gateway (training is off)")
    limits = files.limits
    data, summary = await experiments.preference_data(name, max_bytes=limits.max_bytes, max_lines=limits.max_lines,
                                                      max_line_bytes=limits.max_line_bytes)
    record = await files.create(data, f"{name}-preferences.jsonl", "fine-tune")
    return {**file_object(record), "records": summary.pairs, "answers": summary.answers, "prompts": summary.prompts,
            "skipped": summary.skipped}
