"""OpenAI-compatible routes: /v1/chat/completions, /v1/completions, /v1/models."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, StreamingResponse

from gateway.auth import check_inference_key
from gateway.errors import error_body
from gateway.generation import Generation, GenerationService
from gateway.protocol import (
    ChatCompletionRequest, CompletionRequest, ModelCard, ModelList, Usage, new_id, now,
)

router = APIRouter(prefix="/v1", dependencies=[Depends(check_inference_key)])


def get_service(request: Request) -> GenerationService:
    return request.app.state.gateway.service


ServiceDep = Annotated[GenerationService, Depends(get_service)]


@router.get("/models")
async def list_models(request: Request) -> ModelList:
    gateway = request.app.state.gateway
    base = gateway.service.base_name
    cards = [ModelCard(id=base, created=gateway.started, root=base)]
    cards += [ModelCard(id=e.id, created=int(e.created), parent=base, root=base)
              for e in gateway.registry.entries()]
    return ModelList(data=cards)


@router.post("/chat/completions")
async def chat_completions(body: ChatCompletionRequest, request: Request, service: ServiceDep):
    adapter = service.resolve_model(body.model)
    params = service.sampling_params(body)
    prompt = service.chat_prompt(body)
    generation = await service.start(adapter, [prompt], params, body.n, "messages")
    meta = {"id": new_id("chatcmpl"), "created": now(), "model": body.model}
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return _sse(_chat_chunks(generation, meta, body.n, include_usage))
    return await _collect(request, generation, lambda texts, reasons: {
        **meta, "object": "chat.completion",
        "choices": [{"index": i, "message": {"role": "assistant", "content": texts[i]},
                     "finish_reason": reasons[i], "logprobs": None} for i in range(generation.choices)],
    })


@router.post("/completions")
async def completions(body: CompletionRequest, request: Request, service: ServiceDep):
    adapter = service.resolve_model(body.model)
    params = service.sampling_params(body)
    prompts = service.completion_prompts(body)
    generation = await service.start(adapter, prompts, params, body.n, "prompt")
    meta = {"id": new_id("cmpl"), "created": now(), "model": body.model}
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return _sse(_completion_chunks(generation, meta, include_usage))
    return await _collect(request, generation, lambda texts, reasons: {
        **meta, "object": "text_completion",
        "choices": [{"index": i, "text": texts[i], "finish_reason": reasons[i], "logprobs": None}
                    for i in range(generation.choices)],
    })


def _usage(generation: Generation) -> dict[str, int]:
    completion = generation.total_completion_tokens
    return Usage(prompt_tokens=generation.prompt_tokens, completion_tokens=completion,
                 total_tokens=generation.prompt_tokens + completion).model_dump()


async def _watch_disconnect(request: Request, generation: Generation) -> None:
    while not await request.is_disconnected():
        await asyncio.sleep(0.25)
    generation.cancel()


async def _collect(request: Request, generation: Generation,
                   render: Callable[[list[str], list[str | None]], dict[str, Any]]) -> JSONResponse:
    """Wait for every choice; a client that goes away cancels the work."""
    texts = [""] * generation.choices
    reasons: list[str | None] = [None] * generation.choices
    watcher = asyncio.create_task(_watch_disconnect(request, generation))
    try:
        async for event in generation.events():
            if event.error:
                generation.cancel()
                return JSONResponse(error_body(event.error, "server_error", None, "generation_failed"), 500)
            texts[event.index] += event.text
            reasons[event.index] = event.finish_reason
    finally:
        watcher.cancel()
    return JSONResponse({**render(texts, reasons), "usage": _usage(generation)})


def _sse(chunks: AsyncIterator[dict[str, Any]]) -> StreamingResponse:
    async def body() -> AsyncIterator[bytes]:
        async for chunk in chunks:
            yield b"data: " + json.dumps(chunk, separators=(",", ":")).encode() + b"\n\n"
        yield b"data: [DONE]\n\n"

    return StreamingResponse(body(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


async def _chat_chunks(generation: Generation, meta: dict, n: int,
                       include_usage: bool) -> AsyncIterator[dict[str, Any]]:
    base = {**meta, "object": "chat.completion.chunk"}
    extra = {"usage": None} if include_usage else {}

    def chunk(index: int, delta: dict, finish: str | None) -> dict:
        return {**base, "choices": [{"index": index, "delta": delta, "finish_reason": finish, "logprobs": None}],
                **extra}

    for index in range(n):
        yield chunk(index, {"role": "assistant", "content": ""}, None)
    async for event in generation.events():
        if event.error:
            yield error_body(event.error, "server_error", None, "generation_failed")
            return
        if event.text:
            yield chunk(event.index, {"content": event.text}, None)
        if event.finish_reason is not None:
            yield chunk(event.index, {}, event.finish_reason)
    if include_usage:
        yield {**base, "choices": [], "usage": _usage(generation)}


async def _completion_chunks(generation: Generation, meta: dict,
                             include_usage: bool) -> AsyncIterator[dict[str, Any]]:
    base = {**meta, "object": "text_completion"}
    extra = {"usage": None} if include_usage else {}
    async for event in generation.events():
        if event.error:
            yield error_body(event.error, "server_error", None, "generation_failed")
            return
        if event.text or event.finish_reason is not None:
            yield {**base, "choices": [{"index": event.index, "text": event.text,
                                        "finish_reason": event.finish_reason, "logprobs": None}], **extra}
    if include_usage:
        yield {**base, "choices": [], "usage": _usage(generation)}
