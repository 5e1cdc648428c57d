"""Typed errors of the fine-tuning API's domain (no FastAPI): ``gateway.errors`` maps them."""

from __future__ import annotations

from gateway.domain_errors import DomainError


class FineTuningRequestError(DomainError):
    """A job request that cannot be honoured as asked (a bad hyperparameter, an unknown or
    unavailable method, a file of the wrong format); ``param`` names the field at fault."""
