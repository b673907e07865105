"""The model replica's class on the real embedded model, without Ray: what
happens to the engine's work when a caller goes away, and which thread
does it."""

import asyncio
import json
import threading
import time
from collections.abc import Iterator

import pytest

from helpers.config import ServeConfig
from helpers.engine.grammar import TokenConstraint
from helpers.protocol import Completion, Grammar, Prompt, Sampling
from helpers.serve.model_server import LLMServer


@pytest.fixture(scope="module")
def server() -> Iterator[LLMServer]:
    settings = {
        "LLM_METRICS": "off",
        "SPARE_WORKER": "off",
        "PREFILL_CHUNK_TOKENS": "64",
        "PREFIX_CACHE_MB": "3",
    }
    server = LLMServer(ServeConfig.from_env(settings))
    yield server
    server.engine.close()


def test_the_replicas_engine_prefills_what_prefill_chunk_tokens_says_a_pass(
    server: LLMServer,
) -> None:
    assert server.engine._batcher.prefill_chunk == 64


def test_the_replicas_engine_keeps_what_prefix_cache_mb_says_of_ended_rows(
    server: LLMServer,
) -> None:
    prefixes = server.engine._batcher._rows.prefixes
    assert prefixes is not None and prefixes.budget == 3 * 2**20


def test_a_stream_closed_as_soon_as_it_is_accepted_leaves_nothing_decoding(
    server: LLMServer,
) -> None:
    """The ingress closes the stream when its client leaves, possibly right
    after the replica accepted the request: the prompt must not decode on,
    for nobody, to its last token."""
    stats = server.engine.stats
    cancelled_before, generated_before = stats.cancelled, stats.generated_tokens

    async def accept_then_leave() -> None:
        stream = server.stream([Prompt("Tell a long story.")], Sampling(256, 0.0, 1.0))
        assert await anext(stream) == []  # accepted
        await stream.aclose()

    asyncio.run(accept_then_leave())
    deadline = time.monotonic() + 60
    while stats.cancelled == cancelled_before:
        assert time.monotonic() < deadline, "the prompt decoded on after its stream closed"
        time.sleep(0.02)
    assert stats.generated_tokens - generated_before < 256


def test_a_grammars_first_mask_is_computed_off_the_event_loop(
    server: LLMServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Prompts are submitted on the replica's event loop, inside the lock the
    decode loop takes every step: a grammar's masks, its first included, are
    computed elsewhere (the first on a worker thread, where the request is
    checked), so neither every other request nor the batch waits for one."""
    built_on: list[threading.Thread] = []
    compute_mask = TokenConstraint.compute_mask

    def recorded(self: TokenConstraint) -> None:
        built_on.append(threading.current_thread())
        compute_mask(self)

    monkeypatch.setattr(TokenConstraint, "compute_mask", recorded)
    schema = {"type": "object", "properties": {"answer": {"type": "integer"}}}
    sampling = Sampling(24, 0.0, 1.0, grammar=Grammar(json.dumps(schema)))

    async def stream() -> tuple[threading.Thread, list[Completion]]:
        completions = []
        async for batch in server.stream([Prompt("Reply in JSON.")], sampling):
            assert isinstance(batch, list), batch
            completions += [delta.completion for delta in batch if delta.completion]
        return threading.current_thread(), completions

    event_loop, completions = asyncio.run(stream())
    assert len(completions) == 1
    assert built_on and event_loop not in built_on


def test_a_prompts_choices_share_one_scoring_of_its_echo(
    server: LLMServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``echo`` with ``logprobs`` and ``n`` 3: the prompt is scored once,
    from the ids the replica already tokenized, and every choice begins
    with the same entries."""
    asked: list[str | tuple[int, ...]] = []
    prompt_logprobs = server.engine.prompt_logprobs

    def recorded(prompt: str | tuple[int, ...], top: int) -> object:
        asked.append(prompt)
        return prompt_logprobs(prompt, top)

    monkeypatch.setattr(server.engine, "prompt_logprobs", recorded)
    sampling = Sampling(2, 0.0, 1.0, logprobs=1)
    choices = [Prompt("Once upon a time", raw=True, echo=True, choice=i) for i in range(3)]

    async def completions() -> list[Completion]:
        done = []
        async for batch in server.stream(choices, sampling, streamed=False):
            done += [delta.completion for delta in batch if delta.completion is not None]
        return done

    completed = asyncio.run(completions())
    ids = tuple(server.engine.tokenizer("Once upon a time")["input_ids"])
    assert asked == [ids], "scored once, from its ids"
    assert len(completed) == 3
    assert all(c.text.startswith("Once upon a time") for c in completed)
    assert len({c.logprobs[: len(ids)] for c in completed if c.logprobs}) == 1
