"""OpenAI function calling: the request's ``tools``, ``tool_choice`` and ``parallel_tool_calls``
checked into a ``ToolSpec``, and the xgrammar structural tag that constrains generation to it.

Output format (README "Tools"): one ``<tool_call>{"name":NAME,"arguments":ARGS}</tool_call>``
block per call (``gateway.tool_parser`` reads it back), ARGS valid against the function's
``parameters`` schema:
- ``auto``: free text; once the text reaches ``<tool_call>`` the block is forced, with a
  declared name and schema-valid arguments (xgrammar's ``triggered_tags``);
- ``required`` / a named function: nothing but blocks, at least one (``tags_with_separator``);
- ``none``: no constraint, the output is plain text (tools are still shown in the prompt);
- ``parallel_tool_calls: false`` (and a named function): at most one block.
Every client-controlled size is bounded here and every refusal names its field
(``tools[3].function.parameters``); schemas go through ``gateway.structured`` one by one so that
an unsupported keyword is a 400 naming the tool.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, Literal

from gateway.errors import BadRequestError
from gateway.tool_parser import CLOSE, OPEN

NAME = re.compile(r"^[a-zA-Z0-9_-]{1,64}\Z")  # \Z: "$" also matches before a last newline
MAX_DESCRIPTION_CHARS = 8192
EMPTY_PARAMETERS = {"type": "object", "properties": {}, "additionalProperties": False}
# what an object schema may hold without naming its type (annotations included)
OBJECT_SCHEMA_KEYS = frozenset({
    "properties", "required", "additionalProperties", "patternProperties", "propertyNames", "minProperties",
    "maxProperties", "unevaluatedProperties", "$defs", "definitions", "$schema", "$id", "$comment", "title",
    "description", "default", "examples", "deprecated", "readOnly", "writeOnly"})
MAX_ARGUMENT_BLANKS = 1  # consecutive whitespace the grammar lets arguments hold (bounded output)
Choice = Literal["none", "auto", "required", "function"]


@dataclass(frozen=True)
class Function:
    name: str
    description: str | None
    parameters: dict[str, Any]  # a JSON schema of type object

    def definition(self) -> dict[str, Any]:
        """As OpenAI's ``tools[].function`` (what prompts show)."""
        out: dict[str, Any] = {"name": self.name}
        if self.description:
            out["description"] = self.description
        out["parameters"] = self.parameters
        return out


@dataclass(frozen=True)
class ToolSpec:
    functions: tuple[Function, ...]
    choice: Choice
    named: str | None = None  # the function ``tool_choice`` names
    parallel: bool = True

    @property
    def constrained(self) -> bool:
        """Generation follows the tool-call grammar (and the answer is read for calls)."""
        return self.choice != "none" and bool(self.functions)

    def callable(self) -> tuple[Function, ...]:
        return tuple(f for f in self.functions if self.named in (None, f.name))

    def structural_tag(self) -> dict[str, Any]:
        """The xgrammar structural tag (``Grammars.structural_tag``) for this choice."""
        tags = [{"type": "tag", "begin": f"{OPEN}{{\"name\":{json.dumps(f.name)},\"arguments\":",
                 "content": {"type": "json_schema", "json_schema": f.parameters,
                             "max_whitespace_cnt": MAX_ARGUMENT_BLANKS},
                 "end": "}" + CLOSE} for f in self.callable()]
        one = self.choice == "function" or not self.parallel
        if self.choice == "auto":
            fmt = {"type": "triggered_tags", "triggers": [OPEN], "tags": tags, "stop_after_first": one}
        else:
            fmt = {"type": "tags_with_separator", "tags": tags, "separator": "", "at_least_one": True,
                   "stop_after_first": one}
        return {"type": "structural_tag", "format": fmt}


def _bad(message: str, param: str) -> BadRequestError:
    return BadRequestError(message, param=param)


def parse_tools(tools: list[Any] | None, tool_choice: Any, parallel_tool_calls: bool | None, *,
                max_tools: int, max_schema_bytes: int) -> ToolSpec | None:
    """The request's tools, checked; None when it has none (and asks for none)."""
    if not tools:
        if tool_choice not in (None, "none", "auto"):
            raise _bad("tool_choice needs tools", "tool_choice")
        return None
    if len(tools) > max_tools:
        raise _bad(f"{len(tools)} tools; the limit is {max_tools}", "tools")
    functions = tuple(_function(tool, i, max_schema_bytes) for i, tool in enumerate(tools))
    names = [f.name for f in functions]
    for i, name in enumerate(names):
        if name in names[:i]:
            raise _bad(f"the function name '{name}' is declared twice", f"tools[{i}].function.name")
    choice, named = _choice(tool_choice, set(names))
    return ToolSpec(functions, choice, named, True if parallel_tool_calls is None else bool(parallel_tool_calls))


def _function(tool: Any, i: int, max_schema_bytes: int) -> Function:
    where = f"tools[{i}]"
    if not isinstance(tool, dict) or tool.get("type") != "function":
        raise _bad("each tool must be an object of type 'function'", f"{where}.type")
    fn = tool.get("function")
    if not isinstance(fn, dict):
        raise _bad("a function tool needs a 'function' object", f"{where}.function")
    name = fn.get("name")
    if not isinstance(name, str) or not NAME.match(name):
        raise _bad("function names must match ^[a-zA-Z0-9_-]{1,64}$", f"{where}.function.name")
    description = fn.get("description")
    if description is not None and (not isinstance(description, str) or len(description) > MAX_DESCRIPTION_CHARS):
        raise _bad(f"a function description must be a string of at most {MAX_DESCRIPTION_CHARS} characters",
                   f"{where}.function.description")
    strict = fn.get("strict")
    if strict is not None and not isinstance(strict, bool):  # always enforced, whatever it says
        raise _bad("strict must be a boolean", f"{where}.function.strict")
    parameters = fn.get("parameters")
    param = f"{where}.function.parameters"
    if parameters is None:
        parameters = EMPTY_PARAMETERS  # OpenAI: no parameters is an empty parameter list
    if not isinstance(parameters, dict):
        raise _bad("parameters must be a JSON schema object", param)
    if parameters.get("type", "object") != "object":
        raise _bad(f"parameters must be a JSON schema of type 'object', got {str(parameters.get('type'))[:40]!r}",
                   param)
    if "type" not in parameters:
        # without it the grammar would take {"enum": [1, 2]} or {"anyOf": [...]} for what the
        # arguments are: a call with "arguments": "1", which this gateway then refuses in history
        other = sorted(set(parameters) - OBJECT_SCHEMA_KEYS)
        if other:
            raise _bad(f"parameters must describe an object: without \"type\": \"object\" they may hold only object "
                       f"keywords, and '{str(other[0])[:40]}' is not one", param)
        parameters = {"type": "object", **parameters}
    size = len(json.dumps(parameters, separators=(",", ":")))
    if size > max_schema_bytes:
        raise _bad(f"the schema is {size} bytes; the limit is {max_schema_bytes}", param)
    return Function(name, description, parameters)


def _choice(tool_choice: Any, names: set[str]) -> tuple[Choice, str | None]:
    if tool_choice is None:
        return "auto", None
    if tool_choice in ("none", "auto", "required"):
        return tool_choice, None
    if isinstance(tool_choice, dict) and tool_choice.get("type") == "function":
        fn = tool_choice.get("function")
        name = fn.get("name") if isinstance(fn, dict) else None
        if not isinstance(name, str):
            raise _bad("a named tool_choice needs function.name", "tool_choice.function.name")
        if name not in names:
            raise _bad(f"tool_choice names the function '{name[:64]}', which is not in tools",
                       "tool_choice.function.name")
        return "function", name
    raise _bad("tool_choice must be 'none', 'auto', 'required' or "
               "{\"type\": \"function\", \"function\": {\"name\": ...}}", "tool_choice")
