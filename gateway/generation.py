"""From a validated API request to engine work and back: resolve the model name, apply limits,
tokenize, hold the adapter for the request's lifetime, and collect the engine's events."""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import logging
import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from typing import Literal

from jinja2 import TemplateError

from adapters.chat_template import render_chat, template_kwargs
from adapters.registry import AdapterLease, AdapterRegistry
from gateway.engine import Engine, EngineRequest, SequenceEvent
from gateway.errors import BadRequestError, ModelNotFoundError, shown
from gateway.logprobs import TokenLogprob, TokenStrings
from gateway.structured import Grammars
from gateway.tool_calls import ToolSpec, parse_tools
from gateway.tool_prompt import render_messages, template_has_tools
from gateway.protocol import ChatCompletionRequest, CompletionRequest, new_id
from gateway.sampling import SamplingParams, SamplingValueError
from gateway.settings import Settings

log = logging.getLogger(__name__)

# A stream's events wait in its Generation's queue until the response sends them; a client that
# stops reading stops the sending, not the engine. Past this many bytes of unread events (an
# estimate, ``held_bytes``) the request is cancelled and its stream ends with CLIENT_NOT_READING.
# Generous: a plain-text stream at the default limits (n 8 x 4,096 tokens, ~400 bytes an event)
# stays under it even unread, and a reading client with top_logprobs 20 (~3 KB an event) would
# have to fall ~5,400 events behind the engine.
MAX_UNREAD_BYTES = 16 * 2**20
CLIENT_NOT_READING = "client_not_reading"  # the error code of a stream ended that way
# the estimate errs high: an event with one token and its top 20 measured 2,841 bytes (tracemalloc)
EVENT_BYTES = 400  # a ChoiceEvent with a few characters of text and no logprobs
LOGPROB_BYTES = 128  # one (token, logprob) value: a tuple, an int and a float (measured ~120)


@dataclass
class ChoiceEvent:
    index: int
    text: str
    finish_reason: str | None
    error: str | None = None
    error_code: str | None = None  # gateway.engine's code for the error (the API picks the status)
    logprobs: tuple[TokenLogprob, ...] = ()  # the generated tokens this event completes (when asked)
    prompt_logprobs: tuple[TokenLogprob, ...] | None = None  # the prompt's, on a choice's first event


CAPTURE_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


@dataclass
class Capture:
    """The prompt and answer of a chat request an experiment with capture on routed (one choice):
    the messages as the chat template saw them, and the answer's text as it is generated. Over
    ``max_chars`` in all, nothing is kept (a cut prompt or answer would be wrong training data)."""

    messages: list[dict]
    max_chars: int
    text: list[str] = field(default_factory=list)
    chars: int = 0

    def add(self, piece: str) -> None:  # engine thread; read on the loop once the request is over
        self.chars += len(piece)
        if self.chars <= self.max_chars:
            self.text.append(piece)

    @property
    def complete(self) -> bool:
        return self.chars <= self.max_chars

    @classmethod
    def of(cls, body, max_chars: int) -> Capture | None:
        """For a one-choice chat request whose messages a preference file can hold and that fit
        ``max_chars``; else None. Not captured: several choices (feedback could not say which it
        meant), tools (the answer may be a call), tool messages and calls, blank or non-text content."""
        if not isinstance(body, ChatCompletionRequest) or body.n != 1 or body.tools:
            return None
        try:
            messages = [{"role": CAPTURE_ROLES[m.role], "content": m.text()} for m in body.messages
                        if not m.tool_calls]
            if len(messages) != len(body.messages) or any(not m["content"].strip() for m in messages):
                return None
            for m in messages:
                m["content"].encode("utf-8")  # JSON escapes can spell lone surrogates
        except (KeyError, ValueError):  # a role or content a preference file cannot hold
            return None
        size = sum(len(m["content"]) for m in messages)
        if not messages or messages[-1]["role"] == "assistant" or size > max_chars:
            return None
        return cls(messages, max_chars - size)


@dataclass
class RequestRecord:
    """The outcome of one generation request. Opened by ``GenerationService.begin``; once the
    request's work is over (finished, failed, or abandoned by its client) every observer gets it,
    on the event loop. Times are ``time.monotonic()`` seconds."""

    completion_id: str  # the response's ``id``
    endpoint: Literal["chat", "completions"]
    requested_model: str  # the ``model`` the client sent: an adapter id, the base name, an experiment
    adapter_id: str | None = None  # what served it; None: the base model
    stream: bool = False
    experiment: str | None = None  # set when an experiment routed the request
    arm: str | None = None  # the model name the experiment picked
    subject: str | None = None  # the experiment's hash of the sticky subject; None: drawn per request
    api_key_id: str | None = None  # the inference key that sent it (gateway/keys.py ApiKey.id); None: no keys
    created: float = field(default_factory=time.time)  # wall clock, for storage
    start: float = field(default_factory=time.monotonic)
    first_token: float | None = None  # first text sent back
    end: float | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error_type: str | None = None  # None: completed; "cancelled": the client went away; else an error code
    capture: Capture | None = None  # set when the routing experiment keeps prompts and answers

    @property
    def ttft_s(self) -> float | None:
        return None if self.first_token is None else self.first_token - self.start

    @property
    def latency_s(self) -> float | None:
        return None if self.end is None else self.end - self.start


@dataclass(frozen=True)
class Assignment:
    """A model router's choice: serve the request with ``arm`` (an adapter id or the base name)."""

    experiment: str
    arm: str
    subject: str | None = None  # a hash of the sticky subject; None: drawn per request
    capture_chars: int = 0  # > 0: capture the prompt and answer, up to this many characters in all


# (requested model, the OpenAI ``user`` field, request headers) -> an assignment, or None to serve
# the requested model itself
ModelRouter = Callable[[str, str | None, Mapping[str, str]], Assignment | None]
RecordObserver = Callable[[RequestRecord], None]


@dataclass
class Generation:
    """A running request: its events in order, and a way to stop it."""

    prompt_tokens: int
    choices: int
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    requests: list[EngineRequest] = field(default_factory=list)
    completion_tokens: dict[int, int] = field(default_factory=dict)
    record: RequestRecord | None = None
    cancelled: bool = False
    # set once every engine request let go and the record went to the observers (metrics,
    # experiments): a finished response is only sent after it, so a client that has its answer
    # finds it counted and can give feedback on it at once
    settled: asyncio.Event = field(default_factory=asyncio.Event)

    # streams only (None: no bound): see MAX_UNREAD_BYTES. A non-streamed request's events are
    # taken off the queue by a task on the event loop that never waits on the client, so they
    # cannot pile up there; what it collects is bounded by the response's own limits
    max_unread_bytes: int | None = None
    unread_bytes: int = 0  # held_bytes of the events queued and not yet taken
    overflowed: bool = False  # the client stopped reading: cancelled, the queue holds only the error

    def cancel(self) -> None:
        self.cancelled = True
        for request in self.requests:
            request.cancelled = True

    def deliver(self, event: ChoiceEvent) -> None:
        """Queue one engine event (on the event loop; the engine thread hands it over with
        ``call_soon_threadsafe`` and never waits). Past ``max_unread_bytes`` unread, the work is
        cancelled, the unread events dropped and the stream ends with an error."""
        if self.max_unread_bytes is not None:  # a stream: its events are sized (not a bare queue's)
            if self.overflowed:  # sent by the engine before it saw the cancel: nobody will read it
                return
            self.unread_bytes += held_bytes(event)
            if self.unread_bytes > self.max_unread_bytes:
                self._overflow()
                return
        self.queue.put_nowait(event)

    def _overflow(self) -> None:
        self.overflowed = True
        self.cancel()  # the path a disconnect takes: the engine drops the rows within one step
        dropped, held = self.queue.qsize(), self.unread_bytes
        while not self.queue.empty():
            self.queue.get_nowait()
        record = self.record
        if record is not None and record.error_type is None:
            record.error_type = CLIENT_NOT_READING
        log.warning("request %s (key %s) cancelled: its client stopped reading the stream, %d events "
                    "(~%d bytes) unread, over the limit of %d bytes", record and record.completion_id,
                    record and record.api_key_id, dropped + 1, held, self.max_unread_bytes)
        error = ChoiceEvent(0, "", None, error=(
            f"the stream was cancelled: the client stopped reading it and more than {self.max_unread_bytes} "
            "bytes of it waited unsent"), error_code=CLIENT_NOT_READING)
        self.unread_bytes = held_bytes(error)
        self.queue.put_nowait(error)

    async def events(self) -> AsyncIterator[ChoiceEvent]:
        """Yield events until every choice has finished and the request settled; cancels the work
        if abandoned."""
        open_choices = self.choices
        try:
            while open_choices:
                event: ChoiceEvent = await self.queue.get()
                if self.max_unread_bytes is not None:
                    self.unread_bytes -= held_bytes(event)
                if event.finish_reason is not None:
                    open_choices -= 1
                yield event
            await self.settled.wait()  # the engine let go right after the last event: a moment
        finally:
            if open_choices:
                self.cancel()

    @property
    def total_completion_tokens(self) -> int:
        return sum(self.completion_tokens.values())


def held_bytes(event: ChoiceEvent) -> int:
    """About how much memory a queued event holds: its text and its generated tokens' logprob
    values. A prompt's logprobs (echo) are left out: they come once, on a choice's first event,
    bounded by the prompt limits, and counting them could end a stream its client reads."""
    values = sum(1 + len(e.top) for e in event.logprobs)
    return EVENT_BYTES + len(event.text) + LOGPROB_BYTES * values


class LeaseSlotClaim:
    """The engine's claim on a lease's device slot (``gateway.engine.SlotClaim``): polled on the
    engine thread, claimed on the event loop, shared by the engine requests of one API request."""

    def __init__(self, lease: AdapterLease, loop: asyncio.AbstractEventLoop):
        self.lease = lease
        self.loop = loop
        self.future: concurrent.futures.Future | None = None

    def poll(self, wake: Callable[[], None]) -> int | None:
        if self.future is None:
            self.future = asyncio.run_coroutine_threadsafe(self.lease.claim_device(wait=True), self.loop)
            self.future.add_done_callback(lambda _: wake())
        if not self.future.done():
            return None
        return self.future.result()

    def cancel(self) -> None:
        """The request is done: stop a claim still waiting for a slot (on the event loop)."""
        if self.future is not None:
            self.future.cancel()


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
        self._template_kwargs = template_kwargs(tokenizer)
        self._native_tools = template_has_tools(tokenizer)  # else the gateway's tool format (gateway.tool_prompt)
        self.token_strings = TokenStrings(tokenizer)  # logprobs' token texts and bytes
        self.grammars: Grammars | None = None  # structured outputs (set by the app)
        self.model_router: ModelRouter | None = None  # experiments pick a model for their name
        # other names of registered adapters (fine-tuning's ft:... names): name -> adapter id, or None
        self.model_aliases: Callable[[str], str | None] | None = None
        self.observers: list[RecordObserver] = []  # each gets every finished RequestRecord

    # ---- request checks ---------------------------------------------------------------------
    def resolve_model(self, model: str) -> str | None:
        """The adapter id a model name stands for; None for the base model."""
        if model == self.base_name:
            return None
        if model in self.registry:
            return model
        alias = self.model_aliases(model) if self.model_aliases is not None else None
        if alias is None or alias not in self.registry:
            raise ModelNotFoundError(f"The model '{shown(model)}' does not exist", param="model")
        return alias

    def begin(self, body: ChatCompletionRequest | CompletionRequest, headers: Mapping[str, str],
              endpoint: Literal["chat", "completions"]) -> RequestRecord:
        """Open the request's record: its id, and the adapter serving it (the model router, when
        set, may pick another model, e.g. an experiment's arm)."""
        record = RequestRecord(completion_id=new_id("chatcmpl" if endpoint == "chat" else "cmpl"),
                               endpoint=endpoint, requested_model=body.model, stream=body.stream)
        assignment = self.model_router(body.model, body.user, headers) if self.model_router else None
        if assignment is None:
            record.adapter_id = self.resolve_model(body.model)
            return record
        record.experiment, record.arm, record.subject = assignment.experiment, assignment.arm, assignment.subject
        if assignment.capture_chars > 0:
            record.capture = Capture.of(body, assignment.capture_chars)
        try:
            record.adapter_id = self.resolve_model(assignment.arm)
        except ModelNotFoundError:
            raise ModelNotFoundError(f"the experiment '{assignment.experiment}' routed this request to "
                                     f"'{assignment.arm}', which is not registered", param="model") from None
        return record

    def sampling_params(self, body: ChatCompletionRequest | CompletionRequest) -> SamplingParams:
        s = self.settings
        if body.n > s.max_n:
            raise BadRequestError(f"n is {shown(body.n)}; the limit is {s.max_n}", param="n")
        stop = body.stop_list()
        if len(stop) > s.max_stop_sequences:
            raise BadRequestError(f"{len(stop)} stop sequences; the limit is {s.max_stop_sequences}", param="stop")
        if any(len(x) > s.max_stop_length for x in stop):
            raise BadRequestError(f"a stop sequence is longer than {s.max_stop_length} characters", param="stop")
        max_tokens = self._max_tokens(body)
        if isinstance(body, ChatCompletionRequest):
            logprobs = (body.top_logprobs or 0) if body.logprobs else None
            prompt_logprobs = None
        else:  # the prompt's own log-probabilities come back with echo
            logprobs = body.logprobs
            prompt_logprobs = body.logprobs if body.echo else None
        try:  # tiny temperatures become greedy, tiny top_p the top token (see gateway.sampling)
            return SamplingParams(
                max_tokens=s.default_max_tokens if max_tokens is None else max_tokens,
                temperature=body.temperature, top_p=body.top_p, seed=body.seed, stop=tuple(stop),
                presence_penalty=_or(body.presence_penalty, 0.0), frequency_penalty=_or(body.frequency_penalty, 0.0),
                repetition_penalty=_or(body.repetition_penalty, 1.0), logit_bias=self._logit_bias(body.logit_bias),
                logprobs=logprobs, prompt_logprobs=prompt_logprobs)
        except SamplingValueError as exc:
            raise BadRequestError(str(exc), param=exc.param) from None

    def _max_tokens(self, body: ChatCompletionRequest | CompletionRequest) -> int | None:
        """The most tokens the request asks for (None: the default), within ``max_tokens_limit``."""
        completion = getattr(body, "max_completion_tokens", None)
        if completion is not None and body.max_tokens is not None:  # OpenAI refuses the pair, equal or not
            raise BadRequestError("setting max_tokens and max_completion_tokens at the same time is not supported; "
                                  "send max_completion_tokens alone (max_tokens is its deprecated name)",
                                  param="max_tokens", code="invalid_parameter_combination")
        param = "max_tokens" if completion is None else "max_completion_tokens"
        max_tokens = body.max_tokens if completion is None else completion
        if max_tokens is not None and max_tokens > self.settings.max_tokens_limit:
            raise BadRequestError(f"{param} is {shown(max_tokens)}; the limit is {self.settings.max_tokens_limit}",
                                  param=param)
        return max_tokens

    def tool_spec(self, body: ChatCompletionRequest) -> ToolSpec | None:
        """The request's tools and tool choice, checked (None: no tools)."""
        return parse_tools(body.tools, body.tool_choice, body.parallel_tool_calls, max_tools=self.settings.max_tools,
                           max_schema_bytes=self.settings.max_schema_bytes)

    async def constrain(self, params: SamplingParams, body: ChatCompletionRequest | CompletionRequest,
                        tools: ToolSpec | None = None, owner: str | None = None) -> SamplingParams:
        """``params`` with the grammar of the request's ``response_format`` or of its tool calls
        (compiled off the event loop, cached); unchanged for plain text. ``owner``: the request's
        key, whose compiles at once are bounded."""
        fmt = body.response_format
        structured = fmt is not None and fmt.type != "text"
        if tools is not None and tools.constrained:
            if structured:
                raise BadRequestError("response_format cannot be combined with tools unless tool_choice is "
                                      "'none'", param="response_format")
            return dataclasses.replace(params, grammar=await self._tool_grammar(tools, owner))
        if not structured:
            return params
        if self.grammars is None:
            raise BadRequestError("structured outputs are not available on this server", param="response_format")
        schema = fmt.json_schema.schema_ if fmt.type == "json_schema" else None
        return dataclasses.replace(params, grammar=await self.grammars.constraint(schema, owner=owner))

    async def _tool_grammar(self, tools: ToolSpec, owner: str | None):
        """One compile, of the whole tag: compiling each tool's schema alone as well (to name a
        refused one) cost 64 tools 65 compiles, and put 64 grammars no request reads into the cache
        all clients share, even when the tag then failed. The static checks still name their tool;
        a compile's refusal names the one callable tool, or all of ``tools``."""
        if self.grammars is None:
            raise BadRequestError("function calling is not available on this server", param="tools")
        params = {f.name: f"tools[{i}].function.parameters" for i, f in enumerate(tools.functions)}
        for function in tools.functions:
            self.grammars.check(function.parameters, params[function.name])
        callable_ = tools.callable()
        param = params[callable_[0].name] if len(callable_) == 1 else "tools"
        return await self.grammars.structural_tag(tools.structural_tag(), param=param, owner=owner)

    def _logit_bias(self, bias: dict[str, float] | None) -> tuple[tuple[int, float], ...]:
        """OpenAI's ``{"token id": bias}`` as (id, bias) pairs; ids must be in the vocabulary
        (values are checked by ``SamplingParams``)."""
        if not bias:
            return ()
        if len(bias) > self.settings.max_logit_bias:
            raise BadRequestError(f"logit_bias lists {len(bias)} tokens; the limit is {self.settings.max_logit_bias}",
                                  param="logit_bias")
        vocab = len(self.tokenizer)
        pairs: dict[int, float] = {}
        for key, value in bias.items():
            token = int(key) if key.isascii() and key.isdigit() and len(key) <= 12 else -1
            if not 0 <= token < vocab:
                raise BadRequestError(f"logit_bias keys must be token ids from 0 to {vocab - 1}",
                                      param="logit_bias")
            if token in pairs:  # "1" and "01": the sampler adds them up, past the +-100 cap
                raise BadRequestError(f"logit_bias lists token {token} twice (keys that differ only in leading "
                                      "zeros name the same token)", param="logit_bias")
            pairs[token] = float(value)
        return tuple(pairs.items())

    # ---- prompts: sizes are checked first, then templating and tokenization run off the event loop
    async def chat_prompt(self, body: ChatCompletionRequest, tools: ToolSpec | None = None, *,
                          generation_prompt: bool = True, check_length: bool = True) -> list[int]:
        if not getattr(self.tokenizer, "chat_template", None):
            raise BadRequestError(
                f"the model '{self.base_name}' has no chat template; use /v1/completions, or start the "
                "gateway with GATEWAY_CHAT_TEMPLATE set to a template file", param="messages")
        if len(body.messages) > self.settings.max_messages:
            raise BadRequestError(f"{len(body.messages)} messages; the limit is {self.settings.max_messages}",
                                  param="messages")
        # tool calls and results checked, and written as the template (or the gateway) writes them
        chat = render_messages(body.messages, tools, self._native_tools)
        self._check_chars(chat.texts, "messages")
        try:
            # control tokens typed in a message stay plain text: only the template writes turns
            ids = await asyncio.to_thread(render_chat, self.tokenizer, chat.messages,
                                          generation_prompt=generation_prompt, kwargs=self._template_kwargs,
                                          tools=chat.tools)
        except TemplateError as exc:  # the template's own raise_exception(), e.g. roles out of order
            raise BadRequestError(f"the chat template refused these messages: {exc}", param="messages") from None
        return self._check_length(ids, "messages") if check_length else ids

    async def completion_prompts(self, body: CompletionRequest) -> list[list[int]]:
        given = body.token_prompts()
        prompts = given if given is not None else body.prompts()
        if not prompts or len(prompts) > self.settings.max_n:
            raise BadRequestError(f"prompt must hold 1 to {self.settings.max_n} strings", param="prompt")
        if len(prompts) * body.n > self.settings.max_n:
            raise BadRequestError(f"{len(prompts)} prompts x n={body.n} exceeds the limit of "
                                  f"{self.settings.max_n} choices", param="n")
        if given is not None:
            vocab = len(self.tokenizer)
            if any(not 0 <= t < vocab for ids in given for t in ids):
                raise BadRequestError(f"prompt token ids must be from 0 to {vocab - 1}", param="prompt")
            return [self._check_length(ids, "prompt") for ids in given]
        self._check_chars(prompts, "prompt")
        # a raw prompt is the client's whole text: no template boundary to protect, control tokens kept
        encoded = await asyncio.to_thread(lambda: [self.tokenizer.encode(p) for p in prompts])
        return [self._check_length(ids, "prompt") for ids in encoded]

    async def prompt_texts(self, body: CompletionRequest, prompts: list[list[int]]) -> list[str]:
        """The text of each prompt (what ``echo`` returns): as given, or decoded from its ids."""
        if body.token_prompts() is None:
            return body.prompts()
        return await asyncio.to_thread(lambda: [self.tokenizer.decode(ids) for ids in prompts])

    def _check_chars(self, texts: list[str], param: str) -> None:
        """Refuse text too long to be worth tokenizing (the token limit is checked after)."""
        total = sum(len(t) for t in texts)
        if total > self.settings.max_prompt_chars:
            raise BadRequestError(f"the prompt has {total} characters; the limit is "
                                  f"{self.settings.max_prompt_chars}", param=param,
                                  code="context_length_exceeded")

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
    async def start(self, record: RequestRecord, prompts: list[list[int]], params: SamplingParams,
                    n: int, prompt_param: str) -> Generation:
        """Queue the work of ``record``'s request; its observers run once the work is over, also
        when this raises."""
        adapter_id = record.adapter_id
        record.prompt_tokens = sum(len(p) for p in prompts)
        lease = None
        try:
            if adapter_id is not None:
                # the lease pins this version of the adapter (a replace or delete waits for it) and
                # its CPU copy; its device slot is claimed when the engine is ready to run it
                lease = await self.registry.reserve(adapter_id)
                for ids in prompts:  # prompt tuning adds positions the plain length check did not see
                    self._check_length(ids, prompt_param, lease.entry.virtual_tokens)
        except Exception as exc:
            if lease is not None:
                lease.release()
            record.error_type = _error_type(exc)
            self._close(record)
            raise
        loop = asyncio.get_running_loop()
        claim = None if lease is None else LeaseSlotClaim(lease, loop)
        cache_key = "" if lease is None else lease.entry.record.content_hash  # prefix-cache identity
        virtual_tokens = 0 if lease is None else lease.entry.virtual_tokens
        generation = Generation(prompt_tokens=record.prompt_tokens, choices=len(prompts) * n, record=record,
                                max_unread_bytes=MAX_UNREAD_BYTES if record.stream else None)
        remaining = [len(prompts)]

        def release() -> None:  # on the event loop, once per engine request
            remaining[0] -= 1
            if remaining[0] == 0:
                if lease is not None:
                    claim.cancel()
                    lease.release()
                self._finish(generation)

        def sink_for(offset: int):
            def sink(event: SequenceEvent) -> None:  # engine thread
                index = offset + event.index
                generation.completion_tokens[index] = event.completion_tokens
                if record.first_token is None and event.completion_tokens:
                    record.first_token = time.monotonic()
                if record.capture is not None and event.text:
                    record.capture.add(event.text)
                if event.error is not None and record.error_type is None:
                    record.error_type = event.error_code or "generation_failed"
                loop.call_soon_threadsafe(generation.deliver, ChoiceEvent(
                    index, event.text, event.finish_reason, event.error, event.error_code, event.logprobs,
                    event.prompt_logprobs))
            return sink

        requests = [EngineRequest(prompt_ids=ids, slot=0, params=params, sink=sink_for(i * n), n=n,
                                  on_done=lambda: loop.call_soon_threadsafe(release), cache_key=cache_key,
                                  claim=claim, virtual_tokens=virtual_tokens)
                    for i, ids in enumerate(prompts)]
        try:
            self.engine.submit(*requests)  # all or none
        except Exception as exc:
            record.error_type = _error_type(exc)
            for _ in requests:
                release()
            raise
        generation.requests.extend(requests)
        return generation

    def _finish(self, generation: Generation) -> None:
        record = generation.record
        record.completion_tokens = generation.total_completion_tokens
        if record.error_type is None and generation.cancelled:
            record.error_type = "cancelled"
        self._close(record)
        generation.settled.set()

    def _close(self, record: RequestRecord) -> None:
        record.end = time.monotonic()
        for observer in self.observers:
            try:
                observer(record)
            except Exception:  # an observer's bug must not fail requests
                log.exception("request observer %r failed", observer)


def _or(value: float | None, default: float) -> float:
    return default if value is None else value


def _error_type(exc: Exception) -> str:
    """A short name for why a request failed before reaching the engine (an API error's code)."""
    return getattr(exc, "code", None) or type(exc).__name__
