"""From a validated API request to engine work and back: resolve the model name, apply limits,
tokenize, hold the adapter for the request's lifetime, and collect the engine's events."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from adapters.registry import AdapterRegistry
from gateway.engine import Engine, EngineRequest, SequenceEvent
from gateway.errors import BadRequestError, ModelNotFoundError
from gateway.protocol import ChatCompletionRequest, CompletionRequest
from gateway.sampling import SamplingParams
from gateway.settings import Settings

log = logging.getLogger(__name__)


@dataclass
class ChoiceEvent:
    index: int
    text: str
    finish_reason: str | None
    error: str | None = None


@dataclass
class Generation:
    """A running request: its events in order, and a way to stop it."""

    prompt_tokens: int
    choices: int
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    requests: list[EngineRequest] = field(default_factory=list)
    completion_tokens: dict[int, int] = field(default_factory=dict)

    def cancel(self) -> None:
        for request in self.requests:
            request.cancelled = True

    async def events(self) -> AsyncIterator[ChoiceEvent]:
        """Yield events until every choice has finished; cancels the work if abandoned."""
        open_choices = self.choices
        try:
            while open_choices:
                event: ChoiceEvent = await self.queue.get()
                if event.finish_reason is not None:
                    open_choices -= 1
                yield event
        finally:
            if open_choices:
                self.cancel()

    @property
    def total_completion_tokens(self) -> int:
        return sum(self.completion_tokens.values())


class GenerationService:
    def __init__(self, engine: Engine, registry: AdapterRegistry, tokenizer, base_name: str,
                 context_window: int, settings: Settings):
        self.engine = engine
        self.registry = registry
        self.tokenizer = tokenizer
        self.base_name = base_name
        self.context_window = context_window
        self.settings = settings
        self.max_prompt_tokens = min(settings.max_prompt_tokens or context_window, context_window)

    # ---- request checks ---------------------------------------------------------------------
    def resolve_model(self, model: str) -> str | None:
        """The adapter id a model name stands for; None for the base model."""
        if model == self.base_name:
            return None
        if model not in self.registry:
            raise ModelNotFoundError(f"The model '{model}' does not exist", param="model")
        return model

    def sampling_params(self, body: ChatCompletionRequest | CompletionRequest) -> SamplingParams:
        s = self.settings
        if body.n > s.max_n:
            raise BadRequestError(f"n is {body.n}; the limit is {s.max_n}", param="n")
        stop = body.stop_list()
        if len(stop) > s.max_stop_sequences:
            raise BadRequestError(f"{len(stop)} stop sequences; the limit is {s.max_stop_sequences}", param="stop")
        if any(len(x) > s.max_stop_length for x in stop):
            raise BadRequestError(f"a stop sequence is longer than {s.max_stop_length} characters", param="stop")
        max_tokens = body.requested_max_tokens()
        if max_tokens is not None and max_tokens > s.max_tokens_limit:
            param = "max_completion_tokens" if getattr(body, "max_completion_tokens", None) else "max_tokens"
            raise BadRequestError(f"{param} is {max_tokens}; the limit is {s.max_tokens_limit}", param=param)
        return SamplingParams(max_tokens=max_tokens or s.default_max_tokens, temperature=body.temperature,
                              top_p=body.top_p, seed=body.seed, stop=tuple(stop))

    def chat_prompt(self, body: ChatCompletionRequest) -> list[int]:
        if not getattr(self.tokenizer, "chat_template", None):
            raise BadRequestError(
                f"the model '{self.base_name}' has no chat template; use /v1/completions, or start the "
                "gateway with GATEWAY_CHAT_TEMPLATE set to a template file", param="messages")
        try:
            messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()}
                        for m in body.messages]
        except ValueError as exc:
            raise BadRequestError(str(exc), param="messages") from None
        text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return self._check_length(self.tokenizer.encode(text, add_special_tokens=False), "messages")

    def completion_prompts(self, body: CompletionRequest) -> list[list[int]]:
        prompts = body.prompts()
        if not prompts or len(prompts) > self.settings.max_n:
            raise BadRequestError(f"prompt must hold 1 to {self.settings.max_n} strings", param="prompt")
        if len(prompts) * body.n > self.settings.max_n:
            raise BadRequestError(f"{len(prompts)} prompts x n={body.n} exceeds the limit of "
                                  f"{self.settings.max_n} choices", param="n")
        return [self._check_length(self.tokenizer.encode(p), "prompt") for p in prompts]

    def _check_length(self, ids: list[int], param: str, virtual_tokens: int = 0) -> list[int]:
        if not ids:
            raise BadRequestError("the prompt is empty", param=param)
        if len(ids) + virtual_tokens > self.max_prompt_tokens:
            extra = f" plus the adapter's {virtual_tokens} virtual tokens" if virtual_tokens else ""
            raise BadRequestError(
                f"the prompt has {len(ids)} tokens{extra}; this model's limit is {self.max_prompt_tokens} tokens "
                f"(context window {self.context_window})", param=param, code="context_length_exceeded")
        return ids

    # ---- running --------------------------------------------------------------------------------
    async def start(self, adapter_id: str | None, prompts: list[list[int]], params: SamplingParams,
                    n: int, prompt_param: str) -> Generation:
        if adapter_id is not None:
            virtual = self.registry.get(adapter_id).weights.virtual_tokens
            for ids in prompts:  # prompt tuning adds positions the plain length check did not see
                self._check_length(ids, prompt_param, virtual)
        slot = 0 if adapter_id is None else await self.registry.acquire(adapter_id)
        loop = asyncio.get_running_loop()
        generation = Generation(prompt_tokens=sum(len(p) for p in prompts), choices=len(prompts) * n)
        remaining = [len(prompts)]

        def release() -> None:  # engine thread -> event loop
            remaining[0] -= 1
            if remaining[0] == 0 and adapter_id is not None:
                loop.call_soon_threadsafe(self.registry.release, adapter_id)

        def sink_for(offset: int):
            def sink(event: SequenceEvent) -> None:
                index = offset + event.index
                generation.completion_tokens[index] = event.completion_tokens
                loop.call_soon_threadsafe(generation.queue.put_nowait, ChoiceEvent(
                    index, event.text, event.finish_reason, event.error))
            return sink

        try:
            for i, ids in enumerate(prompts):
                request = EngineRequest(prompt_ids=ids, slot=slot, params=params, sink=sink_for(i * n), n=n,
                                        on_done=release)
                self.engine.submit(request)
                generation.requests.append(request)
        except Exception:
            generation.cancel()  # what was queued ends as cancelled and releases itself
            for _ in range(len(prompts) - len(generation.requests)):
                release()
            raise
        return generation
