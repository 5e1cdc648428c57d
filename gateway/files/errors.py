"""Typed errors of the file store (no FastAPI): ``gateway.errors`` maps them to statuses."""

from __future__ import annotations

from gateway.domain_errors import DomainError


class FileError(DomainError):
    """A file request that cannot be honoured."""


class FileNotFound(FileError):
    """No file has this id (never uploaded, or deleted)."""


class FileInUseError(FileError):
    """A queued or running fine-tuning job reads the file; it cannot be deleted now."""


class FileRequestError(FileError):
    """A bad upload request: an unsupported purpose, too many files stored."""


class FileUnavailableError(FileError):
    """The file's bytes cannot be read now, or no longer match their digest (refused, not served)."""
