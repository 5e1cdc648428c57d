"""Incremental detokenization with stop strings, for one generated sequence."""

from __future__ import annotations

from collections.abc import Sequence


class IncrementalText:
    """Turns generated token ids into text deltas that are safe to send.

    Text that could still become a stop string is held back; a stop string ends the text right
    before it; an incomplete UTF-8 character (decoded as U+FFFD) waits for its next token.
    """

    def __init__(self, tokenizer, stop: Sequence[str] = ()):
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self.ids: list[int] = []
        self.text = ""  # decoded text of all ids so far
        self.sent = 0  # characters already handed out

    def push(self, token_id: int) -> tuple[str, bool]:
        """Add a token; return (text ready to send, whether a stop string was hit)."""
        self.ids.append(token_id)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):
            return "", False
        self.text = text
        if self.stop:
            window = max(0, self.sent - max(len(s) for s in self.stop))
            hits = [i for i in (text.find(s, window) for s in self.stop) if i >= 0]
            if hits:
                end = min(hits)
                self.text = text[:end]
                return self._take(end), True
            return self._take(len(text) - self._stop_prefix_len(text)), False
        return self._take(len(text)), False

    def flush(self) -> str:
        """All text not yet sent (at the end of generation)."""
        return self._take(len(self.text))

    def _take(self, end: int) -> str:
        delta = self.text[self.sent:end] if end > self.sent else ""
        self.sent = max(self.sent, end)
        return delta

    def _stop_prefix_len(self, text: str) -> int:
        """Length of the longest suffix of ``text`` that begins some stop string."""
        best = 0
        for stop in self.stop:
            for size in range(min(len(stop) - 1, len(text)), best, -1):
                if text.endswith(stop[:size]):
                    best = size
                    break
        return best
