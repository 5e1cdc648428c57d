"""Typed errors of the adapter library. The gateway maps each to an HTTP status in one place."""


class AdapterError(Exception):
    """Base class of every error the adapter library raises on purpose."""


class AdapterValidationError(AdapterError):
    """An adapter (or an upload holding one) is unsafe, malformed or incompatible with the base.

    The message names the problem in words an operator can act on; it never echoes file contents.
    """


class AdapterNotFoundError(AdapterError):
    """No adapter is registered under the requested id."""


class DatasetValidationError(AdapterError):
    """A training dataset has no usable example, or is malformed as a whole.

    ``problems`` lists ``(line_number, reason)`` pairs, 1-based, for every bad line found.
    """

    def __init__(self, message: str, problems: list[tuple[int, str]] | None = None):
        super().__init__(message)
        self.problems = problems or []


class AdapterConflictError(AdapterError):
    """The request clashes with the registry's state: the id is taken (and no replace was asked),
    the adapter is in use by something that forbids its removal, or no device slot can be pinned."""


class AdapterUnavailableError(AdapterError):
    """The adapter is registered but cannot be served now (its files are missing on disk)."""


class SharedStoreUnavailableError(AdapterError):
    """The shared store of a multi-replica deployment cannot be read or written now (unreachable,
    refused); nothing was changed. A full disk stays an ``OSError(ENOSPC)``."""
