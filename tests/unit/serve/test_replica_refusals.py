"""What ``LLMServer`` refuses before it accepts a request, and what it does
once when Serve stops it (helpers/serve/model_server.py), over a stand-in
engine: no model, no Ray."""

from __future__ import annotations

import asyncio
import contextlib
from concurrent.futures import Future
from typing import Any

import pytest

from helpers.protocol import (
    BatcherClosedError,
    Completion,
    FieldError,
    Prompt,
    PromptTooLongError,
    Refused,
    Sampling,
)
from helpers.serve import model_server, spare_worker
from helpers.serve.model_server import LLMServer

SAMPLING = Sampling(max_new_tokens=8, temperature=0.0, top_p=1.0)


class SubmitsOnly:
    """What ``LLMServer.stream`` uses of an Engine. A request is its prompt's
    text; submitting one in ``refusals`` fails its future at once, as the
    batcher does with a prompt it cannot admit, or with anything once its
    decode loop has stopped. Other requests stay pending."""

    def __init__(self, refusals: dict[str, Exception]) -> None:
        self.refusals = refusals
        self.submitted: list[Future[Completion]] = []

    def request(self, prompt: str, sampling: Sampling) -> str:
        return prompt

    def together(self) -> contextlib.AbstractContextManager[None]:
        return contextlib.nullcontext()

    def submit(self, request: str, *callbacks: Any) -> Future[Completion]:
        future: Future[Completion] = Future()
        if request in self.refusals:
            future.set_exception(self.refusals[request])
        self.submitted.append(future)
        return future


def server_over(engine: SubmitsOnly) -> LLMServer:
    server = LLMServer.__new__(LLMServer)  # no model loaded
    server.engine, server.metrics = engine, None  # type: ignore[assignment]
    return server


async def first_batch(server: LLMServer, prompts: list[str]) -> list[Any]:
    stream = server.stream([Prompt(text, raw=True) for text in prompts], SAMPLING)
    async with contextlib.aclosing(stream):
        return await anext(stream)


@pytest.mark.parametrize(
    "refusal",
    [
        FieldError("prompt", "prompt: it has no tokens; a completion needs one or more"),
        PromptTooLongError("exceed the 64 positions a sequence may have in this cache"),
    ],
    ids=["no tokens", "longer than the cache"],
)
def test_a_prompt_refused_at_submission_is_answered_before_it_is_accepted(
    refusal: Exception,
) -> None:
    """The ingress answers a 4xx only while nothing was accepted: after the
    acceptance signal, a streamed reply has begun with a 200. The refusal is
    returned, not raised: Serve would log a raised one as a failed request,
    traceback and all."""
    engine = SubmitsOnly({"refused": refusal})
    first = asyncio.run(first_batch(server_over(engine), ["admitted", "refused"]))
    assert isinstance(first, Refused) and first.error is refusal
    assert engine.submitted[0].cancelled(), "the request's other prompt decodes on for nobody"


def test_a_replica_whose_decode_loop_stopped_fails_the_call_before_it_is_accepted() -> None:
    """A server fault, not the client's: raised, so Serve logs it, and the
    ingress answers 503."""
    engine = SubmitsOnly({"refused": BatcherClosedError()})
    with pytest.raises(BatcherClosedError):
        asyncio.run(first_batch(server_over(engine), ["admitted", "refused"]))
    assert engine.submitted[0].cancelled()


def test_a_token_id_outside_the_vocabulary_is_returned_refused_by_detokenize() -> None:
    class Vocabulary(SubmitsOnly):
        def check_vocabulary(self, field: str, tokens: list[int]) -> None:
            raise FieldError(field, f"{field}: token id {tokens[0]} is not in the vocabulary")

    answer = server_over(Vocabulary({})).detokenize([10**9])
    assert isinstance(answer, Refused) and answer.error.field == "tokens"


def test_prompts_that_are_all_admitted_are_accepted() -> None:
    engine = SubmitsOnly({})
    assert asyncio.run(first_batch(server_over(engine), ["one", "two"])) == []


def test_a_stopped_replica_asks_for_one_spare_however_often_it_is_deleted(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Serve calls ``__del__`` itself, and garbage collection may call it again."""
    asked: list[str] = []
    monkeypatch.setenv(spare_worker.KEY_VARIABLE, "key")
    monkeypatch.setattr(model_server.spare_worker, "ask_for_spare", asked.append)
    server = server_over(SubmitsOnly({}))
    server.__del__()
    server.__del__()
    assert asked == ["key"]
