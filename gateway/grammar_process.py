"""Grammar compilation in a child process that is killed when it runs past its time.

xgrammar's compiler cannot be interrupted, and some schemas that pass every static check still take
minutes to compile (adjacent variable-length repetitions of overlapping classes in a ``pattern``:
``.{1,64}`` eight times over did not compile in 60 s on two cores). In a thread, a compile past its
timeout answered the client with a 400 but kept a core busy and held a compile worker until it
finished, so a few such requests starved every structured-output request and slowed the engine.
Here each compile runs in a child process (``python -m gateway.grammar_process``) that holds the
tokenizer's vocabulary and an xgrammar compiler; past its deadline the child is killed and a fresh
one starts for the next compile. A child may grow by ``MEMORY_BUDGET`` of address space once it is
ready, so a compile that would need more fails alone; and it dies with the server. The compiled
grammar comes back serialized (xgrammar's JSON form: 50 KB for a small object schema, 0.8 MB for
``.{1,128}``; under 10 ms each way).

The serialized size grows much faster than the schema: 1,000 string properties (42 KB of schema)
weigh 336 MB, nested identical ``anyOf`` 17 MB for 10 KB. So each request carries ``max_bytes``:
the child refuses a grammar over it instead of sending it, and the server refuses any frame over it
before reading it, so no oversized grammar is ever parsed or deserialized in the server.

The protocol over the child's stdin and stdout is length-prefixed frames: first the tokenizer info
(xgrammar's JSON), answered by ``{"ready": true}`` once the child has imported xgrammar and built
its compiler, then one ``{"kind", "text", "max_bytes"}`` request per compile, each answered by
``{"ok": serialized grammar}``, ``{"too_large": its size}`` or ``{"error": message}``. A compile's
timeout starts when its request is sent to a ready child: a child's start (seconds: it imports
torch, longer on a loaded machine) is the server's cost, bounded apart by ``START_TIMEOUT``, and
is never counted against a schema.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import logging
import os
import resource
import select
import signal
import struct
import subprocess
import sys
import time
from typing import IO, Any

log = logging.getLogger(__name__)

_HEADER = struct.Struct(">I")  # a frame's length in bytes, then the frame
_PR_SET_PDEATHSIG = 1  # prctl(2)
_PARENT_ENV = "GATEWAY_GRAMMAR_PARENT_PID"  # the server's pid: the child checks it is still its parent
_BUDGET_ENV = "GATEWAY_GRAMMAR_MEMORY_BUDGET"
# address space a compile may add to the child's once it is ready (xgrammar and torch imported):
# far above what any schema that passes the checks needs, far below what would crowd the server
MEMORY_BUDGET = 2 << 30
# longest a child may take to become ready (imports, tokenizer info): ~3 s on an idle two-core
# machine; past it the server cannot compile now (503), which says nothing about the schema
START_TIMEOUT = 60.0


class CompileTimeoutError(TimeoutError):
    """The compile ran past its deadline; its child process was killed."""


class CompilerUnavailableError(RuntimeError):
    """A child did not become ready (it died or took past ``START_TIMEOUT`` to start): the
    server's trouble, no schema's."""


class GrammarCompileError(ValueError):
    """xgrammar refused the grammar (the message is xgrammar's)."""


class GrammarTooLargeError(GrammarCompileError):
    """The compiled grammar's serialized form is over the size the server accepts."""

    def __init__(self, size: int, limit: int):
        super().__init__(f"the compiled grammar is {size >> 20} MB, over the limit of {limit >> 20} MB; "
                         "use fewer properties or alternatives")


class CompileProcess:
    """One child process and the compiles it runs, one at a time (callers serialize)."""

    def __init__(self, tokenizer_info_json: str, memory_budget: int = MEMORY_BUDGET,
                 start_timeout: float = START_TIMEOUT):
        self._info = tokenizer_info_json.encode()
        self._memory_budget = memory_budget
        self._start_timeout = start_timeout
        self._proc: subprocess.Popen | None = None
        self._ready = False  # the current child answered its ready frame
        self._start_deadline = 0.0  # monotonic time by which it must have

    def compile(self, kind: str, text: str, timeout: float, max_bytes: int = 1 << 62) -> str:
        """The serialized compiled grammar of ``text`` (``kind`` "json" for a JSON schema, "tag" for
        a structural tag). Raises ``CompileTimeoutError`` past ``timeout`` seconds (the child is
        killed), ``GrammarTooLargeError`` when the serialized grammar is over ``max_bytes`` and
        ``GrammarCompileError`` when xgrammar refuses it."""
        proc = self._ready_process()
        deadline = time.monotonic() + timeout  # the compile's own time, not the process's start
        try:
            _write_frame(proc.stdin, json.dumps({"kind": kind, "text": text, "max_bytes": max_bytes}).encode())
            # the child checks the size itself; this bound holds even if it did not (JSON quoting: x2)
            answer = json.loads(_read_frame(proc.stdout, deadline, limit=2 * max_bytes + 4096))
        except _FrameTooLargeError as exc:  # the rest of the frame is still in the pipe: drop this child
            self.close()
            raise GrammarTooLargeError(exc.size, max_bytes) from None
        except TimeoutError:
            self.close()
            self._started()  # its successor starts now, not in the next compile's time
            raise CompileTimeoutError(f"compiling took longer than {timeout:g} s") from None
        except (OSError, EOFError, ValueError) as exc:  # the child died (out of memory, killed): start afresh
            self.close()
            raise GrammarCompileError(f"the grammar compiler stopped ({exc})") from None
        if "error" in answer:
            raise GrammarCompileError(answer["error"])
        if "too_large" in answer:
            raise GrammarTooLargeError(int(answer["too_large"]), max_bytes)
        return answer["ok"]

    def _ready_process(self) -> subprocess.Popen:
        """The child, once it said it is ready (``CompilerUnavailableError`` when it does not)."""
        proc = self._started()
        if not self._ready:
            try:
                answer = json.loads(_read_frame(proc.stdout, self._start_deadline, limit=4096))
                if answer != {"ready": True}:
                    raise ValueError(f"unexpected first frame {str(answer)[:100]}")
            except TimeoutError:
                self.close()
                raise CompilerUnavailableError(f"a compile process did not start within "
                                               f"{self._start_timeout:g} s") from None
            except (OSError, EOFError, ValueError) as exc:
                self.close()
                raise CompilerUnavailableError(f"a compile process failed to start ({exc})") from None
            self._ready = True
        return proc

    def _started(self) -> subprocess.Popen:
        if self._proc is None or self._proc.poll() is not None:
            self._ready = False
            self._start_deadline = time.monotonic() + self._start_timeout
            self._proc = subprocess.Popen([sys.executable, "-m", "gateway.grammar_process"], stdin=subprocess.PIPE,
                                          stdout=subprocess.PIPE,
                                          env={**os.environ, "OMP_NUM_THREADS": "1", _PARENT_ENV: str(os.getpid()),
                                               _BUDGET_ENV: str(self._memory_budget)})
            _write_frame(self._proc.stdin, self._info)
        return self._proc

    @property
    def pid(self) -> int | None:
        return None if self._proc is None or self._proc.poll() is not None else self._proc.pid

    def close(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdin.close()
        proc.stdout.close()


def _die_with_parent() -> None:
    """In the child: on Linux, ask the kernel to kill it when the server dies, even in the middle of
    a compile (elsewhere it ends at its next read, which finds its input closed). A server that died
    before the request was made has been replaced as parent already: then end now. (Linux ties
    this to the thread that started the child: the compile workers live as long as the server.)"""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        return
    if os.environ.get(_PARENT_ENV) != str(os.getppid()):
        sys.exit(0)


def _write_frame(pipe: IO[bytes], data: bytes) -> None:
    pipe.write(_HEADER.pack(len(data)) + data)
    pipe.flush()


class _FrameTooLargeError(ValueError):
    def __init__(self, size: int):
        super().__init__(f"a frame of {size} bytes")
        self.size = size


def _read_frame(pipe: IO[bytes], deadline: float | None = None, limit: int | None = None) -> bytes:
    """One frame from ``pipe``; ``TimeoutError`` when ``deadline`` (monotonic) passes first,
    ``_FrameTooLargeError`` (before reading it) when it is longer than ``limit``."""
    size = _HEADER.unpack(_read_exactly(pipe, _HEADER.size, deadline))[0]
    if limit is not None and size > limit:
        raise _FrameTooLargeError(size)
    return _read_exactly(pipe, size, deadline)


def _read_exactly(pipe: IO[bytes], size: int, deadline: float | None) -> bytes:
    fd, chunks, left = pipe.fileno(), [], size
    while left:
        if deadline is not None:
            wait = deadline - time.monotonic()
            if wait <= 0 or not select.select([fd], [], [], wait)[0]:
                raise TimeoutError
        chunk = os.read(fd, min(left, 1 << 20))
        if not chunk:
            raise EOFError("the grammar compiler closed its output")
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def _cap_address_space(budget: int) -> None:
    """Let this process grow by at most ``budget`` bytes of address space from now on (Linux): a
    compile that would need more fails alone instead of pressing the whole machine's memory."""
    try:
        with open("/proc/self/status") as status:
            size_kb = int(next(line for line in status if line.startswith("VmSize:")).split()[1])
        _, hard = resource.getrlimit(resource.RLIMIT_AS)
        soft = size_kb * 1024 + budget
        resource.setrlimit(resource.RLIMIT_AS, (soft if hard == resource.RLIM_INFINITY else min(soft, hard), hard))
    except (OSError, StopIteration, ValueError):
        log.warning("could not cap the grammar compiler's memory")


def _serve(stdin: IO[bytes], stdout: IO[bytes]) -> None:
    """The child: compile each request with one compiler over the tokenizer it was sent first."""
    import xgrammar

    info = xgrammar.TokenizerInfo.deserialize_json(_read_frame(stdin).decode())
    compiler = xgrammar.GrammarCompiler(info, max_threads=1, cache_enabled=False)
    budget = int(os.environ.get(_BUDGET_ENV, MEMORY_BUDGET))
    _cap_address_space(budget)
    _write_frame(stdout, json.dumps({"ready": True}).encode())  # from now on, compiles are timed
    while True:
        try:
            request: dict[str, Any] = json.loads(_read_frame(stdin))
        except EOFError:  # the server went away
            return
        try:
            if request["kind"] == "tag":
                compiled = compiler.compile_structural_tag(request["text"])
            else:  # compact JSON (no free whitespace): a model cannot pad an answer with blanks forever
                compiled = compiler.compile_json_schema(request["text"], any_whitespace=False, strict_mode=True)
            serialized = compiled.serialize_json()
            max_bytes = int(request.get("max_bytes", 1 << 62))
            answer = {"too_large": len(serialized)} if len(serialized) > max_bytes else {"ok": serialized}
        except MemoryError:
            answer = {"error": f"compiling it needs more than {budget >> 20} MB"}
        except Exception as exc:  # noqa: BLE001 - xgrammar's refusal goes back to the request
            message = str(exc)
            if "bad_alloc" in message:  # xgrammar's C++ ran out of the address space it may use
                message = f"compiling it needs more than {budget >> 20} MB"
            answer = {"error": message}
        _write_frame(stdout, json.dumps(answer).encode())


if __name__ == "__main__":
    _die_with_parent()
    logging.basicConfig(level=logging.WARNING)
    protocol_out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # anything a library prints goes to stderr, never into the frames
    _serve(sys.stdin.buffer, protocol_out)
