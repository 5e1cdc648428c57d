"""Build the FastAPI application from ``Settings``. Nothing is created at import time."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from adapters.blobs import content_hash
from adapters.errors import AdapterError
from adapters.kinds.base import AdapterLimits
from adapters.kinds.lora_kernel import choose_lora_kernel, warm_up
from adapters.peft_io import read_adapter
from adapters.registry import AdapterRegistry
from adapters.runtime import AdapterRuntime
from adapters.shared_store import SharedStore
from adapters.store import check_database
from gateway.admin_key import resolve_admin_key
from gateway.api import admin_adapters, admin_experiments, feedback, openai, ops, tokenize
from gateway.api import admin_training, files as files_api, fine_tuning as fine_tuning_api
from gateway.base_model import LoadedBase, load_base
from gateway.engine import Engine
from gateway.engines import build_engine
from gateway.kv_metrics import KVCacheCollector
from gateway.omp_threads import in_own_thread, single_omp_executor
from gateway.paged_engine import PagedEngine
from gateway.errors import install_error_handlers
from gateway.experiments.service import ExperimentService, attach_experiments
from gateway.files.service import FileService
from gateway.fine_tuning.service import FineTuning
from gateway.fine_tuning.wiring import FILES_DIR, attach_fine_tuning
from gateway.generation import GenerationService, RequestRecord
from gateway.auth import AccessGuard, key_guess_throttle
from gateway.console.routes import ConsoleState, attach_console, install_console
from gateway.connections import ConnectionBook, ConnectionCollector
from gateway.console.security import ConsoleHeaders
from gateway.database import DATABASE_FILE, Stores, check_shared_database, open_stores, shared_database
from gateway.database.changes import ChangeFeed, ChangeFeedCollector
from gateway.keys import KeyRing
from gateway.rate_limits import KeyLimits
from gateway.metrics import GatewayMetrics
from gateway.settings import Settings
from gateway.shutdown import HandlersInFlight, close_within
from gateway.shared_storage import adapter_blobs, open_shared_store
from gateway.structured import Grammars
from gateway.throttle import FailureThrottle
from gateway.training.jobs import TrainingJobs
from gateway.training.wiring import attach_training
from gateway.uploads import clear_staging

log = logging.getLogger(__name__)


@dataclass
class Gateway:
    """Everything one running gateway owns."""

    settings: Settings
    base: LoadedBase
    runtime: AdapterRuntime
    engine: Engine
    registry: AdapterRegistry
    service: GenerationService
    admin_key: str
    metrics: GatewayMetrics
    started: int
    ready: bool = False
    draining: bool = False  # shutting down: /readyz and new /v1 requests answer 503 (gateway/shutdown.py)
    handlers_in_flight: int = 0  # requests whose handler runs; a drain waits for them (gateway/shutdown.py)
    experiments: ExperimentService | None = None
    training: TrainingJobs | None = None
    files: FileService | None = None  # /v1/files
    fine_tuning: FineTuning | None = None  # /v1/fine_tuning/jobs, over ``training``
    keys: KeyRing = field(default_factory=lambda: KeyRing([]))  # inference keys and their limits
    console: ConsoleState | None = None  # the operator console's sessions (gateway/console)
    shared_store: SharedStore | None = None  # files all replicas share (settings.shared_store_url)
    changes: ChangeFeed | None = None  # PostgreSQL: follows other replicas' changes (gateway/database)
    key_guesses: FailureThrottle | None = None  # wrong bearer keys per client address (None: no limit)


def eos_ids(base: LoadedBase) -> set[int]:
    ids: set[int] = set()
    for source in (base.model.generation_config.eos_token_id, base.tokenizer.eos_token_id):
        if isinstance(source, int):
            ids.add(source)
        elif source:
            ids.update(source)
    return ids


def check_data_dir(settings: Settings) -> None:
    """Raise ``DatabaseUnusableError`` when the database is damaged, or lost while the files it
    described remain (the registry would forget them): the operator decides, never the gateway.
    With PostgreSQL: raise ``DatabaseUnavailableError`` when it cannot be reached, and
    ``SchemaTooNewError`` when a newer release migrated it (its schema is migrated here otherwise)."""
    if settings.database_url is not None:
        check_shared_database(settings)
        return
    data = settings.data_dir
    check_database(data / DATABASE_FILE, (data / "adapter-store", data / "training", data / FILES_DIR))


def build_gateway(settings: Settings, base: LoadedBase | None = None) -> Gateway:
    if settings.database_url is None:  # PostgreSQL: open_stores reaches and migrates it, with the same errors
        check_data_dir(settings)  # before the model loads: fail fast
    stores = open_stores(settings)
    base = base or load_base(settings)
    kernel = choose_lora_kernel(settings.lora_kernel, base.device, base.dtype, base.model.config.hidden_size)
    log.info("LoRA deltas: %s path (%s)%s", kernel.kernel, kernel.reason,
             f"; probe ms {kernel.timings_ms}" if kernel.timings_ms else "")
    if kernel.kernel == "triton":
        started = time.monotonic()
        variants = warm_up(base.device, base.dtype, base.model.config.hidden_size, settings.max_lora_rank)
        log.info("LoRA kernels: %d variants compiled in %.1f s", variants, time.monotonic() - started)
    runtime = AdapterRuntime(base.model, settings.max_device_adapters, base.dtype, lora_kernel=kernel.kernel)
    engine = build_engine(settings, runtime, base.tokenizer, context_window=base.context_window,
                          eos_token_ids=eos_ids(base))

    async def install(weights) -> int:
        return await asyncio.wrap_future(engine.call(lambda: runtime.install(weights)))

    async def uninstall(slot: int) -> None:
        await asyncio.wrap_future(engine.call(lambda: runtime.uninstall(slot)))

    limits = AdapterLimits(max_lora_rank=settings.max_lora_rank, max_virtual_tokens=settings.max_virtual_tokens,
                           max_adapter_bytes=settings.max_adapter_bytes)
    metrics = GatewayMetrics()
    metrics.queue_depth.set_function(lambda: engine.queue_depth)
    metrics.lora_kernel.labels(kernel.kernel).set(1)
    metrics.running_sequences.set_function(lambda: engine.running)
    metrics.quarantined_blobs.set_function(lambda: registry.quarantined_blobs)
    if isinstance(engine, PagedEngine):
        metrics.registry.register(KVCacheCollector(engine))
    shared = open_shared_store(settings)  # None: every file stays in the data dir
    registry = AdapterRegistry(
        store=stores.adapters, blobs=adapter_blobs(settings.data_dir / "adapter-store", shared),
        read=lambda folder: read_adapter(folder, runtime.base_info, limits, base.dtype),
        install=install, uninstall=uninstall, device_slots=settings.max_device_adapters,
        cpu_capacity=settings.max_cpu_adapters, slot_wait_seconds=settings.slot_wait_seconds, events=metrics)
    service = GenerationService(engine, registry, base.tokenizer, base.name, base.context_window, settings)
    service.grammars = Grammars(base.tokenizer, base.model.get_output_embeddings().weight.shape[0], eos_ids(base),
                                max_schema_bytes=settings.max_schema_bytes,
                                compile_timeout=settings.grammar_compile_timeout_seconds)
    registry.add_name_guard(lambda name: f"{name!r} is the base model's name" if name == service.base_name else None)
    registry.on_removed.append(metrics.forget_adapter)
    service.observers.append(lambda record: count_request(record, registry, metrics, service.base_name))
    admin_key = resolve_admin_key(settings.admin_key, settings.data_dir)
    keys = KeyRing(settings.api_keys, KeyLimits(settings.key_max_concurrent, settings.key_rpm, settings.key_tpm))
    service.observers.append(lambda record: count_key_usage(record, keys, metrics))
    gateway = Gateway(settings, base, runtime, engine, registry, service, admin_key, metrics, started=int(time.time()),
                      keys=keys, shared_store=shared)
    gateway.experiments = attach_experiments(stores.experiments, settings, service, registry, metrics.registry)
    gateway.training = attach_training(gateway, stores.training, shared=stores.shared)
    gateway.files, gateway.fine_tuning = attach_fine_tuning(gateway, stores.files)
    gateway.console = attach_console(settings, shared_database(settings))
    gateway.key_guesses = key_guess_throttle(settings.max_failed_key_attempts)
    gateway.changes = follow_changes(gateway, stores)
    return gateway


def follow_changes(gateway: Gateway, stores: Stores) -> ChangeFeed | None:
    """On a shared database, what other replicas change reaches this one's memory (gateway/database)."""
    if stores.postgres is None:
        return None
    feed = ChangeFeed(stores.postgres, gateway.settings.database_resync_seconds)
    feed.subscribe("adapters", gateway.registry.sync)
    feed.subscribe("experiments", gateway.experiments.sync)
    feed.subscribe("training", gateway.training.sync)
    feed.subscribe("files", gateway.files.sync)
    gateway.metrics.registry.register(ChangeFeedCollector(feed))
    return feed


def count_request(record: RequestRecord, registry: AdapterRegistry, metrics: GatewayMetrics, base_name: str) -> None:
    """Per-adapter request metrics and the registry's usage counters, from one finished request."""
    stats = registry.stats(record.adapter_id) if record.adapter_id is not None else None
    if stats is not None:
        stats.prompt_tokens += record.prompt_tokens
        stats.completion_tokens += record.completion_tokens
    metrics.request_finished(record.adapter_id or base_name, ttft=record.ttft_s, latency=record.latency_s or 0.0,
                             prompt_tokens=record.prompt_tokens, completion_tokens=record.completion_tokens,
                             error_type=record.error_type)


def count_key_usage(record: RequestRecord, keys: KeyRing, metrics: GatewayMetrics) -> None:
    """Give back the unused part of the request's token reservation; count its tokens by key name."""
    keys.settle(record.completion_id, record.prompt_tokens + record.completion_tokens)
    key = keys.by_id(record.api_key_id)
    if key is not None:
        metrics.key_used(key.name, record.prompt_tokens, record.completion_tokens)


async def load_adapters_dir(gateway: Gateway, folder: Path) -> None:
    """Register every sub-folder (its name is the adapter id) unless the same content already is;
    changed content replaces the registered version. A bad one is logged and skipped."""
    for sub in sorted(p for p in folder.iterdir() if p.is_dir()):
        try:
            if sub.name in gateway.registry:
                current = gateway.registry.get(sub.name)
                # same content and its stored files are whole: nothing to do (a missing one is re-stored)
                if not current.missing and await asyncio.to_thread(content_hash, sub) == current.record.content_hash:
                    continue
            entry = await gateway.registry.register(sub.name, sub, replace=True)
        except (AdapterError, OSError) as exc:
            log.error("skipping adapter folder %s: %s", sub.name, exc)
            continue
        log.info("adapter %s from %s (%s)", entry.id, sub, entry.record.kind)


def create_app(settings: Settings, base: LoadedBase | None = None,
               connections: ConnectionBook | None = None) -> FastAPI:
    """``connections``: the HTTP server's connection counts (``gateway.connections``), for /metrics."""
    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # blocking work off the loop never starts an OpenMP team; the model loads in a thread of its own
        asyncio.get_running_loop().set_default_executor(single_omp_executor())
        gateway = await in_own_thread(build_gateway, settings, base)
        if connections is not None:
            gateway.metrics.registry.register(ConnectionCollector(connections))
        gateway.engine.start()  # installs run on the engine thread
        await asyncio.to_thread(clear_staging, settings.data_dir / "staging")
        await gateway.registry.start()
        await gateway.files.start()
        await gateway.training.start()  # after the registry: a resumed job may register its result
        if gateway.changes is not None:
            await gateway.changes.start()
        if settings.adapters_dir is not None:
            await load_adapters_dir(gateway, settings.adapters_dir)
        gateway.ready = True
        app.state.gateway = gateway
        try:
            yield
        finally:
            gateway.ready = False
            # each step bounded: a hung one is logged and skipped, the rest still close
            if gateway.changes is not None:
                await close_within("the change feed", gateway.changes.close(), 15)
            await close_within("the engine", asyncio.to_thread(gateway.engine.stop), 15)
            # a running job resumes from its checkpoint at the next start
            await close_within("training", gateway.training.close(), 30)
            await close_within("files", gateway.files.close(), 15)
            await close_within("the registry", gateway.registry.close(), 30)
            await close_within("experiments", asyncio.to_thread(gateway.experiments.close), 30)
            if gateway.console is not None:
                await close_within("console sessions", asyncio.to_thread(gateway.console.sessions.close), 15)
            if gateway.service.grammars is not None:
                gateway.service.grammars.close()

    # no /docs or /redoc: FastAPI's pages load unpinned scripts from a CDN, on the console's origin
    # (where a signed-in operator's cookie is good); /openapi.json serves the same description
    app = FastAPI(title="adapter-gateway", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.add_middleware(HandlersInFlight)  # inside the guard: refused requests are not waited for
    app.add_middleware(AccessGuard)  # keys and limits before any body byte is read
    app.add_middleware(ConsoleHeaders)  # outermost: the guard's refusals under /console get the CSP too
    install_error_handlers(app)
    app.include_router(ops.router)
    app.include_router(openai.router)
    app.include_router(tokenize.router)
    app.include_router(admin_adapters.router)
    app.include_router(admin_experiments.router)
    app.include_router(feedback.router)
    app.include_router(admin_training.router)
    app.include_router(files_api.router)
    app.include_router(fine_tuning_api.router)
    install_console(app)  # /console: the operator's web UI

    @app.get("/metrics", include_in_schema=False)
    async def metrics(request: Request) -> Response:
        return Response(generate_latest(request.app.state.gateway.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app
