"""Chat answers with tool calls, shaped as OpenAI shapes them: ``message.tool_calls`` (``content``
null when the answer is only calls) and ``finish_reason: "tool_calls"``; streamed, one
``delta.tool_calls`` entry per call whose first chunk carries its id, type and name, then the
arguments in pieces. Both read the text with ``gateway.tool_parser.ToolCallParser``."""

from __future__ import annotations

from typing import Any

from gateway.tool_parser import Arguments, CallStart, Content, Piece, ToolCallParser


def finish_reason(reason: str | None, parser: ToolCallParser) -> str | None:
    """A complete answer that called tools ends with ``tool_calls``; a cut one keeps its reason
    (``length``, or ``stop`` where a stop string ended it inside a call's arguments)."""
    return "tool_calls" if reason == "stop" and parser.calls and not parser.cut else reason


def tool_message(text: str, reason: str | None) -> tuple[dict[str, Any], str | None]:
    """The ``message`` and ``finish_reason`` of a whole answer."""
    parser = ToolCallParser()
    parser.feed(text)
    parser.finish()
    content = parser.content if parser.content.strip() or not parser.calls else None
    message: dict[str, Any] = {"role": "assistant", "content": content}
    if parser.calls:
        message["tool_calls"] = [
            {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
            for c in parser.calls]
    return message, finish_reason(reason, parser)


class ToolDeltas:
    """One streamed choice: generated text in, ``delta`` objects out."""

    def __init__(self) -> None:
        self.parser = ToolCallParser()

    def feed(self, text: str) -> list[dict[str, Any]]:
        return [_delta(p) for p in self.parser.feed(text)]

    def finish(self, reason: str | None) -> tuple[list[dict[str, Any]], str | None]:
        deltas = [_delta(p) for p in self.parser.finish()]
        return deltas, finish_reason(reason, self.parser)


def _delta(piece: Piece) -> dict[str, Any]:
    if isinstance(piece, Content):
        return {"content": piece.text}
    if isinstance(piece, CallStart):
        return {"tool_calls": [{"index": piece.index, "id": piece.id, "type": "function",
                                "function": {"name": piece.name, "arguments": ""}}]}
    assert isinstance(piece, Arguments)
    return {"tool_calls": [{"index": piece.index, "function": {"arguments": piece.text}}]}
