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

from collections.abc import Sequence
from typing import Any

from gateway.detokenize import WindowDecoder
from gateway.logprobs import TokenLogprob, TokenStrings


def chat_logprobs(strings: TokenStrings, entries: Sequence[TokenLogprob]) -> dict[str, Any]:
    def one(token: int, logprob: float | None) -> dict[str, Any]:
        text, data = strings.get(token)
        return {"token": text, "logprob": logprob, "bytes": list(data)}

    return {"content": [{**one(e.token, e.logprob), "top_logprobs": [one(t, lp) for t, lp in e.top]}
                        for e in entries if not e.end], "refusal": None}


class CompletionLogprobs:
    """Builds a choice's legacy ``logprobs`` object piece by piece (a stream sends each piece as
    it comes), keeping the running character offset.

    Offsets count characters of the text the client gets, decoded as that text is
    (``gateway.detokenize.WindowDecoder``), not of the tokens' display strings: a token holding
    part of a character shows it as \\xNN escapes, a SentencePiece token shows no leading space,
    and a character split over tokens begins where its first token does. With ``echo``
    (``prompt_text``), the prompt's entries come first (``prompt=True``) and count the characters
    of the echoed text: a special token counts where the client wrote it there, and a special
    token the tokenizer added (a BOS) counts none; the answer's entries then count from the
    prompt text's end."""

    def __init__(self, strings: TokenStrings, offset: int = 0, prompt_text: str | None = None):
        self.strings = strings
        self.offset = offset
        self._answer_start = offset + len(prompt_text or "")
        self._prompt_text = prompt_text  # None once the answer's entries began
        self._text = WindowDecoder(strings.tokenizer)  # skips special tokens, as the answer's text does
        self._specials = frozenset(getattr(strings.tokenizer, "all_special_ids", None) or ())

    def piece(self, entries: Sequence[TokenLogprob], prompt: bool = False) -> dict[str, Any]:
        if not prompt and self._prompt_text is not None:  # the answer begins after the echoed prompt
            self._prompt_text = None
            self.offset = self._answer_start
            self._text = WindowDecoder(self.strings.tokenizer)
        tokens, offsets, tops = [], [], []
        for e in entries:
            text, _ = self.strings.get(e.token)
            tokens.append(text)
            offsets.append(self.offset)
            if not e.end:  # the end token is not part of the text
                self.offset += self._chars(e.token)
            if e.logprob is None:  # a prompt's first token: nothing predicts it
                tops.append(None)
                continue
            top = {self.strings.text(t): lp for t, lp in e.top}
            top.setdefault(text, e.logprob)
            tops.append(top)
        return {"tokens": tokens, "token_logprobs": [e.logprob for e in entries], "top_logprobs": tops,
                "text_offset": offsets}

    def _chars(self, token: int) -> int:
        if self._prompt_text is not None and token in self._specials:
            # in the echoed text when the client wrote it there; a BOS the tokenizer added is not
            special = self.strings.text(token)
            return len(special) if self._prompt_text.startswith(special, self.offset) else 0
        return len(self._text.push(token))


def merge_pieces(pieces: Sequence[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for piece in pieces:
        for key in out:
            out[key] += piece[key]
    return out
