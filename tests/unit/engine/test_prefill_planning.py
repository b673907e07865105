"""How a pass shares its prompt-token budget among the prefills under way
(``ContinuousBatcher._pieces``), held to its rules on random queues."""

import random
from types import SimpleNamespace

import pytest

from helpers.engine.batcher import ContinuousBatcher, _Prefilling


def planned(chunk: int, prefills: list[tuple[int, int]]) -> list[tuple[int, int, int]]:
    """(index in the queue, rows, columns) of each piece planned for prefills
    given as (rows, columns left), oldest first."""
    queue = [_Prefilling([], SimpleNamespace(rows=r, left=left)) for r, left in prefills]  # type: ignore[arg-type]
    batcher = SimpleNamespace(prefill_chunk=chunk, _prefilling=queue)
    pieces = ContinuousBatcher._pieces(batcher)  # type: ignore[arg-type]
    return [(queue.index(p), p.prefill.rows, columns) for p, columns in pieces]


def test_a_short_prompt_behind_a_long_one_goes_in_beside_its_next_piece() -> None:
    assert planned(256, [(1, 6000), (1, 20)]) == [(0, 1, 236), (1, 1, 20)]


def test_short_prompts_take_half_the_budget_at_most_while_a_long_one_goes_in() -> None:
    assert planned(256, [(1, 6000), (1, 100), (1, 100)]) == [(0, 1, 128), (1, 1, 100), (2, 1, 28)]


def test_long_prompts_go_in_one_after_another() -> None:
    assert planned(256, [(1, 6000), (1, 5000), (1, 20)]) == [(0, 1, 236), (2, 1, 20)]


def test_with_no_long_prompt_what_the_oldest_leaves_goes_to_the_next_ones_in_order() -> None:
    assert planned(256, [(1, 100), (2, 50), (1, 100)]) == [(0, 1, 100), (1, 2, 50), (2, 1, 56)]


def test_the_oldest_moves_on_by_a_column_even_where_its_rows_exceed_the_budget() -> None:
    assert planned(16, [(20, 40), (1, 100)]) == [(0, 20, 1)]


def test_each_lanes_oldest_moves_on_where_the_short_one_takes_more_than_its_half() -> None:
    assert planned(16, [(1, 100), (12, 1)]) == [(0, 1, 4), (1, 12, 1)]


def lane_rules(pieces: dict[int, int], lane: list[int], rows: dict[int, int], budget: int) -> int:
    """Check one lane's pieces against its budget; the tokens it spent."""
    served = [index for index in lane if index in pieces]
    assert served == lane[: len(served)], "oldest first within a lane"
    if lane:
        assert served, "a lane's oldest moves on by a column at least"
    spent = sum(rows[index] * pieces[index] for index in served)
    assert spent <= max(budget, rows[lane[0]] if lane else 0), "within its share, or one column"
    return spent


@pytest.mark.parametrize("seed", range(200))
def test_every_plan_keeps_to_the_rules(seed: int) -> None:
    rng = random.Random(seed)
    chunk = rng.choice([16, 64, 256, rng.randint(16, 512)])
    prefills = [
        (rng.randint(1, 40), rng.choice([rng.randint(1, 20), rng.randint(1, 2000)]))
        for _ in range(rng.randint(1, 6))
    ]
    got = planned(chunk, prefills)
    assert [index for index, _, _ in got] == sorted({index for index, _, _ in got}), "queue order"
    pieces = {index: columns for index, _, columns in got}
    for index, columns in pieces.items():
        assert 1 <= columns <= prefills[index][1]
    rows = {index: r for index, (r, _) in enumerate(prefills)}
    long = [i for i, (r, left) in enumerate(prefills) if r * left > chunk]
    short = [i for i in range(len(prefills)) if i not in long]
    short_budget = chunk - chunk // 2 if long else chunk
    spent = lane_rules(pieces, short, rows, short_budget)
    long_budget = chunk - spent
    lane_rules(pieces, long, rows, long_budget)
    for lane, budget in ((short, short_budget), (long, long_budget)):
        left = budget - sum(rows[i] * pieces.get(i, 0) for i in lane)
        cut = [i for i in lane if pieces.get(i, 0) < prefills[i][1]]
        if cut:
            assert left < rows[cut[0]], "a lane stops only where its share ends"
