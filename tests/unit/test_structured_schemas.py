"""The structured-output benchmark's schema list (``loadtest.structured_schemas``) stays usable:
every schema is valid JSON Schema, passes the gateway's check of enforceable keywords, compiles
to a grammar over a vocabulary within the default limits, and the list keeps covering what the
benchmark claims to measure. A schema that the gateway stops supporting fails here, in seconds,
rather than in a benchmark run on the real model."""

from __future__ import annotations

import asyncio
import re

import jsonschema
import pytest

from gateway.settings import Settings
from gateway.structured import Grammars, check_schema
from loadtest.structured_schemas import SCHEMAS

VOCAB = 320  # the tiny models' vocabulary width (tests/support.py), wider than the tokenizer's


def _keywords(schema, found: set[str]) -> set[str]:
    """Every key of every nested dict (property names included: a superset is enough here)."""
    if isinstance(schema, dict):
        for key, value in schema.items():
            found.add(key)
            if key == "format":
                found.add(f"format:{value}")
            _keywords(value, found)
    elif isinstance(schema, list):
        for value in schema:
            _keywords(value, found)
    return found


def test_the_list_has_twenty_distinct_named_schemas():
    names = [s.name for s in SCHEMAS]
    assert len(SCHEMAS) >= 20
    assert len(set(names)) == len(names)
    assert all(re.fullmatch(r"[A-Za-z0-9_-]{1,64}", n) for n in names)
    assert len({repr(s.schema) for s in SCHEMAS}) == len(SCHEMAS)


def test_the_list_covers_what_the_benchmark_reports():
    used = _keywords([s.schema for s in SCHEMAS], set())
    for keyword in ("properties", "required", "enum", "const", "minItems", "maxItems", "minimum", "maximum",
                    "exclusiveMinimum", "pattern", "anyOf", "$ref", "prefixItems", "additionalProperties",
                    "format:date", "format:email", "format:uuid", "format:date-time"):
        assert keyword in used, keyword
    nested = [s for s in SCHEMAS if any(isinstance(p, dict) and p.get("type") == "object"
                                        for p in s.schema.get("properties", {}).values())]
    assert len(nested) >= 2


@pytest.mark.parametrize("bench", SCHEMAS, ids=[s.name for s in SCHEMAS])
def test_every_schema_is_valid_and_enforceable(bench):
    jsonschema.Draft202012Validator.check_schema(bench.schema)
    check_schema(bench.schema)  # raises naming the first keyword the gateway cannot enforce


def test_every_schema_compiles_with_the_gateway_compiler(tiny_tokenizer):
    settings = Settings()
    grammars = Grammars(tiny_tokenizer, VOCAB, [tiny_tokenizer.convert_tokens_to_ids("<|im_end|>")],
                        max_schema_bytes=settings.max_schema_bytes,
                        compile_timeout=settings.grammar_compile_timeout_seconds)

    async def compile_all():
        return [await grammars.constraint(s.schema) for s in SCHEMAS]

    try:
        constraints = asyncio.run(compile_all())
    finally:
        grammars.close()
    assert grammars.compiled == len(SCHEMAS)
    for bench, constraint in zip(SCHEMAS, constraints, strict=True):
        state = constraint.matcher()  # a fresh answer may not end before it starts
        assert not state.is_terminated(), bench.name
