"""How the ingress's middleware decides what became of a request, driven
with ASGI messages as Serve's proxy sends them; the counts themselves are
checked on a real deployment in tests/integration/test_openai_api.py
(``test_the_metrics_count_exactly_what_was_sent_and_the_cold_start``)."""

import asyncio
from collections.abc import Callable

import pytest

from helpers.serve.llm_metrics import CountLLMRequests, IngressMetrics, outcome_of


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
    statuses = (200, 404, 408, 503)
    assert [outcome_of(s, cancelled=False) for s in statuses] == [
        "completed",
        "client_error",
        "client_error",
        "server_error",
    ]
    assert outcome_of(200, cancelled=True) == "cancelled"
