"""The kit's LLM metrics, exported through Ray's metrics system.

Serve's proxy already counts HTTP requests by route and status code and times
them (``ray_serve_num_http_requests_total``, ``ray_serve_http_request_latency_ms``),
and each replica's queue (``ray_serve_replica_processing_queries``). What it
cannot see is what an LLM server is judged by: tokens, the first token's
latency, the time per output token, how full the batch is, how a streamed
request really ended (its status is 200 before any token exists), and what a
cold start costs. Those are here. Ray exports them with the prefix ``ray_``
beside Serve's own, on each node's metrics-export port (``make serve`` and the
notebooks ask for 8080: ``helpers.notebook.cluster.metrics_export_port``), and adds the
``deployment``, ``replica`` and ``application`` labels. No label carries request
content: endpoints are the app's fixed routes, errors go by status and type.

``LLM_METRICS=off`` creates none of them (the benchmark ``bench.metrics_cost``
compares the two).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

from ray.serve import metrics
from starlette.requests import Request

from helpers.api.errors import error_type
from helpers.api.request_checks import CLIENT_CLOSED_REQUEST
from helpers.protocol import Completion, Prompt, TextDelta

logger = logging.getLogger("ray.serve")

LLM_ENDPOINTS = ("/generate", "/v1/completions", "/v1/chat/completions", "/tokenize", "/detokenize")
"""Routes whose requests are counted; any other path is Serve's business."""

LATENCY_BUCKETS_S = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160, 320,
]  # fmt: skip
"""From a GPU's few milliseconds to a long CPU reply or a queued cold start."""

PER_TOKEN_BUCKETS_S = [0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28]
"""A GPU decodes a token in milliseconds; a busy 2-core CPU in a tenth of a second or more."""

COLD_START_BUCKETS_S = [0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024]
"""A cold start's phase: a cached tokenizer takes milliseconds, a large model's
weights many minutes (from a network disk, or converted on first use)."""

GAUGE_INTERVAL_S = 1.0
"""How often a replica samples its batch for the gauges; Ray reports them every few seconds."""


OUTCOMES = ("completed", "client_error", "timeout", "server_error", "cancelled")
"""Every ``outcome`` label of ``llm_requests_total``; nothing else ever is one."""

REQUEST_TIMEOUT = 408


def outcome_of(status: int, cancelled: bool) -> str:
    """How a request ended, as ``llm_requests_total`` labels it.

    A client that left is ``cancelled`` however its departure was noticed:
    Serve cancelling the task, or the ingress answering 499 to a body cut
    short. A 408 (``REQUEST_TIMEOUT_S`` passed: a slow model, a long cold
    start, a body that never finished arriving) is a ``timeout``, apart from
    the client's errors, so that an overloaded server shows.
    """
    if cancelled or status == CLIENT_CLOSED_REQUEST:
        return "cancelled"
    if status >= 500:
        return "server_error"
    if status == REQUEST_TIMEOUT:
        return "timeout"
    return "client_error" if status >= 400 else "completed"


class IngressMetrics:
    """What the ingress counts: requests by endpoint and outcome, errors by kind."""

    def __init__(self) -> None:
        self.requests = metrics.Counter(
            "llm_requests",
            f"LLM requests by endpoint and outcome ({', '.join(OUTCOMES)}: a 408, "
            "REQUEST_TIMEOUT_S passed; a client that left, 499 included), a stream counted "
            "when it ends.",
            tag_keys=("endpoint", "outcome"),
        )
        self.errors = metrics.Counter(
            "llm_errors",
            "LLM requests that failed, by endpoint, HTTP status and error type; a stream's "
            "failure after its response started counts with the status its error event names.",
            tag_keys=("endpoint", "status", "type"),
        )

    def count(self, endpoint: str, status: int, *, cancelled: bool) -> None:
        outcome = outcome_of(status, cancelled)
        self.requests.inc(tags={"endpoint": endpoint, "outcome": outcome})
        if outcome not in ("completed", "cancelled"):
            tags = {"endpoint": endpoint, "status": str(status), "type": error_type(status)}
            self.errors.inc(tags=tags)


def note_stream_failure(request: Request, status: int) -> None:
    """Tell :class:`CountLLMRequests` that a stream whose response began
    with 200 ended with an error event of ``status``."""
    request.state.stream_failure = status


class CountLLMRequests:
    """ASGI middleware: counts each request to an LLM endpoint once it ends.

    A plain ASGI wrapper rather than Starlette's ``BaseHTTPMiddleware``, which
    would stand between a stream and the client and hide the disconnect that
    cancels its generation. A request whose response never sent its last
    part was cancelled: the client went away, and Starlette stopped the
    handler or the stream.
    """

    metrics: IngressMetrics | None = None
    """Set by ``Ingress.__init__`` when ``LLM_METRICS`` is on. On the class, not
    the app: Serve runs a frozen copy of the FastAPI app, this middleware
    included, so the replica's ``Ingress`` reaches it only through its class."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        counter = self.metrics
        if counter is None or scope["type"] != "http" or scope["path"] not in LLM_ENDPOINTS:
            await self.app(scope, receive, send)
            return
        state = scope.setdefault("state", {})
        status, finished = 500, False

        async def sending(message: dict[str, Any]) -> None:
            nonlocal status, finished
            if message["type"] == "http.response.start":
                status = message["status"]
            elif message["type"] == "http.response.body" and not message.get("more_body"):
                finished = True
            await send(message)

        try:
            await self.app(scope, receive, sending)
        except asyncio.CancelledError:
            raise
        except Exception:  # the 500 handler answers outside this middleware
            status, finished = 500, True
            raise
        finally:
            failure = state.get("stream_failure")
            counter.count(scope["path"], failure or status, cancelled=not finished)


class ReplicaMetrics:
    """What a model replica records: tokens, latencies, its batch, its cold start."""

    def __init__(self) -> None:
        self.prompt_tokens = metrics.Counter(
            "llm_prompt_tokens",
            "Prompt tokens read (prefilled), a prompt's once whatever its n, when its "
            "first choice ends.",
        )
        self.prompt_tokens_cached = metrics.Counter(
            "llm_prompt_tokens_cached",
            "Of the prompt tokens read, those the prefix cache held (PREFIX_CACHE_MB), "
            "counted as llm_prompt_tokens is.",
        )
        self.completion_tokens = metrics.Counter(
            "llm_completion_tokens", "Tokens generated, over every completion that ended."
        )
        self.first_token = metrics.Histogram(
            "llm_time_to_first_token_seconds",
            "Seconds from a prompt's arrival at the engine of a replica to its first token.",
            boundaries=LATENCY_BUCKETS_S,
        )
        self.per_token = metrics.Histogram(
            "llm_time_per_output_token_seconds",
            "Mean seconds between a completion's output tokens after the first.",
            boundaries=PER_TOKEN_BUCKETS_S,
        )
        self.latency = metrics.Histogram(
            "llm_e2e_request_latency_seconds",
            "Seconds a model replica spent on a request, from its arrival to its last completion.",
            boundaries=LATENCY_BUCKETS_S,
        )
        self.running = metrics.Gauge(
            "llm_requests_running", "Requests a model replica is working on."
        )
        self.waiting = metrics.Gauge(
            "llm_sequences_waiting", "Prompts submitted to the engine, not yet in the batch."
        )
        self.rows = metrics.Gauge(
            "llm_batch_rows", "Sequences in the running batch or being prefilled into it."
        )
        self.cached_tokens = metrics.Gauge(
            "llm_kv_cache_tokens", "Positions the running batch holds in its KV cache."
        )
        self.cancelled_rows = metrics.Counter(
            "llm_cancelled_rows", "Sequences dropped because their request went away."
        )
        self.cold_starts = metrics.Counter("llm_cold_starts", "Model replicas started.")
        self.cold_start_phases = metrics.Histogram(
            "llm_cold_start_seconds",
            "Seconds each phase of a model replica's start took (process, imports, "
            "tokenizer, weights, warm_up) and all of them (total).",
            boundaries=COLD_START_BUCKETS_S,
            tag_keys=("phase",),
        )
        self._in_flight = 0
        self._cancelled_seen = 0

    def started(self, phases: dict[str, float]) -> None:
        """Record this replica's cold start, once."""
        self.cold_starts.inc()
        for phase, seconds in phases.items():
            self.cold_start_phases.observe(seconds, tags={"phase": phase})

    async def watched(
        self, deltas: AsyncIterator[list[TextDelta]], prompts: Sequence[Prompt]
    ) -> AsyncIterator[list[TextDelta]]:
        """``deltas`` passed on, recorded as one request: running while it
        lasts, its completions as they end, its latency if it ran to the end
        (a cancelled request's would say how long its client waited).

        ``prompts`` are the request's, one per delta index, a prompt's ``n``
        choices side by side (``choice`` 0 first): a prompt's tokens count
        once, with the first of its choices to end, as the response's usage
        counts them. A completion that never ended (cancelled, failed) counts no tokens."""
        began = time.monotonic()
        self._in_flight += 1
        self.running.set(self._in_flight)
        prompts_counted: set[int] = set()
        try:
            async with contextlib.aclosing(deltas):
                async for batch in deltas:
                    for delta in batch:
                        if delta.completion:
                            first = delta.index - prompts[delta.index].choice
                            self.completed(delta.completion, prompt=first not in prompts_counted)
                            prompts_counted.add(first)
                    yield batch
            self.latency.observe(time.monotonic() - began)
        finally:
            self._in_flight -= 1
            self.running.set(self._in_flight)

    def completed(self, completion: Completion, *, prompt: bool = True) -> None:
        """One choice's completion: its tokens (the prompt's too, unless another
        choice of it counted them) and, when the engine decoded it, its timing."""
        if prompt and completion.prompt_tokens:  # Ray refuses an inc of 0
            self.prompt_tokens.inc(completion.prompt_tokens)
        if prompt and completion.cached_tokens:
            self.prompt_tokens_cached.inc(completion.cached_tokens)
        if completion.completion_tokens:
            self.completion_tokens.inc(completion.completion_tokens)
        timing = completion.timing
        if timing is None:  # an echo with nothing decoded
            return
        self.first_token.observe(timing.first_token_s)
        if completion.completion_tokens > 1:
            after_first = timing.total_s - timing.first_token_s
            self.per_token.observe(after_first / (completion.completion_tokens - 1))

    def sample_batch(self, waiting: int, rows: int, cached_tokens: int, cancelled: int) -> None:
        """Set the batch gauges; ``cancelled`` is the engine's running total.
        ``requests_running`` is set again too: Ray's exporter drops a gauge
        it has not been told of for a while, which during one long request,
        or while idle, would leave that series empty rather than 1 or 0."""
        self.running.set(self._in_flight)
        self.waiting.set(waiting)
        self.rows.set(rows)
        self.cached_tokens.set(cached_tokens)
        if cancelled > self._cancelled_seen:
            self.cancelled_rows.inc(cancelled - self._cancelled_seen)
            self._cancelled_seen = cancelled

    def sample_every(
        self,
        read: Callable[[], tuple[int, int, int, int]],
        stop: threading.Event | None = None,
    ) -> threading.Thread:
        """Call :meth:`sample_batch` with ``read()`` every ``GAUGE_INTERVAL_S`` on a
        daemon thread, which ends with the replica's process (or when ``stop`` is set).

        A sample that fails is skipped and the next one taken: the gauges
        would otherwise freeze for the replica's life. The first failure is
        logged with its traceback; later ones are not, or a broken read would
        log every second."""
        stop = stop or threading.Event()

        def loop() -> None:
            logged = False
            while not stop.is_set():
                try:
                    self.sample_batch(*read())
                except Exception:
                    if not logged:
                        logged = True
                        logger.warning(
                            "sampling the batch gauges failed; sampling goes on, and further "
                            "failures are not logged",
                            exc_info=True,
                        )
                stop.wait(GAUGE_INTERVAL_S)

        thread = threading.Thread(target=loop, name="llm-metrics", daemon=True)
        thread.start()
        return thread
