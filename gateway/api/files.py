"""OpenAI's ``/v1/files`` for fine-tuning data (admin key: what is uploaded here trains what is
served). Upload (multipart ``file`` + ``purpose``), list, retrieve, delete, content. Only
``purpose: "fine-tune"`` is stored; each upload is validated as training data, every bad line
named (400). Errors are typed (``gateway.files.errors``); ``gateway.errors`` renders them."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Query, Request, Security
from fastapi.responses import JSONResponse, Response
from starlette.datastructures import UploadFile

from adapters.errors import DatasetValidationError
from adapters.training.prepare import describe_problems
from gateway.auth import admin_key_scheme
from gateway.errors import BadRequestError, PayloadTooLargeError, ServiceUnavailableError
from gateway.files.service import FileService
from gateway.files.store import FileRecord
from gateway.fine_tuning.views import page

router = APIRouter(prefix="/v1/files", dependencies=[Security(admin_key_scheme)])  # checked by AccessGuard
MAX_FIELD_BYTES = 1024


def get_files(request: Request) -> FileService:
    files = getattr(request.app.state.gateway, "files", None)
    if files is None:
        raise ServiceUnavailableError("files are not available on this gateway")
    return files


FilesDep = Annotated[FileService, Depends(get_files)]


def file_object(record: FileRecord) -> dict[str, Any]:
    return {"object": "file", "id": record.id, "bytes": record.bytes, "created_at": record.created_at,
            "filename": record.filename, "purpose": record.purpose, "status": "processed", "status_details": None,
            "expires_at": None}


UPLOAD_BODY = {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
    "type": "object", "required": ["file", "purpose"],
    "properties": {
        "file": {"type": "string", "format": "binary", "description": (
            "JSONL training data: chat messages, prompt/completion, instruction/output, or preference records")},
        "purpose": {"type": "string", "enum": ["fine-tune"]},
    }}}}}}


@router.post("", openapi_extra=UPLOAD_BODY)
async def upload_file(request: Request, files: FilesDep) -> JSONResponse:
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        raise BadRequestError("send multipart/form-data with a 'file' and a 'purpose' field")
    try:
        form = await request.form(max_files=1, max_fields=1, max_part_size=MAX_FIELD_BYTES)
    except PayloadTooLargeError:
        raise
    except Exception as exc:  # noqa: BLE001 - starlette raises plain HTTP/multipart errors
        raise BadRequestError(f"the multipart form could not be read: {getattr(exc, 'detail', exc)}") from None
    try:
        purpose = form.get("purpose")
        if not isinstance(purpose, str) or not purpose:
            raise BadRequestError("missing required parameter: purpose", param="purpose")
        upload = form.get("file")
        if not isinstance(upload, UploadFile):
            raise BadRequestError("send the data as a file field named 'file' (JSONL)", param="file")
        limit = files.limits.max_bytes
        data = await upload.read(limit + 1)
        if len(data) > limit:
            raise PayloadTooLargeError.over(limit, "the file", param="file")
        filename = upload.filename
    finally:
        await form.close()
    try:
        record = await files.create(data, filename, purpose)
    except DatasetValidationError as exc:
        raise BadRequestError(describe_problems(exc), param="file", code="invalid_file") from None
    return JSONResponse(file_object(record))


@router.get("")
async def list_files(files: FilesDep, purpose: str | None = None,
                     limit: Annotated[int, Query(ge=1, le=10_000)] = 10_000,
                     order: Literal["asc", "desc"] = "desc", after: str | None = None) -> dict[str, Any]:
    records = files.list(purpose)
    if order == "asc":
        records.reverse()
    return page([file_object(r) for r in records], after, limit)


@router.get("/{file_id}")
async def retrieve_file(file_id: str, files: FilesDep) -> dict[str, Any]:
    return file_object(files.get(file_id))


@router.delete("/{file_id}")
async def delete_file(file_id: str, files: FilesDep) -> dict[str, Any]:
    """409 while a fine-tuning job that has not ended uses the file."""
    await files.delete(file_id)
    return {"object": "file", "id": file_id, "deleted": True}


@router.get("/{file_id}/content")
async def file_content(file_id: str, files: FilesDep) -> Response:
    return Response(await files.read(file_id), media_type="application/jsonl")
