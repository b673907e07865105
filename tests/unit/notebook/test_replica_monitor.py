"""Unit tests for helpers.notebook.replica_monitor with a scripted fake client (no server),
or the real client against the fake ingress where what matters is what the client raises,
and a fake clock (``fake_clock``), so the timeline's seconds are exact and nothing sleeps."""

from __future__ import annotations

from collections.abc import Iterable

import matplotlib
import pytest

from helpers.notebook.client import ApiError, LLMClient
from helpers.notebook.replica_monitor import ReplicaMonitor, ReplicaTimeline
from tests.unit.notebook.fake_clock import FakeClock
from tests.unit.notebook.fake_ingress import RUNNING_REPLICAS, FakeServer

matplotlib.use("Agg")


class ScriptedClient:
    """running_model_replicas() returns the script in order, then repeats its
    last value; an ``ApiError`` in the script is raised instead."""

    def __init__(self, script: Iterable[int | ApiError]) -> None:
        self.script = list(script)
        self.calls = 0

    def running_model_replicas(self) -> int:
        value = self.script[min(self.calls, len(self.script) - 1)]
        self.calls += 1
        if isinstance(value, ApiError):
            raise value
        return value


# -- ReplicaTimeline -------------------------------------------------------------------------


def test_timeline_add_keeps_samples_in_order() -> None:
    timeline = ReplicaTimeline()
    assert (timeline.seconds, timeline.replicas) == ([], [])
    timeline.add(0.0, 0)
    timeline.add(1.5, 1)
    timeline.add(3.0, 2)
    assert timeline.seconds == [0.0, 1.5, 3.0]
    assert timeline.replicas == [0, 1, 2]


def test_timelines_do_not_share_lists() -> None:
    first, second = ReplicaTimeline(), ReplicaTimeline()
    first.add(1.0, 1)
    assert second.seconds == [] and second.replicas == []


def test_first_time_at() -> None:
    timeline = ReplicaTimeline()
    for second, replicas in [(0.0, 2), (1.5, 1), (2.5, 0), (3.5, 1), (4.5, 2)]:
        timeline.add(second, replicas)
    assert timeline.first_time_at(2) == 0.0
    assert timeline.first_time_at(1) == 1.5  # the first time, not the later one
    assert timeline.first_time_at(0) == 2.5  # an exact match, not the first count above it
    assert timeline.first_time_at(3) is None
    assert ReplicaTimeline().first_time_at(0) is None


# -- ReplicaMonitor --------------------------------------------------------------------------


def monitor_on(
    clock: FakeClock, client: ScriptedClient | LLMClient, interval_s: float = 1.0
) -> ReplicaMonitor:
    return ReplicaMonitor(client, interval_s=interval_s, clock=clock, sleep=clock.sleep)


def test_sample_records_seconds_since_the_monitor_started_and_the_count() -> None:
    clock = FakeClock()
    monitor = monitor_on(clock, ScriptedClient([2, 1]))
    clock.advance(1.5)
    assert monitor.sample() == 2
    clock.advance(2.25)
    assert monitor.sample() == 1
    assert monitor.timeline.replicas == [2, 1]
    assert monitor.timeline.seconds == [1.5, 3.75]
    assert clock.sleeps == []  # sampling never waits


def test_watch_returns_true_when_the_condition_holds() -> None:
    clock = FakeClock()
    client = ScriptedClient([2, 1, 1, 0, 5])
    monitor = monitor_on(clock, client)
    seen: list[tuple[list[float], list[int]]] = []

    def on_sample(timeline: ReplicaTimeline) -> None:
        assert timeline is monitor.timeline
        seen.append((list(timeline.seconds), list(timeline.replicas)))

    assert monitor.watch(until=lambda n: n == 0, timeout_s=60, on_sample=on_sample) is True
    assert client.calls == 4  # stops at the first 0; the 5 is never read
    assert monitor.timeline.replicas == [2, 1, 1, 0]
    assert monitor.timeline.seconds == [0.0, 1.0, 2.0, 3.0]
    assert clock.sleeps == [1.0] * 3  # none after the sample that held
    assert [replicas for _, replicas in seen] == [[2], [2, 1], [2, 1, 1], [2, 1, 1, 0]]
    assert seen[-1][0] == monitor.timeline.seconds
    assert monitor.timeline.first_time_at(0) == 3.0


def test_watch_without_a_callback() -> None:
    clock = FakeClock()
    monitor = monitor_on(clock, ScriptedClient([0, 1, 2]))
    assert monitor.watch(until=lambda n: n >= 2, timeout_s=60) is True
    assert monitor.timeline.replicas == [0, 1, 2]


def test_watch_returns_false_on_timeout() -> None:
    clock = FakeClock()
    client = ScriptedClient([1])
    monitor = monitor_on(clock, client)
    samples: list[int] = []
    held = monitor.watch(
        until=lambda n: n == 0, timeout_s=3.5, on_sample=lambda t: samples.append(t.replicas[-1])
    )
    assert held is False
    # It kept polling until the deadline and no further: samples at 0, 1, 2 and
    # 3 s; after the sleep to 4 s the deadline has passed.
    assert client.calls == 4
    assert monitor.timeline.seconds == [0.0, 1.0, 2.0, 3.0]
    assert clock.sleeps == [1.0] * 4
    assert samples == monitor.timeline.replicas == [1] * 4


def test_watch_sleeps_interval_between_samples() -> None:
    clock = FakeClock()
    monitor = monitor_on(clock, ScriptedClient([3, 3, 0]), interval_s=0.25)
    assert monitor.watch(until=lambda n: n == 0, timeout_s=60) is True
    assert clock.sleeps == [0.25, 0.25]
    assert monitor.timeline.seconds == [0.0, 0.25, 0.5]


def test_a_slow_healthz_counts_toward_the_timeout() -> None:
    """The deadline is on the clock, not a count of sleeps: a poll that
    takes two seconds leaves room for fewer polls."""
    clock = FakeClock()

    class SlowClient(ScriptedClient):
        def running_model_replicas(self) -> int:
            clock.advance(2.0)
            return super().running_model_replicas()

    client = SlowClient([1])
    monitor = monitor_on(clock, client)
    assert monitor.watch(until=lambda n: n == 0, timeout_s=5) is False
    assert client.calls == 2  # at 0 s (read at 2 s) and 3 s (read at 5 s); none at 6 s
    assert monitor.timeline.seconds == [2.0, 5.0]


def test_watch_skips_a_poll_healthz_answered_503_and_polls_on() -> None:
    """/healthz answers 503 when Serve's controller is too slow to tell."""
    clock = FakeClock()
    unavailable = ApiError(503, {"error": {"message": "Serve's controller did not answer"}})
    monitor = monitor_on(clock, ScriptedClient([2, unavailable, 0]))
    assert monitor.watch(until=lambda n: n == 0, timeout_s=60) is True
    assert monitor.timeline.replicas == [2, 0]
    assert monitor.timeline.seconds == [0.0, 2.0]


def test_watch_skips_a_503_from_the_real_client_and_server(server: FakeServer) -> None:
    """What the scripted client raises above is what ``LLMClient`` raises
    when the server answers 503, so the monitor skips it there too."""
    clock = FakeClock()
    server.healthz_unavailable = 1
    monitor = monitor_on(clock, LLMClient(server.url))
    assert monitor.watch(until=lambda n: n == RUNNING_REPLICAS, timeout_s=60) is True
    assert server.healthz_calls == 2
    assert monitor.timeline.replicas == [RUNNING_REPLICAS]
    assert monitor.timeline.seconds == [1.0]  # the poll at 0 s was skipped


def test_watch_raises_any_other_refusal() -> None:
    failed = ApiError(500, {"error": {"message": "internal error"}})
    monitor = monitor_on(FakeClock(), ScriptedClient([1, failed]))
    with pytest.raises(ApiError, match="HTTP 500"):
        monitor.watch(until=lambda n: n == 0, timeout_s=60)
