"""How a pass shares its prompt-token budget among the prefills under way
(``ContinuousBatcher._pieces``), held to its rules on random queues."""

import random
from types import SimpleNamespace

import pytest

from helpers.engine.batcher import ContinuousBatcher


def planned(chunk: int, prefills: list[tuple[int, int]]) -> list[tuple[int, int, int]]:
    """(index in the queue, rows, columns) of each piece planned for prefills
    given as (rows, columns left), oldest first."""
    queue = [SimpleNamespace(prefill=SimpleNamespace(rows=r, left=left)) for r, left in prefills]
    batcher = SimpleNamespace(prefill_chunk=chunk, _prefilling=queue)
    pieces = ContinuousBatcher._pieces(batcher)  # type: ignore[arg-type]
    index = {id(entry): i for i, entry in enumerate(queue)}
    return [(index[id(p)], p.prefill.rows, columns) for p, columns in pieces]


def test_a_long_prompt_takes_the_whole_budget_and_a_short_one_behind_it_waits() -> None:
    assert planned(256, [(1, 6000), (1, 20)]) == [(0, 1, 256)]


def test_what_the_oldest_leaves_goes_to_the_next_ones_in_order() -> None:
    assert planned(256, [(1, 100), (2, 50), (1, 100)]) == [(0, 1, 100), (1, 2, 50), (2, 1, 56)]


def test_the_oldest_moves_on_by_a_column_even_where_its_rows_exceed_the_budget() -> None:
    assert planned(16, [(20, 40), (1, 100)]) == [(0, 20, 1)]


@pytest.mark.parametrize("seed", range(200))
def test_every_plan_keeps_to_the_rules(seed: int) -> None:
    rng = random.Random(seed)
    chunk = rng.choice([16, 64, 256, rng.randint(16, 512)])
    prefills = [(rng.randint(1, 40), rng.randint(1, 600)) for _ in range(rng.randint(1, 6))]
    pieces = planned(chunk, prefills)
    assert [index for index, _, _ in pieces] == list(range(len(pieces))), "oldest first"
    for index, _, columns in pieces:
        assert 1 <= columns <= prefills[index][1]
    tokens = sum(rows * columns for _, rows, columns in pieces)
    assert tokens <= max(chunk, prefills[0][0]), "within the budget, or one column of the oldest"
    spent = 0
    for index, rows, columns in pieces:
        spent += rows * columns
        if columns < prefills[index][1]:
            assert chunk - spent < rows, "a piece is cut short only where the budget ends"
    if len(pieces) < len(prefills):
        assert chunk - tokens < prefills[len(pieces)][0], "the next one could not get a column"
