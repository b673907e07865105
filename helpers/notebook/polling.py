"""Waiting until something holds: the one polling loop of the kit."""

from __future__ import annotations

import time
from collections.abc import Callable


def wait_for(
    condition: Callable[[], bool],
    timeout_s: float,
    what: str,
    interval_s: float = 1.0,
    *,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> None:
    """Poll ``condition`` every ``interval_s`` until it holds. After
    ``timeout_s`` a :class:`TimeoutError` names ``what`` was awaited, so a
    notebook or test that stops here says why.

    ``clock`` and ``sleep`` are the time it reads and how it waits; a test
    passes a fake pair to check the timing without waiting for it."""
    deadline = clock() + timeout_s
    while not condition():
        if clock() > deadline:
            raise TimeoutError(f"waited {timeout_s:.0f} s for {what}")
        sleep(interval_s)
