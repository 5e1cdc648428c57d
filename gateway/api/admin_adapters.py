"""Admin routes for adapters (admin key): register (upload, archive, or allowed server folder),
list, inspect, delete, pin, unpin and warm."""

from __future__ import annotations

import asyncio
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request, Security
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.datastructures import UploadFile

from adapters.archive import ArchiveLimits
from adapters.registry import AdapterRegistry
from gateway.auth import admin_key_scheme
from gateway.errors import BadRequestError, PayloadTooLargeError
from gateway.uploads import stage_source_folder, stage_uploads, staging_folder

router = APIRouter(prefix="/admin/adapters", dependencies=[Security(admin_key_scheme)])  # checked by AccessGuard
MAX_FORM_FILES = 3  # config, weights and a model card
MAX_FORM_FIELDS = 4


class RegisterFromFolder(BaseModel):
    """JSON body of a registration from a server-side folder."""

    model_config = ConfigDict(extra="forbid")
    source_path: str = Field(max_length=4096)
    id: str | None = Field(None, max_length=64)
    replace: bool = False


def get_registry(request: Request) -> AdapterRegistry:
    return request.app.state.gateway.registry


RegistryDep = Annotated[AdapterRegistry, Depends(get_registry)]


def _flag(value: Any, name: str) -> bool:
    if value is None:
        return False
    text = str(value).strip().lower()
    if text in ("true", "1", "yes"):
        return True
    if text in ("false", "0", "no", ""):
        return False
    raise BadRequestError(f"{name} must be true or false", param=name)


FILE = {"type": "string", "format": "binary"}
REGISTER_BODY = {"requestBody": {"required": True, "content": {
    "multipart/form-data": {"schema": {
        "type": "object", "required": ["files"],
        "properties": {
            "files": {"type": "array", "minItems": 1, "maxItems": MAX_FORM_FILES, "items": FILE, "description": (
                "adapter_config.json and adapter_model.safetensors (a README.md may come along), or one "
                ".zip / .tar.gz / .tar archive holding them; the part names do not matter, the file names do")},
            "id": {"type": "string", "maxLength": 64, "description": "Adapter id (default: from the content hash)."},
            "replace": {"type": "string", "enum": ["true", "false", "1", "0", "yes", "no"], "default": "false",
                        "description": "Replace an adapter registered under the same id."},
        }}},
    "application/json": {"schema": RegisterFromFolder.model_json_schema()},
}}}


@router.post("", status_code=201, openapi_extra=REGISTER_BODY)
async def register_adapter(request: Request, registry: RegistryDep) -> JSONResponse:
    gateway = request.app.state.gateway
    settings = gateway.settings
    content_type = request.headers.get("content-type", "")
    with staging_folder(settings.data_dir / "staging") as staging:
        if content_type.startswith("application/json"):
            raw = await request.body()  # bounded by max_admin_json_bytes (gateway/auth.py)
            try:
                body = RegisterFromFolder.model_validate_json(raw)
            except ValidationError as exc:
                first = exc.errors()[0]
                param = ".".join(str(p) for p in first["loc"]) or None
                raise BadRequestError(f"invalid value for {param}: {first['msg']}", param=param) from None
            adapter_id, replace = body.id, body.replace
            folder = await asyncio.to_thread(stage_source_folder, body.source_path, settings.adapter_source_roots,
                                             staging, settings.max_adapter_bytes)
        elif content_type.startswith("multipart/form-data"):
            try:
                form = await request.form(max_files=MAX_FORM_FILES, max_fields=MAX_FORM_FIELDS)
            except PayloadTooLargeError:
                raise
            except Exception as exc:  # noqa: BLE001 - starlette raises plain HTTP/multipart errors
                raise BadRequestError(f"the multipart form could not be read: {getattr(exc, 'detail', exc)}") from None
            try:
                adapter_id = form.get("id")
                if adapter_id is not None and not isinstance(adapter_id, str):
                    raise BadRequestError("id must be a text field", param="id")
                replace = _flag(form.get("replace"), "replace")
                uploads = [v for _, v in form.multi_items() if isinstance(v, UploadFile)]
                limits = ArchiveLimits(max_member_bytes=settings.max_adapter_bytes,
                                       max_total_bytes=settings.max_adapter_bytes + (1 << 20))
                folder = await stage_uploads(uploads, staging, settings.max_adapter_bytes, limits)
            finally:
                await form.close()  # spooled upload files
        else:
            raise BadRequestError("send multipart/form-data (adapter files or one archive) or JSON with "
                                  "source_path")
        entry = await registry.register(adapter_id or None, folder, replace=replace)
    return JSONResponse(entry.describe(), status_code=201)


@router.get("")
async def list_adapters(registry: RegistryDep) -> dict[str, Any]:
    return {"object": "list", "data": [e.describe() for e in registry.entries()]}


@router.get("/{adapter_id}")
async def get_adapter(adapter_id: str, registry: RegistryDep) -> dict[str, Any]:
    return registry.get(adapter_id).describe()


@router.delete("/{adapter_id}")
async def delete_adapter(adapter_id: str, registry: RegistryDep) -> dict[str, Any]:
    await registry.delete(adapter_id)
    return {"id": adapter_id, "object": "adapter", "deleted": True}


@router.post("/{adapter_id}/pin")
async def pin_adapter(adapter_id: str, registry: RegistryDep) -> dict[str, Any]:
    return (await registry.set_pinned(adapter_id, True)).describe()


@router.post("/{adapter_id}/unpin")
async def unpin_adapter(adapter_id: str, registry: RegistryDep) -> dict[str, Any]:
    return (await registry.set_pinned(adapter_id, False)).describe()


@router.post("/{adapter_id}/load")
async def load_adapter(adapter_id: str, registry: RegistryDep) -> dict[str, Any]:
    return (await registry.load(adapter_id)).describe()
