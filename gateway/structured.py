"""Structured outputs: ``response_format`` (``json_object`` / ``json_schema``) through xgrammar.

A schema is checked here first (``check_schema``): xgrammar silently ignores some JSON-schema
keywords (``uniqueItems``, ``not``, ``if``/``then``/``else``, a multi-entry ``allOf``, unknown
string formats...), and a schema we cannot enforce must be a 400 naming the keyword, never an
answer that looks constrained and is not. Only keywords known to be enforced (or pure
annotations) pass.

Compiling turns a schema into a grammar over the model's vocabulary; it runs in a child process
(``gateway.grammar_process``: killed when it runs past ``compile_timeout``), driven from a worker
thread (never the event loop nor the engine thread), and its result is cached per schema. Each
constrained sequence holds its own matcher (the grammar's state after its tokens); the engine
asks the matchers of the rows that have one for a token bitmask and applies it to those rows in
the batched sampling step (``gateway.grammar_mask``). xgrammar is imported on first use (it takes seconds).
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import json
import logging
import queue
import re
import threading
from collections.abc import Sequence
from typing import Any

import torch

from gateway.errors import BadRequestError
from gateway.grammar_process import CompileProcess, CompileTimeoutError
from gateway.pattern_cost import PatternTooComplexError, check_pattern_cost
from gateway.tool_parser import CallTracker

log = logging.getLogger(__name__)

CACHE_SIZE = 256  # compiled grammars kept (least recently used dropped)
MAX_SCHEMA_DEPTH = 32  # nesting of subschemas checked (deeper is refused)

# keywords enforced by xgrammar 0.2.9 (checked one by one), and annotations that constrain nothing
ENFORCED = {
    "type", "enum", "const", "properties", "required", "additionalProperties", "patternProperties",
    "propertyNames", "minProperties", "maxProperties", "items", "prefixItems", "minItems", "maxItems",
    "contains", "unevaluatedProperties", "anyOf", "oneOf", "allOf", "$ref", "$defs", "definitions",
    "minLength", "maxLength", "pattern", "format", "minimum", "maximum", "exclusiveMinimum",
    "exclusiveMaximum", "multipleOf",
}
ANNOTATIONS = {"$schema", "$id", "$comment", "title", "description", "default", "examples", "deprecated",
               "readOnly", "writeOnly"}
FORMATS = {"email", "date", "time", "date-time", "duration", "uri", "uri-reference", "uri-template", "uuid",
           "ipv4", "ipv6", "hostname", "json-pointer"}
# Keywords that constrain one JSON type. xgrammar 0.2.9 applies them only when the schema names
# its ``type`` (or, for arrays and objects, has ``items``/``prefixItems`` or ``properties``, from
# which it infers the type); alone they give an unconstrained value. And it ignores, with a log
# line only, ``minLength``/``maxLength`` next to ``format`` or ``pattern``, and ``multipleOf`` on
# numbers that are not integers. ``check_schema`` refuses all of these.
SCALAR_KEYWORDS = {"minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf", "minLength",
                   "maxLength", "pattern", "format"}
ARRAY_KEYWORDS = {"minItems", "maxItems", "contains"}
OBJECT_KEYWORDS = {"required", "minProperties", "maxProperties", "patternProperties", "propertyNames",
                   "additionalProperties", "unevaluatedProperties"}
SCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions")  # name -> subschema
SCHEMA_LISTS = ("prefixItems", "anyOf", "oneOf", "allOf")  # [subschema]
SCHEMA_ONE = ("items", "additionalProperties", "propertyNames", "contains", "unevaluatedProperties")


def check_schema(schema: Any, path: str = "", depth: int = 0, *, param: str = "response_format") -> None:
    """Raise ``BadRequestError`` naming the first keyword (with its JSON pointer) that structured
    outputs cannot enforce; ``param`` is the request field the schema came from."""
    if isinstance(schema, bool):
        return
    where = path or "/"
    if not isinstance(schema, dict):
        raise _refuse(param, f"the schema at {where} must be an object or a boolean")
    if depth > MAX_SCHEMA_DEPTH:
        raise _refuse(param, f"the schema nests deeper than {MAX_SCHEMA_DEPTH} levels at {where}")
    _check_combinations(schema, where, param)
    for key, value in schema.items():
        if key in ANNOTATIONS:
            continue
        if key not in ENFORCED:
            raise _refuse(param, f"the JSON schema keyword '{key}' (at {where}) is not supported by structured outputs")
        if key == "allOf" and isinstance(value, list) and len(value) > 1:
            raise _refuse(param, f"'allOf' with more than one schema (at {where}) is not supported by "
                                 "structured outputs")
        if key == "pattern" and isinstance(value, str):
            _check_pattern(value, f"{path}/pattern", param)
        if key == "patternProperties" and isinstance(value, dict):
            for name in value:
                _check_pattern(name, f"{path}/patternProperties/{_escape(name)}", param)
        if key == "format" and value not in FORMATS:
            raise _refuse(param, f"the string format {str(value)[:40]!r} (at {where}) is not supported; supported: "
                          + ", ".join(sorted(FORMATS)))
        if key in SCHEMA_MAPS:
            if not isinstance(value, dict):
                raise _refuse(param, f"'{key}' at {where} must be an object")
            for name, sub in value.items():
                check_schema(sub, f"{path}/{key}/{_escape(name)}", depth + 1, param=param)
        elif key in SCHEMA_LISTS or (key == "items" and isinstance(value, list)):
            if not isinstance(value, list):
                raise _refuse(param, f"'{key}' at {where} must be an array")
            for i, sub in enumerate(value):
                check_schema(sub, f"{path}/{key}/{i}", depth + 1, param=param)
        elif key in SCHEMA_ONE:
            check_schema(value, f"{path}/{key}", depth + 1, param=param)


def _check_combinations(schema: dict, where: str, param: str) -> None:
    """Refuse keyword combinations xgrammar accepts but does not enforce (see SCALAR_KEYWORDS)."""
    if "type" not in schema:
        loose = sorted(SCALAR_KEYWORDS & schema.keys())
        if not {"items", "prefixItems"} & schema.keys():
            loose += sorted(ARRAY_KEYWORDS & schema.keys())
        if "properties" not in schema:
            loose += sorted(OBJECT_KEYWORDS & schema.keys())
        if loose:
            raise _refuse(param, f"'{loose[0]}' (at {where}) is enforced only in a schema that names its 'type'; add one")
    lengths = sorted({"minLength", "maxLength"} & schema.keys())
    shaped = sorted({"format", "pattern"} & schema.keys())
    if lengths and shaped:
        raise _refuse(param, f"'{lengths[0]}' together with '{shaped[0]}' (at {where}) is not supported by "
                      "structured outputs (the length would not be enforced)")
    types = schema.get("type")
    if "multipleOf" in schema and not (types == "integer" or (isinstance(types, list) and "integer" in types
                                                              and "number" not in types)):
        raise _refuse(param, f"'multipleOf' (at {where}) is supported on integers only")


def _check_pattern(pattern: str, where: str, param: str) -> None:
    try:
        check_pattern_cost(pattern)
    except PatternTooComplexError as exc:
        raise _refuse(param, f"{exc} (at {where})") from None


def _escape(name: str) -> str:
    return str(name)[:64].replace("~", "~0").replace("/", "~1")


def _refuse(param: str, message: str) -> BadRequestError:
    return BadRequestError(message, param=param)


_XGRAMMAR_PREFIX = re.compile(r"^\s*\[[^\]]*\]\s*\S+:\d+:\s*")


class GrammarState:
    """One sequence's progress through its grammar, and the tokens it may never take."""

    def __init__(self, matcher: Any, banned: torch.Tensor):
        self.matcher = matcher
        self._banned = banned

    @property
    def banned(self) -> torch.Tensor:
        """Token ids masked out on top of the grammar at this point of the sequence."""
        return self._banned

    def accept_token(self, token: int) -> bool:
        return bool(self.matcher.accept_token(token))

    def is_terminated(self) -> bool:
        return bool(self.matcher.is_terminated())


class ToolCallGrammarState(GrammarState):
    """A tool-calling sequence (``gateway.tool_calls``): free text may hold control characters
    (newlines), a tool call's JSON may not, so the ban applies only while inside a call, as
    ``CallTracker`` follows it from the bytes of the accepted tokens."""

    def __init__(self, matcher: Any, banned: torch.Tensor, token_bytes: Sequence[bytes]):
        super().__init__(matcher, banned)
        self._token_bytes = token_bytes
        self._tracker = CallTracker()

    @property
    def banned(self) -> torch.Tensor:
        return self._banned if self._tracker.inside else _NOTHING

    def accept_token(self, token: int) -> bool:
        accepted = super().accept_token(token)
        if accepted and 0 <= token < len(self._token_bytes):
            self._tracker.feed(self._token_bytes[token].decode("latin-1"))  # one char per byte
        return accepted


_NOTHING = torch.empty(0, dtype=torch.long)


class GrammarConstraint:
    """A compiled grammar (what ``SamplingParams.grammar`` holds); ``matcher()`` starts a
    sequence's state. ``banned``: tokens holding a control character (bytes below 0x20), never
    valid in compact JSON (raw inside a string they are invalid JSON, and xgrammar 0.2.9's rule
    for length-bounded strings lets them through), so they are masked out on top of the grammar.
    ``token_bytes`` (tool calls only): each token's bytes, to follow where a sequence is."""

    def __init__(self, compiled: Any, key: str, banned: torch.Tensor, token_bytes: Sequence[bytes] | None = None):
        self.compiled = compiled
        self.key = key
        self.banned = banned
        self.token_bytes = token_bytes

    def matcher(self) -> GrammarState:
        import xgrammar

        matcher = xgrammar.GrammarMatcher(self.compiled)
        if self.token_bytes is not None:
            return ToolCallGrammarState(matcher, self.banned, self.token_bytes)
        return GrammarState(matcher, self.banned)


class Grammars:
    """Compiles and caches response-format and tool-call grammars for one model (tokenizer,
    vocabulary width, end tokens)."""

    def __init__(self, tokenizer, vocab_size: int, stop_token_ids: Sequence[int], *, max_schema_bytes: int,
                 compile_timeout: float, workers: int = 2):
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.stop_token_ids = sorted(stop_token_ids)
        self.max_schema_bytes = max_schema_bytes
        self.compile_timeout = compile_timeout
        self._executor = concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="grammar")
        self._info: Any = None  # xgrammar's TokenizerInfo, made on the first compile
        # one compile process per worker thread, taken for the length of a compile; last in, first
        # out, so one process serves compiles that come one at a time (each holds ~270 MB: xgrammar
        # imports torch) and the others start only when compiles overlap
        self._processes: queue.LifoQueue[CompileProcess] = queue.LifoQueue()
        self._all_processes: list[CompileProcess] = []
        self._workers = workers
        self._info_lock = threading.Lock()
        self._banned = torch.empty(0, dtype=torch.long)  # control-character tokens (see GrammarConstraint)
        self._token_bytes: list[bytes] = []
        self._cache: collections.OrderedDict[str, asyncio.Future] = collections.OrderedDict()
        self.compiled = 0  # grammars compiled (cache misses), for tests and metrics

    async def constraint(self, schema: dict[str, Any] | None, param: str = "response_format") -> GrammarConstraint:
        """The grammar of a ``json_object`` (``schema`` None) or ``json_schema`` response format
        (or of a tool's parameters: ``param`` names where the schema came from); a bad or
        unsupported schema raises ``BadRequestError``."""
        schema = {"type": "object"} if schema is None else schema
        key = json.dumps(schema, separators=(",", ":"))  # property order kept: the answer follows it
        if len(key) > self.max_schema_bytes:
            raise _refuse(param, f"the schema is {len(key)} bytes; the limit is {self.max_schema_bytes}")
        check_schema(schema, param=param)
        compiled = await self._compiled("json:" + key, param)
        return GrammarConstraint(compiled, key, self._banned)

    async def structural_tag(self, tag: dict[str, Any], param: str = "tools") -> GrammarConstraint:
        """The grammar of an xgrammar structural tag (``gateway.tool_calls`` builds them; their
        schemas were checked one by one with ``constraint``)."""
        key = json.dumps(tag, separators=(",", ":"))
        compiled = await self._compiled("tag:" + key, param)
        return GrammarConstraint(compiled, key, self._banned, self._token_bytes)

    async def _compiled(self, key: str, param: str) -> Any:
        future = self._cache.get(key)
        if future is None:
            future = asyncio.ensure_future(asyncio.wrap_future(self._executor.submit(self._compile, key)))
            self._cache[key] = future  # concurrent requests with this grammar share one compilation
            while len(self._cache) > CACHE_SIZE:
                self._cache.popitem(last=False)
            future.add_done_callback(lambda f: self._forget_failed(key, f))
        else:
            self._cache.move_to_end(key)
        try:
            return await asyncio.wait_for(asyncio.shield(future), self.compile_timeout)
        except TimeoutError:
            raise _refuse(param, f"the schema took longer than {self.compile_timeout:g} s to compile; "
                                 "simplify it") from None
        except Exception as exc:  # noqa: BLE001 - xgrammar's refusal: an invalid or unsupported schema
            message = _XGRAMMAR_PREFIX.sub("", str(exc).strip().splitlines()[0] if str(exc).strip() else "")
            raise _refuse(param, f"the schema cannot be compiled: {message[:300]}") from None

    def _forget_failed(self, key: str, future: asyncio.Future) -> None:
        """A grammar that failed is compiled again when asked again, except one that ran out of
        time: it would only take a compile process's time again."""
        if future.cancelled() or (future.exception() is not None
                                  and not isinstance(future.exception(), CompileTimeoutError)):
            if self._cache.get(key) is future:
                del self._cache[key]

    def _compile(self, key: str) -> Any:  # worker thread
        import xgrammar

        with self._info_lock:
            if self._info is None:
                info = xgrammar.TokenizerInfo.from_huggingface(self.tokenizer, vocab_size=self.vocab_size,
                                                               stop_token_ids=self.stop_token_ids)
                stops = set(self.stop_token_ids)
                self._token_bytes = list(info.decoded_vocab)
                self._banned = torch.tensor([i for i, data in enumerate(info.decoded_vocab)
                                             if i not in stops and any(b < 0x20 for b in data)], dtype=torch.long)
                info_json = info.serialize_json()
                for _ in range(self._workers):
                    process = CompileProcess(info_json)
                    self._all_processes.append(process)
                    self._processes.put(process)
                self._info = info
        self.compiled += 1
        kind, _, text = key.partition(":")
        process = self._processes.get()
        try:
            serialized = process.compile(kind, text, self.compile_timeout)
        finally:
            self._processes.put(process)
        return xgrammar.CompiledGrammar.deserialize_json(serialized, self._info)

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
        for process in self._all_processes:
            process.close()
