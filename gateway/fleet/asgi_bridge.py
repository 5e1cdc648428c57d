"""Run one HTTP request through an ASGI app in this process and hand its response back piece by
piece: first a ``ResponseStart`` (status and headers), then body chunks as the app sends them.

This is how a replica serves the requests the ingress forwards: the gateway's own FastAPI app,
middleware (keys, limits) and error handlers answer exactly as they do in one process; only the
socket is replaced by plain values that Ray can carry. No Ray import here (unit-testable)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from starlette.types import ASGIApp, Message

log = logging.getLogger(__name__)
# after the caller went away, how long the app may take to notice the disconnect and end
# (a generation stops at its next step) before its task is cancelled
ABANDON_GRACE_SECONDS = 10.0


@dataclass(frozen=True)
class ForwardedRequest:
    """What the ingress read of one client request (the body whole: it is bounded there)."""

    method: str
    path: str
    query_string: bytes = b""
    headers: tuple[tuple[bytes, bytes], ...] = ()
    body: bytes = b""
    client: tuple[str, int] | None = None

    def scope(self) -> dict:
        return {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
                "method": self.method, "scheme": "http", "path": self.path, "raw_path": self.path.encode(),
                "root_path": "", "query_string": self.query_string, "headers": list(self.headers),
                "client": self.client, "server": ("gateway-replica", 80)}


@dataclass(frozen=True)
class ResponseStart:
    status: int
    headers: tuple[tuple[bytes, bytes], ...] = field(default=())


class AppFailedError(RuntimeError):
    """The app ended without a complete response (a bug: the gateway renders its own errors)."""


async def call_app(app: ASGIApp, request: ForwardedRequest,
                   extra_headers: tuple[tuple[bytes, bytes], ...] = ()) -> AsyncIterator[ResponseStart | bytes]:
    """Yield the app's ``ResponseStart`` (with ``extra_headers`` added), then its non-empty body
    chunks as they are sent. Closing the iterator early (the client left) tells the app the
    client disconnected, as a server would."""
    messages: asyncio.Queue[Message | None] = asyncio.Queue()
    gone = asyncio.Event()
    body_given = False

    async def receive() -> Message:
        nonlocal body_given
        if not body_given:
            body_given = True
            return {"type": "http.request", "body": request.body, "more_body": False}
        await gone.wait()  # a second receive waits for the disconnect, as under uvicorn
        return {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        await messages.put(message)

    task = asyncio.get_running_loop().create_task(app(request.scope(), receive, send))
    task.add_done_callback(lambda _: messages.put_nowait(None))
    finished = False
    try:
        while True:
            message = await messages.get()
            if message is None:  # the app returned (or raised) before its last body chunk
                if not task.cancelled() and task.exception() is not None:
                    raise AppFailedError("the gateway app failed") from task.exception()
                raise AppFailedError("the gateway app ended without a complete response")
            if message["type"] == "http.response.start":
                yield ResponseStart(message["status"], tuple(message.get("headers", ())) + extra_headers)
            elif message["type"] == "http.response.body":
                if message.get("body"):
                    yield message["body"]
                if not message.get("more_body", False):
                    finished = True
                    return
    finally:
        gone.set()
        if not finished and not task.done():
            asyncio.get_running_loop().call_later(ABANDON_GRACE_SECONDS, task.cancel)
