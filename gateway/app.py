"""Build the FastAPI application from ``Settings``. Nothing is created at import time."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

from fastapi import FastAPI

from adapters.errors import AdapterValidationError
from adapters.kinds.base import AdapterLimits
from adapters.peft_io import read_adapter
from adapters.registry import AdapterRegistry
from adapters.runtime import AdapterRuntime
from gateway.admin_key import resolve_admin_key
from gateway.api import openai, ops
from gateway.base_model import LoadedBase, load_base
from gateway.engine import Engine
from gateway.errors import install_error_handlers
from gateway.generation import GenerationService
from gateway.limits import BodySizeLimit
from gateway.model_runner import ModelRunner
from gateway.settings import Settings

log = logging.getLogger(__name__)
ADAPTER_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"


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
    started: int
    ready: bool = False

    def limits(self) -> AdapterLimits:
        s = self.settings
        return AdapterLimits(max_lora_rank=s.max_lora_rank, max_virtual_tokens=s.max_virtual_tokens,
                             max_adapter_bytes=s.max_adapter_bytes)


def eos_ids(base: LoadedBase) -> set[int]:
    ids: set[int] = set()
    for source in (base.model.generation_config.eos_token_id, base.tokenizer.eos_token_id):
        if isinstance(source, int):
            ids.add(source)
        elif source:
            ids.update(source)
    return ids


def build_gateway(settings: Settings, base: LoadedBase | None = None) -> Gateway:
    base = base or load_base(settings)
    runtime = AdapterRuntime(base.model, settings.max_device_adapters, base.dtype)
    engine = Engine(ModelRunner(base.model, runtime), base.tokenizer, context_window=base.context_window,
                    max_batch_size=settings.max_batch_size, max_prefill_tokens=settings.max_prefill_tokens,
                    max_queued_requests=settings.max_queued_requests, eos_token_ids=eos_ids(base))

    async def install(weights) -> int:
        return await asyncio.wrap_future(engine.call(lambda: runtime.install(weights)))

    async def uninstall(slot: int) -> None:
        await asyncio.wrap_future(engine.call(lambda: runtime.uninstall(slot)))

    registry = AdapterRegistry(install, uninstall, settings.max_device_adapters)
    service = GenerationService(engine, registry, base.tokenizer, base.name, base.context_window, settings)
    admin_key = resolve_admin_key(settings.admin_key, settings.data_dir)
    return Gateway(settings, base, runtime, engine, registry, service, admin_key, started=int(time.time()))


def load_adapters_dir(gateway: Gateway, folder: Path) -> None:
    """Register every sub-folder (its name is the adapter id); a bad one is logged and skipped."""
    for sub in sorted(p for p in folder.iterdir() if p.is_dir()):
        if not re.match(ADAPTER_ID_PATTERN, sub.name) or sub.name == gateway.service.base_name:
            log.error("skipping adapter folder %s: not a valid adapter id", sub.name)
            continue
        try:
            weights = read_adapter(sub, gateway.runtime.base_info, gateway.limits(), gateway.base.dtype)
        except AdapterValidationError as exc:
            log.error("skipping adapter %s: %s", sub.name, exc)
            continue
        gateway.registry.add(sub.name, weights)
        log.info("adapter %s registered (%s)", sub.name, weights.kind.value)


def create_app(settings: Settings, base: LoadedBase | None = None) -> FastAPI:
    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        gateway = await asyncio.to_thread(build_gateway, settings, base)
        if settings.adapters_dir is not None:
            await asyncio.to_thread(load_adapters_dir, gateway, settings.adapters_dir)
        gateway.engine.start()
        gateway.ready = True
        app.state.gateway = gateway
        try:
            yield
        finally:
            gateway.ready = False
            await asyncio.to_thread(gateway.engine.stop)

    app = FastAPI(title="adapter-gateway", lifespan=lifespan)
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_body_bytes, prefix="/v1/")
    install_error_handlers(app)
    app.include_router(ops.router)
    app.include_router(openai.router)
    return app
