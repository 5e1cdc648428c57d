"""End to end: function calling on the real server (a subprocess) with SmolLM2-135M-Instruct,
driven by the official ``openai`` SDK. Its template has no tool format, so the gateway's is used
(tools in the system message, ``<tool_call>`` blocks); arguments are schema-constrained."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import openai
import pytest

pytestmark = pytest.mark.slow

WEATHER = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 40},
                                            "unit": {"enum": ["celsius", "fahrenheit"]}},
           "required": ["city", "unit"], "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Current weather in a city",
                                           "parameters": WEATHER}}]


@pytest.fixture(scope="module")
def client(smollm2_dir: Path, launch_server, tmp_path_factory) -> openai.OpenAI:
    data_dir = tmp_path_factory.mktemp("tools-data")
    server = launch_server(["--model", str(smollm2_dir), "--data-dir", str(data_dir), "--device", "cpu"])
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=300)


def test_round_trip_call_result_answer(client: openai.OpenAI):
    model = client.models.list().data[0].id
    messages = [{"role": "user", "content": "What is the weather in Paris?"}]
    first = client.chat.completions.create(model=model, messages=messages, tools=TOOLS, tool_choice="required",
                                           temperature=0, max_tokens=80)
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls", choice
    assert choice.message.content is None
    call = choice.message.tool_calls[0]
    assert call.function.name == "get_weather" and call.id.startswith("call_")
    jsonschema.validate(json.loads(call.function.arguments), WEATHER)

    messages.append(choice.message.model_dump(exclude_none=True))
    messages.append({"role": "tool", "tool_call_id": call.id, "content": '{"temperature": 21, "sky": "sunny"}'})
    final = client.chat.completions.create(model=model, messages=messages, tools=TOOLS, tool_choice="none",
                                           temperature=0, max_tokens=120)
    assert final.choices[0].finish_reason == "stop", final.choices[0]
    assert final.choices[0].message.tool_calls is None
    assert final.choices[0].message.content.strip()


def test_streamed_named_call_reassembles(client: openai.OpenAI):
    model = client.models.list().data[0].id
    with client.chat.completions.stream(
            model=model, messages=[{"role": "user", "content": "Weather in Berlin, in fahrenheit?"}], tools=TOOLS,
            tool_choice={"type": "function", "function": {"name": "get_weather"}}, temperature=0,
            max_tokens=80) as stream:
        final = stream.get_final_completion()
    choice = final.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert len(choice.message.tool_calls) == 1
    jsonschema.validate(json.loads(choice.message.tool_calls[0].function.arguments), WEATHER)


def test_auto_answers_text_or_a_valid_call(client: openai.OpenAI):
    model = client.models.list().data[0].id
    choice = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Say hello."}],
                                            tools=TOOLS, temperature=0, max_tokens=60).choices[0]
    if choice.message.tool_calls:
        assert choice.finish_reason == "tool_calls"
        jsonschema.validate(json.loads(choice.message.tool_calls[0].function.arguments), WEATHER)
    else:
        assert choice.finish_reason in ("stop", "length") and choice.message.content
