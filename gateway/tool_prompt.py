"""A chat with tools, as the chat template gets it.

Two renderings:
- **the template's own** (``native``: its source uses the ``tools`` variable, as Hermes, Qwen or
  Llama 3.1 templates do): tools go to ``apply_chat_template(tools=...)``, assistant calls as
  ``tool_calls`` (arguments as objects) and results as ``role: "tool"`` messages, following
  transformers' tool-use conventions;
- **the gateway's** (templates without tools, e.g. the embedded SmolLM2's; README "Tools"): the
  function definitions and how to call them go into the system message, an assistant's calls
  become ``<tool_call>{...}</tool_call>`` blocks of its text (the very form generation produces),
  and tool results become one user turn of ``<tool_response>`` blocks (consecutive results
  merged, so templates that insist on alternating turns still render).

Messages are checked on the way; every refusal names its field (``messages[3].tool_call_id``).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

from adapters.validate import json_depth
from gateway.errors import BadRequestError, surrogate_error, unpaired_surrogate
from gateway.protocol import ChatMessage, ContentError
from gateway.tool_calls import NAME, ToolSpec
from gateway.tool_parser import CLOSE, OPEN

CALL_ID = re.compile(r"^[A-Za-z0-9_.:-]{1,64}\Z")
MAX_CALLS_PER_MESSAGE = 128
# a call's arguments nest at most this deep: schemas nest at most 32 levels (gateway.structured), so
# arguments the gateway generated fit with room to spare
MAX_ARGUMENTS_DEPTH = 64
_TOOLS_WORD = re.compile(r"\btools\b")


def template_has_tools(tokenizer) -> bool:
    """The tokenizer's chat template renders tool definitions itself."""
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):
        template = template.get("tool_use") or template.get("default")
    return isinstance(template, str) and bool(_TOOLS_WORD.search(template))


def tools_preamble(spec: ToolSpec) -> str:
    """The gateway format's system text: the definitions, and how a call is written."""
    lines = [json.dumps(f.definition(), ensure_ascii=False) for f in spec.functions]
    return ("# Tools\n\nYou may call one or more functions to answer. The functions, as JSON schemas:\n<tools>\n"
            + "\n".join(lines) + "\n</tools>\n\nTo call a function, write one block per call:\n"
            + OPEN + '{"name": <function name>, "arguments": <arguments as a JSON object>}' + CLOSE)


@dataclass
class RenderedChat:
    messages: list[dict[str, Any]]
    tools: list[dict[str, Any]] | None = None  # for apply_chat_template (native rendering only)
    texts: list[str] = field(default_factory=list)  # every client text, for the size limits


def render_messages(messages: list[ChatMessage], spec: ToolSpec | None, native: bool) -> RenderedChat:
    out = RenderedChat([])
    calls: dict[str, str] = {}  # call id -> function name, from the assistant messages so far
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        try:
            text = message.text()
        except ContentError as exc:
            raise BadRequestError(str(exc), param=f"{where}.{exc.path}") from None
        out.texts.append(text)
        if message.tool_calls is not None and message.role != "assistant":
            raise BadRequestError("only assistant messages carry tool_calls", param=f"{where}.tool_calls")
        if message.role == "tool":
            _tool_result(out, message, text, calls, where, native)
        elif message.role == "assistant" and message.tool_calls:
            _assistant_calls(out, message, text, calls, where, native)
        else:
            if message.tool_call_id is not None:
                raise BadRequestError("only tool messages carry tool_call_id", param=f"{where}.tool_call_id")
            out.messages.append({"role": "system" if message.role == "developer" else message.role, "content": text})
    if spec is not None and spec.functions:
        if native:
            out.tools = [{"type": "function", "function": f.definition()} for f in spec.functions]
            out.texts.append(json.dumps(out.tools))
        else:
            preamble = tools_preamble(spec)
            out.texts.append(preamble)
            _add_system_text(out.messages, preamble)
    out.messages = [{k: v for k, v in m.items() if k != "tool_results"} for m in out.messages]
    return out


def _assistant_calls(out: RenderedChat, message: ChatMessage, text: str, calls: dict[str, str], where: str,
                     native: bool) -> None:
    if len(message.tool_calls) > MAX_CALLS_PER_MESSAGE:
        raise BadRequestError(f"{len(message.tool_calls)} tool calls; the limit is {MAX_CALLS_PER_MESSAGE}",
                              param=f"{where}.tool_calls")
    parsed = []
    for j, call in enumerate(message.tool_calls):
        at = f"{where}.tool_calls[{j}]"
        if not isinstance(call, dict) or call.get("type", "function") != "function":
            raise BadRequestError("a tool call must be an object of type 'function'", param=f"{at}.type")
        call_id, fn = call.get("id"), call.get("function")
        if not isinstance(call_id, str) or not CALL_ID.match(call_id):
            raise BadRequestError("a tool call id must match ^[A-Za-z0-9_.:-]{1,64}$", param=f"{at}.id")
        if any(earlier == call_id for earlier, _, _ in parsed):  # a result could not say which call it answers
            raise BadRequestError(f"the tool call id '{call_id}' is used twice in this message", param=f"{at}.id")
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not NAME.match(fn["name"]):
            raise BadRequestError("function names must match ^[a-zA-Z0-9_-]{1,64}$", param=f"{at}.function.name")
        arguments = fn.get("arguments")
        value = _arguments(arguments, f"{at}.function.arguments")
        calls[call_id] = fn["name"]
        out.texts.append(arguments)
        parsed.append((call_id, fn["name"], value))
    if native:
        out.messages.append({"role": "assistant", "content": text, "tool_calls": [
            {"id": call_id, "type": "function", "function": {"name": name, "arguments": value}}
            for call_id, name, value in parsed]})
        return
    blocks = "".join(OPEN + json.dumps({"name": name, "arguments": value}, separators=(",", ":"),
                                       ensure_ascii=False) + CLOSE for _, name, value in parsed)
    out.messages.append({"role": "assistant", "content": text + blocks})


def _arguments(arguments: Any, param: str) -> dict[str, Any]:
    """A call's ``arguments`` (a JSON object, as a string) parsed. Depth is bounded before parsing:
    the JSON parser, ``json.dumps`` and the chat templates recurse per level, so arguments nested
    5,000 deep raised RecursionError (a 500)."""
    if isinstance(arguments, str) and json_depth(arguments) > MAX_ARGUMENTS_DEPTH:
        raise BadRequestError(f"arguments nest arrays or objects deeper than {MAX_ARGUMENTS_DEPTH} levels",
                              param=param)
    try:
        value = json.loads(arguments) if isinstance(arguments, str) else None
    except ValueError:
        value = None
    if not isinstance(value, dict):
        raise BadRequestError("arguments must be a JSON object, as a string", param=param)
    # JSON inside a string: the body check (gateway.errors) saw a "\\ud800" here as plain text
    if "\\u" in arguments and unpaired_surrogate(value) is not None:
        raise surrogate_error(param)
    return value


def _tool_result(out: RenderedChat, message: ChatMessage, text: str, calls: dict[str, str], where: str,
                 native: bool) -> None:
    call_id = message.tool_call_id
    if call_id is None:
        raise BadRequestError("a tool message needs tool_call_id", param=f"{where}.tool_call_id")
    if call_id not in calls:
        raise BadRequestError(f"tool_call_id '{call_id[:64]}' answers no tool call of an earlier assistant message",
                              param=f"{where}.tool_call_id")
    name = calls[call_id]
    if native:
        out.messages.append({"role": "tool", "tool_call_id": call_id, "name": name, "content": text})
        return
    block = f'<tool_response name="{name}" id="{call_id}">\n{text}\n</tool_response>'
    last = out.messages[-1] if out.messages else None
    if last is not None and last.get("tool_results"):  # merge consecutive results into one turn
        last["content"] += "\n" + block
    else:
        out.messages.append({"role": "user", "content": block, "tool_results": True})


def _add_system_text(messages: list[dict[str, Any]], text: str) -> None:
    if messages and messages[0]["role"] == "system":
        messages[0]["content"] = (messages[0]["content"] + "\n\n" + text) if messages[0]["content"] else text
    else:
        messages.insert(0, {"role": "system", "content": text})

