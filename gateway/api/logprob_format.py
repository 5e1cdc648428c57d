"""Log-probabilities in OpenAI's response shapes.

- chat: ``choices[].logprobs = {"content": [{token, logprob, bytes, top_logprobs: [{token,
  logprob, bytes}]}]}`` (in a stream, each chunk carries the tokens of its own text);
- completions (legacy): ``choices[].logprobs = {tokens, token_logprobs, top_logprobs,
  text_offset}``, where each ``top_logprobs`` entry maps token text to logprob for the k most
  likely tokens plus the chosen one (so up to k + 1 entries), and ``text_offset`` counts characters
  from the start of the prompt (echo puts the prompt's tokens first, the first one with null).

The end-of-sequence token that finished an answer has an entry in legacy completions (one entry
per generated token: lm-evaluation-harness sends an echoed prompt with ``max_tokens`` 1 and drops
the last entry as the generated one, whatever it is) but none in chat, as OpenAI does.
"""

from __future__ import annotations

import codecs
from collections.abc import Sequence
from typing import Any

from gateway.logprobs import TokenLogprob, TokenStrings


def chat_logprobs(strings: TokenStrings, entries: Sequence[TokenLogprob]) -> dict[str, Any]:
    def one(token: int, logprob: float | None) -> dict[str, Any]:
        text, data = strings.get(token)
        return {"token": text, "logprob": logprob, "bytes": list(data)}

    return {"content": [{**one(e.token, e.logprob), "top_logprobs": [one(t, lp) for t, lp in e.top]}
                        for e in entries if not e.end], "refusal": None}


class CompletionLogprobs:
    """Builds a choice's legacy ``logprobs`` object piece by piece (a stream sends each piece as
    it comes), keeping the running character offset."""

    def __init__(self, strings: TokenStrings, offset: int = 0):
        self.strings = strings
        self.offset = offset
        # offsets count characters of the text, not of the tokens' display strings: a token holding
        # part of a character shows it as \xNN escapes (8 characters for one emoji's first bytes),
        # and a character split over tokens begins where its first token does
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def piece(self, entries: Sequence[TokenLogprob]) -> dict[str, Any]:
        tokens, offsets, tops = [], [], []
        for e in entries:
            text, data = self.strings.get(e.token)
            tokens.append(text)
            offsets.append(self.offset)
            if not e.end:  # the end token is not part of the text
                self.offset += len(self._utf8.decode(data))
            if e.logprob is None:  # a prompt's first token: nothing predicts it
                tops.append(None)
                continue
            top = {self.strings.text(t): lp for t, lp in e.top}
            top.setdefault(text, e.logprob)
            tops.append(top)
        return {"tokens": tokens, "token_logprobs": [e.logprob for e in entries], "top_logprobs": tops,
                "text_offset": offsets}


def merge_pieces(pieces: Sequence[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for piece in pieces:
        for key in out:
            out[key] += piece[key]
    return out
