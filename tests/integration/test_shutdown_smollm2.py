"""SIGTERM on the real server process: /readyz turns 503 while requests are still in flight, new
requests get 503 ``shutting_down``, a stream that can finish within the grace period finishes,
one that cannot ends with an error event, and the process exits by itself with status 0.

The model has random weights at SmolLM2's shapes (``--dummy-weights``): it never says EOS, so
every stream runs exactly as long as ``max_tokens`` asks, at the real model's speed."""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Iterator

import httpx
import pytest

pytestmark = pytest.mark.slow

GRACE_SECONDS = 15
SHORT, LONG = 24, 4000  # tokens: well within the grace period, far beyond it


@pytest.fixture(scope="module")
def server(smollm2_dir, tmp_path_factory, launch_server):
    data_dir = tmp_path_factory.mktemp("shutdown-data")
    return launch_server(["--model", str(smollm2_dir), "--dummy-weights", "true", "--data-dir", str(data_dir),
                          "--device", "cpu", "--served-model-name", "dummy",
                          "--shutdown-grace-seconds", str(GRACE_SECONDS)])


def data_lines(lines: Iterator[str]) -> Iterator[str]:
    return (line[len("data: "):] for line in lines if line.startswith("data: "))


def body(max_tokens: int) -> dict:
    return {"model": "dummy", "prompt": "Once upon a time", "max_tokens": max_tokens, "temperature": 0,
            "stream": True}


def test_sigterm_drains_in_flight_streams_then_exits(server):
    with httpx.Client(base_url=server.url, timeout=120) as client:
        with client.stream("POST", "/v1/completions", json=body(LONG)) as long, \
                client.stream("POST", "/v1/completions", json=body(SHORT)) as short:
            long_data, short_data = data_lines(long.iter_lines()), data_lines(short.iter_lines())
            received = {"long": [next(long_data)], "short": [next(short_data)]}  # both are generating

            server.process.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + 10
            while (ready := client.get("/readyz")).status_code == 200:
                assert time.monotonic() < deadline, "/readyz still 200 after SIGTERM"
                time.sleep(0.05)
            assert ready.status_code == 503 and ready.json()["status"] == "shutting down"
            refused = client.post("/v1/chat/completions", json={
                "model": "dummy", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
            assert refused.status_code == 503
            assert refused.json()["error"]["code"] == "shutting_down"
            assert server.process.poll() is None  # still draining

            received["short"] += list(short_data)
            received["long"] += list(long_data)

    short_events = [json.loads(x) for x in received["short"][:-1]]
    assert received["short"][-1] == "[DONE]"
    assert short_events[-1]["choices"][0]["finish_reason"] == "length"
    assert not any("error" in e for e in short_events)

    long_events = [json.loads(x) for x in received["long"][:-1]]
    assert received["long"][-1] == "[DONE]"
    error = long_events[-1]["error"]
    assert (error["type"], error["code"]) == ("server_error", "shutting_down")
    assert f"grace period of {GRACE_SECONDS} s" in error["message"]
    assert len(long_events) - 1 < LONG  # cut short

    assert server.process.wait(timeout=60) == 0
    log = server.log()
    assert "draining" in log and "ending the requests still in flight" in log
