"""The base class of every error a gateway domain (experiments, training, ...) raises on purpose.

The convention, shared with the adapter library (``adapters/errors.py``):

- a domain raises a *typed* error that says what went wrong in its own terms (``ExperimentNotFound``,
  ``DatasetTooLarge``...), with a message an operator or client can act on and, optionally, the
  name of the input at fault (``param``). It knows nothing of HTTP: no status, no error type, no
  response shape;
- ``gateway/errors.py`` holds the one table mapping each error class to an HTTP status and
  OpenAI's error ``type`` and ``code``; a domain adds its classes there with
  ``register_domain_error`` (or a row in ``DOMAIN_ERRORS``). A subclass without a row of its own
  takes its nearest registered base class's row, so a domain needs only one row for a family.

This module imports nothing but the standard library, so domain code stays free of FastAPI.
"""

from __future__ import annotations


class DomainError(Exception):
    """An expected failure of a domain operation; ``param`` names the input at fault, if one is."""

    def __init__(self, message: str, *, param: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
