"""Watch the model replicas come and go, and draw them live in a notebook.

The monitor polls ``/healthz`` (never the model itself, so watching does not
keep the model awake) and records how many model replicas run over time.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from helpers.notebook.client import ApiError, LLMClient


@dataclass
class ReplicaTimeline:
    """Seconds since the monitor was created, and running model replicas then.

    Successive ``watch`` calls extend one timeline, so a plot shows them all."""

    seconds: list[float] = field(default_factory=list)
    replicas: list[int] = field(default_factory=list)

    def add(self, second: float, replicas: int) -> None:
        self.seconds.append(second)
        self.replicas.append(replicas)

    def first_time_at(self, replicas: int) -> float | None:
        """When the count first equalled ``replicas``, if it ever did."""
        return next(
            (s for s, r in zip(self.seconds, self.replicas, strict=True) if r == replicas), None
        )


class ReplicaMonitor:
    def __init__(
        self,
        client: LLMClient,
        interval_s: float = 1.0,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        """``clock`` and ``sleep`` are the time the monitor reads and how it
        waits between samples; a test passes a fake pair to check the
        timeline's seconds without waiting for them."""
        self.client = client
        self.interval_s = interval_s
        self.timeline = ReplicaTimeline()
        self._clock = clock
        self._sleep = sleep
        self._started = clock()

    def sample(self) -> int:
        replicas = self.client.running_model_replicas()
        self.timeline.add(self._clock() - self._started, replicas)
        return replicas

    def watch(
        self,
        until: Callable[[int], bool],
        timeout_s: float,
        on_sample: Callable[[ReplicaTimeline], None] | None = None,
    ) -> bool:
        """Poll until ``until(replicas)`` holds or ``timeout_s`` passes; True if it held."""
        deadline = self._clock() + timeout_s
        while self._clock() < deadline:
            replicas = self._sample_if_answered()
            if replicas is not None:
                if on_sample:
                    on_sample(self.timeline)
                if until(replicas):
                    return True
            self._sleep(self.interval_s)
        return False

    def _sample_if_answered(self) -> int | None:
        """A sample, or None when ``/healthz`` answered 503: Serve's
        controller was too slow to tell, and the next poll asks again."""
        try:
            return self.sample()
        except ApiError as err:
            if err.status != 503:
                raise
            return None


class NodeReplicaMonitor(ReplicaMonitor):
    """Also records which node each model replica runs on, from Ray's state
    API, so a multi-node burst shows where Serve placed its replicas."""

    def __init__(self, client: LLMClient, deployment: str, interval_s: float = 1.0) -> None:
        super().__init__(client, interval_s)
        self.deployment = deployment
        self.by_node: list[Counter[str]] = []

    def sample(self) -> int:
        from helpers.notebook.multinode import replica_nodes

        placed = Counter(replica_nodes(self.deployment))
        self.by_node.append(placed)
        self.timeline.add(self._clock() - self._started, placed.total())
        return placed.total()

    def nodes_used(self) -> set[str]:
        return {node for placed in self.by_node for node in placed}


def plot_replicas_by_node(monitor: NodeReplicaMonitor, title: str) -> Any:
    """Stacked replicas per node over time: the burst's spread across nodes."""
    import matplotlib.pyplot as plt

    nodes = sorted(monitor.nodes_used())
    figure, axes = plt.subplots(figsize=(7, 3))
    series = [[placed[node] for placed in monitor.by_node] for node in nodes]
    axes.stackplot(monitor.timeline.seconds, *series, labels=nodes, step="post")
    axes.set_title(title)
    axes.set_xlabel("seconds")
    axes.set_ylabel("model replicas")
    axes.legend(loc="upper right", title="node")
    return figure


class LivePlot:
    """A matplotlib step plot of replicas over time, redrawn in place."""

    def __init__(self, title: str, max_replicas: int) -> None:
        import matplotlib.pyplot as plt
        from IPython.display import display

        self.figure, self.axes = plt.subplots(figsize=(7, 3))
        self.axes.set_title(title)
        self.axes.set_xlabel("seconds")
        self.axes.set_ylabel("model replicas")
        self.axes.set_ylim(-0.2, max_replicas + 0.5)
        self.axes.set_yticks(range(max_replicas + 1))
        (self.line,) = self.axes.step([], [], where="post")
        plt.close(self.figure)  # shown through the display handle only
        self.handle = display(self.figure, display_id=True)

    def update(self, timeline: ReplicaTimeline) -> None:
        self.line.set_data(timeline.seconds, timeline.replicas)
        self.axes.set_xlim(0, max(10.0, timeline.seconds[-1] + 1))
        if self.handle is not None:
            self.handle.update(self.figure)
