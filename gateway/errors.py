"""Typed API errors and the one place that renders every error in OpenAI's shape:
``{"error": {"message", "type", "param", "code"}}``."""

from __future__ import annotations

import errno
import logging
import sqlite3

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from adapters.errors import (
    AdapterConflictError, AdapterNotFoundError, AdapterUnavailableError, AdapterValidationError,
    DatasetValidationError,
)
from adapters.tiers import NoFreeSlotError
from gateway.engine import QUEUE_TIMEOUT, SHUTTING_DOWN, EngineStoppedError, QueueFullError
from gateway.training.errors import (
    TooManyTrainingJobsError, TrainingJobNotFoundError, TrainingJobStateError, TrainingStoreError,
)

log = logging.getLogger(__name__)


class APIError(Exception):
    status = 400
    type = "invalid_request_error"
    code: str | None = None

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        self.headers = headers
        if code is not None:
            self.code = code


class BadRequestError(APIError):
    pass


class AuthenticationError(APIError):
    status = 401
    type = "authentication_error"
    code = "invalid_api_key"


class NotFoundError(APIError):
    status = 404
    type = "not_found_error"


class ModelNotFoundError(NotFoundError):
    code = "model_not_found"


class ConflictError(APIError):
    status = 409
    type = "conflict_error"
    code = "conflict"


class PayloadTooLargeError(APIError):
    status = 413
    code = "payload_too_large"


class RateLimitError(APIError):
    status = 429
    type = "rate_limit_error"
    code = "overloaded"


class ServiceUnavailableError(APIError):
    status = 503
    type = "server_error"
    code = "unavailable"


class QueueTimeoutError(ServiceUnavailableError):
    """Waited too long for a batch row. 503 with Retry-After, not 408: the request was valid and
    the client was not slow; the server is overloaded, and clients (the openai SDK included) and
    load balancers retry a 503 elsewhere or later."""

    code = QUEUE_TIMEOUT


class ShuttingDownError(ServiceUnavailableError):
    code = SHUTTING_DOWN


class InsufficientStorageError(APIError):
    status = 507
    type = "server_error"
    code = "insufficient_storage"


class GenerationFailedError(APIError):
    status = 500
    type = "server_error"
    code = "generation_failed"


def engine_error(message: str, code: str | None) -> APIError:
    """The API error for a sequence the engine ended with an error (``SequenceEvent.error_code``)."""
    if code == QUEUE_TIMEOUT:
        return QueueTimeoutError(message, headers={"Retry-After": "1"})
    if code == SHUTTING_DOWN:
        return ShuttingDownError(message)
    return GenerationFailedError(message)


def error_body(message: str, type_: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def _render(exc: APIError) -> JSONResponse:
    return JSONResponse(error_body(exc.message, exc.type, exc.param, exc.code), status_code=exc.status,
                        headers=exc.headers)


def _describe_validation(exc: RequestValidationError) -> tuple[str, str | None]:
    """First problem, in words, with its field path; never echoes the submitted value."""
    errors = exc.errors()
    if not errors:
        return "invalid request", None
    first = errors[0]
    loc = [str(p) for p in first.get("loc", ()) if p not in ("body", "query", "path", "header")]
    param = ".".join(loc) or None
    msg = first.get("msg", "invalid value")
    if first.get("type") == "json_invalid":
        return "the request body is not valid JSON", None
    if first.get("type") == "missing":
        return f"missing required parameter: {param}", param
    more = f" (and {len(errors) - 1} more problem(s))" if len(errors) > 1 else ""
    return (f"invalid value for {param}: {msg}" if param else msg) + more, param


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        return _render(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = _describe_validation(exc)
        return JSONResponse(error_body(message, "invalid_request_error", param, "invalid_value"), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        type_ = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        code = "payload_too_large" if exc.status_code == 413 else None
        return JSONResponse(error_body(str(exc.detail), type_, None, code), status_code=exc.status_code)

    @app.exception_handler(AdapterNotFoundError)
    async def _adapter_missing(_: Request, exc: AdapterNotFoundError) -> JSONResponse:
        return _render(ModelNotFoundError(str(exc), param="model"))

    @app.exception_handler(AdapterValidationError)
    async def _adapter_invalid(_: Request, exc: AdapterValidationError) -> JSONResponse:
        return _render(BadRequestError(str(exc), code="invalid_adapter"))

    @app.exception_handler(AdapterConflictError)
    async def _adapter_conflict(_: Request, exc: AdapterConflictError) -> JSONResponse:
        return _render(ConflictError(str(exc)))

    @app.exception_handler(AdapterUnavailableError)
    async def _adapter_unavailable(_: Request, exc: AdapterUnavailableError) -> JSONResponse:
        return _render(ServiceUnavailableError(str(exc), code="adapter_unavailable"))

    @app.exception_handler(DatasetValidationError)
    async def _dataset_invalid(_: Request, exc: DatasetValidationError) -> JSONResponse:
        return _render(BadRequestError(str(exc), code="invalid_dataset"))

    # training jobs (gateway/training/errors.py)
    @app.exception_handler(TrainingJobNotFoundError)
    async def _job_missing(_: Request, exc: TrainingJobNotFoundError) -> JSONResponse:
        return _render(NotFoundError(str(exc), code="not_found"))

    @app.exception_handler(TrainingJobStateError)
    async def _job_state(_: Request, exc: TrainingJobStateError) -> JSONResponse:
        return _render(ConflictError(str(exc)))

    @app.exception_handler(TooManyTrainingJobsError)
    async def _too_many_jobs(_: Request, exc: TooManyTrainingJobsError) -> JSONResponse:
        return _render(RateLimitError(str(exc), code="too_many_jobs"))

    @app.exception_handler(TrainingStoreError)
    async def _job_store(_: Request, exc: TrainingStoreError) -> JSONResponse:
        return _render(ServiceUnavailableError(str(exc), code="storage_unavailable", headers={"Retry-After": "5"}))

    # storage: a full disk or a busy database fails the request that needed it, cleanly
    @app.exception_handler(OSError)
    @app.exception_handler(sqlite3.Error)
    async def _storage(request: Request, exc: Exception) -> JSONResponse:
        full = (isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)) or (
            isinstance(exc, sqlite3.OperationalError) and "full" in str(exc))
        if full:
            log.error("%s %s: out of disk space: %s", request.method, request.url.path, exc)
            return _render(InsufficientStorageError(
                "the server is out of disk space; nothing was saved. Retry once space is freed"))
        if isinstance(exc, sqlite3.OperationalError) and ("locked" in str(exc) or "busy" in str(exc)):
            log.error("%s %s: database busy: %s", request.method, request.url.path, exc)
            return _render(ServiceUnavailableError("the database is busy; nothing was saved. Retry later",
                                                   code="storage_unavailable", headers={"Retry-After": "5"}))
        return await _unexpected(request, exc)

    @app.exception_handler(QueueFullError)
    @app.exception_handler(NoFreeSlotError)
    async def _busy(_: Request, exc: Exception) -> JSONResponse:
        return _render(RateLimitError(f"the server is busy: {exc}", headers={"Retry-After": "1"}))

    @app.exception_handler(EngineStoppedError)
    async def _stopping(_: Request, exc: Exception) -> JSONResponse:
        return _render(ShuttingDownError(str(exc)))

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error")
        return JSONResponse(error_body("internal server error", "server_error", None, "internal_error"),
                            status_code=500)
