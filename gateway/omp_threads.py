"""Keep OpenMP's thread teams to the engine thread, so its own team spins instead of sleeping.

Every thread that runs a parallel torch op on the CPU becomes the master of an OpenMP team whose
workers live as long as that thread does. GNU OpenMP (the runtime torch's CPU wheels ship)
counts those workers process-wide, and once they outnumber the CPUs it stops spinning between
parallel regions: every worker sleeps on a futex after a short spin and is woken for the next op.
A forward or training step is thousands of small ops, so the engine loses a large share of its
time to wake-ups: a training job in the server ran at 0.81x the tokens/s of the same trainer
run offline (99 against 122), with the engine's worker thread busy 62% of the time against 98%.

The gateway's other threads (the event loop's executor, which builds the model and reads
adapters) must therefore never start a team: ``single_omp_thread`` sets the calling thread's
OpenMP thread count to one (torch then runs its ops inline there), and ``in_own_thread`` runs
a one-off heavy job (loading the model) in a thread that exits afterwards, which releases its
team. The engine thread keeps torch's default, all the cores.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import os
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

import torch

log = logging.getLogger(__name__)
T = TypeVar("T")
# OpenMP runtimes torch may be linked with: GNU (Linux wheels), LLVM (macOS), Intel
OPENMP_LIBRARIES = ("libgomp.so.1", "libomp.so", "libomp.dylib", "libiomp5.so")


def _loaded_openmp():
    """The OpenMP runtime already in this process (torch's), or None: never loads another one."""
    noload = getattr(os, "RTLD_NOLOAD", 0)
    for name in OPENMP_LIBRARIES:
        try:
            return ctypes.CDLL(name, mode=noload | getattr(os, "RTLD_GLOBAL", 0))
        except OSError:
            continue
    return None


def single_omp_thread() -> None:
    """Make torch's CPU ops in the calling thread run on this thread alone (no OpenMP team).

    Only this thread's setting changes: ``torch.set_num_threads`` would change the default of
    every thread started later, the engine's included."""
    torch.get_num_threads()  # torch sets each thread's count on first use: let it, then override
    runtime = _loaded_openmp()
    try:
        runtime.omp_set_num_threads(1)
    except AttributeError:  # no OpenMP runtime loaded (or not this one's symbol): nothing to limit, and
        # an executor's initializer must not fail, which would break every later call on the pool
        log.debug("no OpenMP runtime to limit")


def single_omp_executor(max_workers: int | None = None) -> ThreadPoolExecutor:
    """A thread pool for the event loop's blocking work whose threads never start an OpenMP team."""
    return ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="blocking",
                              initializer=single_omp_thread)


async def in_own_thread(fn: Callable[..., T], *args) -> T:
    """``fn(*args)`` in a new thread that ends with it: full CPU parallelism for a one-off job,
    and its OpenMP team goes away with the thread."""
    outcome: Future = Future()

    def run() -> None:
        try:
            outcome.set_result(fn(*args))
        except BaseException as exc:  # noqa: BLE001 - handed to the awaiting coroutine
            outcome.set_exception(exc)

    thread = threading.Thread(target=run, name=getattr(fn, "__name__", "one-off"), daemon=True)
    thread.start()
    result = await asyncio.wrap_future(outcome)
    thread.join()  # it has handed over its result: only its exit, which frees its team, remains
    return result
