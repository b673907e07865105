"""Waiting until something holds: the one polling loop of the kit."""

from __future__ import annotations

import time
from collections.abc import Callable


def wait_for(
    condition: Callable[[], bool], timeout_s: float, what: str, interval_s: float = 1.0
) -> None:
    """Poll ``condition`` every ``interval_s`` until it holds. After
    ``timeout_s`` a :class:`TimeoutError` names ``what`` was awaited, so a
    notebook or test that stops here says why."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"waited {timeout_s:.0f} s for {what}")
        time.sleep(interval_s)
