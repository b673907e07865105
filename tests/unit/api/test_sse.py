"""How a streamed body ends (helpers/api/sse.py): whatever stops it, the
model call it reads is closed, so the replica stops decoding for nobody."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from helpers.api.errors import ApiError
from helpers.api.sse import SSE_DONE, GenerateStream, sse_body
from helpers.protocol import Completion, TextDelta


class Call:
    """A model call's deltas, as the ingress's ``ModelStream`` gives them:
    lists of deltas, then ``failure`` (if any), and closing it cancels it."""

    def __init__(self, batches: list[list[TextDelta]], failure: Exception | None = None) -> None:
        self.batches, self.failure, self.closed = list(batches), failure, False

    def __aiter__(self) -> Call:
        return self

    async def __anext__(self) -> list[TextDelta]:
        if self.batches:
            return self.batches.pop(0)
        if self.failure:
            raise self.failure
        raise StopAsyncIteration

    async def aclose(self) -> None:
        self.closed = True


class BreaksOnSecondPiece(GenerateStream):
    """A formatter that fails, as a tool call that cannot be read back might."""

    def events(self, delta: TextDelta) -> list[dict[str, Any]]:
        if delta.text == "second":
            raise ValueError("cannot format this piece")
        return super().events(delta)


def body_of(call: Call, shape: GenerateStream, errors: list[int]) -> list[str]:
    async def read() -> list[str]:
        return [event async for event in sse_body(call, shape, "req-1", errors.append)]

    return asyncio.run(read())


def error_of(event: str) -> dict[str, Any]:
    return json.loads(event.removeprefix("data: "))["error"]


DONE = Completion("first second", 1, 2, "length")


def test_a_stream_that_ends_closes_its_call_and_says_done() -> None:
    call, errors = Call([[TextDelta(0, "first")], [TextDelta(0, " second", completion=DONE)]]), []
    events = body_of(call, GenerateStream(), errors)
    assert events[-1] == SSE_DONE and len(events) == 3
    assert call.closed and errors == []


def test_a_formatter_that_fails_closes_the_call_and_sends_one_error_event() -> None:
    call = Call([[TextDelta(0, "first")], [TextDelta(0, "second")], [TextDelta(0, "third")]])
    errors: list[int] = []
    events = body_of(call, BreaksOnSecondPiece(), errors)
    assert call.closed, "the replica would decode on for a stream that has ended"
    assert len(events) == 2 and json.loads(events[0].removeprefix("data: "))["text"] == "first"
    assert error_of(events[1])["request_id"] == "req-1" and errors == [500]


@pytest.mark.parametrize(("status", "kind"), [(408, "timeout_error"), (503, "service_unavailable")])
def test_a_known_failure_is_sent_with_its_type_and_told_with_its_status(
    status: int, kind: str
) -> None:
    call, errors = Call([[TextDelta(0, "first")]], ApiError(status, "gone", None)), []
    events = body_of(call, GenerateStream(), errors)
    assert error_of(events[-1])["type"] == kind and errors == [status]
    assert call.closed
