"""OpenMP teams stay with the engine thread: the gateway's other threads run torch on one thread.

Why it matters (see ``gateway.omp_threads``): a second team puts GNU OpenMP over the CPU count
and the engine's workers then sleep between ops; a training job in the server ran at 0.81x the
offline trainer's tokens/s that way.
"""

from __future__ import annotations

import asyncio
import threading

import pytest
import torch
from fastapi.testclient import TestClient

from gateway.app import create_app
from gateway.base_model import LoadedBase
from gateway.omp_threads import in_own_thread, single_omp_executor, single_omp_thread
from gateway.settings import Settings
from support import build_tiny_llama, build_tokenizer

needs_cores = pytest.mark.skipif(torch.get_num_threads() < 2, reason="torch runs on one thread here anyway")


def in_new_thread(fn):
    out = []
    thread = threading.Thread(target=lambda: out.append(fn()))
    thread.start()
    thread.join()
    return out[0]


@needs_cores
def test_single_omp_thread_limits_only_the_calling_thread():
    default = in_new_thread(torch.get_num_threads)
    assert default > 1

    def limited():
        single_omp_thread()
        product = torch.randn(256, 256) @ torch.randn(256, 256)  # torch still works, on this thread
        return torch.get_num_threads(), product.shape

    assert in_new_thread(limited) == (1, (256, 256))
    assert in_new_thread(torch.get_num_threads) == default  # threads started later keep the default
    assert torch.get_num_threads() == default


@needs_cores
def test_single_omp_executor_threads_run_torch_on_one_thread():
    with single_omp_executor(2) as pool:
        counts = {pool.submit(torch.get_num_threads).result() for _ in range(4)}
    assert counts == {1}


def test_in_own_thread_returns_raises_and_leaves_no_thread():
    seen = {}

    def work(x):
        seen["thread"] = threading.current_thread()
        return x * 2

    def fail():
        raise ValueError("boom")

    async def main():
        assert await in_own_thread(work, 21) == 42
        assert seen["thread"] is not threading.main_thread()
        assert not seen["thread"].is_alive()  # ended, so its OpenMP team is gone with it
        with pytest.raises(ValueError, match="boom"):
            await in_own_thread(fail)

    asyncio.run(main())


@needs_cores
def test_running_gateway_keeps_omp_teams_to_the_engine(tmp_path):
    default = in_new_thread(torch.get_num_threads)
    tokenizer = build_tokenizer()
    base = LoadedBase(model=build_tiny_llama(len(tokenizer)), tokenizer=tokenizer, name="tiny",
                      device=torch.device("cpu"), dtype=torch.float32, context_window=256, load_seconds=0.0)
    app = create_app(Settings(quantization="none", device="cpu", data_dir=tmp_path), base=base)
    with TestClient(app) as client:
        gateway = app.state.gateway

        async def off_loop():  # what the app's blocking work (adapter reads, job preparation) runs on
            return await asyncio.to_thread(torch.get_num_threads)

        assert client.portal.call(off_loop) == 1
        assert gateway.engine.call(torch.get_num_threads).result(timeout=30) == default


def test_without_an_openmp_runtime_the_limit_is_a_no_op(monkeypatch):
    import gateway.omp_threads as omp_threads

    monkeypatch.setattr(omp_threads, "_loaded_openmp", lambda: None)
    default = in_new_thread(torch.get_num_threads)

    def limited():
        single_omp_thread()  # must not raise: it is a thread pool's initializer
        return torch.get_num_threads()

    assert in_new_thread(limited) == default
