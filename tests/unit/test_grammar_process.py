"""Grammar compilation in a child process (``gateway.grammar_process``): a compile past its
deadline is refused, its process killed (no core stays busy) and a fresh one started; xgrammar's
refusals come back as errors without losing the process; and a schema that ran out of time is
refused again at once rather than compiled again."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time

import pytest
import xgrammar

from gateway.errors import BadRequestError
from gateway.grammar_process import (CompileProcess, CompilerUnavailableError, CompileTimeoutError,
                                     GrammarCompileError, GrammarTooLargeError, _FrameTooLargeError, _read_frame,
                                     _write_frame)
from gateway.structured import Grammars, check_schema

# passes every static check (no nested repetition, 512 elements) yet did not compile in 60 s over
# SmolLM2's vocabulary on two cores: adjacent repetitions of '.' leave every split open
SLOW = {"type": "string", "pattern": ".{1,64}" * 8}
QUICK = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as stat:  # a zombie is dead too
        return stat.read().split(")")[-1].split()[0] != "Z"


@pytest.fixture(scope="module")
def smollm2_info(smollm2_tokenizer):
    return xgrammar.TokenizerInfo.from_huggingface(smollm2_tokenizer, vocab_size=len(smollm2_tokenizer))


def test_a_compile_past_its_deadline_kills_its_process_and_the_next_gets_a_new_one(smollm2_info):
    check_schema(SLOW)
    process = CompileProcess(smollm2_info.serialize_json())
    try:
        process.compile("json", json.dumps(QUICK), timeout=60)
        first = process.pid
        started = time.monotonic()
        with pytest.raises(CompileTimeoutError):
            process.compile("json", json.dumps(SLOW), timeout=1.5)
        assert time.monotonic() - started < 10
        assert not _alive(first)
        successor = process.pid  # started at once, so the next compile does not wait for it
        assert successor not in (None, first)
        compiled = xgrammar.CompiledGrammar.deserialize_json(process.compile("json", json.dumps(QUICK), timeout=60),
                                                              smollm2_info)
        assert process.pid == successor
        assert xgrammar.GrammarMatcher(compiled).accept_string('{"a": 12}')
        assert not xgrammar.GrammarMatcher(compiled).accept_string('{"b"')
    finally:
        process.close()


def test_xgrammar_refusals_come_back_and_the_process_stays(tiny_tokenizer):
    info = xgrammar.TokenizerInfo.from_huggingface(tiny_tokenizer, vocab_size=len(tiny_tokenizer))
    process = CompileProcess(info.serialize_json())
    try:
        process.compile("json", json.dumps(QUICK), timeout=60)
        pid = process.pid
        with pytest.raises(GrammarCompileError, match="missing"):
            process.compile("json", json.dumps({"$ref": "#/$defs/missing"}), timeout=60)
        assert process.pid == pid
    finally:
        process.close()
    assert not _alive(pid)


def test_a_schema_that_ran_out_of_time_is_refused_again_without_compiling(smollm2_tokenizer):
    grammars = Grammars(smollm2_tokenizer, len(smollm2_tokenizer), [smollm2_tokenizer.eos_token_id],
                        max_schema_bytes=65536, compile_timeout=1.5, workers=1)

    async def scenario():
        with pytest.raises(BadRequestError, match="longer than 1.5 s"):
            await grammars.constraint(SLOW)
        await asyncio.sleep(2)  # the compile process's own deadline passes too
        compiled = grammars.compiled
        with pytest.raises(BadRequestError, match="longer than 1.5 s"):
            await grammars.constraint(SLOW)
        assert grammars.compiled == compiled  # remembered, not compiled again
        await grammars.constraint(QUICK)  # the worker and a fresh process serve the next schema
        assert grammars.compiled == compiled + 1

    try:
        asyncio.run(scenario())
    finally:
        grammars.close()


def test_a_compile_process_dies_with_the_server(smollm2_info, tmp_path):
    """The server killed outright (no shutdown) in the middle of a slow compile: its compile
    process goes too, not left compiling."""
    script = tmp_path / "server.py"
    info = tmp_path / "info.json"
    info.write_text(smollm2_info.serialize_json())
    script.write_text(
        "import json, pathlib, sys, threading\n"
        "from gateway.grammar_process import CompileProcess\n"
        f"process = CompileProcess(pathlib.Path({str(info)!r}).read_text())\n"
        "process.compile('json', json.dumps({'type': 'integer'}), 60)\n"
        "print(process.pid, flush=True)\n"
        f"process.compile('json', json.dumps({SLOW!r}), 600)\n")
    server = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    child = int(server.stdout.readline())
    assert _alive(child)
    server.kill()
    server.wait()
    deadline = time.monotonic() + 10
    while _alive(child) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _alive(child)


def test_a_compile_past_its_memory_budget_fails_alone(tiny_tokenizer):
    """A compile process may grow by its memory budget and no more: past it the compile is refused
    with a clear message, and a process with the default budget compiles the same schema."""
    info = xgrammar.TokenizerInfo.from_huggingface(tiny_tokenizer, vocab_size=len(tiny_tokenizer)).serialize_json()
    schema = json.dumps({"type": "object", "properties": {f"p{i}": {"type": "string", "pattern": "[a-z]{1,64}"}
                                                          for i in range(40)}})
    cramped = CompileProcess(info, memory_budget=1 << 20)
    try:
        with pytest.raises(GrammarCompileError, match="needs more than 1 MB"):
            cramped.compile("json", schema, timeout=60)
    finally:
        cramped.close()
    roomy = CompileProcess(info)
    try:
        roomy.compile("json", schema, timeout=60)
    finally:
        roomy.close()


def test_a_grammar_over_the_size_limit_is_refused_and_never_sent(tiny_tokenizer):
    """The child refuses a serialized grammar over ``max_bytes`` (it weighs far more than its
    schema: 100 string properties are 3 MB over SmolLM2's vocabulary), and the process stays."""
    info = xgrammar.TokenizerInfo.from_huggingface(tiny_tokenizer, vocab_size=len(tiny_tokenizer)).serialize_json()
    wide = json.dumps({"type": "object", "properties": {f"p{i}": {"type": "string"} for i in range(60)}})
    process = CompileProcess(info)
    try:
        size = len(process.compile("json", wide, timeout=60))
        with pytest.raises(GrammarTooLargeError, match="over the limit"):
            process.compile("json", wide, timeout=60, max_bytes=size - 1)
        pid = process.pid
        assert len(process.compile("json", json.dumps(QUICK), timeout=60, max_bytes=size)) < size
        assert process.pid == pid
    finally:
        process.close()


def test_a_frame_over_its_limit_is_refused_before_it_is_read():
    read, write = os.pipe()
    with os.fdopen(read, "rb") as reader, os.fdopen(write, "wb") as writer:
        _write_frame(writer, b"x" * 100)
        with pytest.raises(_FrameTooLargeError):
            _read_frame(reader, limit=99)
        assert os.read(reader.fileno(), 1000) == b"x" * 100  # left unread (its caller drops the child)


def test_an_oversized_grammar_is_a_400_and_not_compiled_again(tiny_tokenizer):
    grammars = Grammars(tiny_tokenizer, len(tiny_tokenizer), [0], max_schema_bytes=65536, compile_timeout=60,
                        workers=1, max_grammar_bytes=20_000)
    wide = {"type": "object", "properties": {f"p{i}": {"type": "string"} for i in range(60)}}

    async def scenario():
        with pytest.raises(BadRequestError, match="compiled grammar is .* over the limit"):
            await grammars.constraint(wide)
        compiled = grammars.compiled
        with pytest.raises(BadRequestError, match="over the limit"):
            await grammars.constraint(wide)
        assert grammars.compiled == compiled  # remembered, not compiled again
        await grammars.constraint(QUICK)
        assert grammars.cached_bytes > 0

    try:
        asyncio.run(scenario())
    finally:
        grammars.close()


def test_a_process_start_is_not_counted_in_the_compile_timeout(tiny_tokenizer):
    """A fresh child takes seconds to start (it imports torch): a compile of a few milliseconds
    with a 0.5 s timeout still succeeds on it. A child that cannot start in time is the server's
    trouble (``CompilerUnavailableError``, a 503 upstream), not the schema's."""
    info = xgrammar.TokenizerInfo.from_huggingface(tiny_tokenizer, vocab_size=len(tiny_tokenizer)).serialize_json()
    process = CompileProcess(info)
    try:
        started = time.monotonic()
        process.compile("json", json.dumps(QUICK), timeout=0.5)
        assert time.monotonic() - started > 0.5  # the start took longer than the timeout
    finally:
        process.close()
    hurried = CompileProcess(info, start_timeout=0.05)
    try:
        with pytest.raises(CompilerUnavailableError, match="did not start within"):
            hurried.compile("json", json.dumps(QUICK), timeout=60)
        assert hurried.pid is None  # killed, not left starting
    finally:
        hurried.close()
