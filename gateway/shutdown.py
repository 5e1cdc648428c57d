"""Graceful shutdown: the first SIGTERM (or Ctrl-C) drains the gateway instead of closing it.

Draining: ``/readyz`` answers 503 at once (the load balancer stops sending traffic), new ``/v1``
requests get 503 ``shutting_down``, and requests in flight run on for up to
``shutdown_grace_seconds``; whatever is still running then ends with an error (an error event
on a stream). Only then does the HTTP server stop: it closes its listener, lets the last
responses go out and runs the app's shutdown. A second signal exits at once.

uvicorn's own handler closes the listening socket at the first signal, so ``/readyz`` could no
longer answer during the drain; ``GatewayServer`` replaces that handler.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import signal
import socket
import threading
from collections.abc import Awaitable, Callable, Iterator
from typing import TYPE_CHECKING, Any

import uvicorn
from fastapi import Request

from gateway.engine import SHUTTING_DOWN
from gateway.errors import ShuttingDownError

if TYPE_CHECKING:
    from gateway.app import Gateway

log = logging.getLogger(__name__)
SHUTDOWN_SIGNALS = (signal.SIGTERM, signal.SIGINT)
POLL_SECONDS = 0.05


def refuse_while_draining(request: Request) -> None:
    """Route dependency: no new work once the gateway drains."""
    gateway = getattr(request.app.state, "gateway", None)
    if gateway is not None and gateway.draining:
        raise ShuttingDownError("the server is shutting down; retry on another instance")


async def drain(gateway: Gateway, grace_seconds: float) -> bool:
    """Stop taking work and wait for the engine to finish what it has, for up to ``grace_seconds``;
    then end the rest with a ``shutting_down`` error. True when everything finished in time."""
    gateway.draining = True
    loop = asyncio.get_running_loop()
    deadline = loop.time() + grace_seconds
    log.info("draining: waiting up to %.1f s for requests in flight", grace_seconds)
    while gateway.engine.busy and loop.time() < deadline:
        await asyncio.sleep(POLL_SECONDS)
    if not gateway.engine.busy:
        log.info("drained: every request in flight finished")
        return True
    log.warning("shutdown grace of %.1f s is over: ending the requests still in flight", grace_seconds)
    await asyncio.wrap_future(gateway.engine.fail_in_flight(
        f"the server is shutting down (grace period of {grace_seconds:g} s is over)", SHUTTING_DOWN))
    return False


class GatewayServer(uvicorn.Server):
    """A uvicorn server whose first shutdown signal drains the gateway before uvicorn stops."""

    def __init__(self, config: uvicorn.Config, gateway: Callable[[], Gateway | None], grace_seconds: float):
        super().__init__(config)
        self._gateway = gateway  # None until the app's startup has built it
        self.grace_seconds = grace_seconds
        self._drain_task: asyncio.Task | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets=sockets)
        # the server process's ~570k startup objects (model, libraries) live as long as it does:
        # out of the collector's full passes, which took ~140 ms each, a stall of the engine thread
        gc.freeze()

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        # replaces uvicorn's handlers; signals can only be handled on the main thread
        self._loop = loop = asyncio.get_running_loop()
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        for sig in SHUTDOWN_SIGNALS:
            loop.add_signal_handler(sig, self.request_shutdown, sig)
        try:
            yield
        finally:
            for sig in SHUTDOWN_SIGNALS:
                loop.remove_signal_handler(sig)

    def request_shutdown(self, sig: int | None = None) -> None:
        """First call: drain, then stop the server. A second call: stop now."""
        name = signal.Signals(sig).name if sig is not None else "shutdown request"
        if self._drain_task is None:
            log.info("%s received: draining before exit (a second one exits at once)", name)
            self._drain_task = asyncio.get_running_loop().create_task(self._drain_then_exit())
        else:
            log.warning("%s received again: exiting without waiting", name)
            self.should_exit = self.force_exit = True

    def request_shutdown_threadsafe(self) -> None:
        """``request_shutdown`` from another thread (a program that runs the server in a thread)."""
        if self._loop is None:
            raise RuntimeError("the server is not running")
        self._loop.call_soon_threadsafe(self.request_shutdown)

    async def _drain_then_exit(self) -> None:
        gateway = self._gateway()
        try:
            if gateway is not None:
                await drain(gateway, self.grace_seconds)
        finally:
            self.should_exit = True


async def close_within(name: str, closing: Awaitable[Any], seconds: float) -> None:
    """Await one step of the app's teardown for at most ``seconds``. A step that fails or hangs is
    logged and left behind, so the steps after it still run and the process can still exit (a
    stuck database call once kept a whole shutdown, and the test run around it, waiting)."""
    try:
        await asyncio.wait_for(closing, seconds)
    except asyncio.TimeoutError:
        log.error("shutdown: %s did not finish within %.0f s; going on without it", name, seconds)
    except Exception:  # noqa: BLE001 - one component's failure must not skip the others' teardown
        log.exception("shutdown: %s failed; going on", name)
