"""Integration helpers: start the real gateway as a subprocess on a free local port, wait until
it is ready, and stop it (SIGTERM, then kill) at the end; its log is printed when a test failed."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from loadtest.server import free_port

REPO = Path(__file__).resolve().parents[2]


@dataclass
class Server:
    port: int
    process: subprocess.Popen
    log_path: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)


def start_server(args: list[str], log_path: Path, env: dict[str, str] | None = None,
                 timeout: float = 120.0) -> Server:
    """``python -m gateway serve ARGS --host 127.0.0.1 --port P``; returns once /readyz is 200."""
    port = free_port()
    cmd = [sys.executable, "-m", "gateway", "serve", *args, "--host", "127.0.0.1", "--port", str(port)]
    with open(log_path, "wb") as log_file:
        process = subprocess.Popen(cmd, cwd=REPO, stdout=log_file, stderr=subprocess.STDOUT,
                                   env={**os.environ, **(env or {})})
    server = Server(port, process, log_path)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"server exited with {process.returncode} before ready:\n{server.log()}")
        try:
            if httpx.get(f"{server.url}/readyz", timeout=2).status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    server.stop()
    pytest.fail(f"server not ready after {timeout} s:\n{server.log()}")


@pytest.fixture(scope="module")
def launch_server(request, tmp_path_factory) -> Iterator[Callable[..., Server]]:
    """A factory for servers that live until the end of the module."""
    servers: list[Server] = []
    failed_before = request.session.testsfailed

    def launch(args: list[str], env: dict[str, str] | None = None) -> Server:
        log_path = tmp_path_factory.mktemp("server-log") / "server.log"
        servers.append(server := start_server(args, log_path, env))
        return server

    yield launch
    for server in servers:
        server.stop()
    if request.session.testsfailed > failed_before:
        # teardown output of a passing last test would stay hidden: write past pytest's capture
        capture = request.config.pluginmanager.getplugin("capturemanager")
        with capture.global_and_fixture_disabled():
            for server in servers:
                print(f"\n----- server log ({server.log_path}) -----\n{server.log()}", file=sys.stderr)


@pytest.fixture(scope="session")
def ray_cluster() -> Iterator[str]:
    """One local Ray cluster with Ray Serve for the whole session (the fleet tests), shut down at
    the end; yields the base URL of Serve's HTTP proxy (one port per Serve instance: every fleet
    test deploys its application behind it). Two logical CPUs, as on this machine: two replicas
    at half a CPU each and the ingress fit."""
    ray = pytest.importorskip("ray")
    from ray import serve

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": str(REPO)}})
    port = free_port()
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()
