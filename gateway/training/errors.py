"""Typed errors of the training jobs (no torch, no FastAPI): ``gateway.errors`` decides their HTTP
status and OpenAI error shape, the job manager only says what went wrong."""

from __future__ import annotations


class TrainingJobError(Exception):
    """A training job request that cannot be honoured."""


class TrainingJobNotFoundError(TrainingJobError):
    """No job has this id (never existed, or deleted)."""


class TrainingJobStateError(TrainingJobError):
    """The job is in a state that does not allow the request (cancel an ended job, delete a running one)."""


class TooManyTrainingJobsError(TrainingJobError):
    """The limit on queued or running jobs is reached; retry after one ends."""


class TrainingStoreError(TrainingJobError):
    """The job records cannot be written now (disk full, database locked); retry later."""
