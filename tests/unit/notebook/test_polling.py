"""The kit's one polling loop."""

import itertools

import pytest

from helpers.notebook.polling import wait_for


def test_it_returns_once_the_condition_holds() -> None:
    calls = itertools.count(1)
    wait_for(lambda: next(calls) >= 3, timeout_s=5, what="the third call", interval_s=0)
    assert next(calls) == 4


def test_it_names_what_it_waited_for_when_time_runs_out() -> None:
    with pytest.raises(TimeoutError, match="waited 0 s for the app to answer"):
        wait_for(lambda: False, timeout_s=0, what="the app to answer", interval_s=0)
