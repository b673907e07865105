"""How a pass shares its prompt-token budget among the prefills under way
(``helpers.engine.prefill_lanes.plan_pass``): named cases, random queues held
to its rules, and queues run pass by pass with prompts arriving."""

import itertools
import math
import random
from types import SimpleNamespace

import pytest

from helpers.engine.prefill_lanes import LONG_PROMPT_PASSES, plan_pass


def planned(
    chunk: int, prefills: list[tuple[int, ...]], long_prompt: int | None = None
) -> list[tuple[int, int]]:
    """(index in the queue, columns) of each piece planned for prefills given
    as (rows, columns left) or (rows, columns left, columns in all), oldest
    first; long past four passes by default."""
    queue = [SimpleNamespace(rows=p[0], left=p[1], width=p[-1]) for p in prefills]
    return [(i, c) for i, c in enumerate(plan_pass(queue, chunk, long_prompt)) if c]


def test_a_question_behind_a_document_goes_in_beside_its_next_piece() -> None:
    assert planned(256, [(1, 6000), (1, 20)]) == [(0, 236), (1, 20)]


def test_short_prompts_take_half_the_budget_at_most_while_a_long_one_goes_in() -> None:
    assert planned(256, [(1, 6000), (1, 100), (1, 100)]) == [(0, 128), (1, 100), (2, 28)]


def test_a_group_of_short_prompts_admitted_together_is_short() -> None:
    """Seven questions of 40 tokens cost 280 tokens a pass, past the budget,
    but each is a chat turn: they go in beside the document, not after it."""
    assert planned(256, [(1, 6000), (7, 40)]) == [(0, 130), (1, 18)]


def test_a_documents_last_pieces_are_still_long() -> None:
    assert planned(256, [(1, 200, 6000), (1, 5000)]) == [(0, 200), (1, 56)]


def test_long_prompts_go_in_one_after_another() -> None:
    assert planned(256, [(1, 6000), (1, 5000), (1, 20)]) == [(0, 236), (2, 20)]


def test_with_no_long_prompt_what_the_oldest_leaves_goes_to_the_next_ones_in_order() -> None:
    assert planned(256, [(1, 100), (2, 50), (1, 100)]) == [(0, 100), (1, 50), (2, 56)]


def test_no_threshold_is_first_come_first_served() -> None:
    assert planned(256, [(1, 6000), (1, 20)], long_prompt=0) == [(0, 256)]


def test_the_oldest_moves_on_by_a_column_even_where_its_rows_exceed_the_budget() -> None:
    assert planned(16, [(20, 40), (1, 30)]) == [(0, 1)]


def test_each_lanes_oldest_moves_on_where_a_short_group_takes_more_than_its_half() -> None:
    assert planned(16, [(1, 100), (12, 1)]) == [(0, 4), (1, 1)]


@pytest.mark.parametrize("seed", range(200))
def test_every_plan_keeps_to_the_rules(seed: int) -> None:
    rng = random.Random(seed)
    chunk = rng.choice([16, 256, rng.randint(16, 8192)])
    long_prompt = rng.choice([0, None, rng.randint(1, 4000)])
    threshold = LONG_PROMPT_PASSES * chunk if long_prompt is None else long_prompt
    prefills = []
    for _ in range(rng.randint(1, 6)):
        width = rng.randint(1, rng.choice([40, 8000]))
        prefills.append((rng.choice([1, 1, rng.randint(1, 256)]), rng.randint(1, width), width))
    pieces = dict(planned(chunk, prefills, long_prompt))
    assert pieces, "a pass with prefills waiting runs some"
    for index, columns in pieces.items():
        assert 1 <= columns <= prefills[index][1]
    long = [i for i, (_, _, width) in enumerate(prefills) if width > threshold]
    short = [i for i in range(len(prefills)) if i not in long]
    share = chunk - chunk // 2 if long else chunk
    for lane in (short, long):
        served = [i for i in lane if i in pieces]
        assert served == lane[: len(served)], "oldest first within a lane"
        assert served or not lane, "a lane's oldest moves on by a column at least"
        spent = sum(prefills[i][0] * pieces[i] for i in served)
        first_rows = prefills[lane[0]][0] if lane else 0
        assert spent <= max(share, first_rows), "within its share, or the oldest's column"
        cut = [i for i in lane if pieces.get(i, 0) < prefills[i][1]]
        if cut:
            assert share - spent < prefills[cut[0]][0], "a lane stops only where its share ends"
        share = chunk - spent  # the long lane takes what the short one left


def run_passes(
    chunk: int, arrivals: dict[int, list[tuple[int, int]]], passes: int
) -> dict[int, tuple[int, int]]:
    """Run ``passes`` passes, prefills given as (rows, columns) arriving before
    the pass numbered by ``arrivals``' keys: each prefill's (pass it arrived
    at, pass it finished in), numbered by arrival."""
    queue: list[SimpleNamespace] = []
    finished: dict[int, tuple[int, int]] = {}
    arrived = 0
    for number in range(passes):
        for rows, left in arrivals.get(number, []):
            queue.append(SimpleNamespace(rows=rows, left=left, width=left, name=arrived, at=number))
            arrived += 1
        if not queue:
            continue
        for prefill, columns in zip(queue, plan_pass(queue, chunk), strict=True):
            prefill.left -= columns
            if not prefill.left:
                finished[prefill.name] = (prefill.at, number)
        queue = [prefill for prefill in queue if prefill.left]
    return finished


def test_a_question_every_pass_goes_in_at_once_and_the_document_at_half_pace() -> None:
    questions = {number: [(1, 40)] for number in range(1, 200)}
    finished = run_passes(256, {0: [(1, 6000)], **questions}, 200)
    assert finished[0][1] < math.ceil(6000 / 128), "the document at half pace or more"
    assert all(at == done for name, (at, done) in finished.items() if name), "each in one pass"


def test_a_second_document_waits_for_the_first_and_questions_pass_both() -> None:
    """Passes are numbered from 0: the first document shares its passes with
    the question alone, and the second takes nothing before the first is in."""
    finished = run_passes(256, {0: [(1, 3000)], 1: [(1, 3000)], 5: [(2, 90)]}, 100)
    assert finished[2] == (5, 6), "two questions of 90 tokens: 180, past half a pass"
    assert finished[0] == (0, math.ceil((3000 + 180) / 256) - 1)
    assert finished[1] == (1, math.ceil((6000 + 180) / 256) - 1)


def test_documents_go_in_one_after_another_at_half_pace_under_a_question_every_pass() -> None:
    """Questions never stop coming: each document is still in within the
    passes that it and the documents before it need at half a pass each."""
    documents = {0: 3000, 3: 2000, 10: 1500}
    arrivals = {number: [(1, 40)] for number in range(150)}
    for number, tokens in documents.items():
        arrivals[number] = [(1, tokens), *arrivals[number]]
    finished = run_passes(256, arrivals, 150)
    arrived = [left for number in sorted(arrivals) for _, left in arrivals[number]]
    names = [name for name, left in enumerate(arrived) if left > 40]  # numbered by arrival
    ends = [finished[name][1] for name in names]
    assert ends == sorted(ends), "one after another"
    for name, ahead in zip(names, itertools.accumulate(documents.values()), strict=True):
        assert finished[name][1] < math.ceil(ahead / 128)
    assert all(at == done for name, (at, done) in finished.items() if name not in names)


@pytest.mark.parametrize("seed", range(50))
def test_every_prefill_finishes_however_they_arrive(seed: int) -> None:
    """Queues run pass by pass with random arrivals: every prefill is in
    within as many passes as there are columns in all (each pass moves each
    lane's oldest by a column at least), so nothing waits for ever."""
    rng = random.Random(seed)
    chunk = rng.choice([16, 64, 256])
    arrivals = {
        number: [(rng.randint(1, 8), rng.randint(1, 4 * chunk * rng.choice([1, 3])))]
        for number in range(60)
        if rng.random() < 0.3
    }
    count = sum(len(group) for group in arrivals.values())
    everything = sum(left for group in arrivals.values() for _, left in group)
    finished = run_passes(chunk, arrivals, 60 + everything)
    assert len(finished) == count
