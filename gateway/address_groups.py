"""The unit a per-address limit counts (connections per address, wrong keys per address).

An IPv6 host is handed a whole /64 (SLAAC, privacy addresses) and may send from any address in
it: counted one by one, each of its 2^64 addresses would get a fresh allowance. So an IPv6
address counts as its /64 network (``::1`` as itself); an IPv4-mapped IPv6 address (``::ffff:a.b.c.d``, a dual-stack
listener) as its IPv4 address; an IPv4 address as itself; anything else (a Unix socket, no
address at all) as it is written.
"""

from __future__ import annotations

import ipaddress
from functools import lru_cache

IPV6_GROUP_PREFIX = 64


@lru_cache(maxsize=4096)
def address_group(address: str) -> str:
    """``address`` as the unit its limits are counted by, e.g. '2001:db8:1:2::/64'."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])  # a zone index (fe80::1%eth0) is not part of it
    except ValueError:
        return address
    if ip.version == 4 or ip.is_loopback:
        return str(ip)
    if ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    return str(ipaddress.ip_network(f"{ip}/{IPV6_GROUP_PREFIX}", strict=False))
