"""OpenAI request and response models, named as OpenAI names them.

Fields we do not implement are refused when set to a non-default value (rather than silently
ignored), so a client never gets an answer computed differently from what it asked for.
"""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, WithJsonSchema, field_validator, model_validator
from pydantic_core import PydanticCustomError


class StreamOptions(BaseModel):
    include_usage: bool = False


class ContentError(ValueError):
    """A message's content the gateway cannot read; ``path`` is where, from the message
    (``content[1].type``), for an error's ``param``."""

    def __init__(self, message: str, path: str):
        super().__init__(message)
        self.path = path


# A string, text parts, or null. Checked by ``ChatMessage.text`` rather than by the model, so that
# an error names the part at fault (messages[0].content[1].type), not a union member's type.
Content = Annotated[Any, WithJsonSchema({"anyOf": [
    {"type": "string"}, {"type": "array", "items": {"type": "object"}}, {"type": "null"}]})]


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Content = None
    # function calling (checked in gateway.tool_prompt, whose errors name the exact field)
    tool_calls: list[Any] | None = None  # an assistant's calls: {id, type: "function", function: {name, arguments}}
    tool_call_id: str | None = None  # a tool message: the call it answers
    # accepted, as OpenAI clients send it, but not shown to the model: chat templates have no place for it
    name: str | None = Field(None, max_length=64)

    def text(self) -> str:
        """The content's text (text parts joined); ``ContentError`` for anything else."""
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        if not isinstance(self.content, list):
            raise ContentError("content must be a string or a list of content parts", "content")
        return "".join(_part_text(part, f"content[{j}]") for j, part in enumerate(self.content))


def _part_text(part: Any, where: str) -> str:
    if not isinstance(part, dict):
        raise ContentError("a content part must be an object", where)
    if part.get("type") != "text":
        raise ContentError("only text content parts are supported (no image, audio or file input)", f"{where}.type")
    if not isinstance(part.get("text"), str):
        raise ContentError("a text content part needs text, a string", f"{where}.text")
    return part["text"]


MAX_MODEL_CHARS = 256  # a request's model name (longer ones are a 400 before any lookup)
# strings stored in the database: PostgreSQL text cannot hold NUL (its refusal was a 500)
NO_NUL = r"^[^\x00]*$"
TokenId = Annotated[int, Field(ge=0, lt=2**31)]  # checked against the vocabulary by the service
# token id (a string, as OpenAI has it) -> bias. Ids, values and the count are checked by the
# service (so that an error names ``logit_bias``, never a client's key); the schema tells clients.
LogitBias = Annotated[dict[str, float], WithJsonSchema({
    "type": "object", "propertyNames": {"pattern": "^[0-9]{1,9}$"},
    "additionalProperties": {"type": "number", "minimum": -100, "maximum": 100}})]


class JsonSchemaFormat(BaseModel):
    model_config = ConfigDict(extra="ignore", populate_by_name=True)
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")
    description: str | None = Field(None, max_length=4096)
    schema_: dict[str, Any] | None = Field(None, alias="schema")  # None: any JSON object
    strict: bool | None = None  # always enforced (the grammar allows only what the schema allows)


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_given(self):
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("response_format of type json_schema needs json_schema")
        return self


def _unsupported(message: str) -> PydanticCustomError:
    """A refusal that FastAPI's validation error names by its field (``param``), in these words."""
    return PydanticCustomError("unsupported", message)


class _GenerationParams(BaseModel):
    """Fields shared by chat and text completions."""

    model_config = ConfigDict(extra="ignore")
    model: str = Field(min_length=1, max_length=MAX_MODEL_CHARS)
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: int = Field(1, ge=1)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=-(2**63), le=2**63 - 1)  # OpenAI's range (a 64-bit integer)
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = Field(None, max_length=256, pattern=NO_NUL)  # stored as an experiment's subject
    # logit adjustments (ranges, and logit_bias's token ids and size, are checked with the
    # sampling parameters: gateway.sampling, gateway.generation)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    repetition_penalty: float | None = Field(None, ge=0.1, le=10.0)  # extension (vLLM's): 1 is neutral
    logit_bias: LogitBias | None = None
    response_format: ResponseFormat | None = None  # structured outputs (gateway.structured)

    @field_validator("temperature", "top_p", "n", "stream", mode="before")
    @classmethod
    def _null_is_the_default(cls, value: Any, info: ValidationInfo) -> Any:
        """OpenAI takes null for these (the official client sends an explicit None as null)."""
        return cls.model_fields[info.field_name].default if value is None else value

    @field_validator("stream_options")
    @classmethod
    def _with_stream(cls, value: StreamOptions | None, info: ValidationInfo) -> StreamOptions | None:
        if value is not None and not info.data.get("stream"):  # as OpenAI: a non-streamed answer has none
            raise _unsupported("stream_options is only allowed when stream is true")
        return value

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)


class ChatCompletionRequest(_GenerationParams):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    # function calling: checked in gateway.tool_calls (errors name e.g. tools[3].function.parameters)
    tools: list[Any] | None = None
    # "none", "auto", "required" or a named function; any JSON here, so that a wrong one is named
    # "tool_choice" by gateway.tool_calls rather than by a union member ("tool_choice.str")
    tool_choice: Annotated[Any, WithJsonSchema({"anyOf": [{"type": "string"}, {"type": "object"}]})] = None
    parallel_tool_calls: bool | None = None  # None: true, as OpenAI
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=20)
    # OpenAI fields this server does not implement: refused when set (_unsupported), never ignored
    functions: list[Any] | None = None
    function_call: Any = None
    modalities: list[str] | None = None
    audio: dict[str, Any] | None = None
    prediction: Any = None
    web_search_options: Any = None
    reasoning_effort: Any = None
    verbosity: Any = None

    @field_validator("top_logprobs")
    @classmethod
    def _top_needs_logprobs(cls, value: int | None, info: ValidationInfo) -> int | None:
        if value is not None and not info.data.get("logprobs"):
            raise PydanticCustomError("invalid_value", "top_logprobs needs logprobs set to true")
        return value

    @field_validator("functions", "function_call")
    @classmethod
    def _legacy_functions(cls, value: Any, info: ValidationInfo) -> Any:
        if value is not None:
            raise _unsupported(f"{info.field_name} (OpenAI's deprecated function calling) is not supported; "
                               "use tools and tool_choice")
        return value

    @field_validator("prediction", "web_search_options", "reasoning_effort", "verbosity")
    @classmethod
    def _not_offered(cls, value: Any, info: ValidationInfo) -> Any:
        if value is not None:  # each would change the answer: refused rather than ignored
            raise _unsupported(f"{info.field_name} is not supported by this server; leave it out")
        return value

    @field_validator("modalities")
    @classmethod
    def _text_only(cls, value: list[str] | None) -> list[str] | None:
        if value not in (None, ["text"]):
            raise _unsupported("only text output is supported: send modalities [\"text\"] or leave it out")
        return value

    @field_validator("audio")
    @classmethod
    def _no_audio(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        if value is not None:
            raise _unsupported("audio output is not supported; leave audio out")
        return value


class CompletionRequest(_GenerationParams):
    # text, or token ids (as OpenAI accepts, and lm-evaluation-harness sends by default)
    prompt: str | list[str] | list[TokenId] | list[list[TokenId]]
    max_tokens: int | None = Field(None, ge=0)  # 0 with echo: score the prompt, generate nothing
    logprobs: int | None = Field(None, ge=0, le=5)
    echo: bool = Field(False, validate_default=True)  # checked when left out too (max_tokens 0)
    suffix: str | None = None
    best_of: int | None = None

    @field_validator("echo", mode="before")
    @classmethod
    def _null_echo(cls, value: Any) -> Any:
        return False if value is None else value

    @field_validator("echo")
    @classmethod
    def _echo_for_no_tokens(cls, value: bool, info: ValidationInfo) -> bool:
        # here, not on the model: the error names a field (param), as every other one does
        if info.data.get("max_tokens") == 0 and not value:
            raise ValueError("max_tokens 0 needs echo true (it returns the prompt alone)")
        return value

    @field_validator("suffix")
    @classmethod
    def _no_suffix(cls, value: str | None) -> str | None:
        if value:
            raise _unsupported("suffix (insertion) is not supported")
        return value

    @field_validator("best_of")
    @classmethod
    def _no_best_of(cls, value: int | None, info: ValidationInfo) -> int | None:
        if value not in (None, 1, info.data.get("n")):
            raise _unsupported("best_of is not supported (only 1, or n)")
        return value

    def token_prompts(self) -> list[list[int]] | None:
        """The prompts as token ids when given so; None when given as text."""
        p = self.prompt
        if isinstance(p, list) and p and isinstance(p[0], int):
            return [list(p)]
        if isinstance(p, list) and p and isinstance(p[0], list):
            return [list(x) for x in p]
        return None

    def prompts(self) -> list[str]:
        """The prompts as text (only when given as text)."""
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)


class TokenizeRequest(BaseModel):
    """vLLM's ``/tokenize``: a completion ``prompt``, or chat ``messages`` through the template."""

    model_config = ConfigDict(extra="ignore")
    model: str = Field(min_length=1, max_length=MAX_MODEL_CHARS)
    prompt: str | None = None
    messages: list[ChatMessage] | None = Field(None, min_length=1)
    add_generation_prompt: bool = True

    @model_validator(mode="after")
    def _one_input(self):
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give either prompt or messages")
        return self


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str = Field(min_length=1, max_length=MAX_MODEL_CHARS)
    tokens: list[int]


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "adapter-gateway"
    parent: str | None = None
    root: str | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
