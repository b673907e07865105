"""Stop strings found in text that arrives a piece at a time
(``helpers.engine.text_stream.StopMatcher``), held to the plain definition:
where a stop string first begins, and how much of the text's end could
still begin one."""

from __future__ import annotations

import random

import pytest

from helpers.engine.text_stream import StopMatcher


def first_stop(text: str, stops: list[str]) -> int | None:
    found = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(found) if found else None


def held_back(text: str, stops: list[str]) -> int:
    ends = [k for s in stops for k in range(1, len(s)) if text.endswith(s[:k])]
    return max(ends, default=0)


@pytest.mark.parametrize("seed", range(200))
def test_fed_a_piece_at_a_time_it_agrees_with_searching_the_whole_text(seed: int) -> None:
    rng = random.Random(seed)
    stops = ["".join(rng.choice("ab") for _ in range(rng.randint(1, 7))) for _ in range(3)]
    matchers = [StopMatcher(stop) for stop in stops]
    text = ""
    while len(text) < 60:
        piece = "".join(rng.choice("abc") for _ in range(rng.randint(0, 4)))
        offset, text = len(text), text + piece
        found = [i for i in (m.feed(piece, offset) for m in matchers) if i is not None]
        expected = first_stop(text, stops)
        if found or expected is not None:
            assert min(found) == expected, (stops, text)
            return
        assert max(m.matched for m in matchers) == held_back(text, stops), (stops, text)


def test_a_stop_string_that_repeats_itself_after_a_run_of_its_first_letter() -> None:
    """``"a" + "ab" * 127`` after a run of ``a``: the case that made comparing
    every end of the text cost the stop string's length squared per token."""
    stop = "a" + "ab" * 127
    matcher, text = StopMatcher(stop), ""
    for offset in range(300):
        text += "a"
        assert matcher.feed("a", offset) is None
    assert matcher.matched == held_back(text, [stop]) == 2
    assert matcher.feed(stop[2:], len(text)) == len(text) - 2
