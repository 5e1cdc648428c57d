"""Log-probabilities as the API reports them: the model's own distribution (base plus adapter)
at each position, ``log_softmax`` of the raw logits, before temperature, top-p, penalties and
logit_bias. Computed for a whole batch of rows at once on the device; one transfer brings the
chosen tokens' values and the top-k back.

``TokenStrings`` turns token ids into the strings and bytes OpenAI's response shapes carry.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch

LOGPROB_FLOOR = -9999.0


@dataclass(frozen=True)
class TokenLogprob:
    """One position: its token, that token's log-probability (None for a prompt's first token,
    which nothing predicts) and the ``k`` most likely tokens with theirs, most likely first.
    ``end``: the token is the end-of-sequence token that finished the answer (it has no text;
    legacy completions list it, chat leaves it out, as OpenAI and vLLM do)."""

    token: int
    logprob: float | None
    top: tuple[tuple[int, float], ...] = ()
    end: bool = False


def score_rows(logits: torch.Tensor, targets: Sequence[int], top: Sequence[int]) -> list[TokenLogprob]:
    """``logits [rows, vocab]`` and each row's target token and top-k count -> per row its
    ``TokenLogprob``. Top-k ties are ordered as ``torch.topk`` orders them."""
    if not targets:
        return []
    # a masked-out token (-inf) reports -9999, as OpenAI does: JSON has no infinity
    logp = torch.log_softmax(logits.float(), dim=-1).clamp(min=LOGPROB_FLOOR)
    index = torch.tensor(list(targets), dtype=torch.long, device=logits.device).unsqueeze(-1)
    chosen = logp.gather(-1, index).squeeze(-1).tolist()
    k = min(max(top), logp.shape[-1])
    if k == 0:
        return [TokenLogprob(t, c) for t, c in zip(targets, chosen, strict=True)]
    values, ids = logp.topk(k, dim=-1)
    values, ids = values.tolist(), ids.tolist()
    return [TokenLogprob(t, c, tuple(zip(ids[r][:top[r]], values[r][:top[r]], strict=True)))
            for r, (t, c) in enumerate(zip(targets, chosen, strict=True))]


SENTENCEPIECE_SPACE = "\u2581"  # '▁', how SentencePiece writes a space inside a token
_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")  # a byte-fallback token


def _byte_decoder() -> dict[str, int]:
    """The inverse of GPT-2's byte-level alphabet: bytes that are printable Latin-1 characters
    stand for themselves, every other byte for the code point 256 + its rank among those."""
    printable = set(range(ord("!"), ord("~") + 1)) | set(range(ord("¡"), ord("¬") + 1)) \
        | set(range(ord("®"), ord("ÿ") + 1))
    out, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            out[chr(byte)] = byte
        else:
            out[chr(256 + extra)] = byte
            extra += 1
    return out


class TokenStrings:
    """Token id -> (text, UTF-8 bytes), cached. Byte-level BPE tokens (GPT-2, Llama 3, SmolLM2)
    map back to their exact bytes, so a token holding part of a character reports those bytes, as
    do SentencePiece's byte-fallback tokens (``<0xE2>``); other tokenizers report the bytes of the
    token's decoded text, a SentencePiece word's leading space included. Text that is not whole
    UTF-8 shows its stray bytes as ``\\xNN`` escapes."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        decoder = getattr(getattr(tokenizer, "backend_tokenizer", None), "decoder", None)
        self._bytes_of = _byte_decoder() if type(decoder).__name__ == "ByteLevel" else None
        self._special = set(getattr(tokenizer, "all_special_ids", ()))
        self._cache: dict[int, tuple[str, bytes]] = {}

    def get(self, token: int) -> tuple[str, bytes]:
        found = self._cache.get(token)
        if found is None:
            found = self._cache[token] = self._compute(token)
        return found

    def text(self, token: int) -> str:
        return self.get(token)[0]

    def _compute(self, token: int) -> tuple[str, bytes]:
        if self._bytes_of is not None and token not in self._special:
            piece = self.tokenizer.convert_ids_to_tokens(token)
            if isinstance(piece, str):
                data = b"".join(bytes([self._bytes_of[c]]) if c in self._bytes_of else c.encode() for c in piece)
                return data.decode("utf-8", errors="backslashreplace"), data
        text = self.tokenizer.decode([token])
        piece = None if token in self._special else self.tokenizer.convert_ids_to_tokens(token)
        if isinstance(piece, str):  # SentencePiece (Llama 2, Mistral): the vocabulary says more
            if (byte := _BYTE_PIECE.fullmatch(piece)) is not None and text != piece:  # byte fallback
                data = bytes([int(byte.group(1), 16)])
                return data.decode("utf-8", errors="backslashreplace"), data
            if piece.startswith(SENTENCEPIECE_SPACE) and not text.startswith(" "):
                text = " " + text  # decoding the token alone strips the space its word begins with
        return text, text.encode()
