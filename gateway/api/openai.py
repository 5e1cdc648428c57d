"""OpenAI-compatible routes: /v1/chat/completions, /v1/completions, /v1/models (list and retrieve)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request, Security
from fastapi.responses import Response, StreamingResponse

from gateway.api.logprob_format import CompletionLogprobs, chat_logprobs, merge_pieces
from gateway.api.tool_format import ToolDeltas, tool_message
from gateway.auth import count_sequences, inference_key_scheme, rate_limit_error, request_key
from gateway.errors import APIError, BadRequestError, ModelNotFoundError, engine_error, error_body, shown
from gateway.generation import CLIENT_NOT_READING, ChoiceEvent, Generation, GenerationService, RequestRecord
from gateway.logprobs import TokenLogprob, TokenStrings
from gateway.sampling import SamplingParams
from gateway.protocol import (
    ChatCompletionRequest, CompletionRequest, ModelCard, ModelList, Usage, now,
)
from gateway.shutdown import refuse_while_draining

# keys are checked by gateway.auth.AccessGuard before the body is read; the scheme documents them
router = APIRouter(prefix="/v1", dependencies=[Security(inference_key_scheme), Depends(refuse_while_draining)])


def get_service(request: Request) -> GenerationService:
    return request.app.state.gateway.service


ServiceDep = Annotated[GenerationService, Depends(get_service)]
EXPERIMENT_HEADER = "x-gateway-experiment"
ARM_HEADER = "x-gateway-experiment-arm"

# The most log-probability values (a token's own and each of its top ones) a response that is not
# streamed may hold: it is built and serialized as a whole, in a worker thread, but that thread
# still holds the GIL the event loop needs. A stream sends each event's values as they come, so it
# has no such bound. Chat: n x max_tokens x (top_logprobs + 1); 100,000 lets n 1 x 4,096 tokens x
# top 20 (86,016) through and took 0.25-0.3 s to build and serialize (6 MB) on one core, up to 1 s
# when the startup objects are not frozen (gc.freeze: GatewayServer does it). Legacy completions'
# values cost ~3x less each (a dict entry, no bytes list): 300,000 took ~0.5 s (10 MB), and an echoed
# batch of 8 prompts x 8,192 tokens with logprobs 1 (lm-evaluation-harness scoring, 131,072) passes.
MAX_CHAT_LOGPROB_VALUES = 100_000
MAX_COMPLETION_LOGPROB_VALUES = 300_000


def _model_cards(request: Request) -> list[ModelCard]:
    """Every model name a request may ask for: the base, each adapter, each experiment, each ft: name."""
    gateway = request.app.state.gateway
    base = gateway.service.base_name
    cards = [ModelCard(id=base, created=gateway.started, root=base)]
    cards += [ModelCard(id=e.id, created=int(e.created), parent=base, root=base)
              for e in gateway.registry.entries()]
    if gateway.experiments is not None:  # an experiment's name is a model clients can ask for
        cards += [ModelCard(id=e.name, created=int(e.created), root=base) for e in gateway.experiments.list()]
    if gateway.fine_tuning is not None:  # ft:... names of fine-tuning results (their adapters are listed too)
        cards += [ModelCard(id=name, created=int(created), parent=base, root=base)
                  for name, created in gateway.fine_tuning.served_names()]
    return cards


@router.get("/models")
async def list_models(request: Request) -> ModelList:
    return ModelList(data=_model_cards(request))


# ``path``: the base model's served name may hold a slash (``HuggingFaceTB/SmolLM2-135M-Instruct``)
@router.get("/models/{model:path}")
async def retrieve_model(model: str, request: Request) -> ModelCard:
    """OpenAI's ``models.retrieve``: the card of one name that ``/v1/models`` lists, else a 404."""
    for card in _model_cards(request):
        if card.id == model:
            return card
    raise ModelNotFoundError(f"The model '{shown(model)}' does not exist", param="model")


@router.post("/chat/completions")
async def chat_completions(body: ChatCompletionRequest, request: Request, service: ServiceDep):
    record = service.begin(body, request.headers, "chat")
    tools = service.tool_spec(body)
    params = await service.constrain(service.sampling_params(body), body, tools, _key_id(request))
    prompt = await service.chat_prompt(body, tools)
    if not body.stream:
        _check_chat_logprobs(body, params, service.context_window - len(prompt))
    generation = await _start(request, service, record, [prompt], params, body.n, "messages")
    meta = {"id": record.completion_id, "created": now(), "model": body.model, **_experiment_field(record)}
    strings = service.token_strings if params.logprobs is not None else None
    calls = tools is not None and tools.constrained  # the answer is read for tool calls
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        chunks = _chat_chunks(generation, meta, body.n, include_usage, strings, calls)
        return _experiment_headers(_GenerationStream(chunks, generation), record)

    def message(c: _Collected, i: int) -> tuple[dict[str, Any], str | None]:
        if calls:
            return tool_message(c.texts[i], c.reasons[i])
        return {"role": "assistant", "content": c.texts[i]}, c.reasons[i]

    def render(c: _Collected) -> dict[str, Any]:
        choices = []
        for i in range(generation.choices):
            msg, reason = message(c, i)
            choices.append({"index": i, "message": msg, "finish_reason": reason,
                            "logprobs": None if strings is None else chat_logprobs(strings, c.logprobs[i])})
        return {**meta, "object": "chat.completion", "choices": choices}

    return _experiment_headers(await _collect(request, generation, render), record)


@router.post("/completions")
async def completions(body: CompletionRequest, request: Request, service: ServiceDep):
    record = service.begin(body, request.headers, "completions")
    params = await service.constrain(service.sampling_params(body), body, owner=_key_id(request))
    prompts = await service.completion_prompts(body)
    if not body.stream:
        _check_completion_logprobs(body, params, prompts, service.context_window)
    generation = await _start(request, service, record, prompts, params, body.n, "prompt")
    meta = {"id": record.completion_id, "created": now(), "model": body.model, **_experiment_field(record)}
    texts = await service.prompt_texts(body, prompts) if body.echo or params.logprobs is not None else []
    echo = _Echo(texts, body.n, body.echo, service.token_strings if params.logprobs is not None else None)
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        chunks = _completion_chunks(generation, meta, include_usage, echo)
        return _experiment_headers(_GenerationStream(chunks, generation), record)

    def render(c: _Collected) -> dict[str, Any]:
        choices = []
        for i in range(generation.choices):
            lead, builder = echo.start(i)
            logprobs = None
            if builder is not None:
                pieces = [builder.piece(c.prompt_logprobs[i] or (), prompt=True)] if echo.echo else []
                logprobs = merge_pieces([*pieces, builder.piece(c.logprobs[i])])
            choices.append({"index": i, "text": lead + c.texts[i], "finish_reason": c.reasons[i],
                            "logprobs": logprobs})
        return {**meta, "object": "text_completion", "choices": choices}

    return _experiment_headers(await _collect(request, generation, render), record)


def _check_chat_logprobs(body: ChatCompletionRequest, params: SamplingParams, room: int) -> None:
    """Refuse a non-streamed chat request whose logprobs could pass MAX_CHAT_LOGPROB_VALUES
    (``room``: the most tokens the context window leaves its answer)."""
    if params.logprobs is None:
        return
    tokens = max(0, min(params.max_tokens, room))
    values = body.n * tokens * (params.logprobs + 1)
    if values > MAX_CHAT_LOGPROB_VALUES:
        raise BadRequestError(
            f"with logprobs, this response could hold {values} log-probabilities (n {body.n} x {tokens} tokens x "
            f"(top_logprobs {params.logprobs} + 1)); the limit without streaming is {MAX_CHAT_LOGPROB_VALUES}. "
            "Lower n, max_tokens or top_logprobs, or use stream: true",
            param="top_logprobs" if body.top_logprobs else "logprobs")


def _check_completion_logprobs(body: CompletionRequest, params: SamplingParams, prompts: list[list[int]],
                               context_window: int) -> None:
    """Refuse a non-streamed completions request whose legacy logprobs (the generated tokens', and
    the prompt's with echo) could pass MAX_COMPLETION_LOGPROB_VALUES."""
    if params.logprobs is None:
        return
    tokens = sum((len(p) if body.echo else 0) + max(0, min(params.max_tokens, context_window - len(p)))
                 for p in prompts)
    values = body.n * tokens * (params.logprobs + 1)
    if values > MAX_COMPLETION_LOGPROB_VALUES:
        what = "prompt and generated tokens" if body.echo else "generated tokens"
        raise BadRequestError(
            f"with logprobs, this response could hold {values} log-probabilities (n {body.n} x {tokens} {what} x "
            f"(logprobs {params.logprobs} + 1)); the limit without streaming is {MAX_COMPLETION_LOGPROB_VALUES}. "
            "Lower n, max_tokens or logprobs, send fewer or shorter prompts, or use stream: true",
            param="logprobs")


@dataclass
class _Echo:
    """What a completion choice starts with: the prompt's text with ``echo``, and the builder of
    its legacy logprobs (None when not asked), whose offsets count from the prompt's start."""

    prompts: list[str]
    n: int
    echo: bool
    strings: TokenStrings | None

    def start(self, index: int) -> tuple[str, CompletionLogprobs | None]:
        if self.strings is None and not self.echo:
            return "", None
        prompt = self.prompts[index // self.n]
        builder = None if self.strings is None else \
            CompletionLogprobs(self.strings, 0, prompt) if self.echo else CompletionLogprobs(self.strings, len(prompt))
        return (prompt if self.echo else ""), builder


def _key_id(request: Request) -> str | None:
    key = request_key(request)
    return None if key is None else key.id


async def _start(request: Request, service: GenerationService, record: RequestRecord, prompts: list[list[int]],
                 params: SamplingParams, n: int, prompt_param: str) -> Generation:
    """Bind the request to its key, reserve the most tokens it can use against the key's tokens
    per minute (the unused part is given back when it ends: ``app.count_key_usage``), and start it."""
    key = request_key(request)
    if key is None:
        return await service.start(record, prompts, params, n, prompt_param)
    record.api_key_id = key.id
    gateway = request.app.state.gateway
    try:
        count_sequences(request, key, len(prompts) * n)
    except APIError:
        gateway.metrics.key_refused(key.name, "concurrency")
        raise
    cost = sum(len(p) for p in prompts) + len(prompts) * n * params.max_tokens
    refusal = gateway.keys.reserve(key, record.completion_id, cost)
    if refusal is not None:
        gateway.metrics.key_refused(key.name, refusal.limit)
        raise rate_limit_error(refusal)
    try:
        return await service.start(record, prompts, params, n, prompt_param)
    except BaseException:
        # a failed start has run the record's observers (which settled), unless it was cancelled
        # while waiting for a slot: settle here too (a second settle does nothing)
        gateway.keys.settle(record.completion_id, record.prompt_tokens)
        raise


def _experiment_field(record: RequestRecord) -> dict[str, Any]:
    """Extension field of responses and stream chunks: the experiment and arm that served them."""
    return {} if record.experiment is None else {"experiment": {"name": record.experiment, "arm": record.arm}}


def _experiment_headers(response: Response, record: RequestRecord) -> Response:
    if record.experiment is not None:
        response.headers[EXPERIMENT_HEADER] = record.experiment
        response.headers[ARM_HEADER] = record.arm or ""
    return response


def _usage(generation: Generation) -> dict[str, int]:
    completion = generation.total_completion_tokens
    return Usage(prompt_tokens=generation.prompt_tokens, completion_tokens=completion,
                 total_tokens=generation.prompt_tokens + completion).model_dump()


CLIENT_CLOSED_REQUEST = 499  # as nginx logs it; nobody is left to read it


async def _client_gone(request: Request) -> None:
    """Return once the client has disconnected: the body is read already, so the server's next
    ASGI message is ``http.disconnect`` (streams get the same from StreamingResponse)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


@dataclass
class _Collected:
    """Every choice's text, finish reason and log-probabilities (generated; prompt's, with echo)."""

    texts: list[str]
    reasons: list[str | None]
    logprobs: list[list[TokenLogprob]]
    prompt_logprobs: list[tuple[TokenLogprob, ...] | None]


async def _collect(request: Request, generation: Generation,
                   render: Callable[[_Collected], dict[str, Any]]) -> Response:
    """Wait for every choice; a client that goes away cancels the work and the wait (a cancelled
    sequence sends no more events, so waiting on would never end)."""
    count = generation.choices
    collected = _Collected([""] * count, [None] * count, [[] for _ in range(count)], [None] * count)

    async def gather() -> None:
        async for event in generation.events():
            if event.error:
                generation.cancel()
                raise engine_error(event.error, event.error_code)
            collected.texts[event.index] += event.text
            collected.reasons[event.index] = event.finish_reason
            collected.logprobs[event.index] += event.logprobs
            if event.prompt_logprobs is not None:
                collected.prompt_logprobs[event.index] = event.prompt_logprobs

    collecting = asyncio.create_task(gather())
    gone = asyncio.create_task(_client_gone(request))
    try:
        done, _ = await asyncio.wait({collecting, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not collecting.done():
            collecting.cancel()
            generation.cancel()
    if collecting not in done:
        return Response(status_code=CLIENT_CLOSED_REQUEST)
    collecting.result()  # the engine's error, as an API error
    usage = _usage(generation)
    # building the logprob entries and the JSON of a large answer takes seconds of CPU: a worker
    # thread does both, so the event loop serves other clients meanwhile (the caps above bound it)
    content = await asyncio.to_thread(_render_body, render, collected, usage)
    return Response(content, media_type="application/json")


def _render_body(render: Callable[[_Collected], dict[str, Any]], collected: _Collected,
                 usage: dict[str, int]) -> bytes:
    """The response body, as JSONResponse writes it (off the event loop: see ``_collect``)."""
    body = {**render(collected), "usage": usage}
    try:
        return "".join(_json_pieces(body, ensure_ascii=False)).encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate somewhere: JSON escapes keep it valid
        return "".join(_json_pieces(body, ensure_ascii=True)).encode("ascii")


# json.dumps is one C call that holds the GIL until it returns: 0.3 s for a 6 MB body, during
# which the event loop cannot run even though the call is in a worker thread. So a body is written
# in pieces: a list in slices of this many items (~2 ms each for chat entries with top_logprobs
# 20), and the dicts and short lists of its first levels (where choices and logprobs sit) item by item.
JSON_SLICE = 256
JSON_SPLIT_DEPTH = 4  # body > choices > choice > logprobs > the long lists of entries


def _json_pieces(value: Any, *, ensure_ascii: bool, depth: int = 0) -> Iterator[str]:
    """``value`` as compact JSON (json.dumps' own text, allow_nan off), in pieces."""
    if isinstance(value, list) and len(value) > JSON_SLICE:
        yield "["
        for start in range(0, len(value), JSON_SLICE):
            part = _dumps(value[start:start + JSON_SLICE], ensure_ascii)
            yield ("," if start else "") + part[1:-1]
        yield "]"
    elif depth < JSON_SPLIT_DEPTH and isinstance(value, list):
        yield "["
        for i, item in enumerate(value):
            if i:
                yield ","
            yield from _json_pieces(item, ensure_ascii=ensure_ascii, depth=depth + 1)
        yield "]"
    elif depth < JSON_SPLIT_DEPTH and isinstance(value, dict):
        yield "{"
        for i, (key, item) in enumerate(value.items()):
            yield ("," if i else "") + _dumps(key, ensure_ascii) + ":"
            yield from _json_pieces(item, ensure_ascii=ensure_ascii, depth=depth + 1)
        yield "}"
    else:
        yield _dumps(value, ensure_ascii)


def _dumps(value: Any, ensure_ascii: bool) -> str:
    return json.dumps(value, ensure_ascii=ensure_ascii, allow_nan=False, separators=(",", ":"))


def _error_chunk(event: ChoiceEvent) -> dict[str, Any]:
    """The error event that ends a stream (its HTTP status was sent with the first chunk)."""
    if event.error_code == CLIENT_NOT_READING:  # the gateway's own end, not the engine's
        return error_body(event.error or "the client stopped reading", "invalid_request_error", None,
                          CLIENT_NOT_READING)
    error = engine_error(event.error or "generation failed", event.error_code)
    return error_body(error.message, error.type, None, error.code)


class _GenerationStream(StreamingResponse):
    """SSE of one generation, whose unsettled work is cancelled when the response ends however it
    ends. A client that left while a chunk was being sent: Starlette cancels the response's task
    inside ``send``, with the body iterator suspended at a ``yield``, and never closes it; its
    ``finally`` ran only when a garbage collection finalized it, which could come after the work
    had run to max_tokens (or never, for a stream stopped at the role chunks)."""

    def __init__(self, chunks: AsyncIterator[dict[str, Any]], generation: Generation):
        super().__init__(self._lines(chunks), media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.generation = generation

    @staticmethod
    async def _lines(chunks: AsyncIterator[dict[str, Any]]) -> AsyncIterator[bytes]:
        async for chunk in chunks:
            yield b"data: " + json.dumps(chunk, separators=(",", ":")).encode() + b"\n\n"
        yield b"data: [DONE]\n\n"

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            if not self.generation.settled.is_set():
                self.generation.cancel()


async def _chat_chunks(generation: Generation, meta: dict, n: int, include_usage: bool,
                       strings: TokenStrings | None, calls: bool = False) -> AsyncIterator[dict[str, Any]]:
    base = {**meta, "object": "chat.completion.chunk"}
    extra = {"usage": None} if include_usage else {}

    def chunk(index: int, delta: dict, finish: str | None, logprobs: dict | None = None) -> dict:
        return {**base, "choices": [{"index": index, "delta": delta, "finish_reason": finish, "logprobs": logprobs}],
                **extra}

    readers = [ToolDeltas() for _ in range(n)] if calls else []  # tool calls read out of each choice's text
    for index in range(n):
        yield chunk(index, {"role": "assistant", "content": ""}, None)
    async for event in generation.events():
        if event.error:
            yield _error_chunk(event)
            return
        finish = event.finish_reason
        if readers:
            shown = strings is not None and any(not e.end for e in event.logprobs)  # chat leaves the end token out
            logprobs = chat_logprobs(strings, event.logprobs) if shown else None
            deltas = readers[event.index].feed(event.text)
            if finish is not None:
                more, finish = readers[event.index].finish(finish)
                deltas += more
            for delta in deltas:  # logprobs go with the first chunk of the event
                yield chunk(event.index, delta, None, logprobs)
                logprobs = None
            if logprobs is not None:
                yield chunk(event.index, {}, None, logprobs)
        elif event.text or (strings is not None and any(not e.end for e in event.logprobs)):
            logprobs = None if strings is None else chat_logprobs(strings, event.logprobs)
            yield chunk(event.index, {"content": event.text}, None, logprobs)
        if finish is not None:
            yield chunk(event.index, {}, finish)
    if include_usage:
        yield {**base, "choices": [], "usage": _usage(generation)}


async def _completion_chunks(generation: Generation, meta: dict, include_usage: bool,
                             echo: _Echo) -> AsyncIterator[dict[str, Any]]:
    base = {**meta, "object": "text_completion"}
    extra = {"usage": None} if include_usage else {}
    builders: dict[int, CompletionLogprobs | None] = {}
    async for event in generation.events():
        if event.error:
            yield _error_chunk(event)
            return
        text, entries, prompt_entries = event.text, list(event.logprobs), []
        if event.index not in builders:  # the choice's first chunk: the prompt goes first with echo
            lead, builders[event.index] = echo.start(event.index)
            text = lead + text
            if echo.echo:
                prompt_entries = list(event.prompt_logprobs or ())
        builder = builders[event.index]
        if text or event.finish_reason is not None or (builder is not None and (entries or prompt_entries)):
            logprobs = None if builder is None else \
                merge_pieces([builder.piece(prompt_entries, prompt=True), builder.piece(entries)])
            yield {**base, "choices": [{"index": event.index, "text": text,
                                        "finish_reason": event.finish_reason, "logprobs": logprobs}], **extra}
    if include_usage:
        yield {**base, "choices": [], "usage": _usage(generation)}
