"""Listening beyond loopback without an inference key is refused unless explicitly allowed."""

from __future__ import annotations

import logging

import pytest

import gateway.app
from gateway.cli import main
from gateway.exposure import check_exposure, is_loopback
from gateway.settings import Settings


@pytest.mark.parametrize("host, loopback", [("127.0.0.1", True), ("127.8.0.1", True), ("::1", True),
                                            ("[::1]", True), ("localhost", True), ("0.0.0.0", False),
                                            ("::", False), ("10.1.2.3", False), ("gateway.example", False)])
def test_is_loopback(host, loopback):
    assert is_loopback(host) is loopback


def test_serve_on_all_interfaces_without_a_key_is_refused_before_loading(monkeypatch):
    monkeypatch.setattr(gateway.app, "create_app", lambda *a: pytest.fail("must refuse before building the app"))
    with pytest.raises(SystemExit) as exit_info:
        main(["serve", "--host", "0.0.0.0"])
    message = str(exit_info.value)
    assert "GATEWAY_API_KEYS" in message and "GATEWAY_ALLOW_UNAUTHENTICATED" in message


def test_a_key_or_loopback_or_the_opt_in_allow_it(caplog):
    assert check_exposure(Settings()) is None  # the default host is loopback
    assert check_exposure(Settings(host="0.0.0.0", api_keys="k1")) is None
    with caplog.at_level(logging.WARNING, logger="gateway.exposure"):
        assert check_exposure(Settings(host="0.0.0.0", allow_unauthenticated=True)) is None
    assert "without any inference key" in caplog.text
    assert check_exposure(Settings(host="0.0.0.0")) is not None
