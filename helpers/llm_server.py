"""The model deployment: owns one :class:`Engine` and batches requests into it.

Replicas of this deployment are the expensive part (a model in memory, CPU or
GPU reserved), so they scale between ``MIN_REPLICAS`` (default 0) and
``MAX_REPLICAS``. Only the ingress calls them, and only for real work: a
health probe never lands here, so it cannot keep a replica awake.

Batching: every prompt, from one request or many, streamed or not, is
submitted to the engine's continuous batcher, which decodes all prompts in
flight together and lets new ones join at the next token. On CPU this is the
largest lever there is: sixteen sequences decoded together give several times
the tokens per second of sixteen decoded one after another.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Future
from dataclasses import asdict, dataclass

from helpers.config import ServeConfig
from helpers.engine import Completion, Engine, GenerationRequest


@dataclass(frozen=True)
class Prompt:
    """What a client asked to complete, before the model's formatting.

    ``/generate`` sends text formatted by ``PROMPT_FORMAT``; ``/v1/completions``
    sends raw text, as OpenAI's completions API does; ``/v1/chat/completions``
    sends messages, rendered with the tokenizer's chat template.
    """

    text: str = ""
    raw: bool = False
    messages: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class Sampling:
    """The knobs that reach the engine; nothing else a client sends does."""

    max_new_tokens: int
    temperature: float
    top_p: float
    seed: int | None = None
    stop: tuple[str, ...] = ()


@dataclass(frozen=True)
class TextDelta:
    """New text for prompt ``index``; the last one for a prompt carries its completion."""

    index: int
    text: str
    completion: Completion | None = None


class LLMServer:
    """Serve deployment class; options are applied in :mod:`helpers.serve_app`."""

    def __init__(self, config: ServeConfig) -> None:
        self.config = config
        self.engine = Engine(
            config.model_id,
            config.model_cache_dir,
            want_gpu=config.num_gpus_per_replica > 0,
            cpu_threads=config.torch_threads,
            max_batch_size=config.max_batch_size,
        )

    async def generate(self, prompts: list[Prompt], sampling: Sampling) -> list[Completion]:
        """Complete every prompt; the prompts join the batch being decoded.

        Raises PromptTooLongError before any work starts if one prompt does not
        fit, so a bad prompt never fails a batch shared with other requests.
        """
        requests = self._requests(prompts, sampling)
        # The engine decodes on its own thread; awaiting its futures keeps this
        # replica's event loop free, and a cancelled request (client gone)
        # cancels its futures, which drops those rows at the next token.
        futures = [asyncio.wrap_future(self.engine.submit(r)) for r in requests]
        return list(await asyncio.gather(*futures))

    async def stream(
        self, prompts: list[Prompt], sampling: Sampling
    ) -> AsyncIterator[list[TextDelta]]:
        """Yield text as the batcher produces it, in lists of whatever arrived together.

        The first list is empty: it tells the caller the prompts were accepted
        (an error would have been raised instead), before any token exists.
        Closing this generator early (the client went away) cancels every
        prompt still decoding.
        """
        requests = self._requests(prompts, sampling)
        loop = asyncio.get_running_loop()
        arrived: asyncio.Queue[TextDelta | BaseException] = asyncio.Queue()

        def deliver(item: TextDelta | BaseException) -> None:
            with contextlib.suppress(RuntimeError):  # the replica's loop has closed
                loop.call_soon_threadsafe(arrived.put_nowait, item)

        futures = [self._submit_streaming(i, r, deliver) for i, r in enumerate(requests)]
        yield []
        try:
            remaining = len(futures)
            while remaining:
                batch = [await arrived.get()]
                while not arrived.empty():
                    batch.append(arrived.get_nowait())
                for item in batch:
                    if isinstance(item, BaseException):
                        raise item
                deltas = [item for item in batch if isinstance(item, TextDelta)]
                remaining -= sum(1 for delta in deltas if delta.completion is not None)
                yield deltas
        finally:
            for future in futures:
                future.cancel()

    async def check_health(self) -> None:
        """Serve calls this every few seconds; raising makes Serve replace the
        replica. It exercises the model itself, so a replica whose engine broke
        is replaced rather than left failing every request."""
        await asyncio.to_thread(self.engine.probe)

    def batch_stats(self) -> dict[str, int]:
        """Batching counters of this replica, for tests and curious users."""
        return asdict(self.engine.stats)

    def _submit_streaming(
        self,
        index: int,
        request: GenerationRequest,
        deliver: Callable[[TextDelta | BaseException], None],
    ) -> Future[Completion]:
        def on_done(done: Future[Completion]) -> None:
            # Runs on the decode thread after the last piece of text was
            # delivered, so the completion (or the error) always arrives last.
            if not done.cancelled():
                error = done.exception()
                deliver(error if error else TextDelta(index, "", done.result()))

        future = self.engine.submit(request, lambda text: deliver(TextDelta(index, text)))
        future.add_done_callback(on_done)
        return future

    def _requests(self, prompts: list[Prompt], sampling: Sampling) -> list[GenerationRequest]:
        requests = [
            GenerationRequest(self._render(prompt), **asdict(sampling)) for prompt in prompts
        ]
        for request in requests:
            self.engine.check_fits(request)
        return requests

    def _render(self, prompt: Prompt) -> str:
        if prompt.messages:
            return self.engine.render_chat(
                [{"role": role, "content": content} for role, content in prompt.messages]
            )
        return (
            prompt.text
            if prompt.raw
            else self.engine.format_prompt(prompt.text, self.config.prompt_format)
        )
