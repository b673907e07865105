"""A clock that moves only when something sleeps on it, for timing tests.

Loops that poll (``wait_for``, ``ReplicaMonitor``) take ``clock`` and
``sleep`` callables; given this pair they run at once, and a test can assert
exactly how long they slept and what time they read, which a real clock on a
loaded machine never allows.
"""

from __future__ import annotations


class FakeClock:
    """``clock()`` reads the time; ``clock.sleep(s)`` records ``s`` and moves time on by it."""

    def __init__(self, start: float = 1000.0) -> None:
        """Starts far from zero, so "seconds since the start" and the raw time differ."""
        self.now = start
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds

    def advance(self, seconds: float) -> None:
        """Time passes without a sleep, as while a request is on its way."""
        self.now += seconds
