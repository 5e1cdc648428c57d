"""The fleet's HTTP entry: a Ray Serve ingress deployment (FastAPI, no model) that checks keys
(wrong ones throttled per client address), reads the body (bounded by its area's limit; one whose
only credential is a console cookie no further than 64 KiB until a replica confirms the session; one
no key vouches for within 20 s), picks the adapter id a request needs, and relays it to a replica
with ``multiplexed_model_id`` set, so that Serve prefers a replica already holding that adapter.
The replica's response comes back as it is produced (SSE chunk by chunk), status and headers kept; what the ingress answers itself is in OpenAI's error shape.

A replica that dies under a request (kill -9, a lost node) ends that request cleanly: a 503 in
OpenAI's shape before the response started, an SSE error event after; Ray restarts the replica
and the other replicas keep serving."""

# no "from __future__ import annotations": Serve rewrites the route methods' signatures and FastAPI
# must then see real annotation objects, not strings
import json
import logging
from collections.abc import AsyncIterator
from functools import partial
from typing import Optional

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from ray import serve
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException as StarletteHTTPException

from gateway.console.security import CSRF_HEADER
from gateway.errors import APIError, ErrorJSONResponse, ServiceUnavailableError, error_body, error_response
from gateway.fleet.asgi_bridge import ForwardedRequest, ResponseStart
from gateway.fleet.routing import (
    UNCONFIRMED_SESSION_BYTES, IngressGuard, ModelRoutes, Route, SessionGate, believed_client, model_request,
    read_body,
)
from gateway.settings import Settings

log = logging.getLogger(__name__)
METHODS = ["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"]
REPLICA_LOST = ("the replica serving this request stopped; retry the request", "replica_unavailable")
# what a replica needs to judge a console session, and no more of the request's headers
SESSION_HEADERS = frozenset({b"cookie", CSRF_HEADER.lower().encode()})
SESSION_CHECK_SECONDS = 10.0  # a replica that does not answer by then cannot vouch for the session


def replica_lost_event() -> bytes:
    """The SSE error event (and end marker) that ends a stream whose replica died: the client
    sees an error as it does for a generation that fails, not a connection cut mid-chunk."""
    message, code = REPLICA_LOST
    payload = json.dumps(error_body(message, ServiceUnavailableError.type, None, code), separators=(",", ":"))
    return b"data: " + payload.encode() + b"\n\ndata: [DONE]\n\n"


def build_ingress_app() -> FastAPI:
    # no description of its own: /openapi.json is the gateway's, answered by a replica
    app = FastAPI(title="adapter-gateway fleet ingress", docs_url=None, redoc_url=None, openapi_url=None)
    install_ingress_error_handlers(app)
    return app


def install_ingress_error_handlers(app: FastAPI) -> None:
    """Whatever the ingress itself answers is in OpenAI's shape, as the gateway's own errors are.
    Not ``gateway.errors.install_error_handlers``: its body check would read a body before the
    ingress's key check and bounded read."""

    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        type_ = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return ErrorJSONResponse(error_body(str(exc.detail), type_), status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.error("%s %s: unhandled error at the ingress", request.method, request.url.path, exc_info=exc)
        return ErrorJSONResponse(error_body("internal server error", "server_error", None, "internal_error"),
                                 status_code=500)


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
        self._warned_forwarded = False

    async def _ask_route(self, model: str, user: str | None, headers: dict[str, str]) -> Route:
        return await self._replicas.route.remote(model, user, headers)

    @fleet_http.api_route("/{path:path}", methods=METHODS, include_in_schema=False)
    async def relay(self, request: Request) -> Response:
        scope = request.scope
        headers = dict(scope["headers"])
        client = self._client(scope)
        refusal = self.guard.refusal(scope["path"], headers, client[0] if client else "unknown")
        if refusal is not None and not self.guard.may_hold_session(headers):
            return error_response(refusal)
        gate = None if refusal is None else SessionGate(
            UNCONFIRMED_SESSION_BYTES, partial(self._session_admits, scope["method"], headers), refusal)
        try:
            body = await read_body(request, self.guard.body_limit(scope), gate,
                                   self.guard.unvouched_body_seconds(scope["path"], gate is not None))
        except APIError as exc:
            return error_response(exc)
        adapter_id = await self._adapter_for(scope["path"], body, headers) if self.multiplexed else None
        handle = self._streams.options(multiplexed_model_id=adapter_id) if adapter_id else self._streams
        forwarded = ForwardedRequest(scope["method"], scope["path"], scope.get("query_string", b""),
                                     tuple(scope["headers"]), body, client)
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

    def _client(self, scope: dict) -> Optional[tuple]:
        client = believed_client(scope, self.settings.trusted_proxies)
        if client is None and scope.get("client") and not self._warned_forwarded:
            self._warned_forwarded = True  # once: every such request would say the same
            log.warning("Serve's HTTP proxy took a client address from X-Forwarded-For although trusted_proxies "
                        "is empty: such requests count as from an unknown address. Give the proxy "
                        "FORWARDED_ALLOW_IPS=<trusted_proxies> (adapter-gateway serve does; with serve run or a "
                        "RayService: in the Ray nodes' environment or the Serve config's controller_options)")
        return client

    async def _session_admits(self, method: str, headers: dict) -> bool:
        """Whether some replica holds this console session (and its CSRF token matches): one small
        call per replica, made only for a large body whose only credential is the cookie."""
        wanted = {k: v for k, v in headers.items() if k in SESSION_HEADERS}
        try:
            answers = await self._replicas.broadcast("console_session_admits", method, wanted).results_async(
                timeout_s=SESSION_CHECK_SECONDS, return_exceptions=True)
        except Exception as exc:  # noqa: BLE001 - no replica could vouch for it: refused as without the cookie
            log.warning("checking a console session with the replicas failed: %r", exc)
            return False
        return any(answer is True for answer in answers)

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
