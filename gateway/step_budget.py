"""How many prompt tokens a step of the paged engine may compute beside its decoding rows.

Fixed (the default): ``max_step_tokens`` every step. Adaptive (``max_decode_slowdown`` set): as
many as keep the decoding rows' mean step time within that multiple of a decode-only step, from
costs measured as the engine runs (the time-between-tokens budget of Sarathi-Serve, learnt from
the steps themselves instead of profiled ahead). On a GPU, where a decode step is bound by memory
bandwidth, hundreds of prompt tokens ride along almost free and the budget reaches
``max_step_tokens``; on a CPU, where every token costs arithmetic, it shrinks to a few, and long
prompts take that much longer to reach their first token.

How it measures: one prompt token's cost is a small difference of two step times that each swing
by 10-20% on a busy machine, and drift over tens of seconds. So while the budget binds, steps
alternate: a decode-only step, then a step with prompt tokens, each priced against the decode-only
step just before it (drift cancels); a token's price is the summed extra time of the recent mixed
steps over their summed tokens (one noisy step moves it little). Alternating costs no prompt
throughput: the mixed steps take twice the allowance, so the mean over both stays within it.
"""

from __future__ import annotations

import statistics
from collections import deque


class StepBudget:
    DECODE_WINDOW = 8  # recent decode-only steps whose median is the allowance's reference
    MIXED_WINDOW = 32  # recent mixed steps that price a token together
    # while the budget binds, every other step is decode-only; while it does not (prompt tokens
    # nearly free, the budget at max_tokens), one in this many, to notice when it starts to bind
    SPARSE_EVERY = 16
    PROBE_TOKENS = 16  # a step's prompt tokens before a prompt token's cost is known

    def __init__(self, max_tokens: int, max_slowdown: float | None = None):
        if max_tokens < 1:
            raise ValueError("max_tokens must be at least 1")
        if max_slowdown is not None and max_slowdown <= 1:
            raise ValueError("max_slowdown must be more than 1")
        self.max_tokens = max_tokens
        self.max_slowdown = max_slowdown
        self._decode: deque[float] = deque(maxlen=self.DECODE_WINDOW)  # seconds of decode-only steps
        self._mixed: deque[tuple[int, float]] = deque(maxlen=self.MIXED_WINDOW)  # (prompt tokens, extra seconds)
        self._mixed_steps = 0  # steps with prompt tokens since the last decode-only one
        # ``estimate()`` as of the last step, for other threads (/metrics): estimate() itself
        # iterates the deques, which the engine thread appends to meanwhile
        self.published = self.estimate()

    @property
    def decode_seconds(self) -> float | None:
        """A decode-only step (the median of the recent ones)."""
        return statistics.median(self._decode) if self._decode else None

    @property
    def token_seconds(self) -> float | None:
        """One prompt token more in a step (recent mixed steps' extra time / their prompt tokens)."""
        if not self._mixed:
            return None
        return sum(extra for _, extra in self._mixed) / sum(tokens for tokens, _ in self._mixed)

    def estimate(self) -> int:
        """Prompt tokens of a mixed step the measured costs allow (``max_tokens`` when fixed)."""
        decode, token = self.decode_seconds, self.token_seconds
        if self.max_slowdown is None or decode is None:
            return self.max_tokens
        if token is None:
            return min(self.PROBE_TOKENS, self.max_tokens)
        # at most twice the most tokens measured: one noisy probe that read prompt tokens as free
        # must not make the next step carry max_tokens (seconds of stall on a CPU)
        most = min(self.max_tokens, 2 * max(tokens for tokens, _ in self._mixed))
        if token <= 0:  # prompt tokens measured free (noise, or a step bound by memory, not arithmetic)
            return most
        allowance = 2 * (self.max_slowdown - 1) * decode  # a mixed step follows each decode-only one
        # at least one: a prompt always moves on, however slow its tokens
        return max(1, min(most, int(allowance / token)))

    def tokens(self) -> int:
        """Prompt tokens the next step that has decoding rows may compute."""
        if self.max_slowdown is None:
            return self.max_tokens
        budget = self.estimate()
        every = self.SPARSE_EVERY if budget == self.max_tokens else 2
        if not self._decode or self._mixed_steps >= every - 1:
            return 0  # a decode-only step: the reference for the next mixed one
        return budget

    def observe(self, prompt_tokens: int, seconds: float) -> None:
        """A step that had decoding rows took ``seconds`` and computed ``prompt_tokens`` more."""
        if self.max_slowdown is None:
            return
        if prompt_tokens == 0:
            self._decode.append(seconds)
            self._mixed_steps = 0
        elif self._decode:
            self._mixed_steps += 1
            # against the decode-only step just before; kept signed, so a mixed step that came out
            # faster (noise) cancels a slower one instead of only ever raising the price
            self._mixed.append((prompt_tokens, seconds - self._decode[-1]))
        self.published = self.estimate()
