"""Function calling (``tools``) on the tiny app, with the official ``openai`` SDK: required and
named choices always give parsable calls whose arguments validate against their schema (base and
every adapter kind), ``auto`` constrains a call once it starts, ``none`` leaves text alone,
streamed ``delta.tool_calls`` reassemble, a call -> result -> answer round trip, tool rows share
batches with other rows, and every bad input is a 400 naming its field."""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import json

import jsonschema
import openai
import pytest
import torch
from fastapi.testclient import TestClient

from adapters.chat_template import render_chat
from gateway.app import create_app
from gateway.grammar_mask import mask_rows
from gateway.protocol import ChatMessage
from gateway.structured import Grammars
from gateway.tool_calls import parse_tools
from gateway.tool_parser import ToolCallParser
from gateway.tool_prompt import render_messages, template_has_tools
from support import build_tokenizer
from test_api import ADAPTERS, MESSAGES, make_adapters, make_base, make_settings, sse_events
from test_api_errors import assert_error

MODELS = ["tiny", *ADAPTERS]
WEATHER = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 6},
                                            "unit": {"enum": ["c", "f"]}},
           "required": ["city", "unit"], "additionalProperties": False}
ADD = {"type": "object", "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 99},
                                        "b": {"type": "array", "maxItems": 2, "items": {"type": "boolean"}}},
       "required": ["a", "b"], "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "the weather", "parameters": WEATHER}},
         {"type": "function", "function": {"name": "add", "parameters": ADD, "strict": True}}]
SCHEMAS = {"get_weather": WEATHER, "add": ADD}
EOS = 2  # the tiny tokenizer's <|im_end|>


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    root = tmp_path_factory.mktemp("tools")
    adapters_dir = make_adapters(root, len(build_tokenizer()))
    settings = make_settings(root, adapters_dir, max_body_bytes=65536, max_schema_bytes=2048,
                             max_tokens_limit=256, max_tools=4)
    # the tools' definitions make long prompts for this tokenizer: a wider window than make_base's
    base = dataclasses.replace(make_base(build_tokenizer()), context_window=2048)
    with TestClient(create_app(settings, base=base)) as c:
        yield c


@pytest.fixture(scope="module")
def sdk(client) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{client.base_url}/v1", api_key="unused", http_client=client, max_retries=0)


def assert_valid_calls(calls, names=("get_weather", "add")) -> None:
    assert calls
    for call in calls:
        assert call.id.startswith("call_") and call.type == "function"
        assert call.function.name in names
        jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])


@pytest.mark.parametrize("model", MODELS)
def test_required_and_named_always_give_valid_calls(sdk, model):
    """(A random model, free to call again, rarely stops calling: one call per answer here.)"""
    for seed in range(2):
        for choice, names in (("required", ("get_weather", "add")),
                              ({"type": "function", "function": {"name": "add"}}, ("add",))):
            completion = sdk.chat.completions.create(model=model, messages=MESSAGES, tools=TOOLS, tool_choice=choice,
                                                     parallel_tool_calls=False, max_tokens=200, temperature=1.0,
                                                     seed=seed)
            choice_ = completion.choices[0]
            assert choice_.finish_reason == "tool_calls", choice_
            assert choice_.message.content is None
            assert_valid_calls(choice_.message.tool_calls, names)
            if isinstance(choice, dict):  # a named function: exactly one call
                assert len(choice_.message.tool_calls) == 1


def test_parallel_calls_are_each_valid_and_false_gives_one_call(sdk):
    for seed in range(3):
        parallel = sdk.chat.completions.create(model="tiny", messages=MESSAGES, tools=TOOLS, tool_choice="required",
                                               max_tokens=120, temperature=1.0, seed=seed).choices[0]
        complete = parallel.message.tool_calls
        if parallel.finish_reason == "length":  # still calling when cut: the last call may be partial
            complete = complete[:-1]
        else:
            assert parallel.finish_reason == "tool_calls"
        if complete:
            assert_valid_calls(complete)
        single = sdk.chat.completions.create(model="tiny", messages=MESSAGES, tools=TOOLS, tool_choice="required",
                                             parallel_tool_calls=False, max_tokens=200, temperature=1.5, seed=seed)
        assert single.choices[0].finish_reason == "tool_calls"
        assert len(single.choices[0].message.tool_calls) == 1


def test_none_gives_text_and_auto_gives_text_or_valid_calls(sdk):
    for seed in range(3):
        none = sdk.chat.completions.create(model="lora-a", messages=MESSAGES, tools=TOOLS, tool_choice="none",
                                           max_tokens=16, temperature=1.0, seed=seed).choices[0]
        assert none.message.tool_calls is None and isinstance(none.message.content, str)
        assert none.finish_reason in ("stop", "length")
        auto = sdk.chat.completions.create(model="ia3-a", messages=MESSAGES, tools=TOOLS, max_tokens=16,
                                           temperature=1.0, seed=seed).choices[0]
        if auto.message.tool_calls:  # unlikely from a random model, but then it must be valid
            assert_valid_calls(auto.message.tool_calls)
        else:
            assert auto.finish_reason in ("stop", "length") and isinstance(auto.message.content, str)


@pytest.mark.parametrize("parallel", [True, False])
def test_auto_constrains_a_call_once_it_starts(parallel):
    """The auto grammar lets free text through (newlines included), and once the text reaches
    ``<tool_call>`` only a declared function with schema-valid arguments can follow."""
    tok = build_tokenizer()
    grammars = Grammars(tok, len(tok), [EOS], max_schema_bytes=4096, compile_timeout=60)
    spec = parse_tools(TOOLS, "auto", parallel, max_tools=4, max_schema_bytes=4096)

    async def compile_():
        return await grammars.structural_tag(spec.structural_tag())

    constraint = asyncio.run(compile_())
    generator = torch.Generator().manual_seed(7)
    for attempt in range(4):
        state = constraint.matcher()
        prefix = "hi\nthere <tool_call>"
        for token in tok.encode(prefix):
            assert state.accept_token(token)
        assert state.banned.numel() > 0  # inside the call: control characters banned
        ids = []
        for _ in range(200):
            logits = mask_rows(torch.randn(1, len(tok), generator=generator), [state])
            token = int(torch.multinomial(torch.softmax(logits, -1), 1, generator=generator))
            assert state.accept_token(token)
            if token == EOS:
                break
            ids.append(token)
        text = prefix + b"".join(constraint.token_bytes[t] for t in ids).decode("utf-8", "replace")
        parser = ToolCallParser()
        parser.feed(text)
        parser.finish()
        assert parser.content.startswith("hi\nthere ")
        call = parser.calls[0]
        jsonschema.validate(json.loads(call.arguments), SCHEMAS[call.name])
        if not parallel:  # one call, then only the end
            assert token == EOS and text.endswith("</tool_call>"), text
    free = constraint.matcher()
    assert free.banned.numel() == 0  # free text may hold newlines
    grammars.close()


def test_streamed_tool_calls_reassemble(client, sdk):
    with sdk.chat.completions.stream(model="pt-a", messages=MESSAGES, tools=TOOLS, tool_choice="required",
                                     parallel_tool_calls=False, max_tokens=200, temperature=1.0, seed=4) as stream:
        final = stream.get_final_completion()
    assert final.choices[0].finish_reason == "tool_calls"
    assert_valid_calls(final.choices[0].message.tool_calls)
    events = sse_events(client.post("/v1/chat/completions", json={
        "model": "tiny", "messages": MESSAGES, "tools": TOOLS, "tool_choice": {"type": "function", "function": {
            "name": "get_weather"}}, "max_tokens": 200, "temperature": 1.0, "seed": 4, "stream": True}))
    assert events[-1] == "[DONE]"
    deltas = [e["choices"][0] for e in events[:-1] if e["choices"]]
    calls = [d["delta"]["tool_calls"][0] for d in deltas if d["delta"].get("tool_calls")]
    assert calls[0]["index"] == 0 and calls[0]["id"].startswith("call_") and calls[0]["type"] == "function"
    assert calls[0]["function"] == {"name": "get_weather", "arguments": ""}
    assert all("id" not in c and "name" not in c["function"] for c in calls[1:])
    jsonschema.validate(json.loads("".join(c["function"]["arguments"] for c in calls)), WEATHER)
    assert deltas[-1]["finish_reason"] == "tool_calls"
    assert [d["finish_reason"] for d in deltas[:-1]] == [None] * (len(deltas) - 1)


def test_round_trip_call_result_answer(sdk, client):
    messages = [{"role": "user", "content": "What is the weather in Paris?"}]
    first = sdk.chat.completions.create(model="lora-a", messages=messages, tools=TOOLS, tool_choice="required",
                                        parallel_tool_calls=False, max_tokens=200, temperature=1.0, seed=1)
    assert first.choices[0].finish_reason == "tool_calls"
    call = first.choices[0].message.tool_calls[0]
    messages.append(first.choices[0].message.model_dump(exclude_none=True))
    messages.append({"role": "tool", "tool_call_id": call.id, "content": "sunny, 21 C"})
    # the end token pushed up: the random model answers at once (its text is junk, its end real)
    final = sdk.chat.completions.create(model="lora-a", messages=messages, tools=TOOLS, max_tokens=16,
                                        logit_bias={str(EOS): 100}, temperature=0)
    assert final.choices[0].finish_reason == "stop"
    assert final.choices[0].message.tool_calls is None
    # the call and its result are in the prompt, in the gateway's format (this template has no tools)
    ids = client.post("/tokenize", json={"model": "lora-a", "messages": messages}).json()["tokens"]
    prompt = build_tokenizer().decode(ids)
    arguments = json.dumps(json.loads(call.function.arguments), separators=(",", ":"))
    assert f'<tool_call>{{"name":"{call.function.name}","arguments":{arguments}}}</tool_call>' in prompt
    assert f'<tool_response name="{call.function.name}" id="{call.id}">\nsunny, 21 C\n</tool_response>' in prompt


def test_tool_rows_and_other_rows_in_one_batch_equal_alone(client):
    rows = [
        {"model": "lora-a", "messages": MESSAGES, "tools": TOOLS, "tool_choice": "required",
         "parallel_tool_calls": False, "max_tokens": 160},
        {"model": "tiny", "messages": MESSAGES},
        {"model": "ia3-a", "messages": MESSAGES, "tools": TOOLS, "max_tokens": 160,
         "tool_choice": {"type": "function", "function": {"name": "add"}}},
        {"model": "pt-a", "messages": MESSAGES, "response_format": {"type": "json_object"}},
        {"model": "tiny", "messages": MESSAGES, "tools": TOOLS, "tool_choice": "auto"},
    ]

    def send(body):
        choice = client.post("/v1/chat/completions", json={"max_tokens": 48, **body, "temperature": 0}).json()
        choice = choice["choices"][0]
        for call in choice["message"].get("tool_calls") or ():
            call.pop("id")  # drawn per answer
        return choice

    alone = [send(body) for body in rows]
    with concurrent.futures.ThreadPoolExecutor(len(rows)) as pool:
        together = list(pool.map(send, rows))
    assert together == alone
    assert alone[0]["finish_reason"] == alone[2]["finish_reason"] == "tool_calls"


BAD_TOOL = {"type": "function", "function": {"name": "ok", "parameters": {"type": "object"}}}


@pytest.mark.parametrize("extra, param, words", [
    ({"tools": [BAD_TOOL] * 5}, "tools", "limit"),
    ({"tools": [BAD_TOOL, {"type": "function", "function": {"name": "bad name"}}]}, "tools[1].function.name",
     "a-zA-Z0-9"),
    ({"tools": [{"type": "function", "function": {"name": "x" * 65}}]}, "tools[0].function.name", "64"),
    ({"tools": [BAD_TOOL, BAD_TOOL]}, "tools[1].function.name", "twice"),
    ({"tools": [{"type": "retrieval"}]}, "tools[0].type", "function"),
    ({"tools": [{"type": "function"}]}, "tools[0].function", "function"),
    ({"tools": [BAD_TOOL, {"type": "function", "function": {"name": "u", "parameters": {
        "type": "object", "properties": {"a": {"type": "array", "uniqueItems": True}}}}}]},
     "tools[1].function.parameters", "uniqueItems"),
    ({"tools": [{"type": "function", "function": {"name": "s", "parameters": {"type": "string"}}}]},
     "tools[0].function.parameters", "object"),
    ({"tools": [{"type": "function", "function": {"name": "r", "parameters": {
        "type": "object", "properties": {"a": {"$ref": "#/$defs/missing"}}}}}]}, "tools[0].function.parameters",
     "missing"),
    ({"tools": [{"type": "function", "function": {"name": "big", "parameters": {
        "type": "object", "properties": {f"p{i}": {"type": "integer"} for i in range(200)}}}}]},
     "tools[0].function.parameters", "limit"),
    ({"tools": [{"type": "function", "function": {"name": "p", "parameters": {
        "type": "object", "properties": {"a": {"type": "string", "pattern": "((a|aa){1,30}){1,30}"}}}}}]},
     "tools[0].function.parameters", "/properties/a/pattern"),
    ({"tools": [BAD_TOOL, {"type": "function", "function": {"name": "u", "parameters": {  # 5 x 5 alike alternatives
        "type": "object", "properties": {"a": {"anyOf": [{"items": {"anyOf": [{"items": {}}] * 5}}] * 5}}}}}]},
     "tools[1].function.parameters", "/properties/a/anyOf/0/items multiply to 25"),
    ({"tools": [{"type": "function", "function": {"name": "d", "description": "x" * 9000}}]},
     "tools[0].function.description", "8192"),
    ({"tools": [BAD_TOOL], "tool_choice": {"type": "function", "function": {"name": "nope"}}},
     "tool_choice.function.name", "nope"),
    ({"tool_choice": "required"}, "tool_choice", "tools"),
    ({"tools": [BAD_TOOL], "tool_choice": "sometimes"}, "tool_choice", ""),
    ({"tools": [BAD_TOOL], "response_format": {"type": "json_object"}}, "response_format", "tools"),
    # "$" matched before a last newline: the grammar then forced calls the parser never reads
    ({"tools": [{"type": "function", "function": {"name": "get\n"}}]}, "tools[0].function.name", "^[a-zA-Z0-9_-]"),
    # without a type, the arguments could be a scalar ("1"), which a round trip then refuses
    ({"tools": [{"type": "function", "function": {"name": "e", "parameters": {"enum": [1, 2]}}}]},
     "tools[0].function.parameters", "'enum' is not one"),
    ({"tools": [{"type": "function", "function": {"name": "e", "parameters": {"anyOf": [{"type": "string"}]}}}]},
     "tools[0].function.parameters", "'anyOf' is not one"),
])
def test_bad_tools_are_a_400_naming_the_field(client, extra, param, words):
    error = assert_error(client.post("/v1/chat/completions", json={"model": "tiny", "messages": MESSAGES, **extra}),
                         400, param=param)
    assert words in error["message"]


CALL = {"id": "call_1", "type": "function", "function": {"name": "add", "arguments": '{"a":1,"b":[]}'}}


@pytest.mark.parametrize("messages, param", [
    ([{"role": "user", "content": "x"}, {"role": "tool", "content": "r"}], "messages[1].tool_call_id"),
    ([{"role": "user", "content": "x"}, {"role": "assistant", "tool_calls": [CALL]},
      {"role": "tool", "tool_call_id": "call_2", "content": "r"}], "messages[2].tool_call_id"),
    ([{"role": "user", "content": "x"}, {"role": "assistant", "tool_calls": [
        {**CALL, "function": {"name": "add", "arguments": "{not json"}}]}],
     "messages[1].tool_calls[0].function.arguments"),
    ([{"role": "user", "content": "x"}, {"role": "assistant", "tool_calls": [{**CALL, "id": "a b"}]}],
     "messages[1].tool_calls[0].id"),
    ([{"role": "user", "content": "x", "tool_calls": [CALL]}], "messages[0].tool_calls"),
    ([{"role": "user", "content": "x"}, {"role": "assistant", "tool_calls": [  # which call would a result answer?
        CALL, {**CALL, "function": {"name": "mul", "arguments": "{}"}}]}], "messages[1].tool_calls[1].id"),
    ([{"role": "user", "content": "x", "tool_call_id": "call_1"}], "messages[0].tool_call_id"),
    ([{"role": "user", "content": "x"}, {"role": "assistant", "tool_calls": [  # RecursionError: a 500 before
        {**CALL, "function": {"name": "add", "arguments": '{"a":' + "[" * 5000 + "]" * 5000 + "}"}}]}],
     "messages[1].tool_calls[0].function.arguments"),
])
def test_bad_tool_messages_are_a_400_naming_the_field(client, messages, param):
    assert_error(client.post("/v1/chat/completions", json={"model": "tiny", "messages": messages, "tools": TOOLS}),
                 400, param=param)


def test_call_arguments_nest_at_most_64_deep(client):
    def send(depth: int):
        arguments = '{"a":' + "[" * (depth - 1) + "]" * (depth - 1) + "}"  # the object is one level
        call = {**CALL, "function": {"name": "add", "arguments": arguments}}
        return client.post("/v1/chat/completions", json={"model": "tiny", "max_tokens": 1, "messages": [
            {"role": "user", "content": "x"}, {"role": "assistant", "tool_calls": [call]},
            {"role": "tool", "tool_call_id": "call_1", "content": "r"}]})

    assert send(64).status_code == 200, send(64).text
    error = assert_error(send(65), 400, param="messages[1].tool_calls[0].function.arguments")
    assert "64" in error["message"]


def _string_tools(tag: str, count: int, bad: dict | None = None) -> list[dict]:
    """``count`` tools of two string properties each, named after ``tag`` (no cache hit from another
    test); ``bad``, when given, is a third property of the last tool."""
    tools = [{"type": "function", "function": {"name": f"{tag}{i}", "parameters": {"type": "object", "properties": {
        f"{tag}_{i}_{j}": {"type": "string", "maxLength": 8} for j in range(2)}}}} for i in range(count)]
    if bad is not None:
        tools[-1]["function"]["parameters"]["properties"]["bad"] = bad
    return tools


def test_a_tool_list_compiles_once_and_a_refused_one_caches_nothing(client):
    """Each tool's schema was compiled and cached alone too (to name a refused one): 64 tools cost
    65 compiles and left 64 grammars in the cache all clients share, even when the tag then failed."""
    grammars = client.app.state.gateway.service.grammars

    def send(tools):
        before, entries = grammars.compiled, len(grammars._cache)  # noqa: SLF001
        response = client.post("/v1/chat/completions", json={"model": "tiny", "messages": MESSAGES, "tools": tools,
                                                               "tool_choice": "required", "max_tokens": 8})
        return response, grammars.compiled - before, len(grammars._cache) - entries  # noqa: SLF001

    tools = _string_tools("once", 3)
    response, compiles, cached = send(tools)
    assert response.status_code == 200, response.text
    assert (compiles, cached) == (1, 1)
    assert send(tools)[1:] == (0, 0)  # the same tools again: the cached tag
    # xgrammar refuses the range when it compiles: once, nothing cached, the tools named together
    response, compiles, cached = send(_string_tools("refused", 3, bad={"type": "integer", "minimum": 5,
                                                                       "maximum": 1}))
    assert "minimum" in assert_error(response, 400, param="tools")["message"]
    assert (compiles, cached) == (1, 0)
    # a static refusal compiles nothing and names its tool
    response, compiles, cached = send(_string_tools("static", 3, bad={"type": "string", "uniqueItems": True}))
    assert "uniqueItems" in assert_error(response, 400, param="tools[2].function.parameters")["message"]
    assert (compiles, cached) == (0, 0)


def test_parser_reads_calls_in_any_chunking():
    text = ('Let me see <tool <tool_call>{"name":"f","arguments":{"q":"}</tool_call>","n":[1,{"m":2}]}}</tool_call>'
            '<tool_call>{"name":"g","arguments":{}}</tool_call> done')
    for size in (1, 2, 5, len(text)):
        parser = ToolCallParser()
        for i in range(0, len(text), size):
            parser.feed(text[i:i + size])
        parser.finish()
        assert parser.content == "Let me see <tool  done"
        assert [(c.name, json.loads(c.arguments)) for c in parser.calls] == [
            ("f", {"q": "}</tool_call>", "n": [1, {"m": 2}]}), ("g", {})]
    cut = ToolCallParser()  # cut by max_tokens: a call with what it has, a half head stays text
    cut.feed('<tool_call>{"name":"f","arguments":{"q":"ab')
    cut.finish()
    assert cut.calls[0].arguments == '{"q":"ab' and cut.content == ""
    half = ToolCallParser()
    half.feed('so <tool_call>{"na')
    half.finish()
    assert half.content == 'so <tool_call>{"na' and not half.calls


def test_a_call_cut_by_a_stop_string_is_not_reported_complete():
    """A stop string that ends the text inside a call's arguments leaves them unfinished JSON: the
    answer's finish reason stays "stop", not "tool_calls" (which says the calls are whole)."""
    from gateway.api.tool_format import finish_reason

    cut = ToolCallParser()
    cut.feed('<tool_call>{"name":"get","arguments":{"a" :7')
    cut.finish()
    assert cut.calls and finish_reason("stop", cut) == "stop" and finish_reason("length", cut) == "length"
    whole = ToolCallParser()
    whole.feed('<tool_call>{"name":"get","arguments":{"a":7}}</tool_call>')
    whole.finish()
    assert finish_reason("stop", whole) == "tool_calls"
    unclosed = ToolCallParser()  # the arguments are whole; only the closing marker is missing
    unclosed.feed('<tool_call>{"name":"get","arguments":{"a":7}}')
    unclosed.finish()
    assert finish_reason("stop", unclosed) == "tool_calls"


def test_parameters_without_a_type_are_an_object(client):
    tools = [{"type": "function", "function": {"name": "get", "parameters": {
        "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 9}}, "required": ["a"],
        "additionalProperties": False}}}]
    answer = client.post("/v1/chat/completions", json={"model": "tiny", "messages": MESSAGES, "max_tokens": 60,
                                                       "tools": tools, "tool_choice": "required"})
    assert answer.status_code == 200, answer.text
    for call in answer.json()["choices"][0]["message"]["tool_calls"]:
        assert isinstance(json.loads(call["function"]["arguments"]), dict)


NATIVE = ("{% if tools %}TOOLS:{% for t in tools %}{{ t.function.name }};{% endfor %}\n{% endif %}"
          "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}"
          "{% for c in m.tool_calls or [] %}CALL {{ c.function.name }} {{ c.function.arguments | tojson }}{% endfor %}"
          "{% if m.role == 'tool' %} ({{ m.tool_call_id }}){% endif %}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def test_a_template_with_its_own_tool_format_renders_tools_itself():
    tok = build_tokenizer(NATIVE)
    assert template_has_tools(tok) and not template_has_tools(build_tokenizer())
    spec = parse_tools(TOOLS, "auto", None, max_tools=4, max_schema_bytes=4096)
    messages = [ChatMessage(role="user", content="x"), ChatMessage(role="assistant", tool_calls=[CALL]),
                ChatMessage(role="tool", tool_call_id="call_1", content="3")]
    chat = render_messages(messages, spec, native=True)
    text = tok.decode(render_chat(tok, chat.messages, generation_prompt=True, tools=chat.tools))
    assert text.startswith("TOOLS:get_weather;add;")
    assert 'CALL add {"a": 1, "b": []}' in text and "<|im_start|>tool\n3 (call_1)" in text
    assert "<tool_call>" not in text  # the gateway's format is for templates without one
