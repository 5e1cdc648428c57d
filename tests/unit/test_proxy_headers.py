"""X-Forwarded-For is believed from the configured proxies only (uvicorn alone believes 127.0.0.1)."""

import asyncio

import pytest
from pydantic import ValidationError

from gateway.cli import server_config
from gateway.connections import ConnectionBook, connection_limits
from gateway.settings import Settings


def client_seen(trusted: list[str], peer: str, forwarded_for: str) -> str:
    """The client address the app sees behind uvicorn's configured middleware."""
    seen = {}

    async def app(scope, receive, send):
        seen["client"] = scope["client"][0]

    settings = Settings(trusted_proxies=trusted)
    config = server_config(app, settings, ConnectionBook(connection_limits(settings)))
    config.load()
    scope = {"type": "http", "scheme": "http", "client": (peer, 40000), "server": ("127.0.0.1", 8000),
             "headers": [(b"x-forwarded-for", forwarded_for.encode())], "path": "/", "method": "GET"}
    asyncio.run(config.loaded_app(scope, None, None))
    return seen["client"]


def test_by_default_no_forwarded_header_is_believed_not_even_from_localhost():
    assert client_seen([], "127.0.0.1", "203.0.113.9") == "127.0.0.1"


def test_a_configured_proxy_network_is_believed_and_no_other_peer():
    assert client_seen(["10.0.0.0/8"], "10.1.2.3", "203.0.113.9") == "203.0.113.9"
    assert client_seen(["10.0.0.0/8"], "127.0.0.1", "203.0.113.9") == "127.0.0.1"


def test_trusted_proxies_come_comma_separated_from_the_environment(monkeypatch):
    monkeypatch.setenv("GATEWAY_TRUSTED_PROXIES", "10.0.0.0/8, 192.168.1.5")
    assert Settings().trusted_proxies == ["10.0.0.0/8", "192.168.1.5"]
    monkeypatch.setenv("GATEWAY_TRUSTED_PROXIES", "10.0.0.0/8, proxy.internal")
    with pytest.raises(ValidationError, match="not an IP address or network"):
        Settings()
