"""The fleet's HTTP entry: a Ray Serve ingress deployment (FastAPI, no model) that checks keys,
reads the body (bounded), picks the adapter id a request needs, and relays it to a replica with
``multiplexed_model_id`` set, so that Serve prefers a replica already holding that adapter. The
replica's response comes back as it is produced (SSE chunk by chunk), status and headers kept.

A replica that dies under a request (kill -9, a lost node) ends that request cleanly: a 503 in
OpenAI's shape before the response started, an SSE error event after; Ray restarts the replica
and the other replicas keep serving."""

# no "from __future__ import annotations": Serve rewrites the route methods' signatures and FastAPI
# must then see real annotation objects, not strings
import json
import logging
from collections.abc import AsyncIterator
from typing import Optional

from fastapi import FastAPI, Request
from fastapi.responses import Response, StreamingResponse
from ray import serve
from ray.serve.handle import DeploymentHandle

from gateway.errors import APIError, PayloadTooLargeError, ServiceUnavailableError, error_body, error_response
from gateway.fleet.asgi_bridge import ForwardedRequest, ResponseStart
from gateway.fleet.routing import IngressGuard, ModelRoutes, Route, model_request
from gateway.limits import declared_too_large
from gateway.settings import Settings

log = logging.getLogger(__name__)
METHODS = ["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"]
REPLICA_LOST = ("the replica serving this request stopped; retry the request", "replica_unavailable")


def replica_lost_event() -> bytes:
    """The SSE error event (and end marker) that ends a stream whose replica died: the client
    sees an error as it does for a generation that fails, not a connection cut mid-chunk."""
    message, code = REPLICA_LOST
    payload = json.dumps(error_body(message, ServiceUnavailableError.type, None, code), separators=(",", ":"))
    return b"data: " + payload.encode() + b"\n\ndata: [DONE]\n\n"


async def read_body(request: Request, limit: int) -> bytes:
    """The whole body, refused with 413 as soon as it passes ``limit`` (counted as it streams in)."""
    too_large = declared_too_large(request.scope, limit)
    if too_large is not None:
        raise too_large
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise PayloadTooLargeError.over(limit)
        chunks.append(chunk)
    return b"".join(chunks)


def build_ingress_app() -> FastAPI:
    # no description of its own: /openapi.json is the gateway's, answered by a replica
    return FastAPI(title="adapter-gateway fleet ingress", docs_url=None, redoc_url=None, openapi_url=None)


# created at import, unlike the gateway's app: serve.ingress takes the app when the class is
# defined, and Serve imports this module in the ingress's process to build it
fleet_http = build_ingress_app()


@serve.ingress(fleet_http)
class GatewayIngress:
    """Deployment class (``gateway.fleet.app`` wraps it with ``serve.deployment``)."""

    def __init__(self, replicas: DeploymentHandle, settings: Settings):
        self.settings = settings
        self.multiplexed = settings.fleet_routing == "multiplexed"
        self.guard = IngressGuard(settings, settings.admin_key or "")
        self._streams = replicas.options(stream=True)
        self._replicas = replicas
        self.routes = ModelRoutes(self._ask_route, settings.fleet_route_cache_seconds)

    async def _ask_route(self, model: str, user: str | None, headers: dict[str, str]) -> Route:
        return await self._replicas.route.remote(model, user, headers)

    @fleet_http.api_route("/{path:path}", methods=METHODS, include_in_schema=False)
    async def relay(self, request: Request) -> Response:
        scope = request.scope
        headers = dict(scope["headers"])
        refusal = self.guard.refusal(scope["path"], headers)
        if refusal is not None:
            return error_response(refusal)
        try:
            body = await read_body(request, self.guard.body_limit(scope))
        except APIError as exc:
            return error_response(exc)
        adapter_id = await self._adapter_for(scope["path"], body, headers) if self.multiplexed else None
        handle = self._streams.options(multiplexed_model_id=adapter_id) if adapter_id else self._streams
        forwarded = ForwardedRequest(scope["method"], scope["path"], scope.get("query_string", b""),
                                     tuple(scope["headers"]), body, scope.get("client"))
        pieces = handle.forward.remote(forwarded)
        try:
            start = await pieces.__anext__()
        except Exception as exc:  # noqa: BLE001 - the replica died or could not take it: the client gets a 503
            log.warning("%s %s: no replica answered: %r", scope["method"], scope["path"], exc)
            message, code = REPLICA_LOST
            return error_response(ServiceUnavailableError(message, code=code))
        if not isinstance(start, ResponseStart):  # a bug, not a client's doing
            log.error("replica sent %r before its response start", type(start))
            return error_response(ServiceUnavailableError("the replica answered out of order", code="bad_replica"))
        response = StreamingResponse(self._body(pieces, start), status_code=start.status)
        response.raw_headers = list(start.headers)  # as the replica sent them (content-length, cookies)
        return response

    async def _adapter_for(self, path: str, body: bytes, headers: dict) -> Optional[str]:
        wanted = model_request(path, body)
        if wanted is None:
            return None
        texts = {k.decode("latin-1"): v.decode("latin-1") for k, v in headers.items()
                 if k != b"authorization" and k != b"cookie"}  # a subject header may matter; secrets never leave
        try:
            return await self.routes.adapter_for(wanted, texts)
        except Exception as exc:  # noqa: BLE001 - routing is a hint: without it, any replica serves the request
            log.warning("routing %r: %r; sending it to any replica", wanted.model, exc)
            return None

    @staticmethod
    async def _body(pieces, start: ResponseStart) -> AsyncIterator[bytes]:
        sse = any(k.lower() == b"content-type" and v.startswith(b"text/event-stream") for k, v in start.headers)
        try:
            async for piece in pieces:
                yield piece
        except Exception as exc:  # noqa: BLE001 - the replica died mid-response
            log.warning("a replica stopped mid-response: %r", exc)
            if sse:
                yield replica_lost_event()
            # other bodies end short of their content-length: the client sees a broken response
