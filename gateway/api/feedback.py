"""``POST /v1/feedback``: a score and/or a thumbs up/down on a response an experiment routed."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Request, Security
from pydantic import BaseModel, ConfigDict, Field, model_validator

from gateway.auth import inference_key_scheme, request_key
from gateway.errors import NotFoundError
from gateway.experiments.service import ExperimentService
from gateway.protocol import NO_NUL

router = APIRouter(prefix="/v1", dependencies=[Security(inference_key_scheme)])  # checked by AccessGuard
MAX_SCORE = 1e6


class FeedbackRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")  # a field we would not keep is refused, not dropped
    id: str = Field(min_length=1, max_length=128, pattern=NO_NUL,
                    description="The completion's id, from its response.")
    score: Annotated[float, Field(strict=True, ge=-MAX_SCORE, le=MAX_SCORE, allow_inf_nan=False)] | None = None
    thumbs: Literal["up", "down"] | None = None

    @model_validator(mode="after")
    def _something(self) -> FeedbackRequest:
        if self.score is None and self.thumbs is None:
            raise ValueError("give a score, a thumbs ('up' or 'down'), or both")
        return self


def get_experiments(request: Request) -> ExperimentService:
    experiments = request.app.state.gateway.experiments
    if experiments is None:
        raise NotFoundError("experiments are not enabled on this gateway")
    return experiments


@router.post("/feedback")
async def post_feedback(body: FeedbackRequest, request: Request,
                        experiments: Annotated[ExperimentService, Depends(get_experiments)]) -> dict[str, Any]:
    """Feedback on a request an experiment routed, from the key that made it (404 for any other id,
    and for another key's request). Sending feedback again for the same id replaces the earlier
    feedback whole (``replaced: true`` says so)."""
    key = request_key(request)
    return await experiments.feedback(body.id, body.score, body.thumbs, key.id if key else None)
