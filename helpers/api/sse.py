"""Server-sent events: how streamed text leaves the server.

Both streaming APIs use the framing OpenAI's clients read: one ``data: {json}``
event per piece, a blank line after each, and ``data: [DONE]`` at the end. A
failure after the response has started cannot change its status any more, so
it is sent as a last event holding the usual error object (the openai client
raises it as an ``APIError``).

What the events contain differs per API; a :class:`StreamFormat` says.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any, Protocol

from helpers.api.errors import ApiError, error_body
from helpers.protocol import TextDelta

logger = logging.getLogger("ray.serve")

SSE_DONE = "data: [DONE]\n\n"
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def sse_event(data: dict[str, Any]) -> str:
    return f"data: {json.dumps(data, separators=(',', ':'))}\n\n"


class Deltas(Protocol):
    """What :func:`sse_body` reads: a model call's lists of deltas, which it
    closes however the body ends, so the call is cancelled at once."""

    def __aiter__(self) -> AsyncIterator[list[TextDelta]]: ...

    async def aclose(self) -> None: ...


class StreamFormat(Protocol):
    def opening(self) -> list[dict[str, Any]]:
        """Events sent as soon as the model accepted the request."""

    def events(self, delta: TextDelta) -> list[dict[str, Any]]:
        """Events for one piece of text, or for a prompt's completion."""

    def closing(self) -> list[dict[str, Any]]:
        """Events after every prompt completed, before ``[DONE]``."""


class GenerateStream:
    """``/generate`` with ``"stream": true``: ``{"index", "text"}`` per piece,
    then ``{"index", "text": "", "finish_reason", "completion_tokens"}`` per prompt."""

    def opening(self) -> list[dict[str, Any]]:
        return []

    def events(self, delta: TextDelta) -> list[dict[str, Any]]:
        if delta.completion is None:
            return [{"index": delta.index, "text": delta.text}]
        return [
            {
                "index": delta.index,
                "text": delta.text,
                "finish_reason": delta.completion.finish_reason,
                "completion_tokens": delta.completion.completion_tokens,
            }
        ]

    def closing(self) -> list[dict[str, Any]]:
        return []


async def sse_body(
    deltas: Deltas,
    stream_format: StreamFormat,
    request_id: str | None = None,
    on_error: Callable[[int], None] | None = None,
) -> AsyncIterator[str]:
    """The response body; ``deltas`` has already yielded its acceptance signal.

    When the client disconnects, Starlette cancels this generator mid-read,
    and the cancelled read of ``deltas`` cancels the model call; the replica
    then drops the prompts. A failure here (a formatter's included) closes
    ``deltas`` too, is sent as an error event carrying ``request_id`` and is
    told to ``on_error`` with its status (the response's own status is long
    gone).
    """
    try:
        async with contextlib.aclosing(deltas):
            for event in stream_format.opening():
                yield sse_event(event)
            async for batch in deltas:
                for delta in batch:
                    for event in stream_format.events(delta):
                        yield sse_event(event)
        for event in stream_format.closing():
            yield sse_event(event)
        yield SSE_DONE
    except ApiError as err:  # a known failure: a timeout, a replica that died
        if on_error:
            on_error(err.status)
        yield sse_event(error_body(err.status, err.message, err.param, request_id))
    except Exception:
        logger.exception("a stream failed after its response started")
        if on_error:
            on_error(500)
        yield sse_event(error_body(500, "internal error: the stream ended early", None, request_id))
