"""Per-address limits count an IPv6 client by its /64: a host that picks a fresh address from its
/64 for every connection or key guess got a fresh allowance each time."""

from __future__ import annotations

import pytest

from gateway.address_groups import address_group
from gateway.throttle import FailureThrottle


@pytest.mark.parametrize("address, group", [
    ("2001:db8:1:2:aaaa:bbbb:cccc:1", "2001:db8:1:2::/64"),
    ("2001:DB8:1:2::ffff", "2001:db8:1:2::/64"),
    ("fe80::1%eth0", "fe80::/64"),
    ("::ffff:192.0.2.5", "192.0.2.5"),  # IPv4 through a dual-stack listener
    ("192.0.2.5", "192.0.2.5"),
    ("::1", "::1"),
    ("testclient", "testclient"),  # not an address: as it is
    ("local", "local"),
])
def test_an_address_counts_as_its_group(address, group):
    assert address_group(address) == group


def test_wrong_keys_from_one_ipv6_slash_64_count_together():
    throttle = FailureThrottle(3)
    for host in range(3):
        throttle.failed(f"2001:db8:0:1::{host + 1:x}")
    assert throttle.retry_after("2001:db8:0:1:ffff::9") is not None  # any address of that /64
    assert throttle.retry_after("2001:db8:0:2::1") is None  # the next /64 is another client
    throttle.succeeded("2001:db8:0:1::77")
    assert throttle.failures("2001:db8:0:1::1") == 0
