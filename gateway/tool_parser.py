"""Reading tool calls out of generated text, as it streams.

The gateway's tool-call format (``gateway.tool_calls``; README "Tools") is one block per call:
``<tool_call>{"name":"get_weather","arguments":{"city":"Paris"}}</tool_call>``, possibly after
some text (``tool_choice: "auto"``). ``ToolCallParser`` turns the text into content pieces, call
starts (id and name) and argument pieces, incrementally, so a stream can send
``delta.tool_calls`` as the arguments are generated, and a whole answer goes through the same
code. ``CallTracker`` follows only whether a sequence is inside a call (for the grammar's
control-character ban, ``gateway.structured``).

Both follow the call's JSON with ``JsonNesting`` (depth and strings), never with a search for the
closing marker: an argument string may well contain ``</tool_call>``.
"""

from __future__ import annotations

import re
import secrets
from dataclasses import dataclass, field

OPEN = "<tool_call>"
CLOSE = "</tool_call>"
# what follows OPEN up to the arguments' value: the grammar writes it compact; whitespace is
# tolerated here so that a hand-written history parses the same
_HEAD = re.compile(r'\s*\{\s*"name"\s*:\s*"([A-Za-z0-9_-]{1,64})"\s*,\s*"arguments"\s*:')
_HEAD_MAX = 128  # longer than any head can be: the text after OPEN is not a call
_ID_ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"


def new_call_id() -> str:
    return "call_" + "".join(secrets.choice(_ID_ALPHABET) for _ in range(24))


class JsonNesting:
    """Where a JSON text stands, one character at a time: bracket depth and whether inside a
    string (escapes followed)."""

    def __init__(self) -> None:
        self.depth = 0
        self.in_string = False
        self._escaped = False

    def feed(self, ch: str) -> None:
        if self.in_string:
            if self._escaped:
                self._escaped = False
            elif ch == "\\":
                self._escaped = True
            elif ch == '"':
                self.in_string = False
        elif ch == '"':
            self.in_string = True
        elif ch in "{[":
            self.depth += 1
        elif ch in "}]":
            self.depth -= 1


class CallTracker:
    """Whether the text so far ends inside a tool call (from OPEN to the end of the call's JSON)."""

    def __init__(self) -> None:
        self.inside = False
        self._window = ""
        self._json: JsonNesting | None = None

    def feed(self, text: str) -> None:
        for ch in text:
            if not self.inside:
                self._window = (self._window + ch)[-len(OPEN):]
                if self._window == OPEN:
                    self.inside, self._json, self._window = True, JsonNesting(), ""
                continue
            json = self._json
            opened = json.depth > 0
            json.feed(ch)
            if opened and json.depth == 0 and not json.in_string:  # the call's object is closed
                self.inside = False


@dataclass
class Content:
    text: str


@dataclass
class CallStart:
    index: int  # the call's position in the message's tool_calls
    id: str
    name: str


@dataclass
class Arguments:
    index: int
    text: str  # the next piece of the call's arguments (a JSON text once all pieces are joined)


Piece = Content | CallStart | Arguments


@dataclass
class ToolCall:
    id: str
    name: str
    arguments: str = ""


@dataclass
class ToolCallParser:
    """Feed generated text in order (``feed``), then ``finish``; each returns the pieces that
    became certain. ``calls`` and ``content`` hold everything so far."""

    calls: list[ToolCall] = field(default_factory=list)
    content: str = ""
    _state: str = "text"  # text -> head -> arguments -> tail -> text ...
    _buffer: str = ""
    _json: JsonNesting | None = None

    def feed(self, text: str) -> list[Piece]:
        pieces: list[Piece] = []
        self._buffer += text
        while self._buffer:
            before = (self._state, len(self._buffer))
            getattr(self, "_" + self._state)(pieces)
            if (self._state, len(self._buffer)) == before:  # waits for more text
                break
        return pieces

    @property
    def cut(self) -> bool:
        """The text ended inside a call's arguments (a stop string or max_tokens cut it)."""
        return self._state == "arguments"

    def finish(self) -> list[Piece]:
        """The end of the text: what was held back is content (a half-written head included)."""
        pieces: list[Piece] = []
        if self._state == "text":
            self._emit_content(pieces, self._buffer)
        elif self._state == "head":
            self._emit_content(pieces, OPEN + self._buffer)
        self._buffer = ""
        return pieces

    def _emit_content(self, pieces: list[Piece], text: str) -> None:
        if text:
            self.content += text
            pieces.append(Content(text))

    def _text(self, pieces: list[Piece]) -> None:
        at = self._buffer.find(OPEN)
        if at >= 0:
            self._emit_content(pieces, self._buffer[:at])
            self._buffer, self._state = self._buffer[at + len(OPEN):], "head"
            return
        hold = _partial_suffix(self._buffer, OPEN)  # may be the start of a call: wait
        self._emit_content(pieces, self._buffer[:len(self._buffer) - hold])
        self._buffer = self._buffer[len(self._buffer) - hold:]

    def _head(self, pieces: list[Piece]) -> None:
        match = _HEAD.match(self._buffer)
        if match:
            call = ToolCall(new_call_id(), match.group(1))
            self.calls.append(call)
            pieces.append(CallStart(len(self.calls) - 1, call.id, call.name))
            self._buffer, self._state, self._json = self._buffer[match.end():].lstrip(), "arguments", JsonNesting()
        elif len(self._buffer) > _HEAD_MAX:  # not a call after all: plain text
            text, self._buffer, self._state = OPEN + self._buffer, "", "text"
            self._emit_content(pieces, text)

    def _arguments(self, pieces: list[Piece]) -> None:
        json, taken, done = self._json, 0, False
        for ch in self._buffer:
            if json.depth == 0 and not json.in_string and ch in "},":
                done = True  # a scalar's end (or the call's own closing brace): not part of it
                break
            json.feed(ch)
            taken += 1
            if json.depth == 0 and not json.in_string and ch in "}]":
                done = True  # the arguments' object is complete
                break
        text, self._buffer = self._buffer[:taken], self._buffer[taken:]
        if text:
            self.calls[-1].arguments += text
            pieces.append(Arguments(len(self.calls) - 1, text))
        if done:
            self._state = "tail"

    def _tail(self, pieces: list[Piece]) -> None:
        at = self._buffer.find(CLOSE)
        if at >= 0:  # the call's closing brace, then the marker
            self._buffer, self._state = self._buffer[at + len(CLOSE):], "text"


def _partial_suffix(text: str, marker: str) -> int:
    """Length of the longest end of ``text`` that is a proper start of ``marker``."""
    for size in range(min(len(text), len(marker) - 1), 0, -1):
        if marker.startswith(text[-size:]):
            return size
    return 0
