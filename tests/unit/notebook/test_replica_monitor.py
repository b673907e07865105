"""Unit tests for helpers.notebook.replica_monitor with a scripted fake client (no server)."""

from __future__ import annotations

import time
from collections.abc import Iterable

import matplotlib

from helpers.notebook.replica_monitor import ReplicaMonitor, ReplicaTimeline

matplotlib.use("Agg")


class ScriptedClient:
    """running_model_replicas() returns the script in order, then repeats its last value."""

    def __init__(self, script: Iterable[int]) -> None:
        self.script = list(script)
        self.calls = 0

    def running_model_replicas(self) -> int:
        value = self.script[min(self.calls, len(self.script) - 1)]
        self.calls += 1
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


def test_sample_records_elapsed_seconds_and_count() -> None:
    monitor = ReplicaMonitor(ScriptedClient([2, 1]), interval_s=0.01)
    assert monitor.sample() == 2
    assert monitor.sample() == 1
    assert monitor.timeline.replicas == [2, 1]
    first, second = monitor.timeline.seconds
    assert 0 <= first <= second < 5


def test_watch_returns_true_when_the_condition_holds() -> None:
    client = ScriptedClient([2, 1, 1, 0, 5])
    monitor = ReplicaMonitor(client, interval_s=0.01)
    seen: list[tuple[list[float], list[int]]] = []

    def on_sample(timeline: ReplicaTimeline) -> None:
        assert timeline is monitor.timeline
        seen.append((list(timeline.seconds), list(timeline.replicas)))

    assert monitor.watch(until=lambda n: n == 0, timeout_s=5, on_sample=on_sample) is True
    assert client.calls == 4  # stops at the first 0; the 5 is never read
    assert monitor.timeline.replicas == [2, 1, 1, 0]
    assert monitor.timeline.seconds == sorted(monitor.timeline.seconds)
    assert [replicas for _, replicas in seen] == [[2], [2, 1], [2, 1, 1], [2, 1, 1, 0]]
    assert seen[-1][0] == monitor.timeline.seconds
    assert monitor.timeline.first_time_at(0) == monitor.timeline.seconds[3]


def test_watch_without_a_callback() -> None:
    monitor = ReplicaMonitor(ScriptedClient([0, 1, 2]), interval_s=0.01)
    assert monitor.watch(until=lambda n: n >= 2, timeout_s=5) is True
    assert monitor.timeline.replicas == [0, 1, 2]


def test_watch_returns_false_on_timeout() -> None:
    client = ScriptedClient([1])
    monitor = ReplicaMonitor(client, interval_s=0.01)
    samples: list[int] = []
    started = time.monotonic()
    held = monitor.watch(
        until=lambda n: n == 0, timeout_s=0.1, on_sample=lambda t: samples.append(t.replicas[-1])
    )
    elapsed = time.monotonic() - started
    assert held is False
    assert 0.1 <= elapsed < 2
    assert client.calls >= 2  # it kept polling until the deadline
    assert samples == monitor.timeline.replicas == [1] * client.calls


def test_watch_sleeps_interval_between_samples() -> None:
    monitor = ReplicaMonitor(ScriptedClient([3, 3, 0]), interval_s=0.05)
    assert monitor.watch(until=lambda n: n == 0, timeout_s=5) is True
    gaps = [
        b - a for a, b in zip(monitor.timeline.seconds, monitor.timeline.seconds[1:], strict=False)
    ]
    assert len(gaps) == 2
    assert all(gap >= 0.045 for gap in gaps)
