"""The kit's one polling loop; its timing on a fake clock (``fake_clock``)."""

import itertools

import pytest

from helpers.notebook.polling import wait_for
from tests.unit.notebook.fake_clock import FakeClock


def test_it_returns_once_the_condition_holds() -> None:
    calls = itertools.count(1)
    wait_for(lambda: next(calls) >= 3, timeout_s=5, what="the third call", interval_s=0)
    assert next(calls) == 4


def test_it_names_what_it_waited_for_when_time_runs_out() -> None:
    with pytest.raises(TimeoutError, match="waited 0 s for the app to answer"):
        wait_for(lambda: False, timeout_s=0, what="the app to answer", interval_s=0)


def test_it_sleeps_the_interval_between_tries_and_not_after_success() -> None:
    clock = FakeClock()
    calls = itertools.count(1)
    wait_for(lambda: next(calls) >= 3, 60, "the third call", 0.5, clock=clock, sleep=clock.sleep)
    assert clock.sleeps == [0.5, 0.5]


def test_it_gives_up_at_the_deadline_and_not_before() -> None:
    clock = FakeClock()
    tried_at: list[float] = []

    def never() -> bool:
        tried_at.append(clock.now - 1000.0)
        return False

    with pytest.raises(TimeoutError, match="waited 3 s for the app to answer"):
        wait_for(never, 3, "the app to answer", 1.0, clock=clock, sleep=clock.sleep)
    # Tried at the deadline too, then once past it before giving up.
    assert tried_at == [0.0, 1.0, 2.0, 3.0, 4.0]
    assert clock.sleeps == [1.0] * 4
