"""What the Ray fleet tests share: keys, headers, and killing a replica under a stream."""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Callable

import httpx

API_KEY = "fleet-inference-key-0123456789"
ADMIN_KEY = "fleet-admin-key-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
NO_EOS = {"2": -100}  # the random model's end token never comes: streams run their full length
REPLICA = "x-gateway-replica"


def kill_mid_stream(url: str, model: str, pid_of: Callable[[str], int]) -> tuple[str, dict]:
    """Start a long stream on ``model``, kill -9 the replica serving it after its first event,
    read the stream to its end; the victim's name and the error event that ended the stream
    (after which ``[DONE]`` must come)."""
    body = {"model": model, "messages": [{"role": "user", "content": "hello"}], "max_tokens": 200, "stream": True,
            "logit_bias": NO_EOS, "temperature": 0}
    events = []
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, headers=AUTH, timeout=120) as response:
        assert response.status_code == 200
        victim = response.headers[REPLICA]
        lines = response.iter_lines()
        for line in lines:
            if line.startswith("data: "):
                events.append(line[len("data: "):])
                break
        os.kill(pid_of(victim), signal.SIGKILL)
        events += [line[len("data: "):] for line in lines if line.startswith("data: ")]
    assert events[-1] == "[DONE]", events[-3:]
    return victim, json.loads(events[-2])["error"]
