"""How the ingress's middleware decides what became of a request, driven
with ASGI messages as Serve's proxy sends them, and what a model replica
records, with its metrics kept instead of sent to Ray; the counts themselves
are checked on a real deployment in tests/integration/test_openai_api.py
(``test_the_metrics_count_exactly_what_was_sent_and_the_cold_start``)."""

import asyncio
import bisect
import logging
import threading
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from helpers.protocol import Completion, Prompt, TextDelta, Timing
from helpers.serve import llm_metrics
from helpers.serve.llm_metrics import (
    CountLLMRequests,
    IngressMetrics,
    ReplicaMetrics,
    outcome_of,
)


class Recorded(IngressMetrics):
    """The middleware's calls, kept instead of sent to Ray."""

    def __init__(self) -> None:
        self.counted: list[tuple[str, int, bool]] = []

    def count(self, endpoint: str, status: int, *, cancelled: bool) -> None:
        self.counted.append((endpoint, status, cancelled))


def responding(status: int, *bodies: bool, failure: int | None = None) -> Callable:
    """An ASGI app that starts a response, then sends one part per entry of
    ``bodies`` (True: more to come), noting a stream's failure if asked."""

    async def app(scope, receive, send) -> None:
        await send({"type": "http.response.start", "status": status, "headers": []})
        if failure:
            scope["state"]["stream_failure"] = failure
        for more in bodies:
            await send({"type": "http.response.body", "body": b"x", "more_body": more})

    return app


async def failing(scope, receive, send) -> None:
    raise RuntimeError("a bug")


def run(app: Callable, metrics: IngressMetrics | None, path: str = "/v1/completions") -> list:
    """One request through the middleware; the ASGI messages that got out."""
    sent = []

    async def send(message) -> None:
        sent.append(message["type"])

    CountLLMRequests.metrics = metrics
    try:
        asyncio.run(CountLLMRequests(app)({"type": "http", "path": path}, None, send))
    finally:
        CountLLMRequests.metrics = None
    return sent


@pytest.mark.parametrize(
    ("app", "expected"),
    [
        (responding(200, False), (200, False)),
        (responding(400, False), (400, False)),
        (responding(200, True, True, False), (200, False)),
        (responding(200, True, False, failure=408), (408, False)),  # an error event, then the end
        (responding(200, True, True), (200, True)),  # the client left mid-stream
    ],
)
def test_the_middleware_counts_how_a_request_ended(app: Callable, expected: tuple) -> None:
    recorded = Recorded()
    run(app, recorded)
    assert recorded.counted == [("/v1/completions", *expected)]


def test_an_unexpected_error_counts_as_a_500_and_reaches_the_500_handler() -> None:
    recorded = Recorded()
    with pytest.raises(RuntimeError):
        run(failing, recorded, path="/generate")
    assert recorded.counted == [("/generate", 500, False)]


def test_other_paths_and_metrics_off_pass_through_uncounted() -> None:
    recorded = Recorded()
    assert run(responding(200, False), recorded, path="/healthz") == [
        "http.response.start",
        "http.response.body",
    ]
    assert recorded.counted == []
    assert len(run(responding(200, False), None)) == 2


def test_outcomes_follow_the_status_class() -> None:
    statuses = (200, 404, 408, 499, 503)
    assert [outcome_of(s, cancelled=False) for s in statuses] == [
        "completed",
        "client_error",
        "timeout",  # the server too slow, or a body that never finished: not the client's error
        "cancelled",  # the client left mid-body, as when Serve cancels the task
        "server_error",
    ]
    assert outcome_of(200, cancelled=True) == "cancelled"


class Kept:
    """A Ray metric's calls, kept: ``inc``, ``set`` and ``observe`` alike,
    refused where Ray's own refuse them (a tag missing or not a string, an
    ``inc`` of zero or less)."""

    def __init__(self, metric: Any) -> None:
        self.calls: list[tuple[float, dict | None]] = []
        self._tag_keys, self._default_tags = metric._tag_keys, metric._default_tags

    def _keep(self, value: float = 1, tags: dict | None = None) -> None:
        final = {**self._default_tags, **(tags or {})}
        if missing := set(self._tag_keys) - set(final):
            raise ValueError(f"Missing value for tag key(s): {','.join(sorted(missing))}.")
        if not all(isinstance(tag, str) for tag in final.values()):
            raise TypeError(f"Tag values must be str, got {final}")
        self.calls.append((value, tags))

    def inc(self, value: float = 1, tags: dict | None = None) -> None:
        if value <= 0:
            raise ValueError(f"value must be >0, got {value}")
        self._keep(value, tags)

    set = observe = _keep

    @property
    def total(self) -> float:
        return sum(value for value, _ in self.calls)


def kept(metrics: IngressMetrics | ReplicaMetrics) -> IngressMetrics | ReplicaMetrics:
    for name, value in vars(metrics).items():
        if hasattr(value, "_name"):
            setattr(metrics, name, Kept(value))
    return metrics


def test_a_client_gone_mid_body_is_cancelled_and_a_timeout_is_an_error() -> None:
    counted = kept(IngressMetrics())
    counted.count("/v1/completions", 499, cancelled=False)
    counted.count("/v1/completions", 408, cancelled=False)
    outcomes = [tags["outcome"] for _, tags in counted.requests.calls]
    assert outcomes == ["cancelled", "timeout"]
    assert [tags["status"] for _, tags in counted.errors.calls] == ["408"]


def test_every_outcome_is_listed_where_a_reader_looks() -> None:
    produced = {outcome_of(s, cancelled=c) for s in range(100, 600) for c in (False, True)}
    assert produced == set(llm_metrics.OUTCOMES)
    description = IngressMetrics().requests._description
    assert all(outcome in description for outcome in llm_metrics.OUTCOMES), description


def completion(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> Completion:
    timing = Timing(0.1, 0.5)
    return Completion(
        "x", prompt_tokens, completion_tokens, "length", timing=timing, cached_tokens=cached_tokens
    )


async def drain(stream: AsyncIterator) -> None:
    async for _ in stream:
        pass


def test_a_prompt_with_n_choices_counts_its_tokens_once() -> None:
    """Two prompts (10 and 4 tokens), n=3: 14 prompt tokens, as the usage
    says, and every choice's completion tokens. The choices arrive out of
    order: the prompt counts with whichever ends first."""
    prompts = [Prompt("a", choice=i) for i in range(3)] + [Prompt("b", choice=i) for i in range(3)]
    tokens = {0: 10, 1: 10, 2: 10, 3: 4, 4: 4, 5: 4}
    cached = {0: 9, 1: 9, 2: 9, 3: 0, 4: 0, 5: 0}  # the first prompt's from the prefix cache

    async def deltas() -> AsyncIterator[list[TextDelta]]:
        yield []
        for index in (1, 0, 5, 2, 3, 4):
            yield [TextDelta(index, "", completion(tokens[index], 2, cached[index]))]

    recorded = kept(ReplicaMetrics())
    asyncio.run(drain(recorded.watched(deltas(), prompts)))
    assert recorded.prompt_tokens.total == 14
    assert recorded.prompt_tokens_cached.total == 9
    assert recorded.completion_tokens.total == 12
    assert len(recorded.first_token.calls) == 6
    assert len(recorded.latency.calls) == 1


def test_a_cancelled_choice_counts_no_tokens() -> None:
    """The client leaves after prompt 0's choice 1 ended: its tokens count,
    its other choices' do not, and the request's latency is not observed."""
    prompts = [Prompt("a", choice=i) for i in range(3)]

    async def deltas() -> AsyncIterator[list[TextDelta]]:
        yield []
        yield [TextDelta(1, "", completion(10, 3))]
        yield [TextDelta(0, "partial")]
        await asyncio.Event().wait()

    async def leave() -> None:
        stream = recorded.watched(deltas(), prompts)
        for _ in range(3):
            await anext(stream)
        await stream.aclose()

    recorded = kept(ReplicaMetrics())
    asyncio.run(leave())
    assert (recorded.prompt_tokens.total, recorded.completion_tokens.total) == (10, 3)
    assert recorded.latency.calls == []
    assert [value for value, _ in recorded.running.calls] == [1, 0]


def test_the_gauges_keep_sampling_after_a_failure_logged_once(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(llm_metrics, "GAUGE_INTERVAL_S", 0.001)
    recorded = kept(ReplicaMetrics())
    reads, enough = 0, threading.Event()

    def read() -> tuple[int, int, int, int]:
        nonlocal reads
        reads += 1
        if reads <= 5:
            raise RuntimeError("the engine is not ready")
        if reads == 6:
            recorded.rows.set = broken  # a gauge that fails once
        if len(recorded.waiting.calls) >= 3:
            enough.set()
        return (reads, 1, 2, 0)

    def broken(value: float) -> None:
        del recorded.rows.set  # back to Kept's
        raise ValueError("a gauge failed")

    stop = threading.Event()
    with caplog.at_level(logging.WARNING):
        thread = recorded.sample_every(read, stop=stop)
        try:
            assert enough.wait(10), "the sampling stopped"
        finally:
            stop.set()
            thread.join(5)
    assert not thread.is_alive()
    failures = [r for r in caplog.records if "batch gauges" in r.getMessage()]
    assert len(failures) == 1, [r.getMessage() for r in caplog.records]
    assert failures[0].exc_info is not None


def test_a_cold_start_of_many_minutes_lands_in_a_bucket_of_its_own() -> None:
    """A large model's weights read from a network disk take many minutes: a
    start of a quarter hour stays below the histogram's last bound, apart
    from one of three minutes, and a phase of a tenth of a second is told
    from one of a second (the spare process's and a cold one's)."""
    recorded = kept(ReplicaMetrics())
    recorded.started({"total": 200.0, "weights": 900.0, "warm_up": 0.1, "imports": 1.0})
    histogram = ReplicaMetrics().cold_start_phases
    bounds = histogram.boundaries
    assert bounds == sorted(bounds)
    bucket = {
        tags["phase"]: bisect.bisect_left(bounds, seconds)
        for seconds, tags in (recorded.cold_start_phases.calls)
    }
    assert bucket["total"] != bucket["weights"] and bucket["weights"] < len(bounds)
    assert bucket["warm_up"] != bucket["imports"]
