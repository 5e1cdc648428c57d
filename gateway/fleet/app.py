"""Build and run the fleet: ``adapter-gateway serve --replicas N`` (N >= 2) or ``serve run``.

``serve run gateway.fleet.app:build_app`` builds the application from ``GATEWAY_*`` variables
(``serve run`` arguments ``key=value`` override them, as flags do). Every replica gets the same
settings but its own data dir (``<data_dir>/replica-<rank>``)."""

from __future__ import annotations

import logging
import math
import os
import signal
import threading
from pathlib import Path
from typing import Any

from gateway.admin_key import resolve_admin_key
from gateway.settings import EMBEDDED_MODEL, Settings

log = logging.getLogger(__name__)
APP_NAME = "gateway"
INGRESS_CPUS = 0.1  # the ingress only relays bytes: it must not take a device replica's CPU share


class FleetConfigError(ValueError):
    """A fleet whose replicas could not share what they must (refused before anything starts)."""


def check_fleet_state(settings: Settings) -> None:
    """Refuse, or warn about, a fleet whose replicas would not share their state.

    With ``replicas`` >= 2 and PostgreSQL but no shared store, an adapter uploaded through one
    replica would be a row every replica knows and files only one has: the others would answer
    errors for it. That is refused. Without ``database_url`` each replica keeps its own SQLite
    registry: a fleet serving a fixed set of adapters (``adapters_dir`` baked into the image) works,
    but an admin write reaches one replica only; that is allowed with a warning at start."""
    if settings.replicas < 2:
        return
    if settings.database_url is None:
        log.warning("replicas=%d without database_url: each replica keeps its own SQLite registry, so an "
                    "adapter, experiment or training job created through the admin API exists on ONE replica "
                    "only; set GATEWAY_DATABASE_URL and GATEWAY_SHARED_STORE_URL for one registry (a fleet "
                    "serving only adapters_dir needs neither)", settings.replicas)
        return
    if settings.shared_store_url is None:
        raise FleetConfigError(
            f"replicas={settings.replicas} with database_url needs shared_store_url too: adapter files uploaded to "
            "one replica's disk would be invisible to the others. Set GATEWAY_SHARED_STORE_URL to a folder every "
            "replica mounts (a ReadWriteMany volume) or to s3://bucket/prefix")


def replica_gpus(settings: Settings) -> float:
    if settings.replica_num_gpus is not None:
        return settings.replica_num_gpus
    if settings.device == "cuda":
        return 1.0
    if settings.device == "auto":
        import torch

        return 1.0 if torch.cuda.is_available() else 0.0
    return 0.0


def fleet_settings(settings: Settings) -> Settings:
    """The settings every replica gets: one admin key for all (resolved here, where the data dir
    is, instead of one generated per replica)."""
    return settings.model_copy(update={"admin_key": resolve_admin_key(settings.admin_key, settings.data_dir)})


def materialize_model_once(settings: Settings) -> Settings:
    """On one machine, write the embedded model's safetensors copy once into the fleet's data dir
    and point every replica at it (instead of one 260 MB copy per replica data dir)."""
    if settings.model != EMBEDDED_MODEL:
        return settings
    from gateway.base_model import EMBEDDED_NAME, materialize_embedded

    folder = materialize_embedded(settings.data_dir)
    return settings.model_copy(update={"model": str(folder), "served_model_name": settings.served_model_name
                                       or EMBEDDED_NAME})


def build_fleet(settings: Settings):
    """The Serve application: the ingress bound to ``settings.replicas`` gateway replicas."""
    from ray import serve

    from gateway.fleet.ingress import GatewayIngress
    from gateway.fleet.replica import GatewayReplica

    check_fleet_state(settings)
    settings = fleet_settings(settings)
    replica = serve.deployment(
        GatewayReplica, name="GatewayReplica", num_replicas=settings.replicas,
        ray_actor_options={"num_cpus": settings.replica_num_cpus, "num_gpus": replica_gpus(settings)},
        max_ongoing_requests=settings.replica_max_ongoing_requests,
        # a start loads the base model: give it time before Serve calls the replica unhealthy
        health_check_timeout_s=60, graceful_shutdown_timeout_s=max(5.0, settings.shutdown_grace_seconds))
    ingress = serve.deployment(
        GatewayIngress, name="GatewayIngress", num_replicas=1, ray_actor_options={"num_cpus": INGRESS_CPUS},
        max_ongoing_requests=max(1000, settings.replicas * settings.replica_max_ongoing_requests))
    return ingress.bind(replica.bind(settings), settings)


def build_app(args: dict[str, Any]):
    """``serve run gateway.fleet.app:build_app [setting=value ...]``: settings from ``GATEWAY_*``
    variables, overridden by the arguments (names as in the settings table)."""
    from gateway.exposure import check_exposure

    settings = Settings(**args)
    problem = check_exposure(settings)  # the proxy listens beyond loopback: refuse an open /v1
    if problem is not None:
        raise ValueError(problem)
    if settings.replicas < 2:
        log.warning("replicas=%d: a Serve application with a single gateway replica", settings.replicas)
    return build_fleet(settings)


def proxy_options(settings: Settings) -> dict[str, Any]:
    """The Serve controller's options, for the HTTP proxies it starts (they inherit its environment).
    Serve's proxy runs uvicorn with proxy headers on, and uvicorn believes ``X-Forwarded-For`` from
    ``FORWARDED_ALLOW_IPS`` (127.0.0.1 and ::1 when unset): set to ``trusted_proxies``, the fleet
    believes the proxies one process believes (none by default; an empty list trusts none)."""
    return {"runtime_env": {"env_vars": {"FORWARDED_ALLOW_IPS": ",".join(settings.trusted_proxies)}}}


def run_fleet(settings: Settings) -> None:
    """Start (or join) Ray, deploy the fleet on ``host:port``, and run until SIGTERM or SIGINT."""
    import ray
    from ray import serve

    settings = materialize_model_once(settings)
    # Ray's workers import the gateway from where this process did (a source checkout too)
    runtime_env = {"env_vars": {"PYTHONPATH": str(Path(__file__).resolve().parents[2])}}
    if settings.ray_address is not None:
        ray.init(address=settings.ray_address, runtime_env=runtime_env)
    else:  # Ray's CPUs are a count to share out: enough for the replicas even on a small machine
        needed = math.ceil(settings.replicas * settings.replica_num_cpus + INGRESS_CPUS)
        ray.init(num_cpus=max(os.cpu_count() or 1, needed), runtime_env=runtime_env)
    serve.start(http_options={"host": settings.host, "port": settings.port}, controller_options=proxy_options(settings))
    serve.run(build_fleet(settings), name=APP_NAME, route_prefix="/")
    log.info("fleet of %d replicas serving on http://%s:%d", settings.replicas, settings.host, settings.port)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    log.info("stopping the fleet")
    serve.delete(APP_NAME)
    if settings.ray_address is None:
        serve.shutdown()
        ray.shutdown()
