"""The JSON schemas of the structured-output benchmark (``loadtest.structured_bench``), each with
the chat prompt it is asked with. Every string is length-bounded or has a fixed format and every
array has ``maxItems``, so a grammar-constrained answer always fits in the benchmark's
``max_tokens``; together they cover nested objects, arrays with min/max items, enums, required and
optional fields, string formats, patterns, bounded numbers, ``anyOf``, ``$ref`` and tuples.

``tests/unit/test_structured_schemas.py`` compiles every one of them with the gateway's schema
compiler, so a schema the gateway stops supporting fails CI before it fails a benchmark run."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class BenchSchema:
    name: str  # also the response_format's json_schema name (letters, digits, _ and -)
    prompt: str
    schema: dict[str, Any]


def _obj(properties: dict[str, Any], required: list[str] | None = None, **extra: Any) -> dict[str, Any]:
    """An object schema that allows no other keys (as OpenAI's strict mode asks)."""
    return {"type": "object", "properties": properties,
            "required": list(properties) if required is None else required,
            "additionalProperties": False, **extra}


def _str(max_length: int = 24, **extra: Any) -> dict[str, Any]:
    return {"type": "string", "minLength": 1, "maxLength": max_length, **extra}


SCHEMAS: list[BenchSchema] = [
    BenchSchema("person", "Describe a fictional person as JSON with a name and an age.",
                _obj({"name": _str(), "age": {"type": "integer", "minimum": 0, "maximum": 120}})),
    BenchSchema("city_enum", "Name the capital of France as JSON.",
                _obj({"city": _str(), "country": {"enum": ["France", "Germany", "Italy", "Spain"]}})),
    BenchSchema("sentiment", "Classify the sentiment of 'I love this phone' as JSON.",
                _obj({"label": {"enum": ["positive", "negative", "neutral"]},
                      "confidence": {"type": "number", "minimum": 0, "maximum": 1}})),
    BenchSchema("address_nested", "Give a postal address of a museum as JSON.",
                _obj({"museum": _str(32),
                      "address": _obj({"street": _str(32), "city": _str(),
                                       "zip": {"type": "string", "pattern": "^[0-9]{5}$"}})})),
    BenchSchema("deep_nesting", "Describe a company with its CEO and the CEO's home city as JSON.",
                _obj({"company": _obj({"name": _str(), "ceo": _obj({"name": _str(),
                                                                     "home": _obj({"city": _str()})})})})),
    BenchSchema("tags_min_max", "List two to four tags for a blog post about cooking as JSON.",
                _obj({"tags": {"type": "array", "minItems": 2, "maxItems": 4, "items": _str(16)}})),
    BenchSchema("scores_bounded", "Give three exam scores between 0 and 100 as JSON.",
                _obj({"scores": {"type": "array", "minItems": 3, "maxItems": 3,
                                 "items": {"type": "integer", "minimum": 0, "maximum": 100}}})),
    BenchSchema("event_date", "When is the next team meeting? Answer as JSON with a date.",
                _obj({"title": _str(32), "date": {"type": "string", "format": "date"}})),
    BenchSchema("contact_email", "Give a contact name and email address for support as JSON.",
                _obj({"name": _str(), "email": {"type": "string", "format": "email"}})),
    BenchSchema("record_uuid", "Create a database record with an id and a status as JSON.",
                _obj({"id": {"type": "string", "format": "uuid"},
                      "status": {"enum": ["active", "archived", "deleted"]}})),
    BenchSchema("timestamp", "Log an event with a timestamp as JSON.",
                _obj({"event": _str(), "at": {"type": "string", "format": "date-time"}})),
    BenchSchema("clock_time", "At what time does the shop open? Answer as JSON.",
                _obj({"opens": {"type": "string", "format": "time"}})),
    BenchSchema("server_ip", "Describe a web server with its IPv4 address as JSON.",
                _obj({"host": _str(), "ip": {"type": "string", "format": "ipv4"},
                      "port": {"type": "integer", "minimum": 1, "maximum": 65535}})),
    BenchSchema("optional_fields", "Describe a book as JSON; the subtitle is optional.",
                _obj({"title": _str(32), "subtitle": _str(32), "pages": {"type": "integer", "minimum": 1,
                                                                         "maximum": 5000}},
                     required=["title", "pages"])),
    BenchSchema("price_exclusive", "Give the price of a coffee in euros as JSON.",
                _obj({"item": _str(), "price": {"type": "number", "exclusiveMinimum": 0, "maximum": 1000},
                      "currency": {"const": "EUR"}})),
    BenchSchema("order_items", "Write a shopping order with one to three items as JSON.",
                _obj({"order_id": {"type": "integer", "minimum": 1, "maximum": 999999},
                      "items": {"type": "array", "minItems": 1, "maxItems": 3,
                                "items": _obj({"product": _str(), "qty": {"type": "integer", "minimum": 1,
                                                                          "maximum": 99}})}})),
    BenchSchema("any_of_answer", "Is Paris in France? Answer as JSON.",
                _obj({"answer": {"anyOf": [{"type": "boolean"}, {"type": "null"},
                                           {"enum": ["yes", "no", "unknown"]}]}})),
    BenchSchema("ref_defs", "List up to two points on a grid as JSON.",
                {"type": "object", "properties": {"points": {"type": "array", "maxItems": 2,
                                                             "items": {"$ref": "#/$defs/point"}}},
                 "required": ["points"], "additionalProperties": False,
                 "$defs": {"point": _obj({"x": {"type": "integer", "minimum": -9, "maximum": 9},
                                          "y": {"type": "integer", "minimum": -9, "maximum": 9}})}}),
    BenchSchema("tuple_prefix", "Give a coordinate pair with a label as JSON.",
                _obj({"pair": {"type": "array", "prefixItems": [{"type": "number", "minimum": -90, "maximum": 90},
                                                                {"type": "number", "minimum": -180, "maximum": 180}],
                               "items": False, "minItems": 2, "maxItems": 2},
                      "label": _str()})),
    BenchSchema("pattern_code", "Give a flight with its code like AB12 as JSON.",
                _obj({"flight": {"type": "string", "pattern": "^[A-Z]{2}[0-9]{2,4}$"},
                      "gate": {"type": "string", "pattern": "^[A-H][0-9]$"}})),
    BenchSchema("boolean_flags", "Describe a user's settings as JSON.",
                _obj({"dark_mode": {"type": "boolean"}, "newsletter": {"type": "boolean"},
                      "language": {"enum": ["en", "fr", "de"]}})),
    BenchSchema("matrix", "Give a small matrix of integers as JSON.",
                _obj({"rows": {"type": "array", "minItems": 1, "maxItems": 2,
                               "items": {"type": "array", "minItems": 1, "maxItems": 3,
                                         "items": {"type": "integer", "minimum": -5, "maximum": 5}}}})),
    BenchSchema("top_level_array", "List up to three colors as a JSON array.",
                {"type": "array", "minItems": 1, "maxItems": 3, "items": {"enum": ["red", "green", "blue",
                                                                                 "yellow"]}}),
    BenchSchema("classification_multi", "Extract the intent and the entities of 'book a table for two in "
                "Rome tomorrow' as JSON.",
                _obj({"intent": {"enum": ["book_restaurant", "book_flight", "weather", "other"]},
                      "entities": {"type": "array", "maxItems": 3,
                                   "items": _obj({"type": {"enum": ["city", "date", "party_size"]},
                                                  "value": _str(16)})}})),
]
