"""Structured outputs (``response_format``) end to end on the tiny app, with the official
``openai`` SDK: ``chat.completions.parse`` with pydantic models returns parsed objects for the
base and every adapter kind, streamed answers parse too, every answer across several schemas
is schema-valid (checked by ``jsonschema``), constrained and free rows share batches, grammars
are compiled once per schema, and schemas we cannot enforce are refused naming the keyword."""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
from typing import Literal

import jsonschema
import openai
import pytest
from fastapi.testclient import TestClient
from pydantic import BaseModel, Field

from gateway.app import create_app
from gateway.errors import BadRequestError
from gateway.structured import Grammars, check_schema
from support import build_tokenizer
from test_api import ADAPTERS, MESSAGES, make_adapters, make_base, make_settings, sse_events
from test_api_errors import assert_error

MODELS = ["tiny", *ADAPTERS]


class Address(BaseModel):
    city: str = Field(max_length=6)
    country: Literal["fr", "de", "us"]


class Person(BaseModel):
    name: str = Field(max_length=8)
    age: int = Field(ge=0, le=120)
    tags: list[Literal["a", "b"]] = Field(max_length=3)
    address: Address
    active: bool


# bounded schemas (a random model must finish within max_tokens): nested objects, arrays, enums,
# required fields, string formats, anyOf, $ref
SCHEMAS = [
    Person.model_json_schema(),
    {"type": "object", "properties": {"when": {"type": "string", "format": "date"},
                                      "id": {"type": "string", "format": "uuid"}},
     "required": ["when", "id"], "additionalProperties": False},
    {"type": "object", "properties": {"grid": {"type": "array", "minItems": 1, "maxItems": 2,
                                               "items": {"type": "array", "maxItems": 2,
                                                         "items": {"type": "integer", "minimum": -5, "maximum": 5}}}},
     "required": ["grid"]},
    {"type": "object", "properties": {"v": {"anyOf": [{"type": "boolean"}, {"type": "null"},
                                                      {"enum": ["yes", "no"]}]}}, "required": ["v"]},
    {"type": "array", "items": {"$ref": "#/$defs/p"}, "maxItems": 2,
     "$defs": {"p": {"type": "object", "properties": {"x": {"type": "integer", "minimum": 0, "maximum": 9}},
                     "required": ["x"], "additionalProperties": False}}},
    {"type": "object", "properties": {"code": {"type": "string", "pattern": "^[A-Z]{2}[0-9]{2}$"},
                                      "ip": {"type": "string", "format": "ipv4"}},
     "required": ["code", "ip"], "additionalProperties": False},
]


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    root = tmp_path_factory.mktemp("structured")
    adapters_dir = make_adapters(root, len(build_tokenizer()))
    settings = make_settings(root, adapters_dir, max_body_bytes=65536, max_schema_bytes=4096,
                             max_tokens_limit=256)
    with TestClient(create_app(settings, base=make_base(build_tokenizer()))) as c:
        yield c


@pytest.fixture(scope="module")
def sdk(client) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{client.base_url}/v1", api_key="unused", http_client=client, max_retries=0)


def schema_format(schema: dict, name: str = "answer") -> dict:
    return {"type": "json_schema", "json_schema": {"name": name, "schema": schema, "strict": True}}


@pytest.mark.parametrize("model", MODELS)
def test_sdk_parse_returns_a_parsed_object_for_every_kind(sdk, model):
    for seed in range(2):
        completion = sdk.chat.completions.parse(model=model, messages=MESSAGES, response_format=Person,
                                                max_tokens=200, temperature=1.0, seed=seed)
        choice = completion.choices[0]
        assert choice.finish_reason == "stop"
        assert isinstance(choice.message.parsed, Person)
        assert Person.model_validate_json(choice.message.content) == choice.message.parsed


@pytest.mark.parametrize("model", ["tiny", "pt-a"])
def test_streamed_structured_output_parses(sdk, model):
    with sdk.chat.completions.stream(model=model, messages=MESSAGES, response_format=Person, max_tokens=200,
                                     temperature=1.0, seed=5) as stream:
        final = stream.get_final_completion()
    assert isinstance(final.choices[0].message.parsed, Person)


def test_every_answer_is_schema_valid_across_schemas(client):
    """Chat and completions, the base and each adapter, sampled, all sent at once (constrained rows
    of many schemas share the engine's batches): every answer validates."""
    jobs = []
    for i, schema in enumerate(SCHEMAS):
        fmt = schema_format(schema, f"s{i}")
        for model in MODELS:
            jobs.append((schema, "/v1/chat/completions", {"model": model, "messages": MESSAGES, "n": 2}))
            jobs.append((schema, "/v1/completions", {"model": model, "prompt": "answer:"}))
        for job in jobs[-2 * len(MODELS):]:
            job[2].update(response_format=fmt, max_tokens=200, temperature=1.0, seed=i)

    def send(job):
        choices = client.post(job[1], json=job[2]).json()["choices"]
        return [(c["finish_reason"], c["message"]["content"] if "message" in c else c["text"]) for c in choices]

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        results = list(pool.map(send, jobs))
    answers = 0
    for (schema, _, _), choices in zip(jobs, results, strict=True):
        for reason, output in choices:
            assert reason == "stop", (schema, output)
            jsonschema.validate(json.loads(output), schema)
            answers += 1
    assert answers == len(SCHEMAS) * len(MODELS) * 3


def test_json_object_gives_an_object(client):
    for model in MODELS:
        body = client.post("/v1/chat/completions", json={
            "model": model, "messages": MESSAGES, "response_format": {"type": "json_object"},
            "max_tokens": 48, "temperature": 0}).json()
        choice = body["choices"][0]
        if choice["finish_reason"] == "stop":  # a free-form object may run to max_tokens
            assert isinstance(json.loads(choice["message"]["content"]), dict)
        else:
            assert choice["message"]["content"].startswith("{")


def test_streamed_completion_with_schema_is_valid(client):
    schema = SCHEMAS[2]
    events = sse_events(client.post("/v1/completions", json={
        "model": "ia3-a", "prompt": "answer:", "response_format": schema_format(schema), "max_tokens": 200,
        "temperature": 1.0, "seed": 3, "stream": True}))
    text = "".join(c["text"] for e in events[:-1] for c in e["choices"])
    jsonschema.validate(json.loads(text), schema)


def test_constrained_and_free_rows_in_one_batch_equal_alone(client):
    """Concurrent constrained, free and logprob rows of different adapters (one engine batch)
    give what each gives alone (greedy)."""
    requests = [
        ("/v1/chat/completions", {"model": "lora-a", "messages": MESSAGES, "response_format": schema_format(SCHEMAS[0])}),
        ("/v1/chat/completions", {"model": "tiny", "messages": MESSAGES}),
        ("/v1/completions", {"model": "pt-a", "prompt": "go:", "response_format": schema_format(SCHEMAS[4])}),
        ("/v1/chat/completions", {"model": "ia3-a", "messages": MESSAGES, "logprobs": True, "top_logprobs": 2}),
        ("/v1/completions", {"model": "tiny", "prompt": "go:", "response_format": {"type": "json_object"},
                             "frequency_penalty": 1.0}),
    ]

    def send(path, body):
        return client.post(path, json={**body, "max_tokens": 48, "temperature": 0}).json()["choices"][0]

    alone = [send(path, body) for path, body in requests]

    async def together():
        return await asyncio.gather(*(asyncio.to_thread(send, path, body) for path, body in requests))

    batched = asyncio.run(together())
    for got, want in zip(batched, alone, strict=True):
        assert got["finish_reason"] == want["finish_reason"]
        assert got.get("message", got).get("content", got.get("text")) == want.get("message", want).get(
            "content", want.get("text"))
        if got.get("logprobs"):
            values = [e["logprob"] for e in got["logprobs"]["content"]]
            assert values == pytest.approx([e["logprob"] for e in want["logprobs"]["content"]], rel=1e-4)


def test_grammars_are_compiled_once_per_schema(client):
    grammars = client.app.state.gateway.service.grammars
    schema = {"type": "object", "properties": {"k": {"enum": ["unique-to-this-test"]}}, "required": ["k"]}
    before = grammars.compiled
    for _ in range(3):
        body = client.post("/v1/completions", json={"model": "tiny", "prompt": "x", "max_tokens": 32,
                                                    "response_format": schema_format(schema)}).json()
        assert json.loads(body["choices"][0]["text"]) == {"k": "unique-to-this-test"}
    assert grammars.compiled == before + 1


def nested_unions(depth: int, width: int) -> dict:
    """``width`` identical alternatives, arrays of the same, ``depth`` times (the audit's amb_compact):
    xgrammar follows all of them at once; 2 wide 7 deep cost 10-16 ms a token, and 17 MB compiled."""
    schema: dict = {"anyOf": [{"type": "string"}] * width}
    for _ in range(depth):
        schema = {"anyOf": [{"items": schema}] * width}
    return schema


@pytest.mark.parametrize("schema, named", [
    ({"type": "array", "uniqueItems": True}, "uniqueItems"),
    ({"type": "object", "properties": {"a": {"not": {"type": "string"}}}}, "not"),
    ({"type": "integer", "if": {"minimum": 1}, "then": {"maximum": 3}}, "if"),
    ({"allOf": [{"type": "integer"}, {"minimum": 2}]}, "allOf"),
    ({"type": "string", "format": "idn-email"}, "idn-email"),
    ({"type": "string", "format": "uri-template"}, "uri-template"),  # ~10 ms a token to follow
    ({"type": "object", "dependentRequired": {"a": ["b"]}}, "dependentRequired"),
    ({"type": "object", "properties": {"a": {"$ref": "#/$defs/missing"}}}, "missing"),
    ({"type": "object", "properties": []}, "properties"),
    ({"type": "stringy"}, "stringy"),
    # accepted by xgrammar 0.2.9 but not enforced (it logs a warning, or builds an any-JSON grammar)
    ({"type": "object", "properties": {"e": {"type": "string", "format": "email", "maxLength": 20}}}, "maxLength"),
    ({"type": "string", "pattern": "^a+$", "minLength": 2}, "minLength"),
    ({"type": "object", "properties": {"x": {"type": "number", "multipleOf": 0.5}}}, "multipleOf"),
    ({"type": "object", "properties": {"n": {"minimum": 3}}, "required": ["n"]}, "minimum"),
    ({"type": "object", "properties": {"e": {"format": "email"}}}, "format"),
    ({"required": ["a"]}, "required"),
    # patterns whose grammar would take minutes to compile or to follow (gateway.pattern_cost)
    ({"type": "string", "pattern": "((a|aa){1,30}){1,30}b"}, "/pattern"),
    ({"type": "object", "properties": {"a": {"type": "string", "pattern": "[a-z]{1,20000}"}}}, "/properties/a/pattern"),
    ({"type": "object", "patternProperties": {"(.|..){1,100}": {"type": "integer"}}}, "/patternProperties/"),
    # accepted by xgrammar but constraining nothing, or unsatisfiable (it answered {} for the last)
    ({"$ref": "https://example.com/schema.json"}, "is not local"),
    ({"type": "array", "items": {"type": "integer"}, "minItems": -5}, "minItems"),
    ({"type": "object", "required": ["x"], "additionalProperties": False}, "'x'"),
    # accepted by xgrammar 0.2.9, not enforced: it answered [] / "ab" / "a" / 1 / true for these
    ({"type": "array", "items": {"type": "integer"}, "contains": {"type": "integer"}}, "contains"),
    ({"type": "string", "pattern": "^(?!a)[ab]{2}$"}, "lookahead"),
    ({"type": "string", "enum": ["a", "bbbb"], "minLength": 3}, "'minLength' next to 'enum'"),
    ({"type": "integer", "const": 1, "minimum": 10}, "'minimum' next to 'const'"),
    ({"type": "object", "properties": {"a": {"type": []}}, "required": ["a"]}, "'type' (at /properties/a)"),
    ({"anyOf": []}, "'anyOf' (at /) is an empty list"),
    # a union of bounded strings: xgrammar follows each one's automaton (480 of them: ~10 ms a token)
    ({"type": "object", "properties": {"a": {"anyOf": [{"type": "string", "maxLength": 8 + i} for i in range(40)]}}},
     "multiply to 40"),
    # unions whose alternatives multiply: every token would cost milliseconds on the engine thread
    ({"type": "object", "properties": {"a": nested_unions(5, 2)}},
     "/properties/a/anyOf/0/items/anyOf/0/items/anyOf/0/items/anyOf/0/items"),
])
def test_unsupported_schemas_are_a_400_naming_the_feature(client, schema, named):
    for path, body in (("/v1/chat/completions", {"messages": MESSAGES}), ("/v1/completions", {"prompt": "x"})):
        error = assert_error(client.post(path, json={"model": "tiny", **body, "response_format": schema_format(schema)}),
                             400, param="response_format")
        assert named in error["message"]


@pytest.mark.parametrize("pattern", ["^\\n$", "^[\\x00-\\x1f]+$", "[^\\s\\S]"])
@pytest.mark.parametrize("stream", [False, True])
def test_a_pattern_no_token_can_write_is_a_400_not_a_500(client, pattern, stream):
    """Strings may not hold raw control characters, so a pattern only they match (or one nothing
    matches) leaves no token after the opening quote: a 400 naming the grammar, not a 500
    blaming the adapter; in a stream, the same error as its last event."""
    body = {"model": "tiny", "messages": MESSAGES, "max_tokens": 20, "stream": stream,
            "response_format": schema_format({"type": "string", "pattern": pattern})}
    answer = client.post("/v1/chat/completions", json=body)
    if not stream:
        error = assert_error(answer, 400)
    else:
        assert answer.status_code == 200
        error = [e for e in sse_events(answer) if "error" in e][-1]["error"]
        assert error["type"] == "invalid_request_error"
    assert error["code"] == "grammar_dead_end" and "allows no token" in error["message"]


def test_unions_of_formats_pass():
    check_schema({"type": "object", "properties": {"when": {"anyOf": [
        {"type": "string", "format": "date"}, {"type": "string", "format": "date-time"}, {"type": "null"}]}}})


def test_response_format_refusals(client):
    base = {"model": "tiny", "messages": MESSAGES}
    post = lambda fmt: client.post("/v1/chat/completions", json={**base, "response_format": fmt})  # noqa: E731
    assert_error(post({"type": "json_schema"}), 400)  # no json_schema
    assert_error(post({"type": "xml"}), 400)
    assert_error(post({"type": "json_schema", "json_schema": {"name": "bad name!", "schema": {}}}), 400)
    deep: dict = {"type": "integer"}
    for _ in range(40):
        deep = {"type": "array", "items": deep}
    assert_error(post(schema_format(deep)), 400, param="response_format")
    big = {"type": "object", "properties": {f"p{i}": {"type": "integer"} for i in range(400)}}
    error = assert_error(post(schema_format(big)), 400, param="response_format")
    assert "limit" in error["message"]


def test_unions_that_multiply_are_refused_naming_where():
    with pytest.raises(BadRequestError, match="/anyOf/0/items/anyOf/0/items/anyOf/0/items/anyOf/0/items multiply to 32"):
        check_schema(nested_unions(7, 2))
    with pytest.raises(BadRequestError, match="/anyOf/0/items multiply to 25"):
        check_schema(nested_unions(2, 5))
    check_schema(nested_unions(4, 2))  # 16: under a millisecond a token
    check_schema(nested_unions(1, 16))
    # followed through $refs, and through a recursion that multiplies on each pass
    defs = {"l0": {"anyOf": [{"type": "string"}] * 2}}
    for d in range(1, 8):
        defs[f"l{d}"] = {"anyOf": [{"type": "array", "items": {"$ref": f"#/$defs/l{d - 1}"}}] * 2}
    with pytest.raises(BadRequestError, match="/[$]defs/l3 multiply to 32"):
        check_schema({"$defs": defs, "$ref": "#/$defs/l7"})
    with pytest.raises(BadRequestError, match="/[$]defs/v multiply"):
        check_schema({"$defs": {"v": {"anyOf": [{"items": {"$ref": "#/$defs/v"}}] * 2}}, "$ref": "#/$defs/v"})


def test_everyday_unions_pass():
    """Nullable fields (a type list or anyOf with null) at any depth, unions of a few objects, enums
    spelled as unions of consts, recursive trees: their alternatives start differently, or are scalars."""
    nullable: dict = {"type": ["string", "null"]}
    for _ in range(8):
        nullable = {"anyOf": [{"type": "object", "properties": {"a": nullable, "n": {"type": ["integer", "null"]}},
                               "required": ["a"]}, {"type": "null"}]}
    check_schema(nullable)
    shape = {"anyOf": [{"type": "object", "properties": {"kind": {"const": k}, "x": {"anyOf": [{"type": "number"},
                                                                                               {"type": "null"}]}},
                        "required": ["kind", "x"]} for k in "abcdefgh"]}
    check_schema({"type": "object", "properties": {"shapes": {"type": "array", "items": shape},
                                                   "first": {"anyOf": [shape, {"type": "null"}]}}})
    check_schema({"anyOf": [{"const": f"v{i}", "description": "one choice"} for i in range(300)]})
    tree = {"$defs": {"node": {"type": "object", "properties": {
        "value": {"anyOf": [{"type": "string"}, {"type": "integer"}, {"type": "null"}]},
        "children": {"type": "array", "items": {"$ref": "#/$defs/node"}}}}}, "$ref": "#/$defs/node"}
    check_schema(tree)
    json_value = {"$defs": {"v": {"anyOf": [{"type": ["string", "number", "boolean", "null"]},
                                            {"type": "array", "items": {"$ref": "#/$defs/v"}},
                                            {"type": "object", "additionalProperties": {"$ref": "#/$defs/v"}}]}},
                  "$ref": "#/$defs/v"}
    check_schema(json_value)

    class Item(BaseModel):
        name: str
        price: float | None = None
        tags: list[str] | None = None

    class Order(BaseModel):
        items: list[Item]
        gift: Item | None = None
        note: str | int | None = None

    check_schema(Order.model_json_schema())


def test_schemas_whose_refs_expand_too_far_are_refused_quickly():
    chain = {f"d{k}": {"$ref": f"#/$defs/d{k + 1}"} for k in range(200)}
    with pytest.raises(BadRequestError, match="through [$]refs"):
        check_schema({"$defs": chain, "$ref": "#/$defs/d0"})
    dag = {"d0": {"type": "object", "properties": {"x": {"type": "string"}}}}
    for k in range(1, 40):  # 2**40 paths, each walked once
        dag[f"d{k}"] = {"type": "object", "properties": {"a": {"$ref": f"#/$defs/d{k - 1}"},
                                                        "b": {"$ref": f"#/$defs/d{k - 1}"}}}
    check_schema({"$defs": dag, "$ref": "#/$defs/d39"})


def test_the_cache_keeps_grammars_by_bytes_least_recently_used_first(monkeypatch):
    grammars = Grammars(None, 10, [0], max_schema_bytes=4096, compile_timeout=5, cache_bytes=100)
    sizes = {"a": 40, "b": 40, "c": 40, "huge": 500}
    name = lambda key: json.loads(key.partition(":")[2])["properties"]["k"]["const"]  # noqa: E731
    monkeypatch.setattr(grammars, "_compile", lambda key: (object(), sizes[name(key)]))  # fake compiled grammars
    cached = lambda: ([name(key) for key in grammars._cache], grammars.cached_bytes)  # noqa: E731, SLF001

    async def scenario() -> None:
        for k in "ab":
            await grammars.constraint({"type": "object", "properties": {"k": {"const": k}}})
        assert cached() == (["a", "b"], 80)
        for k in "ac":  # a used again: b is the least recently used, dropped for c
            await grammars.constraint({"type": "object", "properties": {"k": {"const": k}}})
        assert cached() == (["a", "c"], 80)
        await grammars.constraint({"type": "object", "properties": {"k": {"const": "huge"}}})
        assert cached() == ([], 0)  # over the whole budget: the request had it, the cache keeps nothing

    asyncio.run(scenario())
    assert grammars.compiled == 0  # the fake compile counts nothing


def test_check_schema_walks_subschemas_only():
    """Property names that look like keywords are names, not keywords."""
    check_schema({"type": "object", "properties": {"not": {"type": "string"}, "if": {"type": "integer"}}})
    with pytest.raises(BadRequestError, match="/properties/a/items"):
        check_schema({"type": "object", "properties": {"a": {"type": "array", "items": {"not": {}}}}})


def test_keywords_enforced_where_xgrammar_infers_the_type_pass():
    """``properties`` makes an object and ``items`` an array for xgrammar: their siblings are
    enforced without a ``type``; so is ``multipleOf`` on integers (with or without bounds)."""
    check_schema({"properties": {"a": {"type": "integer"}}, "required": ["a"], "additionalProperties": False})
    check_schema({"items": {"type": "integer"}, "maxItems": 2})
    check_schema({"type": "integer", "minimum": 0, "maximum": 100, "multipleOf": 5})
    check_schema({"type": ["integer", "null"], "multipleOf": 3})
    check_schema({"type": "string", "format": "date"})
    check_schema({"type": "string", "pattern": "^[a-z]{1,8}$"})


@pytest.mark.parametrize("schema, bad", [
    ({"type": "string", "format": "email", "maxLength": 12}, '"abcdefghij@klmnop.com"'),
    ({"type": "number", "minimum": 0, "maximum": 1, "multipleOf": 0.25}, "0.3"),
    ({"minimum": 3}, "1"),
])
def test_xgrammar_still_ignores_what_check_schema_refuses(tiny_tokenizer, schema, bad):
    """Pins the reason for each refusal: compiled alone, xgrammar accepts a whole answer the
    schema forbids. When an xgrammar upgrade enforces one of these, this fails and the refusal
    in ``check_schema`` can go."""
    import xgrammar

    eos = tiny_tokenizer.convert_tokens_to_ids("<|im_end|>")
    info = xgrammar.TokenizerInfo.from_huggingface(tiny_tokenizer, vocab_size=320, stop_token_ids=[eos])
    compiled = xgrammar.GrammarCompiler(info, max_threads=1, cache_enabled=False).compile_json_schema(
        json.dumps(schema), any_whitespace=False, strict_mode=True)
    assert not jsonschema.Draft202012Validator(schema).is_valid(json.loads(bad))
    matcher = xgrammar.GrammarMatcher(compiled)
    assert all(matcher.accept_token(t) for t in tiny_tokenizer.encode(bad, add_special_tokens=False))
    assert matcher.accept_token(eos) and matcher.is_terminated()
