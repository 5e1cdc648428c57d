"""Incremental detokenization with stop strings, for one generated sequence, in constant work per
token: only a short window of the latest tokens is ever decoded again.

The window technique (prefix offset / read offset): ``prefix`` tokens were already turned into
text and stay only as context, ``unread`` tokens follow them. Decoding prefix + unread and cutting
off the prefix's own text gives the new text with the context a full decode would have seen
(byte-level pieces of one character, a SentencePiece word's leading space). Text that ends in an
incomplete UTF-8 character (decoded as U+FFFD) waits for the tokens that complete it. Once new
text is out, the tokens just read become the next prefix. Every boundary so chosen falls after a
whole character, where decoding the two sides apart gives what decoding them together gives, so
the pieces join to exactly the full decode.
"""

from __future__ import annotations

from collections.abc import Sequence

REPLACEMENT = "\ufffd"
# A character spans at most 4 bytes, so a few byte tokens complete one. Tokens that go on
# decoding to an incomplete character for longer (garbage from a broken adapter) are settled
# early: the window is cut at a boundary where decoding apart equals decoding together (at most
# MAX_UNREAD tokens are decoded per token, whatever the model emits).
MAX_UNREAD = 8
SETTLE_TAIL = 3  # tokens kept after such a cut: enough bytes to decide any character cut at it


class WindowDecoder:
    """Token ids in, text out, decoding a bounded window of tokens per call."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.window: list[int] = []  # prefix tokens, then unread ones
        self.read = 0  # window[:read] is the prefix
        self.prefix_text = ""  # decode(window[:read])
        # while a character is incomplete: the whole characters the unread tokens decode to before
        # it (final, with a byte-local decoder), which a stop string may already be found in
        self.pending = ""
        # special tokens decode to nothing (``skip_special_tokens``), so they never enter the window:
        # there they would count as tokens after an incomplete character without bringing a byte of it
        self.skipped = frozenset(getattr(tokenizer, "all_special_ids", None) or ())

    def push(self, token_id: int) -> str:
        """Add a token; return the new text it completes ('' while a character is incomplete)."""
        if token_id in self.skipped:
            return ""
        self.window.append(token_id)
        text = self._decode(self.window)
        if not text.endswith(REPLACEMENT):
            self.pending = ""
            return self._advance(len(self.window), text)
        if len(self.window) - self.read < MAX_UNREAD:
            self.pending = text[len(self.prefix_text):].rstrip(REPLACEMENT) if text.startswith(self.prefix_text) else ""
            return ""
        self.pending = ""
        return self._settle(text)

    def flush(self) -> str:
        """Text of the tokens still waiting (an incomplete character decodes as U+FFFD)."""
        if self.read == len(self.window):
            return ""
        return self._advance(len(self.window), self._decode(self.window))

    def _settle(self, text: str) -> str:
        """Too many tokens without a whole character: send the text up to the latest boundary
        that splits the window cleanly (no character, nor invalid sequence, spans it)."""
        for cut in range(len(self.window) - SETTLE_TAIL, self.read, -1):
            head = self._decode(self.window[:cut])
            if head + self._decode(self.window[cut:]) == text:
                return self._advance(cut, head)
        # no clean boundary (a decoder that is not byte-local): send it all rather than grow
        return self._advance(len(self.window), text)

    def _advance(self, cut: int, text: str) -> str:
        """``text`` decodes ``window[:cut]``: return what follows the prefix's text, and make
        ``window[read:cut]`` the next prefix."""
        # what follows as many characters as the prefix decoded to: a decoder that rewrites text it
        # gave before (byte fallback turns an ASCII byte already sent into U+FFFD when an invalid
        # byte follows it in the same run) has its rewrite skipped, never sent a second time
        new = text[len(self.prefix_text):]
        dropped = self.read
        self.window = self.window[dropped:]
        self.read = cut - dropped
        self.prefix_text = self._decode(self.window[:self.read])
        return new

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True) if ids else ""


class IncrementalText:
    """Turns generated token ids into text deltas that are safe to send.

    Text that could still become a stop string is held back; a stop string ends the text right
    before it; an incomplete UTF-8 character waits for its next token. Only the held-back text
    and the decoder's window are kept, never the whole text.
    """

    def __init__(self, tokenizer, stop: Sequence[str] = ()):
        self.decoder = WindowDecoder(tokenizer)
        self.stop = [s for s in stop if s]
        self.held = ""  # decoded, not sent: it might be the start of a stop string

    def push(self, token_id: int) -> tuple[str, bool]:
        """Add a token; return (text ready to send, whether a stop string was hit)."""
        piece = self.decoder.push(token_id)
        if not piece:
            # a character waits for its next bytes; a stop string before it need not wait (the
            # token that completes a stop string may end in the first bytes of a character)
            if self.stop and self.decoder.pending:
                text, hit = self._cut_at_stop(self.held + self.decoder.pending)
                if hit:
                    self.held = ""
                    return text, True
            return "", False
        if not self.stop:
            return piece, False
        # a stop string starts inside held + piece: whatever could begin one was held back
        text, hit = self._cut_at_stop(self.held + piece)
        if hit:
            self.held = ""
            return text, True
        keep = self._stop_prefix_len(text)
        self.held = text[len(text) - keep:] if keep else ""
        return text[:len(text) - keep], False

    def flush(self) -> str:
        """All text not yet sent, up to a stop string it holds (at the end of generation)."""
        return self.finish()[0]

    def finish(self) -> tuple[str, bool]:
        """``flush``, and whether the text ends at a stop string (the generation stopped there, not
        at its length limit)."""
        text, hit = self._cut_at_stop(self.held + self.decoder.flush())
        self.held = ""
        return text, hit

    def _cut_at_stop(self, text: str) -> tuple[str, bool]:
        """``text`` up to its earliest stop string, and whether it held one."""
        hits = [i for i in (text.find(s) for s in self.stop) if i >= 0]
        return (text[:min(hits)], True) if hits else (text, False)

    def _stop_prefix_len(self, text: str) -> int:
        """Length of the longest suffix of ``text`` that begins some stop string."""
        best = 0
        for stop in self.stop:
            for size in range(min(len(stop) - 1, len(text)), best, -1):
                if text.endswith(stop[:size]):
                    best = size
                    break
        return best
