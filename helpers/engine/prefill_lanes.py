"""How one pass of the padded layout shares its prompt-token budget among
the prefills going in, a piece each (decisions 0035 and 0036).

A column of a prefill costs a token per distinct prompt in it (its rows),
and a pass prefills ``budget`` tokens, so a running row's next token waits
for one piece of a long prompt at most. Prefills go in two lanes, each
oldest first: short prompts, of ``long_prompt_tokens`` or fewer, and long
ones (a prefill is as long as its longest prompt; prompts admitted in one
step are split by length first, shortest first). While
both lanes have work the short lane spends half the budget at most and the
long lane the rest: a question sent behind a pasted document goes in within
a few passes rather than after all of it, and the document goes on with the
other half. Long prompts go in one after another (the next takes only
what the oldest leaves), so two documents do not each wait for the other.

Each lane's oldest moves on by a column at least, even where its rows alone
are past the lane's share, so no prefill waits for ever; only then does a
pass go past the budget, by a column of each lane's oldest at most. Within
a lane the order is strict: a question behind a prompt just short of long
waits for it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

LONG_PROMPT_PASSES = 4
"""By default a prompt is long past this many full passes of tokens: a chat
turn is short, a pasted document long."""


class PrefillShape(Protocol):
    """A prefill as the plan sees it (:class:`helpers.engine.padded_rows.Prefill`)."""

    @property
    def rows(self) -> int:
        """Tokens a column costs: one per distinct prompt."""
        ...

    @property
    def width(self) -> int:
        """Columns to prefill in all: its longest prompt's tokens, less those a
        kept prefix already holds (``Prefill.start``)."""
        ...

    @property
    def left(self) -> int:
        """Columns not yet prefilled."""
        ...


def plan_pass(
    prefills: Sequence[PrefillShape], budget: int, long_prompt_tokens: int | None = None
) -> list[int]:
    """The columns each of ``prefills`` (oldest first) runs in the next pass,
    0 for those that wait. ``long_prompt_tokens`` defaults to
    ``LONG_PROMPT_PASSES`` passes' worth; 0 makes every prompt long, which
    serves them all first come, first served."""
    if long_prompt_tokens is None:
        long_prompt_tokens = LONG_PROMPT_PASSES * budget
    short: list[int] = []
    long: list[int] = []
    for index, prefill in enumerate(prefills):
        (long if prefill.width > long_prompt_tokens else short).append(index)
    given = _lane(prefills, short, budget - budget // 2 if long else budget)
    spent = sum(prefills[i].rows * columns for i, columns in given.items())
    given |= _lane(prefills, long, budget - spent)
    return [given.get(i, 0) for i in range(len(prefills))]


def _lane(prefills: Sequence[PrefillShape], lane: list[int], budget: int) -> dict[int, int]:
    """Columns for the prefills at ``lane``'s indices, oldest first, within
    ``budget`` tokens; the oldest gets a column at least."""
    given: dict[int, int] = {}
    for index in lane:
        rows = prefills[index].rows
        columns = min(prefills[index].left, budget // rows)
        if columns < 1:
            if given:
                break
            columns = 1
        given[index] = columns
        budget -= columns * rows
    return given
