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

A compile's timeout counts the compile alone, from when its process starts on it
(``CompileProcess.compile``): time queued behind other clients' compiles is never blamed on the
schema. That queue is bounded on its own: a compile that finds ``max_queued`` others waiting, or
that gets no process within ``queue_timeout``, is a 503 with Retry-After (the server is busy),
never a 400 for someone else's slow schema.

Two costs are bounded besides compile time. Ambiguity: xgrammar follows every alternative of an
``anyOf`` that could still match, and nested unions multiply them; every constrained row pays it
for every token on the engine thread (``MAX_SCHEMA_AMBIGUITY``). Size: a compiled grammar's
serialized form grows much faster than its schema (``gateway.grammar_process``); one over
``MAX_GRAMMAR_BYTES`` is refused, and the cache keeps at most ``CACHE_BYTES`` of them.
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

from gateway.errors import BadRequestError, RateLimitError, ServiceUnavailableError
from gateway.grammar_process import (CompileProcess, CompilerUnavailableError, CompileTimeoutError,
                                     GrammarTooLargeError)
from gateway.pattern_cost import PatternTooComplexError, check_pattern_cost
from gateway.tool_parser import CallTracker

log = logging.getLogger(__name__)

CACHE_SIZE = 256  # compiled grammars kept (least recently used dropped)
# ... and their serialized bytes (a proxy for what they hold; the server's RSS grew ~4x that)
CACHE_BYTES = 256 << 20
# Largest serialized compiled grammar (xgrammar 0.2.9, SmolLM2's 49k vocabulary): a small object
# 0.05 MB, 100 string properties 3.2 MB (8.2 MB nullable), 300 properties 29 MB, 1,000 properties
# 336 MB (size grows with the square of the property count); nested identical anyOf 17 MB for 10 KB.
MAX_GRAMMAR_BYTES = 16 << 20
# Waiting for a free compile process (all busy with other requests' compiles): at most this long,
# and at most this many compiles waiting at once; past either, 503 + Retry-After. Longer than the
# default compile timeout (10 s), so a schema queued behind two slow ones waits for one of them to
# end (typical compiles take well under a second) before the client is told to come back.
COMPILE_QUEUE_SECONDS = 15.0
MAX_QUEUED_COMPILES = 8
# compiles one key may have queued or running at once (a shared or cached grammar costs nothing):
# one key's slow schemas, each made unique, held both compile processes and the whole queue, and
# every other client's new schema got 503
COMPILES_PER_KEY = 1
BUSY_RETRY_AFTER = 2  # seconds
# Beyond the compile's own timeout (and a process's start, bounded in grammar_process): how long a
# request still waits for a compile that started, in case a worker thread is stuck; then 503.
COMPILE_GRACE_SECONDS = 90.0
MAX_SCHEMA_DEPTH = 32  # nesting of subschemas checked (deeper is refused)
# Alternatives xgrammar may follow at once along one nesting path: the product of the widths of the
# unions (anyOf, oneOf) on it, each counting the alternatives that start with the same JSON type
# (``_Ambiguity.union_width``; a type list's types all start differently, but integer and number,
# scalars, which cost nothing). Per-token mask cost measured on two
# shared cores with identical alternatives, the worst case: nested arrays 2 wide, 4 deep (16)
# 0.7-2 ms; 4 wide x 2 deep (16) 0.3 ms; 16 x 1 (16) 0.3 ms; 2 wide 5 deep (32) 3-4 ms; 5 x 2 (25)
# 1.8-2.2 ms; 2 wide 7 deep (128) 10-16 ms. Flat unions of scalars cost nothing (256 consts:
# 0.02 ms) and count 1.
MAX_SCHEMA_AMBIGUITY = 16
MAX_SCHEMA_VISITS = 100_000  # subschemas the ambiguity check visits, $refs followed (~0.1 s)
MAX_REF_DEPTH = 128  # nesting it follows through $refs (each level is a Python call)

# keywords enforced by xgrammar 0.2.9 (checked one by one), and annotations that constrain nothing
ENFORCED = {
    "type", "enum", "const", "properties", "required", "additionalProperties", "patternProperties",
    "propertyNames", "minProperties", "maxProperties", "items", "prefixItems", "minItems", "maxItems",
    "unevaluatedProperties", "anyOf", "oneOf", "allOf", "$ref", "$defs", "definitions",
    "minLength", "maxLength", "pattern", "format", "minimum", "maximum", "exclusiveMinimum",
    "exclusiveMaximum", "multipleOf",
}
ANNOTATIONS = {"$schema", "$id", "$comment", "title", "description", "default", "examples", "deprecated",
               "readOnly", "writeOnly"}
# not "uri-template": xgrammar 0.2.9 follows it at ~10 ms a token (16-20 ms under load) on the
# engine thread, 100x any other format here; every row of every stream would wait on it
FORMATS = {"email", "date", "time", "date-time", "duration", "uri", "uri-reference", "uuid",
           "ipv4", "ipv6", "hostname", "json-pointer"}
# Keywords that constrain one JSON type. xgrammar 0.2.9 applies them only when the schema names
# its ``type`` (or, for arrays and objects, has ``items``/``prefixItems`` or ``properties``, from
# which it infers the type); alone they give an unconstrained value. And it ignores, with a log
# line only, ``minLength``/``maxLength`` next to ``format`` or ``pattern``, and ``multipleOf`` on
# numbers that are not integers. ``check_schema`` refuses all of these.
SCALAR_KEYWORDS = {"minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf", "minLength",
                   "maxLength", "pattern", "format"}
ARRAY_KEYWORDS = {"minItems", "maxItems"}
OBJECT_KEYWORDS = {"required", "minProperties", "maxProperties", "patternProperties", "propertyNames",
                   "additionalProperties", "unevaluatedProperties"}
SCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions")  # name -> subschema
SCHEMA_LISTS = ("prefixItems", "anyOf", "oneOf", "allOf")  # [subschema]
SCHEMA_ONE = ("items", "additionalProperties", "propertyNames", "unevaluatedProperties")


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
    if depth == 0:
        _Ambiguity(schema, param).walk(schema, "", 1)


_START_TYPES = ("object", "array", "string", "number", "boolean", "null")  # a JSON value's first character
_SCALAR_TYPES = {"string", "number", "integer", "boolean", "null"}
_SUBSCHEMA_KEYS = {*SCHEMA_MAPS, *SCHEMA_LISTS, *SCHEMA_ONE, "$ref"}


class _Ambiguity:
    """Refuses a schema whose unions multiply past ``MAX_SCHEMA_AMBIGUITY`` along a nesting path
    (local ``$ref``s followed; a recursive one ends its path)."""

    def __init__(self, root: dict, param: str):
        self.root = root
        self.param = param
        # by the id of a $ref's target (nodes of ``root``, alive meanwhile): the highest product it was
        # walked with, so each is walked at most once per product, and a recursion ends
        self.entered: dict[int, int] = {}
        self.kinds: dict[int, set[str]] = {}  # starts() of each subschema seen
        self.visits = 0  # subschemas visited: $refs make a DAG of the schema, bounded here

    def visit(self) -> None:
        self.visits += 1
        if self.visits > MAX_SCHEMA_VISITS:
            raise _refuse(self.param, f"the schema's $refs expand past {MAX_SCHEMA_VISITS} subschemas; use fewer")

    def walk(self, schema: Any, path: str, product: int, depth: int = 0) -> None:
        if not isinstance(schema, dict):
            return
        self.visit()
        if depth > MAX_REF_DEPTH:
            raise _refuse(self.param, f"the schema nests deeper than {MAX_REF_DEPTH} levels through $refs at {path}")
        for key in ("anyOf", "oneOf"):
            if isinstance(schema.get(key), list):
                product *= self.union_width(schema[key])
        if product > MAX_SCHEMA_AMBIGUITY:
            raise _refuse(self.param, f"the unions (anyOf, oneOf) nested at {path or '/'} multiply to "
                          f"{product} alternatives (limit {MAX_SCHEMA_AMBIGUITY}), too slow to follow; nest fewer "
                          "unions, or make their alternatives start with different JSON types")
        target = self.resolve(schema["$ref"]) if isinstance(schema.get("$ref"), str) else None
        if isinstance(target, dict) and self.entered.get(id(target), 0) < product:
            self.entered[id(target)] = product  # a recursion through no union comes back with the same product
            self.walk(target, schema["$ref"][1:], product, depth + 1)  # on from the target's own pointer
        for key in SCHEMA_MAPS:
            if isinstance(schema.get(key), dict):
                for name, sub in schema[key].items():
                    self.walk(sub, f"{path}/{key}/{_escape(name)}", product, depth + 1)
        for key in (*SCHEMA_LISTS, "items"):
            if isinstance(schema.get(key), list):
                for i, sub in enumerate(schema[key]):
                    self.walk(sub, f"{path}/{key}/{i}", product, depth + 1)
        for key in SCHEMA_ONE:
            if isinstance(schema.get(key), dict):
                self.walk(schema[key], f"{path}/{key}", product, depth + 1)

    def union_width(self, alternatives: list) -> int:
        """How many alternatives can match together past a value's first character: the most that
        start with the same JSON type (1 when all are scalars, which xgrammar follows cheaply)."""
        if all(_is_scalar(alt) for alt in alternatives):
            return 1
        starts = [self.starts(alt) for alt in alternatives]
        return max(sum(kind in s for s in starts) for kind in _START_TYPES)

    def starts(self, schema: Any, depth: int = 0) -> set[str]:
        """The JSON types a value of ``schema`` may start with (all when unknown, or too deep to tell)."""
        if schema is False:
            return set()
        if not isinstance(schema, dict) or depth > MAX_REF_DEPTH:
            return set(_START_TYPES)
        if id(schema) not in self.kinds:
            self.visit()
            self.kinds[id(schema)] = set(_START_TYPES)  # while it is worked out: a recursion may start with anything
            self.kinds[id(schema)] = self._starts(schema, depth)
        return self.kinds[id(schema)]

    def _starts(self, schema: dict, depth: int) -> set[str]:
        if "const" in schema or isinstance(schema.get("enum"), list):
            values = [schema["const"]] if "const" in schema else schema["enum"]
            return {_value_type(v) for v in values}
        if isinstance(schema.get("type"), (str, list)):
            return _types(schema["type"])
        if "properties" in schema:
            return {"object"}
        if {"items", "prefixItems"} & schema.keys():
            return {"array"}
        alternatives = schema.get("anyOf") or schema.get("oneOf") or schema.get("allOf")
        if isinstance(alternatives, list):
            return set().union(*(self.starts(alt, depth + 1) for alt in alternatives))
        if isinstance(schema.get("$ref"), str):
            return self.starts(self.resolve(schema["$ref"]), depth + 1)
        return set(_START_TYPES)

    def resolve(self, ref: str) -> Any:
        """A local ``$ref``'s target (None when it is not one: xgrammar refuses it)."""
        if not ref.startswith("#"):
            return None
        target: Any = self.root
        for part in ref[1:].split("/")[1:]:
            part = part.replace("~1", "/").replace("~0", "~")
            if isinstance(target, dict) and part in target:
                target = target[part]
            elif isinstance(target, list) and part.isdigit() and int(part) < len(target):
                target = target[int(part)]
            else:
                return None
        return target


def _is_scalar(schema: Any) -> bool:
    """Whether xgrammar follows this alternative of a union for free: a listed value or a plain
    type. A string with a length, pattern or format is an automaton of its own, followed beside
    the others (480 strings of different maxLength: ~10 ms a token)."""
    if not isinstance(schema, dict) or _SUBSCHEMA_KEYS & schema.keys():
        return False
    if "const" in schema or "enum" in schema:
        return True
    if {"minLength", "maxLength", "pattern", "format"} & schema.keys():
        return False
    types = schema.get("type")
    return isinstance(types, str) and types in _SCALAR_TYPES or (
        isinstance(types, list) and bool(types) and all(t in _SCALAR_TYPES for t in types))


def _types(types: str | list) -> set[str]:
    names = [types] if isinstance(types, str) else types
    return {"number" if t == "integer" else t for t in names if isinstance(t, str)}


def _value_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    return {str: "string", list: "array", dict: "object"}.get(type(value), "string")


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
    listed = sorted({"enum", "const"} & schema.keys())
    beside = sorted((SCALAR_KEYWORDS | ARRAY_KEYWORDS | OBJECT_KEYWORDS) & schema.keys())
    if listed and beside:  # xgrammar keeps to the listed values and drops the rest
        raise _refuse(param, f"'{beside[0]}' next to '{listed[0]}' (at {where}) is not enforced by structured outputs; "
                      "list only the values that satisfy it")
    for key in ("type", "anyOf", "oneOf", "allOf"):
        if schema.get(key) == []:  # no value matches: xgrammar allows only an empty answer
            raise _refuse(param, f"'{key}' (at {where}) is an empty list: no value could match")
    lengths = sorted({"minLength", "maxLength"} & schema.keys())
    shaped = sorted({"format", "pattern"} & schema.keys())
    if lengths and shaped:
        raise _refuse(param, f"'{lengths[0]}' together with '{shaped[0]}' (at {where}) is not supported by "
                      "structured outputs (the length would not be enforced)")
    ref = schema.get("$ref")
    if isinstance(ref, str) and not ref.startswith("#"):  # xgrammar would constrain nothing there
        raise _refuse(param, f"the $ref {ref[:64]!r} (at {where}) is not local; only references into this "
                      "schema ('#/$defs/...') are supported")
    for key in ("minItems", "maxItems", "minLength", "maxLength", "minProperties", "maxProperties"):
        if key in schema and not (isinstance(schema[key], int) and not isinstance(schema[key], bool)
                                  and schema[key] >= 0):
            raise _refuse(param, f"'{key}' (at {where}) must be a non-negative integer")
    required = schema.get("required")
    if isinstance(required, list) and schema.get("additionalProperties") is False and "patternProperties" not in schema:
        named = schema.get("properties") if isinstance(schema.get("properties"), dict) else {}
        unmet = [name for name in required if isinstance(name, str) and name not in named]
        if unmet:  # no object can satisfy it: xgrammar would answer {} rather than refuse
            raise _refuse(param, f"'required' names {unmet[0][:64]!r} (at {where}), which 'additionalProperties': "
                          "false forbids; list it in 'properties'")
    types = schema.get("type")
    if "multipleOf" in schema and not (types == "integer" or (isinstance(types, list) and "integer" in types
                                                              and "number" not in types)):
        raise _refuse(param, f"'multipleOf' (at {where}) is supported on integers only")


# lookarounds, which xgrammar 0.2.9 drops (^(?!a)[ab]{2}$ matched "ab")
_LOOKAROUND = re.compile(r"\(\?<?[=!]")


def _check_pattern(pattern: str, where: str, param: str) -> None:
    if _LOOKAROUND.search(pattern):
        raise _refuse(param, f"lookahead and lookbehind in a pattern (at {where}) are not supported by structured "
                      "outputs (they would not be enforced)")
    try:
        check_pattern_cost(pattern)
    except PatternTooComplexError as exc:
        raise _refuse(param, f"{exc} (at {where})") from None


def _escape(name: str) -> str:
    return str(name)[:64].replace("~", "~0").replace("/", "~1")


def _refuse(param: str, message: str) -> BadRequestError:
    return BadRequestError(message, param=param)


class GrammarCompilerBusyError(ServiceUnavailableError):
    """Every compile process is busy with other requests' compiles: the schema is not at fault."""

    code = "grammar_compiler_busy"

    def __init__(self, message: str):
        super().__init__(f"the grammar compiler is busy: {message}; retry shortly",
                         headers={"Retry-After": str(BUSY_RETRY_AFTER)})


class KeyCompileLimitError(RateLimitError):
    """The key already has its share of compiles queued or running."""

    code = "grammar_compile_limit"

    def __init__(self):
        super().__init__(f"this key already has {COMPILES_PER_KEY} schema compile(s) in progress (a schema "
                         "not compiled before); retry when it ends", headers={"Retry-After": str(BUSY_RETRY_AFTER)})


class _Job:
    """One compile, queued until a worker thread (hence a compile process) takes it. ``started``
    and ``abandoned`` change under ``Grammars._queue_lock``: a job is either taken by a worker or
    given up by its requests (past the queue's deadline), never both."""

    __slots__ = ("key", "deadline", "started", "abandoned", "future", "owner")

    def __init__(self, key: str, deadline: float, owner: str | None = None):
        self.key = key
        self.deadline = deadline  # loop time after which its requests stop waiting for a process
        self.started = False
        self.abandoned = False
        self.future: asyncio.Future | None = None
        self.owner = owner  # the key whose request submitted it (its compile share)


class _AbandonedError(Exception):
    """A worker reached a job its requests had given up waiting for."""


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
                 compile_timeout: float, workers: int = 2, max_grammar_bytes: int = MAX_GRAMMAR_BYTES,
                 cache_bytes: int = CACHE_BYTES, queue_timeout: float = COMPILE_QUEUE_SECONDS,
                 max_queued: int = MAX_QUEUED_COMPILES):
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.stop_token_ids = sorted(stop_token_ids)
        self.max_schema_bytes = max_schema_bytes
        self.compile_timeout = compile_timeout
        self.max_grammar_bytes = max_grammar_bytes
        self.cache_bytes = cache_bytes
        self.queue_timeout = queue_timeout
        self.max_queued = max_queued
        self._queue_lock = threading.Lock()
        self._queued = 0  # jobs submitted that no worker has taken yet (nor their requests given up)
        self._owned: collections.Counter[str] = collections.Counter()  # key -> its jobs not ended
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
        self._cache: collections.OrderedDict[str, _Job] = collections.OrderedDict()
        self._sizes: dict[str, int] = {}  # serialized bytes of the cached grammars compiled so far
        self.cached_bytes = 0  # their sum, kept under cache_bytes
        self.compiled = 0  # grammars compiled (cache misses), for tests and metrics

    async def constraint(self, schema: dict[str, Any] | None, param: str = "response_format",
                         owner: str | None = None) -> GrammarConstraint:
        """The grammar of a ``json_object`` (``schema`` None) or ``json_schema`` response format
        (or of a tool's parameters: ``param`` names where the schema came from); a bad or
        unsupported schema raises ``BadRequestError``. ``owner``: the requesting key, held to
        ``COMPILES_PER_KEY`` compiles at once (429 beyond)."""
        schema = {"type": "object"} if schema is None else schema
        key = self.check(schema, param)
        compiled = await self._compiled("json:" + key, param, owner)
        return GrammarConstraint(compiled, key, self._banned)

    def check(self, schema: dict[str, Any], param: str) -> str:
        """Refuse a schema over ``max_schema_bytes`` or with what structured outputs cannot enforce
        (``BadRequestError`` naming ``param``), without compiling it; return its cache key."""
        key = json.dumps(schema, separators=(",", ":"))  # property order kept: the answer follows it
        if len(key) > self.max_schema_bytes:
            raise _refuse(param, f"the schema is {len(key)} bytes; the limit is {self.max_schema_bytes}")
        check_schema(schema, param=param)
        return key

    async def structural_tag(self, tag: dict[str, Any], param: str = "tools",
                             owner: str | None = None) -> GrammarConstraint:
        """The grammar of an xgrammar structural tag (``gateway.tool_calls`` builds them; their
        schemas were checked one by one with ``check``), compiled once as a whole."""
        key = json.dumps(tag, separators=(",", ":"))
        compiled = await self._compiled("tag:" + key, param, owner)
        return GrammarConstraint(compiled, key, self._banned, self._token_bytes)

    async def _compiled(self, key: str, param: str, owner: str | None) -> Any:
        job = self._cache.get(key)
        if job is None or job.abandoned:
            job = self._submit(key, owner)  # concurrent requests with this grammar share one compilation
        else:
            self._cache.move_to_end(key)
        try:
            compiled, _ = await self._result(job)
            return compiled
        except CompileTimeoutError:
            raise _refuse(param, f"the schema took longer than {self.compile_timeout:g} s to compile; "
                                 "simplify it") from None
        except CompilerUnavailableError as exc:  # the server's trouble, not the schema's
            log.warning("grammar compiler unavailable: %s", exc)
            raise GrammarCompilerBusyError("a compile process could not start") from None
        except GrammarCompilerBusyError:
            raise
        except Exception as exc:  # noqa: BLE001 - xgrammar's refusal: an invalid or unsupported schema
            message = _XGRAMMAR_PREFIX.sub("", str(exc).strip().splitlines()[0] if str(exc).strip() else "")
            raise _refuse(param, f"the schema cannot be compiled: {message[:300]}") from None

    def _submit(self, key: str, owner: str | None) -> _Job:
        """Queue a compile of ``key`` for the next free worker, unless too many already wait or
        ``owner`` has its share of compiles already."""
        with self._queue_lock:
            if owner is not None and self._owned[owner] >= COMPILES_PER_KEY:
                raise KeyCompileLimitError()
            waiting = self._queued
            if waiting < self.max_queued:
                self._queued += 1
                if owner is not None:
                    self._owned[owner] += 1
        if waiting >= self.max_queued:
            log.warning("grammar compile refused: %d compiles already wait for a compile process", waiting)
            raise GrammarCompilerBusyError(f"{waiting} compiles are waiting for a compile process")
        job = _Job(key, asyncio.get_running_loop().time() + self.queue_timeout, owner)
        job.future = asyncio.ensure_future(asyncio.wrap_future(self._executor.submit(self._run, job)))
        self._cache[key] = job
        self._evict()
        job.future.add_done_callback(lambda _: self._settled(job))
        return job

    async def _result(self, job: _Job) -> tuple[Any, int]:
        """``job``'s grammar and size. Its requests wait for a worker to take it until its queue
        deadline (then 503: give it up unless a worker took it meanwhile); once taken, the compile
        process bounds its time. ``asyncio.wait``, not ``wait_for``: it neither cancels the shared
        compile nor confuses a ``CompileTimeoutError`` (a ``TimeoutError``) with its own timeout."""
        loop = asyncio.get_running_loop()
        if not job.started:  # read without the lock as a shortcut only; decided under it below
            await asyncio.wait([job.future], timeout=max(0.0, job.deadline - loop.time()))
            if not job.future.done():
                with self._queue_lock:
                    if not job.started and not job.abandoned:
                        job.abandoned = True
                        self._queued -= 1
                if job.abandoned:
                    job.future.cancel()  # the executor drops it too
                    if self._cache.get(job.key) is job:
                        del self._cache[job.key]
                    log.warning("grammar compile gave up: no compile process free within %g s", self.queue_timeout)
                    raise GrammarCompilerBusyError(f"no compile process was free within {self.queue_timeout:g} s")
        if not job.future.done():
            await asyncio.wait([job.future], timeout=self.compile_timeout + COMPILE_GRACE_SECONDS)
        if job.abandoned or job.future.cancelled():  # given up by another request sharing it
            raise GrammarCompilerBusyError(f"no compile process was free within {self.queue_timeout:g} s")
        if not job.future.done():  # a worker stuck past every bound: never expected
            log.error("a grammar compile ran past %g s", self.compile_timeout + COMPILE_GRACE_SECONDS)
            raise GrammarCompilerBusyError("a compile did not finish")
        return job.future.result()

    def _settled(self, job: _Job) -> None:
        """A compiled grammar counts its bytes against the cache's budget. A grammar that failed is
        compiled again when asked again, except one that ran out of time or came out too large: it
        would only take a compile process's time again."""
        key, future = job.key, job.future
        if job.owner is not None:
            with self._queue_lock:
                self._owned[job.owner] -= 1
                if self._owned[job.owner] <= 0:
                    del self._owned[job.owner]
        if self._cache.get(key) is not job:  # evicted while compiling, or given up
            return
        if future.cancelled() or (future.exception() is not None and not isinstance(
                future.exception(), (CompileTimeoutError, GrammarTooLargeError))):
            del self._cache[key]
        elif future.exception() is None:
            self._sizes[key] = future.result()[1]
            self.cached_bytes += self._sizes[key]
            self._evict()

    def _evict(self) -> None:
        """Drop least recently used grammars past CACHE_SIZE entries or cache_bytes (requests that
        hold one keep it)."""
        while len(self._cache) > CACHE_SIZE or (self.cached_bytes > self.cache_bytes and self._cache):
            key, _ = self._cache.popitem(last=False)
            self.cached_bytes -= self._sizes.pop(key, 0)

    def _run(self, job: _Job) -> tuple[Any, int]:  # worker thread
        with self._queue_lock:  # a worker (one per compile process) is free: the job leaves the queue
            if job.abandoned:
                raise _AbandonedError
            job.started = True
            self._queued -= 1
        return self._compile(job.key)

    def _compile(self, key: str) -> tuple[Any, int]:  # worker thread: the grammar and its serialized bytes
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
            serialized = process.compile(kind, text, self.compile_timeout, self.max_grammar_bytes)
        finally:
            self._processes.put(process)
        return xgrammar.CompiledGrammar.deserialize_json(serialized, self._info), len(serialized)

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
        for process in self._all_processes:
            process.close()
