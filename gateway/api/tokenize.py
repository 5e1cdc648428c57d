"""``POST /tokenize`` and ``POST /detokenize``, as vLLM offers them: the token ids a prompt (or a
chat conversation, through the chat template) becomes for a model, and the text of token ids.
``count`` includes a prompt-tuning adapter's virtual tokens, which take context positions like
any other token; ``max_model_len`` is the context window. Behind the inference key (AccessGuard)."""

from __future__ import annotations

import asyncio
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request, Security

from gateway.auth import inference_key_scheme
from gateway.errors import BadRequestError
from gateway.generation import GenerationService
from gateway.protocol import ChatCompletionRequest, DetokenizeRequest, TokenizeRequest
from gateway.shutdown import refuse_while_draining

router = APIRouter(dependencies=[Security(inference_key_scheme), Depends(refuse_while_draining)])


def get_service(request: Request) -> GenerationService:
    return request.app.state.gateway.service


ServiceDep = Annotated[GenerationService, Depends(get_service)]


def _virtual_tokens(request: Request, service: GenerationService, model: str) -> int:
    adapter_id = service.resolve_model(model)  # 404 for an unknown model
    return 0 if adapter_id is None else request.app.state.gateway.registry.get(adapter_id).virtual_tokens


@router.post("/tokenize")
async def tokenize(body: TokenizeRequest, request: Request, service: ServiceDep) -> dict[str, Any]:
    virtual = _virtual_tokens(request, service, body.model)
    if body.messages is not None:
        chat = ChatCompletionRequest(model=body.model, messages=body.messages)
        ids = await service.chat_prompt(chat, generation_prompt=body.add_generation_prompt, check_length=False)
    else:
        service._check_chars([body.prompt], "prompt")
        ids = await asyncio.to_thread(service.tokenizer.encode, body.prompt)
    return {"count": len(ids) + virtual, "max_model_len": service.context_window, "tokens": ids,
            "virtual_tokens": virtual}


@router.post("/detokenize")
async def detokenize(body: DetokenizeRequest, request: Request, service: ServiceDep) -> dict[str, Any]:
    _virtual_tokens(request, service, body.model)
    if len(body.tokens) > service.context_window:
        raise BadRequestError(f"{len(body.tokens)} tokens; the limit is the context window "
                              f"({service.context_window})", param="tokens")
    vocab = len(service.tokenizer)
    if any(not 0 <= t < vocab for t in body.tokens):
        raise BadRequestError(f"token ids must be from 0 to {vocab - 1}", param="tokens")
    return {"prompt": await asyncio.to_thread(service.tokenizer.decode, body.tokens)}
