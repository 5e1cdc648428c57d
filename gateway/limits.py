"""Request body size limits, enforced while the body streams in: a declared Content-Length over
the limit is refused before any byte is read, and the bytes actually received are counted (a
chunked body declares nothing). Used by the access guard (``gateway/auth.py``) after the key
check, so nobody without a key ever gets a body read."""

from __future__ import annotations

import asyncio

from starlette.types import Message, Receive, Scope

from gateway.errors import BodyTimeoutError, PayloadTooLargeError

# (method, path) of the routes that take uploads (multipart): they get ``max_upload_bytes``; every
# other /admin route gets ``max_admin_json_bytes``. A test checks each exists in the app.
UPLOAD_ROUTES = frozenset({("POST", "/admin/adapters"), ("POST", "/admin/training-jobs"), ("POST", "/v1/files")})


def is_upload(scope: Scope) -> bool:
    content_type = dict(scope["headers"]).get(b"content-type", b"")
    return (scope["method"], scope["path"]) in UPLOAD_ROUTES and content_type.startswith(b"multipart/form-data")


def declared_too_large(scope: Scope, max_bytes: int) -> PayloadTooLargeError | None:
    """The refusal for a Content-Length above ``max_bytes`` (None: none declared, or within)."""
    declared = dict(scope["headers"]).get(b"content-length")
    if declared is None or not declared.isdigit():
        return None
    # zero-padded past 4,300 digits (httptools takes it), int() refuses the text: a 500 it was
    digits = declared.lstrip(b"0")
    if len(digits) > len(str(max_bytes)) or (digits and int(digits) > max_bytes):
        return PayloadTooLargeError.over(max_bytes)
    return None


def limited_receive(receive: Receive, max_bytes: int) -> Receive:
    """``receive`` that raises ``PayloadTooLargeError`` once more than ``max_bytes`` came in (the
    error handlers answer 413; FastAPI passes HTTP exceptions raised while reading a body through)."""
    seen = 0

    async def receive_limited() -> Message:
        nonlocal seen
        message = await receive()
        if message["type"] == "http.request":
            seen += len(message.get("body", b""))
            if seen > max_bytes:
                raise PayloadTooLargeError.over(max_bytes)
        return message

    return receive_limited


def timed_receive(receive: Receive, seconds: float) -> Receive:
    """``receive`` that raises ``BodyTimeoutError`` (408) when the body is not all in within
    ``seconds`` of its first read. For open routes, whose small bodies come from clients no key
    vouches for: a sign-in form sent a byte every few minutes held its connection (and its share of
    the per-address and global connection limits) for good. Once the body is in, later reads (the
    wait for a disconnect) are not timed."""
    deadline: float | None = None
    complete = False

    async def receive_timed() -> Message:
        nonlocal deadline, complete
        if complete:
            return await receive()
        loop = asyncio.get_running_loop()
        if deadline is None:
            deadline = loop.time() + seconds
        try:
            message = await asyncio.wait_for(receive(), max(0.0, deadline - loop.time()))
        except TimeoutError:
            raise BodyTimeoutError(f"the request body took longer than {seconds:g} s to arrive") from None
        if message["type"] != "http.request" or not message.get("more_body", False):
            complete = True
        return message

    return receive_timed
