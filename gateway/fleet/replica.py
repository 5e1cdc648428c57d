"""One gateway replica on Ray Serve: the whole gateway app (resident base, engine, adapter tiers,
registry) on one device, serving the requests the ingress forwards to it.

Affinity: the ingress sends an adapter's requests with ``multiplexed_model_id=<adapter id>``.
Before serving one, the replica passes the id through its ``@serve.multiplexed`` loader, whose
cache is as large as the device tier: a miss makes the adapter resident in a device slot (and
Serve then tells its router that this replica holds it); when Serve evicts an id (least recently
used), the adapter's slot is given back unless a request still uses it. The request itself then
leases the adapter as in one process, so an id the loader could not load (unknown, deleted,
missing files) is answered by the gateway's own error in OpenAI's shape, never a Ray error."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import AsyncIterator
from pathlib import Path

from ray import serve
from starlette.datastructures import Headers

from adapters.errors import AdapterError
from adapters.registry import AdapterEntry, AdapterRegistry
from gateway.app import create_app
from gateway.console.security import console_session, csrf_ok
from gateway.errors import ModelNotFoundError
from gateway.fleet.asgi_bridge import ForwardedRequest, ResponseStart, call_app
from gateway.fleet.routing import Route
from gateway.generation import GenerationService
from gateway.settings import Settings

log = logging.getLogger(__name__)
REPLICA_HEADER = b"x-gateway-replica"  # which replica served a response (affinity is visible, testable)


def replica_data_dir(data_dir: Path, rank: int) -> Path:
    """Each replica's own state (SQLite, disk tier, staging) under the fleet's data dir: two
    processes never share one SQLite file or one staging folder."""
    return data_dir / f"replica-{rank}"


class Residency:
    """Serve's multiplexed "model" for one adapter id: the adapter version made resident in this
    replica's device tier. Serve calls an instance's ``__del__`` when it evicts the id; it is set
    per instance (not on the class) so that garbage collection never calls the coroutine."""

    def __init__(self, registry: AdapterRegistry, entry: AdapterEntry):
        self.registry = registry
        self.entry = entry
        self.__del__ = self.release

    async def release(self) -> None:
        # the id may have been replaced since it was loaded: free its current version's slot too
        current = self.registry.get(self.entry.id) if self.entry.id in self.registry else None
        for entry in dict.fromkeys(e for e in (self.entry, current) if e is not None):
            if await self.registry.tiers.release_device(entry):
                log.info("adapter %s: no longer routed here, its device slot is free", entry.name)


def resolve_route(service: GenerationService, model: str, user: str | None, headers: dict[str, str]) -> Route:
    """What ``service`` would serve a request for ``model`` with: an experiment picks its arm as
    when it serves the request (sticky assignments hash to the same arm on every replica), an
    alias its adapter id; the base model and unknown names need no particular replica (an unknown
    one is marked so: the ingress keeps those apart from the served names)."""
    assignment = service.model_router(model, user, Headers(headers)) if service.model_router else None
    try:
        if assignment is not None:
            return Route(service.resolve_model(assignment.arm), cacheable=False)
        return Route(service.resolve_model(model), cacheable=True)
    except ModelNotFoundError:
        return Route(None, cacheable=assignment is None, known=False)


class GatewayReplica:
    """Deployment class (``gateway.fleet.app`` wraps it with ``serve.deployment``)."""

    async def __init__(self, settings: Settings):
        context = serve.get_replica_context()
        self.name = context.replica_tag
        rank = context.rank.rank  # 0 .. replicas-1; a replacement takes the lowest free one: the dead one's
        local_rank = context.rank.local_rank  # among this deployment's replicas on this node
        self.settings = settings.model_copy(update={"data_dir": replica_data_dir(settings.data_dir, rank)})
        self.settings.data_dir.mkdir(parents=True, exist_ok=True)
        self.app = create_app(self.settings)
        self._lifespan = contextlib.AsyncExitStack()
        await self._lifespan.enter_async_context(self.app.router.lifespan_context(self.app))
        self.gateway = self.app.state.gateway
        self._header = ((REPLICA_HEADER, self.name.encode()),)

        async def make_resident(adapter_id: str) -> Residency:
            registry = self.gateway.registry
            return Residency(registry, await registry.load(adapter_id))

        # the loader's cache is the device tier's size, known only now: wired per instance
        self._resident = serve.multiplexed(max_num_models_per_replica=self.settings.max_device_adapters)(
            make_resident)
        self._metrics_server = None
        if settings.replica_metrics_port is not None:
            from prometheus_client import start_http_server

            port = settings.replica_metrics_port + local_rank  # one replica per node (GPU pods): the same port
            self._metrics_server, _ = start_http_server(port, addr=settings.host, registry=self.gateway.metrics.registry)
            log.info("replica %s (rank %d): metrics at http://%s:%d/metrics", self.name, rank, settings.host, port)
        log.info("replica %s (rank %d) ready; data dir %s", self.name, rank, self.settings.data_dir)

    async def forward(self, request: ForwardedRequest) -> AsyncIterator[ResponseStart | bytes]:
        """Serve one forwarded HTTP request: its ``ResponseStart``, then body chunks as they come."""
        adapter_id = serve.get_multiplexed_model_id()
        if adapter_id:
            try:
                await self._resident(adapter_id)
            except AdapterError as exc:  # unknown, deleted, files missing: the gateway answers its own error
                log.info("adapter %s not made resident here: %s", adapter_id, exc)
            except Exception:  # noqa: BLE001 - never a Ray error for the client: the request's own lease reports it
                log.exception("adapter %s: loading it for the router failed", adapter_id)
        async for piece in call_app(self.app, request, self._header):
            yield piece

    async def route(self, model: str, user: str | None, headers: dict[str, str]) -> Route:
        """The adapter a request for ``model`` would use here."""
        return resolve_route(self.gateway.service, model, user, headers)

    async def console_session_admits(self, method: str, headers: dict[bytes, bytes]) -> bool:
        """Whether this replica's access guard would take a request with these headers (the
        session cookie and CSRF token) as a signed-in console's: the ingress asks every replica
        before it reads a large body whose only credential is the cookie (without a shared database
        the session lives only in the replica that signed the browser in)."""
        console = self.gateway.console
        session = await console_session(console.sessions if console else None, headers)
        return session is not None and csrf_ok(session, method, headers)

    def whoami(self) -> tuple[str, int]:
        """This replica's name (as in the ``x-gateway-replica`` header) and process id, for
        operators and tests reaching replicas through a Serve handle (never over HTTP)."""
        return self.name, os.getpid()

    def training_claims(self) -> tuple[str, list[str]]:
        """This replica's name and the training jobs it claimed since it started (in a fleet on one
        database each job is claimed by exactly one replica), for operators and tests."""
        return self.name, list(self.gateway.training.claimed)

    def check_health(self) -> None:
        """Ray Serve restarts a replica whose check raises."""
        if not self.gateway.ready:
            raise RuntimeError(f"replica {self.name}: the gateway is not serving")

    async def __del__(self) -> None:
        # Serve calls this after a failed __init__ too: only what was set up is torn down
        if getattr(self, "_metrics_server", None) is not None:
            self._metrics_server.shutdown()
        lifespan = getattr(self, "_lifespan", None)
        if lifespan is not None:
            await lifespan.aclose()
