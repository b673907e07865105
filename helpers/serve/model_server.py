"""The model deployment: owns one :class:`Engine` and batches requests into it.

Replicas of this deployment are the expensive part (a model in memory, CPU or
GPU reserved), so they scale between ``MIN_REPLICAS`` (default 0) and
``MAX_REPLICAS``. Only the ingress calls them, and only for real work: a
health probe never lands here, so it cannot keep a replica awake.

Batching: every prompt, from one request or many, streamed or not, is
submitted to the engine's continuous batcher, which decodes all prompts in
flight together and lets new ones join at the next token. On CPU this is the
largest lever there is: reading the weights once per step for every sequence
rather than once per sequence (decision 0003).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Future
from dataclasses import asdict, dataclass, replace
from typing import TYPE_CHECKING, Any, TypeVar

import psutil
from ray import serve

from helpers.config import ServeConfig
from helpers.protocol import (
    REFUSALS,
    Completion,
    Prompt,
    Refused,
    Sampling,
    TextDelta,
    TokenLogprob,
)
from helpers.serve import model_report, spare_worker
from helpers.serve.llm_metrics import ReplicaMetrics

if TYPE_CHECKING:  # the engine (torch) is imported by a replica only, when it starts
    from helpers.engine.engine import GenerationRequest, LoadTimes

logger = logging.getLogger("ray.serve")

Answer = TypeVar("Answer")


def _refusals_returned(
    method: Callable[..., Answer],
) -> Callable[..., Answer | Refused]:
    """A replica method that returns a refusal of the client's input as
    :class:`Refused`, rather than raise it for Serve to log as a failure."""

    @functools.wraps(method)
    def answering(*args: Any, **kwargs: Any) -> Answer | Refused:
        try:
            return method(*args, **kwargs)
        except REFUSALS as refusal:
            return Refused(refusal)

    return answering


class Arrivals:
    """What the decode thread delivers for one call (pieces of text, each
    prompt's completion last, or an error), handed over to the replica's
    event loop and taken from there as lists of whatever arrived together."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._arrived: asyncio.Queue[TextDelta | BaseException] = asyncio.Queue()

    def deliver(self, item: TextDelta | BaseException) -> None:
        """Called on the decode thread."""
        with contextlib.suppress(RuntimeError):  # the replica's loop has closed
            self._loop.call_soon_threadsafe(self._arrived.put_nowait, item)

    async def next_batch(self) -> list[TextDelta]:
        """The next delta and every one that arrived with it; an error raises."""
        batch = [await self._arrived.get()]
        while not self._arrived.empty():
            batch.append(self._arrived.get_nowait())
        for item in batch:
            if isinstance(item, BaseException):
                raise item
        return [item for item in batch if isinstance(item, TextDelta)]


@dataclass(frozen=True)
class Echo:
    """A prompt that its completion repeats (``echo``): its text, its length
    in tokens and, where asked, its tokens' log probabilities."""

    text: str
    tokens: int
    logprobs: tuple[TokenLogprob, ...] | None

    def opening(self, index: int) -> TextDelta:
        """The prompt, streamed before the completion's first token."""
        return TextDelta(index, self.text, logprobs=self.logprobs or ())

    def around(self, delta: TextDelta) -> TextDelta:
        """``delta``, with its completion (if it holds one) begun by the prompt."""
        if delta.completion is None:
            return delta
        completion = delta.completion
        logprobs = completion.logprobs
        if logprobs is not None:
            logprobs = (self.logprobs or ()) + logprobs
        whole = replace(completion, text=self.text + completion.text, logprobs=logprobs)
        return replace(delta, completion=whole)

    def nothing_more(self, index: int, streamed: bool) -> TextDelta:
        """The whole answer when no token is to be decoded (``max_tokens`` 0)."""
        logprobs = None if self.logprobs is None else ()
        nothing = Completion("", self.tokens, 0, "length", logprobs)
        opening = self.opening(index) if streamed else TextDelta(index, "")
        return self.around(replace(opening, completion=nothing))


@dataclass(frozen=True)
class ReplicaStartup:
    """When this replica's process started and its model became ready (Unix
    time, seconds), and where the engine's part went. A cold-start benchmark
    lines these up with when its request was sent and answered.

    In a process that waited as a spare (``SPARE_WORKER``), Python, Ray, torch
    and the kit were imported before anyone asked for a replica; for the cold
    start that process began when the replica did, so ``process_started`` is
    ``init_started`` there and ``spare`` says why.
    """

    process_started: float
    init_started: float
    ready: float
    engine: LoadTimes
    spare: bool = False

    def phases(self) -> dict[str, float]:
        """Seconds per phase, and in all, as the cold-start metrics label them."""
        engine = self.engine
        return {
            "process": self.init_started - self.process_started,
            "imports": engine.imports_s,
            "tokenizer": engine.tokenizer_s,
            "weights": engine.weights_s,
            "warm_up": engine.warm_up_s,
            "total": self.ready - self.process_started,
        }

    def summary(self) -> str:
        phases = self.phases()
        before_init = "in a spare process" if self.spare else "Python, Ray, the kit, torch"
        return (
            f"ready {phases['total']:.2f} s after its process started: "
            f"{phases['process']:.2f} s until __init__ ({before_init}), then imports "
            f"{phases['imports']:.2f} s, tokenizer {phases['tokenizer']:.2f} s, weights "
            f"{phases['weights']:.2f} s, warm-up {phases['warm_up']:.2f} s"
        )

    def as_dict(self) -> dict[str, Any]:
        """For ``/healthz``: the Unix times, the engine's seconds, and ``spare``."""
        return asdict(self)


class LLMServer:
    """The model deployment: each replica loads one engine and streams
    completions to the ingress, its only caller, so it scales on model work
    alone, down to zero. Its options (scaling, request limits, health checks):
    :func:`helpers.serve.deployment_options.model_deployment_options`."""

    _deleted = False
    """Set by the first ``__del__``, which Serve calls and garbage collection
    may call again: a stopped replica asks for one spare, not two."""

    def __init__(self, config: ServeConfig) -> None:
        # Imported here, so the app's other processes never load torch; its
        # import counts with the process's start, before ``init_started``.
        from helpers.engine.engine import Engine

        init_started = time.time()
        self.config = config
        self.engine = Engine.load(
            config.model_id,
            config.model_cache_dir,
            want_gpu=config.num_gpus_per_replica > 0,
            cpu_threads=config.torch_threads,
            max_batch_size=config.max_batch_size,
            prefill_chunk=config.prefill_chunk,
            prefix_cache_bytes=config.prefix_cache_mb << 20,
            gpu_memory_fraction=config.gpu_memory_share,
            dtype=config.dtype,
            cpu_weights=config.cpu_weights,
            tokenizer=spare_worker.take_tokenizer(config),
        )
        spare = spare_worker.waited_as_spare()
        process_started = init_started if spare else psutil.Process().create_time()
        self.startup = ReplicaStartup(
            process_started, init_started, time.time(), self.engine.load_times, spare
        )
        logger.info("model replica %s", self.startup.summary())
        self.metrics = ReplicaMetrics() if config.llm_metrics == "on" else None
        if self.metrics:
            self.metrics.started(self.startup.phases())
            self.metrics.sample_every(self._batch_sample)
        self._publish_report()  # last: only a replica that started reports

    async def stream(
        self, prompts: list[Prompt], sampling: Sampling, streamed: bool = True
    ) -> AsyncIterator[list[TextDelta] | Refused]:
        """Complete every prompt, yielding what the batcher produces in lists of
        whatever arrived together; each prompt's last delta holds its completion.

        The first list is empty: it tells the caller the prompts were accepted.
        A prompt refused instead (too long, a token id outside the vocabulary)
        comes first and alone, as :class:`Refused`, before any work, so a bad
        prompt never fails a batch shared with other requests. With
        ``streamed=False`` only the completions come, for a reply sent whole.
        Closing this generator early (the client went away, a timeout) cancels
        every prompt still decoding.

        Whole replies come through here too, not through a plain method, so
        both share one path: the acceptance signal (a cold start and a refusal
        both happen before the ingress answers), the deadline, cancellation,
        and what a failure turns into. A replica that dies mid-call fails the
        call at once; nothing is replayed on another replica.

        Prompts that ``echo`` (all of a request's or none) come first, each as
        its own delta (with its tokens' log probabilities where asked), and
        their completions' text and log probabilities begin with them;
        ``max_new_tokens`` 0 then decodes nothing.
        """
        deltas = self._deltas(prompts, sampling, streamed)
        if self.metrics:
            deltas = self.metrics.watched(deltas, prompts)
        accepted = False
        try:
            async with contextlib.aclosing(deltas):  # closing this closes the engine's side
                async for batch in deltas:
                    accepted = True
                    yield batch
        except REFUSALS as refusal:
            if accepted:
                raise
            yield Refused(refusal)  # in place of the acceptance signal

    async def _deltas(
        self, prompts: list[Prompt], sampling: Sampling, streamed: bool
    ) -> AsyncIterator[list[TextDelta]]:
        # Off the event loop: tokenizing, compiling a grammar and computing its
        # first mask take milliseconds (the first grammar builds llguidance's view
        # of the vocabulary, longer); submitting below then only queues.
        requests = await asyncio.to_thread(self._requests, prompts, sampling)
        echo = any(prompt.echo for prompt in prompts)
        echoes = await self._echoes(requests, sampling) if echo else []
        if echoes and sampling.max_new_tokens == 0:
            yield []  # accepted: the ingress's wait (a cold start's included) ends here
            yield [echoed.nothing_more(index, streamed) for index, echoed in enumerate(echoes)]
            return
        arrivals = Arrivals(asyncio.get_running_loop())
        futures: list[Future[Completion]] = []
        try:  # from the first submission: whatever was submitted is cancelled on the way out
            with self.engine.together():  # a prompt's n choices share its prefill
                for index, request in enumerate(requests):
                    futures.append(self._submit(index, request, arrivals.deliver, streamed))
            _raise_submit_failure(futures)
            yield []  # accepted: the ingress's wait (a cold start's included) ends here
            if echoes and streamed:
                yield [echoed.opening(index) for index, echoed in enumerate(echoes)]
            remaining = len(futures)
            while remaining:
                deltas = await arrivals.next_batch()
                remaining -= sum(1 for delta in deltas if delta.completion is not None)
                if echoes:
                    deltas = [echoes[delta.index].around(delta) for delta in deltas]
                yield deltas
        finally:
            for future in futures:
                future.cancel()

    async def _echoes(self, requests: list[GenerationRequest], sampling: Sampling) -> list[Echo]:
        """Each request's prompt as its echoed completion begins with it. A
        prompt's ``n`` choices share one, so a prompt is scored once, not
        once per choice."""
        echoes: dict[str | tuple[int, ...], Echo] = {}
        for request in requests:
            if request.prompt not in echoes:
                echoes[request.prompt] = await self._echo(request, sampling)
        return [echoes[request.prompt] for request in requests]

    async def _echo(self, request: GenerationRequest, sampling: Sampling) -> Echo:
        """A prompt as its echoed completion begins with it: scored from the
        ids :meth:`_requests` tokenized, and any decoding off the event loop."""
        ids = tuple(request.token_ids(self.engine.tokenizer))
        prompt = request.prompt
        decode = self.engine.tokenizer.decode
        text = prompt if isinstance(prompt, str) else await asyncio.to_thread(decode, list(ids))
        logprobs = None
        if sampling.logprobs is not None:
            scored = self.engine.prompt_logprobs(ids, sampling.logprobs)
            logprobs = await asyncio.wrap_future(scored)
        return Echo(text, len(ids), logprobs)

    def __del__(self) -> None:
        """Serve calls this when it stops the replica (a scale-down, a delete):
        with ``SPARE_WORKER=on``, a process for the next replica starts now,
        and has imported what it needs by the time a request wakes the model."""
        if self._deleted:
            return
        self._deleted = True
        if key := os.environ.get(spare_worker.KEY_VARIABLE):
            spare_worker.ask_for_spare(key)

    async def check_health(self) -> None:
        """Serve calls this every few seconds; raising makes Serve replace the
        replica. ``Engine.probe`` raises when the decode loop stopped or stalled
        on one step, or the model's logits are not finite, so a replica whose
        engine broke is replaced rather than left failing every request."""
        await asyncio.to_thread(self.engine.probe, self.config.request_timeout_s)

    def _publish_report(self) -> None:
        """Tell ``/healthz`` and ``/v1/models`` what serves the model and how
        this replica started, before it takes a request. Best effort: a
        replica that cannot write it still serves."""
        try:
            key = model_report.report_key(serve.get_replica_context().app_name, self.config)
            model_report.publish(key, self.engine.info.as_dict(), self.startup.as_dict())
        except Exception:
            logger.warning("could not write this replica's report for /healthz", exc_info=True)

    @_refusals_returned
    def tokenize(self, prompt: Prompt, add_special_tokens: bool) -> dict[str, Any]:
        """``POST /tokenize``: the ids the model reads for ``prompt`` (messages
        rendered with the chat template, text as it is), in vLLM's shape."""
        text = self._render(prompt)
        assert isinstance(text, str)
        tokens = self.engine.tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"]
        return {"count": len(tokens), "max_model_len": self.engine.context_length, "tokens": tokens}

    @_refusals_returned
    def detokenize(self, tokens: list[int]) -> dict[str, str]:
        """``POST /detokenize``: the text of ``tokens``, special tokens included."""
        self.engine.check_vocabulary("tokens", tokens)
        return {"prompt": self.engine.tokenizer.decode(tokens, skip_special_tokens=False)}

    def batch_stats(self) -> dict[str, int]:
        """Batching counters of this replica, for tests and curious users."""
        return asdict(self.engine.stats)

    def _batch_sample(self) -> tuple[int, int, int, int]:
        """What the batch gauges show: waiting, rows, cached tokens, cancelled so far."""
        load = self.engine.batch_load()
        return load.waiting, load.rows, load.cached_tokens, self.engine.stats.cancelled

    def _submit(
        self,
        index: int,
        request: GenerationRequest,
        deliver: Callable[[TextDelta | BaseException], None],
        streamed: bool,
    ) -> Future[Completion]:
        def on_done(done: Future[Completion]) -> None:
            # Runs on the decode thread after the last piece of text was
            # delivered, so the completion (or the error) always arrives last.
            if not done.cancelled():
                error = done.exception()
                deliver(error if error else TextDelta(index, "", done.result()))

        def on_text(piece: str) -> None:
            deliver(TextDelta(index, piece))

        def on_logprob(logprob: TokenLogprob) -> None:
            deliver(TextDelta(index, "", logprobs=(logprob,)))

        future = self.engine.submit(
            request, on_text if streamed else None, on_logprob if streamed else None
        )
        future.add_done_callback(on_done)
        return future

    def _requests(self, prompts: list[Prompt], sampling: Sampling) -> list[GenerationRequest]:
        return [
            self.engine.request(self._render(prompt), _for_choice(sampling, prompt.choice))
            for prompt in prompts
        ]

    def _render(self, prompt: Prompt) -> str | tuple[int, ...]:
        """What the engine reads: token ids as sent, or the prompt's text."""
        if prompt.token_ids:
            return prompt.token_ids
        if prompt.messages:
            return self.engine.render_conversation(prompt.messages, prompt.tools)
        return (
            prompt.text
            if prompt.raw
            else self.engine.format_prompt(prompt.text, self.config.prompt_format)
        )


def _raise_submit_failure(futures: list[Future[Completion]]) -> None:
    """Raise the error of a prompt the engine refused as it was submitted (no
    tokens, more positions than the cache has, a decode loop that has
    stopped), before the acceptance signal: the ingress then answers 4xx or
    503, not a 200 whose stream holds the error. A stopped loop refuses
    every submission this way, so no separate liveness check is needed."""
    for future in futures:
        if future.done() and not future.cancelled() and (error := future.exception()):
            raise error


def _for_choice(sampling: Sampling, choice: int) -> Sampling:
    """A seeded request's choice ``i`` samples with ``seed + i``."""
    if not choice or sampling.seed is None:
        return sampling
    return replace(sampling, seed=sampling.seed + choice)
