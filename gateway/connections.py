"""What a connection may cost before its request is known.

The key check (``gateway.auth``) runs once a request's headers are parsed, so everything before
that is open to anyone who can reach the port. uvicorn bounds none of it: a connection that never
finishes its headers is kept forever (its keep-alive timer starts only after a response), and its
httptools parser gathers the URL and headers without limit (300 MB of one header line grew the
server by 370 MB). ``guarded_protocol`` is uvicorn's httptools protocol with four limits:

- ``max_header_bytes``: request line plus headers of one request, 431 beyond (counted as bytes
  arrive while headers are unfinished, a request pipelined behind a running one's included);
- ``header_timeout_seconds``: from the connection's start, or from the end of its last response,
  to the end of the next request's headers; a connection past it is closed (408 if it had begun a
  request);
- ``max_connections`` open at once and ``max_connections_per_address`` from one client address (an
  IPv6 address's /64 network: ``gateway.address_groups``): a connection beyond either is answered
  503 and closed before anything of it is read.
"""

from __future__ import annotations

import asyncio
import json
import logging
import resource
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from gateway.address_groups import address_group
from gateway.errors import error_body
from gateway.settings import Settings

log = logging.getLogger(__name__)
# descriptors kept free for everything else the server opens (database, adapter files, pipes)
RESERVED_FILE_DESCRIPTORS = 512
WARN_EVERY_SECONDS = 60.0
# no route takes a long path or query: a longer target is refused (414) and never reaches the access log
MAX_REQUEST_TARGET_BYTES = 8192
LOGGED_TARGET_CHARS = 256  # the most of a request target one access-log line shows
REFUSAL_REASONS = ("max_connections", "per_address", "header_timeout", "header_too_large")


@dataclass(frozen=True)
class ConnectionLimits:
    max_connections: int
    max_connections_per_address: int
    header_timeout_seconds: float
    max_header_bytes: int


def connection_limits(settings: Settings) -> ConnectionLimits:
    return ConnectionLimits(settings.max_connections, settings.max_connections_per_address,
                            settings.header_timeout_seconds, settings.max_header_bytes)


class ConnectionBook:
    """Open connections per client address, and refusals by reason (for /metrics and the log)."""

    def __init__(self, limits: ConnectionLimits):
        self.limits = limits
        self.open = 0
        self.per_address: Counter[str] = Counter()
        self.refusals: Counter[str] = Counter({reason: 0 for reason in REFUSAL_REASONS})
        self._last_warning: dict[str, float] = {}

    def admit(self, address: str) -> str | None:
        """Count a new connection in; the reason it is refused, if it is (then it is not counted)."""
        if self.open >= self.limits.max_connections:
            return self.refuse("max_connections", f"{self.open} connections are open, the most allowed")
        if self.per_address[address] >= self.limits.max_connections_per_address:
            return self.refuse("per_address", f"{address} holds {self.per_address[address]} connections, "
                                              "the most one address may")
        self.open += 1
        self.per_address[address] += 1
        return None

    def release(self, address: str) -> None:
        self.open -= 1
        self.per_address[address] -= 1
        if self.per_address[address] <= 0:
            del self.per_address[address]  # the table holds only addresses with open connections

    def refuse(self, reason: str, detail: str) -> str:
        self.refusals[reason] += 1
        now = time.monotonic()
        if now - self._last_warning.get(reason, -WARN_EVERY_SECONDS) >= WARN_EVERY_SECONDS:
            self._last_warning[reason] = now  # a flood logs one line a minute per reason, not one per connection
            log.warning("refusing connections (%s): %s; %d refused so far", reason, detail, self.refusals[reason])
        return reason


class ConnectionCollector(Collector):
    def __init__(self, book: ConnectionBook):
        self.book = book

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        yield GaugeMetricFamily("gateway_connections_open", "HTTP connections open.", value=self.book.open)
        refused = CounterMetricFamily("gateway_connections_refused", "HTTP connections closed before their "
                                      "request was served, by reason.", labels=["reason"])
        for reason, count in sorted(self.book.refusals.items()):
            refused.add_metric([reason], count)
        yield refused


class _HeadersTooLarge(Exception):
    pass


def _response(status: int, reason: str, message: str, code: str) -> bytes:
    """A whole HTTP response in OpenAI's error shape, written before (or instead of) the ASGI app."""
    type_ = "server_error" if status >= 500 else "invalid_request_error"
    body = json.dumps(error_body(message, type_, code=code)).encode()
    retry = "retry-after: 1\r\n" if status == 503 else ""
    head = (f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\n{retry}"
            f"content-length: {len(body)}\r\nconnection: close\r\n\r\n")
    return head.encode("ascii") + body


def guarded_protocol(book: ConnectionBook) -> type[HttpToolsProtocol]:
    """uvicorn's httptools protocol under ``book``'s limits (one class per server: ``book`` is its state)."""
    limits = book.limits

    class GuardedHttpToolsProtocol(HttpToolsProtocol):
        _address: str | None = None  # set once admitted: counted in the book until the connection ends
        _awaiting_headers = True  # between a request's first byte (or the last one's end) and its headers' end
        _header_bytes = 0  # received while awaiting headers: at most max_header_bytes plus two reads
        _message_ended_in_read = False
        _headers_too_large = False
        _header_timer: asyncio.TimerHandle | None = None
        _began_request = False  # bytes arrived since the timer was armed

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            address = address_group(self.client[0]) if self.client else "local"  # an IPv6 /64 counts as one
            refusal = book.admit(address)
            if refusal is not None:
                transport.write(_response(503, "Service Unavailable", "the server has too many open connections"
                                          if refusal == "max_connections" else
                                          "too many open connections from this address", "too_many_connections"))
                transport.close()
                return
            self._address = address
            self._arm_header_timer()

        def connection_lost(self, exc: Exception | None) -> None:
            self._cancel_header_timer()
            if self._address is not None:
                book.release(self._address)
                self._address = None
            super().connection_lost(exc)

        def data_received(self, data: bytes) -> None:
            if self._address is None or self._headers_too_large:
                return  # refused: nothing more of it is read
            self._began_request = True
            self._message_ended_in_read = False
            super().data_received(data)
            # httptools keeps an unfinished header line whole: count what it holds. A read that ended
            # the last message is left out (it is mostly that message's body): one read at most uncounted
            if self._awaiting_headers and not self._message_ended_in_read:
                self._header_bytes += len(data)
                if self._header_bytes > limits.max_header_bytes:
                    self._refuse_large_headers()

        def on_message_complete(self) -> None:
            super().on_message_complete()
            self._awaiting_headers, self._header_bytes = True, 0  # the next request starts here
            self._message_ended_in_read = True

        def _refuse_large_headers(self) -> None:
            self._refuse_request(f"{self._address} sent more than {limits.max_header_bytes} bytes of request line "
                                 "and headers", _response(431, "Request Header Fields Too Large", "the request line "
                                 f"and headers exceed {limits.max_header_bytes} bytes", "headers_too_large"))

        def _refuse_request(self, detail: str, response: bytes) -> None:
            """Answer and close; nothing more of the connection is read or answered."""
            self._headers_too_large = True
            book.refuse("header_too_large", detail)
            self.transport.write(response)
            self.transport.close()

        # ---- the header timeout ----
        def on_headers_complete(self) -> None:
            self._cancel_header_timer()
            self._awaiting_headers = False
            # a header block that arrived whole within one read is measured here, exactly
            if len(self.url) + sum(len(n) + len(v) + 4 for n, v in self.headers) > limits.max_header_bytes:
                self._refuse_large_headers()
                raise _HeadersTooLarge  # httptools stops parsing; the app never sees the request
            if len(self.url) > MAX_REQUEST_TARGET_BYTES:
                self._refuse_request(f"{self._address} sent a request target of {len(self.url)} bytes", _response(
                    414, "URI Too Long", f"the request target exceeds {MAX_REQUEST_TARGET_BYTES} bytes", "uri_too_long"))
                raise _HeadersTooLarge
            super().on_headers_complete()

        def send_400_response(self, msg: str) -> None:
            if not self._headers_too_large:  # else answered already, and closed
                # in OpenAI's shape, as every other refusal here (uvicorn's own 400 is text/plain)
                self.transport.write(_response(400, "Bad Request", "the request is not valid HTTP/1.1 (its request "
                                               "line, headers or body framing)", "invalid_http_request"))
                self.transport.close()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing():
                self._arm_header_timer()  # the next request's headers get the same time

        def _arm_header_timer(self) -> None:
            self._cancel_header_timer()
            self._began_request = False
            self._header_timer = self.loop.call_later(limits.header_timeout_seconds, self._header_timeout)

        def _cancel_header_timer(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _header_timeout(self) -> None:
            self._header_timer = None
            if self.transport.is_closing() or (self.cycle is not None and not self.cycle.response_complete):
                return  # a request is being served: the timer is armed again when its response ends
            if self._began_request:
                book.refuse("header_timeout", f"{self._address} took over {limits.header_timeout_seconds:g} s "
                                              "to send a request's headers")
                self.transport.write(_response(408, "Request Timeout", "the request's headers took longer than "
                                               f"{limits.header_timeout_seconds:g} s", "header_timeout"))
            self.transport.close()  # an idle connection just ends, as after uvicorn's keep-alive timeout

    return GuardedHttpToolsProtocol


class ShortRequestTargets(logging.Filter):
    """Cuts the request target in uvicorn's access-log lines (arguments: client, method, target,
    HTTP version, status) to LOGGED_TARGET_CHARS: a client without a key otherwise chose how many
    bytes of log each of its requests wrote (64 KB per 401)."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if isinstance(args, tuple) and len(args) == 5 and isinstance(args[2], str) \
                and len(args[2]) > LOGGED_TARGET_CHARS:
            target = args[2]
            record.args = (*args[:2], f"{target[:LOGGED_TARGET_CHARS]}...({len(target)} chars)", *args[3:])
        return True


def ensure_file_descriptors(max_connections: int) -> None:
    """Raise the soft open-files limit so ``max_connections`` sockets leave room for everything else;
    warn when even the hard limit cannot (the process would then fail to open files under a flood)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = max_connections + RESERVED_FILE_DESCRIPTORS
    if soft == resource.RLIM_INFINITY or soft >= wanted:
        return
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if target > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    if target < wanted:
        log.warning("the open-files limit (%d) is below max_connections (%d) + %d: lower max_connections or "
                    "raise the limit (ulimit -n)", target, max_connections, RESERVED_FILE_DESCRIPTORS)
