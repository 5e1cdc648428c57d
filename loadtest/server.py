"""Start a gateway subprocess for a benchmark and stop it afterwards (loopback only)."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx

log = logging.getLogger(__name__)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running_gateway(env: dict[str, str], log_path: Path, timeout: float = 300.0,
                    module: str = "gateway") -> Iterator[str]:
    """Yield the base URL of a gateway started with ``GATEWAY_*`` settings from ``env``.
    ``module`` is what ``python -m`` runs: ``loadtest.bench_server`` serves with EOS ignored."""
    port = free_port()
    full_env = {**os.environ, **env, "GATEWAY_HOST": "127.0.0.1", "GATEWAY_PORT": str(port)}
    with open(log_path, "w") as log_file:
        proc = subprocess.Popen([sys.executable, "-m", module, "serve"], env=full_env,
                                stdout=log_file, stderr=subprocess.STDOUT)
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + timeout
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(f"gateway exited with {proc.returncode}; see {log_path}")
                with contextlib.suppress(httpx.HTTPError):
                    if httpx.get(url + "/readyz", timeout=2).status_code == 200:
                        break
                if time.monotonic() > deadline:
                    raise TimeoutError(f"gateway not ready after {timeout} s; see {log_path}")
                time.sleep(0.5)
            yield url
        finally:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()


def stop_servers_on_sigterm() -> None:
    """A benchmark stopped with SIGTERM unwinds like one stopped with Ctrl-C, so the gateway
    servers it started (context managers here) are stopped with it, never left running."""
    def stop(signum, frame) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, stop)
