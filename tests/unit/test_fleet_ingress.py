"""The fleet ingress's own answers, without Ray running: whatever the ingress itself refuses or
fails at is in OpenAI's error shape (``{"error": {"message", "type", "param", "code"}}``), never
Starlette's plain-text 500 or ``{"detail": ...}``."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from gateway.errors import PayloadTooLargeError

pytest.importorskip("ray")


def ingress_app():
    from gateway.fleet.ingress import build_ingress_app

    app = build_ingress_app()

    @app.get("/boom")
    async def boom() -> None:
        raise RecursionError("maximum recursion depth exceeded")

    @app.post("/too-large")
    async def too_large() -> None:
        raise PayloadTooLargeError.over(10)

    return app


def openai_error(response) -> dict:
    assert response.headers["content-type"].startswith("application/json")
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    return error


def test_an_unexpected_failure_at_the_ingress_is_a_500_in_openais_shape():
    client = TestClient(ingress_app(), raise_server_exceptions=False)
    response = client.get("/boom")
    assert response.status_code == 500
    error = openai_error(response)
    assert error["type"] == "server_error" and error["code"] == "internal_error"
    assert "recursion" not in error["message"]  # nothing of the failure's inside is shown


def test_api_errors_and_http_errors_of_the_ingress_keep_their_status_in_openais_shape():
    client = TestClient(ingress_app(), raise_server_exceptions=False)
    too_large = client.post("/too-large")
    assert too_large.status_code == 413 and openai_error(too_large)["code"] == "payload_too_large"
    not_allowed = client.put("/boom")  # a route's other method: Starlette's 405
    assert not_allowed.status_code == 405 and openai_error(not_allowed)["type"] == "invalid_request_error"
    missing = client.get("/nowhere")
    assert missing.status_code == 404 and openai_error(missing)["type"] == "not_found_error"
