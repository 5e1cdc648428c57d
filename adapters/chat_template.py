"""Render a chat through the tokenizer's chat template straight to token ids, with the control
tokens typed inside messages encoded as plain text: only the template itself writes turn
boundaries (``<|im_start|>``, ``<|im_end|>`` ...), so a message cannot forge a system turn.
Training and serving both render through here, so an adapter is served with the very tokens it
was trained on."""

from __future__ import annotations

import inspect
from collections.abc import Mapping


def template_kwargs(tokenizer) -> dict:
    """Keyword arguments for ``apply_chat_template``: plain ids back, and control tokens in
    messages sanitized where transformers supports it (``sanitize_control_tokens``)."""
    try:
        params = inspect.signature(tokenizer.apply_chat_template).parameters
    except (TypeError, ValueError):
        return {}
    kwargs = {}
    if "return_dict" in params:
        kwargs["return_dict"] = False
    if "sanitize_control_tokens" in params:
        kwargs["sanitize_control_tokens"] = True
    return kwargs


def as_ids(out) -> list[int]:
    """Normalise what ``apply_chat_template(tokenize=True)`` returns (list, dict/BatchEncoding, tensor)."""
    if isinstance(out, Mapping):
        out = out["input_ids"]
    if hasattr(out, "tolist"):
        out = out.tolist()
    out = list(out)
    if len(out) == 1 and isinstance(out[0], (list, tuple)):
        out = list(out[0])
    if not all(isinstance(i, int) and not isinstance(i, bool) for i in out):
        raise TypeError(f"apply_chat_template returned {type(out).__name__} that is not a list of token ids")
    return out


def render_chat(tokenizer, messages: list[dict], *, generation_prompt: bool, kwargs: dict | None = None,
                tools: list[dict] | None = None) -> list[int]:
    """Token ids of ``messages`` as the chat template writes them (``kwargs``: from
    ``template_kwargs``, computed once by callers that render many chats; ``tools``: function
    definitions, for templates that render them)."""
    kwargs = template_kwargs(tokenizer) if kwargs is None else kwargs
    if tools:
        kwargs = {**kwargs, "tools": tools}
    return as_ids(tokenizer.apply_chat_template(messages, add_generation_prompt=generation_prompt,
                                                tokenize=True, **kwargs))
