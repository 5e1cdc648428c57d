"""Refuse to serve /v1 to a network without an inference key, unless the operator says so.

Without ``GATEWAY_API_KEYS`` anyone who reaches the port may generate (and spend the machine).
That is the intended default on a loopback address, and a mistake on ``0.0.0.0``: the start is
refused with what to set, unless ``GATEWAY_ALLOW_UNAUTHENTICATED`` says it is meant (behind an
authenticating proxy, say), in which case a warning is logged at every start."""

from __future__ import annotations

import ipaddress
import logging

from gateway.settings import Settings

log = logging.getLogger(__name__)


def is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # another name may resolve to any interface: count it as exposed


def check_exposure(settings: Settings) -> str | None:
    """A message saying why the start must be refused, or None (logs the warning when allowed)."""
    if settings.api_keys or is_loopback(settings.host):
        return None
    if settings.allow_unauthenticated:
        log.warning("SECURITY: listening on %s without any inference key (GATEWAY_ALLOW_UNAUTHENTICATED=true): "
                    "anyone who reaches port %d can generate with every adapter", settings.host, settings.port)
        return None
    return (f"refusing to listen on {settings.host} without an inference key: anyone who reaches the port could "
            "generate. Set GATEWAY_API_KEYS (see the README's Security section), or listen on 127.0.0.1, or set "
            "GATEWAY_ALLOW_UNAUTHENTICATED=true if something in front of the gateway authenticates clients")
