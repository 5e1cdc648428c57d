"""Waiting for a compile process is not compiling: a schema queued behind other requests' slow
compiles is never refused as too slow (400); it compiles once a process frees, or, past the
queue's bounds (time waited, compiles waiting), gets a 503 with Retry-After. The compile timeout
still refuses a schema that is slow itself."""

from __future__ import annotations

import asyncio
import json
import threading
import time

import pytest

from gateway.errors import BadRequestError, error_response
from gateway.structured import GrammarCompilerBusyError, Grammars, KeyCompileLimitError

# passes every static check yet does not compile in 60 s over SmolLM2's vocabulary (see
# test_grammar_process.py)
SLOW = {"type": "string", "pattern": ".{1,64}" * 8}
QUICK = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}


def _schema(name: str) -> dict:
    return {"type": "object", "properties": {"k": {"const": name}}}


def _name(key: str) -> str:
    return json.loads(key.partition(":")[2])["properties"]["k"]["const"]


class FakeCompiles:
    """Stands in for ``Grammars._compile``: a schema named ``slow*`` holds its worker until
    released; others return at once. Records which ones ran."""

    def __init__(self):
        self.release = threading.Event()
        self.ran: list[str] = []

    def __call__(self, key: str):
        name = _name(key)
        self.ran.append(name)
        if name.startswith("slow"):
            assert self.release.wait(30)
        return object(), 10


@pytest.fixture
def fake_grammars(monkeypatch):
    made = []

    def make(**kwargs) -> tuple[Grammars, FakeCompiles]:
        grammars = Grammars(None, 10, [0], max_schema_bytes=4096, compile_timeout=1.0, workers=1, **kwargs)
        fake = FakeCompiles()
        monkeypatch.setattr(grammars, "_compile", fake)
        made.append((grammars, fake))
        return grammars, fake

    yield make
    for grammars, fake in made:
        fake.release.set()
        grammars.close()


def test_a_compile_queued_past_the_wait_is_a_503_with_retry_after_and_never_runs(fake_grammars):
    grammars, fake = fake_grammars(queue_timeout=0.3)

    async def scenario():
        slow = asyncio.ensure_future(grammars.constraint(_schema("slow")))
        await asyncio.sleep(0.05)
        started = time.monotonic()
        with pytest.raises(GrammarCompilerBusyError) as caught:
            await grammars.constraint(_schema("innocent"))
        assert 0.25 < time.monotonic() - started < 2  # the queue's bound, not the compile timeout
        response = error_response(caught.value)
        assert response.status_code == 503
        assert response.headers["Retry-After"] == "2"
        assert b'"code":"grammar_compiler_busy"' in response.body
        assert b'"type":"server_error"' in response.body
        fake.release.set()
        await slow
        await asyncio.sleep(0.1)  # the worker reaches the abandoned job: it must skip it
        assert fake.ran == ["slow"]
        await grammars.constraint(_schema("innocent"))  # asked again: queued afresh, compiled
        assert fake.ran == ["slow", "innocent"]
        assert grammars._queued == 0  # noqa: SLF001

    asyncio.run(scenario())


def test_a_compile_queued_behind_a_slow_one_compiles_once_a_process_frees(fake_grammars):
    """The wait is longer than the compile timeout (1 s): it is still not blamed on the schema."""
    grammars, fake = fake_grammars(queue_timeout=5)

    async def scenario():
        slow = asyncio.ensure_future(grammars.constraint(_schema("slow")))
        await asyncio.sleep(0.05)
        asyncio.get_running_loop().call_later(1.5, fake.release.set)
        await grammars.constraint(_schema("innocent"))
        await slow
        assert fake.ran == ["slow", "innocent"]

    asyncio.run(scenario())


def test_requests_sharing_a_queued_compile_all_get_the_503(fake_grammars):
    grammars, fake = fake_grammars(queue_timeout=0.3)

    async def scenario():
        slow = asyncio.ensure_future(grammars.constraint(_schema("slow")))
        await asyncio.sleep(0.05)
        first = asyncio.ensure_future(grammars.constraint(_schema("shared")))
        await asyncio.sleep(0.1)
        second = asyncio.ensure_future(grammars.constraint(_schema("shared")))
        results = await asyncio.gather(first, second, return_exceptions=True)
        assert all(isinstance(r, GrammarCompilerBusyError) for r in results), results
        fake.release.set()
        await slow

    asyncio.run(scenario())


def test_past_the_most_queued_compiles_a_new_one_is_refused_at_once(fake_grammars):
    grammars, fake = fake_grammars(queue_timeout=10, max_queued=2)

    async def scenario():
        slow = asyncio.ensure_future(grammars.constraint(_schema("slow")))
        await asyncio.sleep(0.05)  # taken by the only worker: not queued
        queued = [asyncio.ensure_future(grammars.constraint(_schema(f"q{i}"))) for i in range(2)]
        await asyncio.sleep(0.05)
        started = time.monotonic()
        with pytest.raises(GrammarCompilerBusyError, match="2 compiles are waiting"):
            await grammars.constraint(_schema("one-too-many"))
        assert time.monotonic() - started < 0.5
        fake.release.set()
        await asyncio.gather(slow, *queued)  # the queued ones compile once the worker frees
        assert sorted(fake.ran) == ["q0", "q1", "slow"]

    asyncio.run(scenario())


def test_one_key_has_one_compile_at_a_time_and_others_still_compile(fake_grammars):
    """One key's slow schemas, each made unique, held both compile processes and the whole queue:
    every other client's new schema got 503. A key now has one compile queued or running; a
    grammar already compiling or cached costs it nothing."""
    grammars, fake = fake_grammars(queue_timeout=10)

    async def scenario():
        slow = asyncio.ensure_future(grammars.constraint(_schema("slow-a"), owner="attacker"))
        await asyncio.sleep(0.05)
        with pytest.raises(KeyCompileLimitError) as refused:
            await grammars.constraint(_schema("slow-b"), owner="attacker")
        response = error_response(refused.value)
        assert response.status_code == 429 and response.headers["retry-after"] == "2"
        same = asyncio.ensure_future(grammars.constraint(_schema("slow-a"), owner="attacker"))  # shared: free
        other = asyncio.ensure_future(grammars.constraint(_schema("victim"), owner="victim"))  # queued, not refused
        await asyncio.sleep(0.05)
        fake.release.set()
        await asyncio.gather(slow, same, other)
        assert sorted(fake.ran) == ["slow-a", "victim"]
        await grammars.constraint(_schema("slow-c"), owner="attacker")  # its share came back

    asyncio.run(scenario())


def test_a_schema_behind_a_compile_that_times_out_compiles_and_is_not_blamed(smollm2_tokenizer):
    """Real compile processes: one process, a 3 s compile timeout. A slow schema holds it 3 s,
    then is refused with a 400; a quick schema sent meanwhile waits those 3 s and then compiles
    (on the fresh process, whose start is not counted either), where it used to be refused as
    'took longer than 3 s'. With a shorter queue bound it gets a 503 instead, never a 400."""
    grammars = Grammars(smollm2_tokenizer, len(smollm2_tokenizer), [smollm2_tokenizer.eos_token_id],
                        max_schema_bytes=65536, compile_timeout=3, workers=1, queue_timeout=20)

    async def scenario():
        await grammars.constraint({"type": "integer"})  # processes up and warm
        slow = asyncio.ensure_future(grammars.constraint(SLOW))
        await asyncio.sleep(0.2)
        started = time.monotonic()
        await grammars.constraint(QUICK)
        assert time.monotonic() - started > 2.5  # it did wait for the slow compile's process
        with pytest.raises(BadRequestError, match="longer than 3 s"):
            await slow

        grammars.queue_timeout = 1
        # another slow schema (the first is remembered as too slow, refused without compiling)
        slow = asyncio.ensure_future(grammars.constraint({"type": "string", "pattern": ".{1,63}" * 8}))
        await asyncio.sleep(0.2)
        with pytest.raises(GrammarCompilerBusyError):
            await grammars.constraint({**QUICK, "required": []})
        with pytest.raises(BadRequestError, match="longer than 3 s"):
            await slow

    try:
        asyncio.run(scenario())
    finally:
        grammars.close()
