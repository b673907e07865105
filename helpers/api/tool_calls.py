"""Reading the model's tool calls back out of its text, whole or as it streams.

The engine's grammar writes each call as ``<tool_call>\\n{"name": ...,
"arguments": {...}}\\n</tool_call>``, calls one line apart. Here they become
OpenAI's ``tool_calls``: an id of the server's making, the function's name,
the arguments as JSON text. Streamed, text goes out as it comes except what
could be the start of a tag; a call goes out in one delta once its closing
tag has arrived, so a client never sees half a call's arguments.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from typing import Any

from helpers.protocol import TOOL_CALL_CLOSE, TOOL_CALL_OPEN, ToolCall


def read_call(body: str) -> ToolCall | None:
    """The call a tagged body holds, or None where it is not one (cut short)."""
    try:
        call = json.loads(body)
    except ValueError:
        return None
    if not (isinstance(call, dict) and isinstance(call.get("name"), str)):
        return None
    arguments = json.dumps(call.get("arguments", {}))
    return ToolCall(f"call_{uuid.uuid4().hex[:24]}", call["name"], arguments)


def openai_call(call: ToolCall, index: int | None = None) -> dict[str, Any]:
    """A call in OpenAI's shape; with ``index`` as a stream's delta carries it."""
    shaped = {
        "id": call.id,
        "type": "function",
        "function": {"name": call.name, "arguments": call.arguments},
    }
    return shaped if index is None else {"index": index, **shaped}


@dataclass
class ToolCallReader:
    """Splits one choice's text, piece by piece, into content and calls."""

    calls: list[ToolCall] = field(default_factory=list)
    _held: str = ""

    def feed(self, text: str) -> tuple[str, list[ToolCall]]:
        """The content that can go out now, and the calls that closed. The
        line breaks between calls are not content."""
        self._held += text
        content, closed = "", []
        while (start := self._held.find(TOOL_CALL_OPEN)) >= 0:
            content += self._held[:start]
            end = self._held.find(TOOL_CALL_CLOSE, start)
            if end < 0:
                self._held = self._held[start:]
                break
            tagged = self._held[start : end + len(TOOL_CALL_CLOSE)]
            self._held = self._held[end + len(TOOL_CALL_CLOSE) :]
            call = read_call(tagged[len(TOOL_CALL_OPEN) : -len(TOOL_CALL_CLOSE)])
            if call is None:
                content += tagged
            else:
                closed.append(call)
        else:
            keep = _partial_tag(self._held)
            content += self._held[: len(self._held) - keep]
            self._held = self._held[len(self._held) - keep :]
        self.calls += closed
        if self.calls and not content.strip():
            content = ""
        return content, closed

    def finish(self) -> str:
        """What was held back, at the end: text that looked like the start of
        a tag. A call cut short by ``max_tokens`` is not content; the reply's
        ``finish_reason: "length"`` says it was cut."""
        rest, self._held = self._held, ""
        return "" if rest.startswith(TOOL_CALL_OPEN) else rest


def split_tool_calls(text: str) -> tuple[str | None, list[ToolCall]]:
    """A whole reply's content (None when it was only calls, whole or cut)
    and its calls."""
    reader = ToolCallReader()
    content, calls = reader.feed(text)
    content += reader.finish()
    if not content.strip() and text.strip():
        return None, calls
    return content, calls


def _partial_tag(text: str) -> int:
    """How many of the last characters of ``text`` could begin the opening tag."""
    for size in range(min(len(TOOL_CALL_OPEN) - 1, len(text)), 0, -1):
        if TOOL_CALL_OPEN.startswith(text[-size:]):
            return size
    return 0
