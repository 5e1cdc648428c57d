"""Health and readiness probes."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

router = APIRouter()


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    """The process is alive and serving HTTP."""
    return {"status": "ok"}


@router.get("/readyz")
async def readyz(request: Request) -> JSONResponse:
    """The model is loaded, the engine thread runs, and the server is not shutting down."""
    gateway = getattr(request.app.state, "gateway", None)
    draining = gateway is not None and gateway.draining
    ready = gateway is not None and gateway.ready and not draining
    body = {"status": "ready" if ready else "shutting down" if draining else "not ready"}
    if ready:
        body.update(model=gateway.service.base_name, adapters=len(gateway.registry.entries()))
    return JSONResponse(body, status_code=200 if ready else 503)
