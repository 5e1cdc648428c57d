"""Graceful shutdown: the first SIGTERM (or Ctrl-C) drains the gateway instead of closing it.

Draining: ``/readyz`` answers 503 at once (the load balancer stops sending traffic), new ``/v1``
requests get 503 ``shutting_down``, and requests in flight run on for up to
``shutdown_grace_seconds``: generations, and every other handler too (an adapter upload, a file
upload, a registration). Whatever generation is still running then ends with an error (an error
event on a stream). Only then does the HTTP server stop: it closes its listener, lets the last
responses go out (a handler still running gets uvicorn's last 5 s) and runs the app's shutdown.
A second signal exits at once.

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

from starlette.types import ASGIApp, Message, Receive, Scope, Send

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


class HandlersInFlight:
    """ASGI middleware counting the requests whose handler still works (``Gateway.handlers_in_flight``),
    so that a drain waits for an admin upload as it waits for a generation. A request stops counting
    once it has started an event-stream response: what it still sends is engine work (a generation,
    which the drain waits for through the engine) or a watch (a training job's events), which no
    drain should wait for."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        gateway = getattr(scope["app"].state, "gateway", None) if scope["type"] == "http" else None
        if gateway is None:
            await self.app(scope, receive, send)
            return
        counted = True
        gateway.handlers_in_flight += 1

        async def watched_send(message: Message) -> None:
            nonlocal counted
            if counted and message["type"] == "http.response.start" and _is_event_stream(message):
                counted = False
                gateway.handlers_in_flight -= 1
            await send(message)

        try:
            await self.app(scope, receive, watched_send)
        finally:
            if counted:
                gateway.handlers_in_flight -= 1


def _is_event_stream(start: Message) -> bool:
    return any(k.lower() == b"content-type" and v.startswith(b"text/event-stream") for k, v in start["headers"])


async def drain(gateway: Gateway, grace_seconds: float) -> bool:
    """Stop taking work and wait for the engine and every request handler to finish what they
    have, for up to ``grace_seconds``; then end the generations left with a ``shutting_down``
    error. True when everything finished in time."""
    gateway.draining = True
    loop = asyncio.get_running_loop()
    deadline = loop.time() + grace_seconds
    log.info("draining: waiting up to %.1f s for requests in flight", grace_seconds)

    def working() -> bool:
        return gateway.engine.busy or gateway.handlers_in_flight > 0

    while working() and loop.time() < deadline:
        await asyncio.sleep(POLL_SECONDS)
    if not working():
        log.info("drained: every request in flight finished")
        return True
    log.warning("shutdown grace of %.1f s is over: ending the requests still in flight (%d handler(s) running)",
                grace_seconds, gateway.handlers_in_flight)
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
