"""Typed errors of the experiments domain (HTTP statuses are mapped in ``gateway/errors.py``)."""

from __future__ import annotations

from gateway.domain_errors import DomainError


class ExperimentError(DomainError):
    """Base class of every error the experiments domain raises on purpose."""


class ExperimentValidationError(ExperimentError):
    """The definition or change asked for is invalid (weights, an arm the experiment lacks)."""


class UnknownArmModelError(ExperimentValidationError):
    """An arm names neither a registered adapter nor the base model."""


class ExperimentNotFoundError(ExperimentError):
    """No experiment has this name."""


class CompletionNotFoundError(ExperimentError):
    """No request an experiment routed has this completion id (for the key asking)."""


class ExperimentConflictError(ExperimentError):
    """The change clashes with the experiments' state: a name taken, the experiment not running,
    already promoted, the limit on experiments reached, an arm no longer registered."""


class PreferenceFileTooLargeError(ExperimentConflictError):
    """The preference file of an experiment's captures would pass the files' size or record limit."""
