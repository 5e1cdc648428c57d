"""The one place that decides every error's HTTP status and renders it in OpenAI's shape:
``{"error": {"message", "type", "param", "code"}}``.

Two kinds of errors reach it:

- domain errors (``gateway/domain_errors.py``, ``adapters/errors.py``, the engine's and the tiers'
  errors): typed, HTTP-free; ``DOMAIN_ERRORS`` maps each class (or its nearest registered base)
  to a status, an error ``type`` and a ``code``. A domain adds its classes with
  ``register_domain_error``; ``install_error_handlers`` handles every ``DomainError`` subclass,
  registered before or after it ran;
- ``APIError`` subclasses, raised by the HTTP layer itself (authentication, rate limits, request
  checks that belong to the API, not to a domain).

A body larger than its limit is always ``PayloadTooLargeError`` (413, ``payload_too_large``),
whether the size was declared up front or counted while the body streamed in.

A JSON body whose strings are not valid Unicode (JSON can spell a lone UTF-16 surrogate,
``"\\ud800"``) is refused here for every route (``refuse_unpaired_surrogates``), before any route
hands such text to a tokenizer or quotes it in an error. Errors never fail to render such text
either, and quote a client's value at most ``ECHO_CHARS`` long (``shown``).
"""

from __future__ import annotations

import email.message
import errno
import json
import logging
import re
import sqlite3
from dataclasses import dataclass
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from adapters.errors import (
    AdapterConflictError, AdapterError, AdapterNotFoundError, AdapterUnavailableError, AdapterValidationError,
    DatasetValidationError, SharedStoreUnavailableError,
)
from adapters.sql import DatabaseUnavailableError
from adapters.tiers import NoFreeSlotError
from gateway.domain_errors import DomainError
from gateway.engine import (
    ADAPTER_UNAVAILABLE, GRAMMAR_DEAD_END, QUEUE_TIMEOUT, SHUTTING_DOWN, EngineStoppedError, KVCacheDemandError,
    QueueFullError,
)
from gateway.experiments.errors import (
    CompletionNotFoundError, ExperimentConflictError, ExperimentNotFoundError, ExperimentValidationError,
    UnknownArmModelError,
)
from gateway.files.errors import FileInUseError, FileNotFound, FileRequestError, FileUnavailableError
from gateway.fine_tuning.errors import FineTuningRequestError
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


class PermissionDeniedError(APIError):
    status = 403
    type = "permission_error"
    code = "permission_denied"


class NotFoundError(APIError):
    status = 404
    type = "not_found_error"


class ModelNotFoundError(NotFoundError):
    code = "model_not_found"


class ConflictError(APIError):
    status = 409
    type = "conflict_error"
    code = "conflict"


class BodyTimeoutError(APIError, StarletteHTTPException):
    """A body that did not arrive in time (an open route's, from a client no key vouches for).
    A Starlette HTTP exception too, to pass through FastAPI's body reading unchanged."""

    status = 408
    code = "body_timeout"

    def __init__(self, message: str):
        APIError.__init__(self, message, headers={"Connection": "close"})
        self.status_code = self.status
        self.detail = message


class PayloadTooLargeError(APIError, StarletteHTTPException):
    """A request body (or one part of it) larger than its limit. Also a Starlette HTTP exception:
    raised while FastAPI reads a body, only those pass through unchanged (others become a 400)."""

    status = 413
    code = "payload_too_large"

    def __init__(self, message: str, *, param: str | None = None):
        # the rest of the body may still be on its way: closing the connection stops it (uvicorn
        # otherwise read and dropped a chunked body sent without end until its header timeout)
        APIError.__init__(self, message, param=param, headers={"Connection": "close"})
        self.status_code = self.status
        self.detail = message

    @classmethod
    def over(cls, max_bytes: int, what: str = "the request body", param: str | None = None) -> PayloadTooLargeError:
        return cls(f"{what} is larger than the limit of {max_bytes} bytes", param=param)


class RateLimitError(APIError):
    status = 429
    type = "rate_limit_error"
    code = "rate_limit_exceeded"


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
    if code == ADAPTER_UNAVAILABLE:
        return ServiceUnavailableError(message, code=ADAPTER_UNAVAILABLE)
    if code == GRAMMAR_DEAD_END:
        return BadRequestError(message, code=GRAMMAR_DEAD_END)
    return GenerationFailedError(message)


@dataclass(frozen=True)
class ErrorSpec:
    """How one domain error class is answered."""

    status: int
    type: str
    code: str | None = None
    param: str | None = None  # when the error names none itself
    retry_after: int | None = None  # seconds, sent as Retry-After
    prefix: str = ""  # put before the error's own message


BUSY = ErrorSpec(429, "rate_limit_error", "overloaded", retry_after=1, prefix="the server is busy: ")

DOMAIN_ERRORS: dict[type[Exception], ErrorSpec] = {
    AdapterNotFoundError: ErrorSpec(404, "not_found_error", "model_not_found", param="model"),
    AdapterValidationError: ErrorSpec(400, "invalid_request_error", "invalid_adapter"),
    DatasetValidationError: ErrorSpec(400, "invalid_request_error", "invalid_dataset"),
    AdapterConflictError: ErrorSpec(409, "conflict_error", "conflict"),
    AdapterUnavailableError: ErrorSpec(503, "server_error", "adapter_unavailable"),
    SharedStoreUnavailableError: ErrorSpec(503, "server_error", "storage_unavailable", retry_after=5),
    QueueFullError: BUSY,
    NoFreeSlotError: BUSY,
    EngineStoppedError: ErrorSpec(503, "server_error", SHUTTING_DOWN),
    KVCacheDemandError: ErrorSpec(400, "invalid_request_error", "kv_cache_exceeded", param="max_tokens"),
    ExperimentValidationError: ErrorSpec(400, "invalid_request_error"),
    UnknownArmModelError: ErrorSpec(400, "invalid_request_error", "model_not_found"),
    ExperimentNotFoundError: ErrorSpec(404, "not_found_error", "experiment_not_found"),
    CompletionNotFoundError: ErrorSpec(404, "not_found_error", "completion_not_found"),
    ExperimentConflictError: ErrorSpec(409, "conflict_error", "conflict"),
    TrainingJobNotFoundError: ErrorSpec(404, "not_found_error", "not_found"),
    TrainingJobStateError: ErrorSpec(409, "conflict_error", "conflict"),
    TooManyTrainingJobsError: ErrorSpec(429, "rate_limit_error", "too_many_jobs"),
    TrainingStoreError: ErrorSpec(503, "server_error", "storage_unavailable", retry_after=5),
    # PostgreSQL unreachable: nothing was written; serving of known adapters goes on from memory
    DatabaseUnavailableError: ErrorSpec(503, "server_error", "database_unavailable", retry_after=5),
    FileNotFound: ErrorSpec(404, "not_found_error", "file_not_found"),
    FileInUseError: ErrorSpec(409, "conflict_error", "file_in_use"),
    FileRequestError: ErrorSpec(400, "invalid_request_error", "invalid_file_request"),
    FileUnavailableError: ErrorSpec(503, "server_error", "file_unavailable"),
    FineTuningRequestError: ErrorSpec(400, "invalid_request_error", "invalid_fine_tuning_request"),
}


def register_domain_error(cls: type[Exception], status: int, type_: str, code: str | None = None, *,
                          param: str | None = None, retry_after: int | None = None) -> None:
    """Give a domain's error class its answer (call it at import of the domain's HTTP wiring)."""
    DOMAIN_ERRORS[cls] = ErrorSpec(status, type_, code, param, retry_after)


def domain_error_spec(exc: BaseException) -> ErrorSpec | None:
    """The row of the nearest registered class of ``exc``; None when it has none."""
    for cls in type(exc).__mro__:
        if cls in DOMAIN_ERRORS:
            return DOMAIN_ERRORS[cls]
    return None


def error_body(message: str, type_: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


ECHO_CHARS = 64  # the most of one client value an error message quotes


def shown(value: object, limit: int = ECHO_CHARS) -> str:
    """``value`` as an error message quotes it: cut to ``limit`` characters and an ellipsis, so a
    400-digit ``max_tokens`` (or a long string) is not sent back in full."""
    try:
        text = str(value)
    except ValueError:  # an int past Python's digit limit for str()
        return "a number too long to show"
    return text if len(text) <= limit else text[:limit] + "…"


class ErrorJSONResponse(JSONResponse):
    """Starlette's JSONResponse, except that text UTF-8 cannot encode (a lone surrogate that a
    message quotes from the client) is written as a JSON escape instead of failing the response."""

    def render(self, content: Any) -> bytes:
        try:
            return super().render(content)
        except UnicodeEncodeError:
            return json.dumps(content, ensure_ascii=True, allow_nan=False, separators=(",", ":")).encode("ascii")


def error_response(exc: BaseException) -> JSONResponse | None:
    """The response for an ``APIError`` or a registered domain error; None for anything else."""
    if isinstance(exc, APIError):
        return _render(exc)
    spec = domain_error_spec(exc)
    if spec is None:
        return None
    message = spec.prefix + (getattr(exc, "message", None) or str(exc))
    headers = {"Retry-After": str(spec.retry_after)} if spec.retry_after is not None else None
    return ErrorJSONResponse(error_body(message, spec.type, getattr(exc, "param", None) or spec.param, spec.code),
                             status_code=spec.status, headers=headers)


def _render(exc: APIError) -> JSONResponse:
    return ErrorJSONResponse(error_body(exc.message, exc.type, exc.param, exc.code), status_code=exc.status,
                             headers=exc.headers)


_SURROGATE = re.compile("[\ud800-\udfff]")


def unpaired_surrogate(value: Any) -> list[str | int] | None:
    """The path (keys and indexes) to the first string or object key in a parsed JSON value that
    holds a lone UTF-16 surrogate: JSON may spell one and Python keeps it, but it is not Unicode,
    so tokenizers and UTF-8 encoders raise on it. A bad key's path is its object's. None: all valid.
    Iterative, as deep as the JSON parser allowed; a path is built only for the hit."""
    stack: list[tuple[Any, tuple | None]] = [(value, None)]  # (value, (parent's link, key))
    while stack:
        item, link = stack.pop()
        if isinstance(item, str):
            bad = _SURROGATE.search(item) is not None
        elif isinstance(item, dict):
            bad = any(_SURROGATE.search(k) for k in item)
            stack.extend((v, (link, k)) for k, v in reversed(item.items()) if isinstance(v, (str, dict, list)))
        elif isinstance(item, list):
            bad = False
            stack.extend((item[i], (link, i)) for i in range(len(item) - 1, -1, -1)
                         if isinstance(item[i], (str, dict, list)))
        else:
            bad = False
        if bad:
            path: list[str | int] = []
            while link is not None:
                link, key = link
                path.append(key)
            return path[::-1]
    return None


def param_path(path: list[str | int]) -> str | None:
    """``["messages", 0, "content"]`` as OpenAI writes a ``param``: ``messages[0].content``."""
    out = ""
    for key in path:
        out += f"[{key}]" if isinstance(key, int) else (f".{shown(key)}" if out else shown(key))
    return out or None


def _is_json(content_type: str | None) -> bool:
    """Whether FastAPI parses a body of this type as JSON (as ``fastapi.routing`` decides it)."""
    if not content_type:
        return False
    message = email.message.Message()
    message["content-type"] = content_type
    subtype = message.get_content_subtype()
    return message.get_content_maintype() == "application" and (subtype == "json" or subtype.endswith("+json"))


async def refuse_unpaired_surrogates(request: Request) -> None:
    """Dependency of every route: a JSON body with a string that is not valid Unicode gets a 400
    naming where, before the route tokenizes the text or quotes it. FastAPI has parsed the body of
    a route that takes one already (``request.json()`` is cached)."""
    if request.method not in ("POST", "PUT", "PATCH") or not _is_json(request.headers.get("content-type")):
        return
    raw = await request.body()
    if b"\\u" not in raw and b"\xed" not in raw:  # no escape nor raw UTF-8 bytes can spell a surrogate
        return
    try:
        body = await request.json()
    except (ValueError, RecursionError):  # not JSON: the route (or FastAPI) refuses it in its own words
        return
    path = unpaired_surrogate(body)
    if path is not None:
        raise surrogate_error(param_path(path))


def surrogate_error(param: str | None) -> BadRequestError:
    return BadRequestError(f"{param or 'the request body'} holds an unpaired UTF-16 surrogate (\\ud800-\\udfff); "
                           "strings must be valid Unicode", param=param, code="invalid_value")


# pydantic names the member of a union that failed in an error's location ('stop', 'list[str]'):
# type names, never fields (this API's fields are snake_case)
_TYPE_NAMES = frozenset({"str", "int", "float", "bool", "bytes", "none", "any", "list", "dict"})


def _validation_param(loc: tuple) -> str | None:
    """A validation error's location as OpenAI writes a ``param`` (``messages[0].role``), without
    where it came from (``body``) or the union member pydantic tried (``stop.str`` is ``stop``)."""
    path = [part for part in loc[1:] if isinstance(part, int) or not _is_type_name(part)] \
        if loc and loc[0] in ("body", "query", "path", "header") else list(loc)
    return param_path(path)


def _is_type_name(part: str) -> bool:
    return part in _TYPE_NAMES or "[" in part or "-" in part or part[:1].isupper()


def _describe_validation(exc: RequestValidationError) -> tuple[str, str | None]:
    """First problem, in words, with its field path; never echoes the submitted value."""
    errors = exc.errors()
    if not errors:
        return "invalid request", None
    first = errors[0]
    param = _validation_param(first.get("loc", ()))
    msg = first.get("msg", "invalid value")
    if first.get("type") == "json_invalid":
        return "the request body is not valid JSON", None
    if first.get("type") == "missing":
        return f"missing required parameter: {param}", param
    more = f" (and {len(errors) - 1} more problem(s))" if len(errors) > 1 else ""
    return (f"invalid value for {param}: {msg}" if param else msg) + more, param


def install_error_handlers(app: FastAPI) -> None:
    """Handlers for every error, and the body check that must answer before any route runs. Call it
    before the routers are included: the app's dependencies reach the routes included after."""
    app.router.dependencies.append(Depends(refuse_unpaired_surrogates))

    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        return _render(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = _describe_validation(exc)
        return ErrorJSONResponse(error_body(message, "invalid_request_error", param, "invalid_value"),
                                 status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        if isinstance(exc, APIError):  # PayloadTooLargeError raised while a body was read
            return _render(exc)
        type_ = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return ErrorJSONResponse(error_body(str(exc.detail), type_, None, None), status_code=exc.status_code,
                                 headers=exc.headers)

    async def _domain(_: Request, exc: Exception) -> JSONResponse:
        response = error_response(exc)
        if response is None:  # a base class without a row of its own: a bug, not the client's fault
            return await _unexpected(_, exc)
        return response

    # DomainError and AdapterError catch subclasses registered later too (looked up at raise time)
    for cls in {DomainError, AdapterError, *DOMAIN_ERRORS}:
        app.add_exception_handler(cls, _domain)

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

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error")
        return ErrorJSONResponse(error_body("internal server error", "server_error", None, "internal_error"),
                                 status_code=500)
