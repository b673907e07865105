"""Where the padded layout puts rows that join it (``padded_rows.group_for``):
with rows of about their length, or in a group of their own; and how it
splits prompts admitted together into prefills of about one length
(``length_groups``), by the same share."""

import random
from itertools import pairwise
from types import SimpleNamespace

import pytest
import torch

from helpers.engine.padded_rows import (
    PADDING_SHARE,
    ROW_GROUPS,
    PaddedRows,
    RowGroup,
    group_for,
    length_groups,
)


def group(rows: int, width: int) -> RowGroup:
    return RowGroup(None, torch.ones(rows, width, dtype=torch.long), torch.zeros(rows, 1))


def test_the_first_rows_start_the_first_group() -> None:
    assert group_for([], group(1, 50), ROW_GROUPS, may_insert=True) == 0


def test_a_short_row_joins_a_group_of_several_longer_ones() -> None:
    """250 padding columns, within half of the 1,250 the five rows hold apart."""
    assert group_for([group(4, 300)], group(1, 50), ROW_GROUPS, may_insert=True) == 0


def test_padding_of_exactly_the_share_still_joins() -> None:
    """Joining adds 40 columns: half of the 80 held apart (60 and 20)."""
    assert group(1, 60).padding_with(group(1, 20)) == 40
    assert group_for([group(1, 60)], group(1, 20), ROW_GROUPS, may_insert=True) == 0
    assert group_for([group(1, 61)], group(1, 20), ROW_GROUPS, may_insert=True) == 1


def test_a_long_prompt_beside_short_rows_starts_a_group_of_its_own() -> None:
    assert group_for([group(4, 300)], group(1, 6000), ROW_GROUPS, may_insert=True) == 1


def test_a_question_joins_the_short_rows_not_the_document_after_them() -> None:
    groups = [group(4, 300), group(1, 6000)]
    assert group_for(groups, group(1, 40), ROW_GROUPS, may_insert=True) == 0


def test_every_group_is_held_to_the_share_not_only_the_least_padded() -> None:
    """Joining the short group adds 30 padding columns, past half of 50;
    joining the long one adds 35, within half of 115."""
    assert group_for([group(1, 10), group(1, 75)], group(1, 40), ROW_GROUPS, may_insert=True) == 1


def test_rows_that_must_come_last_join_only_the_last_group_or_start_one() -> None:
    groups = [group(4, 300), group(1, 6000)]
    assert group_for(groups, group(1, 40), ROW_GROUPS, may_insert=False) == 2
    assert group_for(groups, group(1, 5900), ROW_GROUPS, may_insert=False) == 1


def test_with_no_room_for_another_group_they_join_the_one_they_pad_least() -> None:
    groups = [group(1, 800), group(1, 6000), group(1, 3000), group(1, 1500)]
    assert group_for(groups, group(1, 10), 5, may_insert=True) == 4, "room for a fifth"
    assert group_for(groups, group(1, 10), 4, may_insert=True) == 0
    assert group_for(groups, group(1, 10), 4, may_insert=False) == 3
    assert group_for([group(4, 300)], group(1, 6000), 1, may_insert=True) == 0


def test_padding_counts_both_sides() -> None:
    """Either side may be the shorter: its rows are padded to the other's length."""
    assert group(2, 10).padding_with(group(1, 30)) == 3 * 30 - (20 + 30)
    assert group(1, 30).padding_with(group(2, 10)) == 3 * 30 - (30 + 20)


def cached_group(lengths: list[int], first: float) -> RowGroup:
    """Rows of ``lengths`` real tokens, left-padded; each row's keys and
    values hold its own number, from ``first`` on, in every column."""
    width = max(lengths)
    mask = torch.tensor([[0] * (width - n) + [1] * n for n in lengths])
    values = torch.arange(first, first + len(lengths)).view(-1, 1, 1, 1).expand(-1, 2, width, 4)
    layer = SimpleNamespace(keys=values.clone(), values=values.clone())
    return RowGroup(SimpleNamespace(layers=[layer]), mask, mask.sum(-1, keepdim=True))


def padded_rows(*groups: RowGroup) -> PaddedRows:
    """Rows in ``groups``, as the kit's decoder keeps them (no model runs here)."""
    rows = PaddedRows(SimpleNamespace(), SimpleNamespace(pad_token_id=0))
    rows.max_groups = ROW_GROUPS  # a model that takes segments; this stand-in takes none
    rows.groups = list(groups)
    rows.logits = torch.arange(float(rows.rows))[:, None]  # each row's logits: its index
    return rows


def new_rows(lengths: list[int], first: float) -> tuple[RowGroup, torch.Tensor]:
    """Prefilled rows, and their logits: ``first`` on, one a row."""
    logits = torch.arange(first, first + len(lengths))[:, None, None]
    return cached_group(lengths, first), logits


def test_rows_that_leave_leave_their_groups_and_an_emptied_group_goes() -> None:
    rows = padded_rows(cached_group([3, 9], 0), cached_group([40], 2), cached_group([5, 2], 3))
    rows.keep([0, 3])
    first, last = rows.groups
    assert rows.rows == 2 and len(rows.groups) == 2
    assert first.mask.tolist() == [[1, 1, 1]], "padding no row needs is dropped"
    assert first.cache.layers[0].keys.shape == (1, 2, 3, 4)
    assert bool((first.cache.layers[0].keys == 0).all())
    assert last.mask.tolist() == [[1] * 5] and bool((last.cache.layers[0].values == 3).all())
    assert last.positions.tolist() == [[5]]


def test_rows_that_join_a_group_before_the_last_go_in_among_the_rows() -> None:
    """Their logits too, where the batcher puts their sequences; a second
    prefill of the same pass is placed after the first went in."""
    rows = padded_rows(cached_group([20, 18], 0), cached_group([600], 2))
    question, logits = new_rows([16], 10)
    assert rows._add_rows(question, logits, may_insert=True) == 2
    answer, logits = new_rows([590], 20)
    assert rows._add_rows(answer, logits, may_insert=True) == 4
    assert [group.rows for group in rows.groups] == [3, 2]
    assert rows.logits[:, 0].tolist() == [0, 1, 10, 2, 20]


def test_rows_that_must_come_last_start_a_group_rather_than_go_in_among_the_rows() -> None:
    rows = padded_rows(cached_group([20, 18], 0), cached_group([600], 2))
    question, logits = new_rows([16], 10)
    assert rows._add_rows(question, logits, may_insert=False) == 3
    assert rows.logits[:, 0].tolist() == [0, 1, 2, 10]


def test_with_every_group_taken_the_neighbours_closest_in_length_merge_for_a_document() -> None:
    """Chats of 20, 600, 30 and 700 tokens took the four groups; a document
    of 6,000 would pad any of them by thousands of columns, so the 600 and
    the 30 (570 columns of padding) become one group and it gets its own."""
    rows = padded_rows(*(cached_group([n], i) for i, n in enumerate([20, 600, 30, 700])))
    document, logits = new_rows([6000], 10)
    assert rows._add_rows(document, logits, may_insert=True) == 4
    assert [group.mask.shape for group in rows.groups] == [(1, 20), (2, 600), (1, 700), (1, 6000)]
    merged = rows.groups[1].cache.layers[0].keys
    assert merged[0, 0, 0, 0] == 1 and merged[1, 0, -1, 0] == 2, "the rows keep their order"
    assert rows.logits[:, 0].tolist() == [0, 1, 2, 3, 10]


def test_with_every_group_taken_rows_that_pad_one_less_than_any_merge_join_it() -> None:
    """1,000 tokens fit no group (700 columns of padding with the 300, past
    half of 1,300), but merging any two neighbours would pad more."""
    rows = padded_rows(*(cached_group([n], i) for i, n in enumerate([100, 6000, 300, 7000])))
    chat, logits = new_rows([1000], 10)
    assert rows._add_rows(chat, logits, may_insert=True) == 3
    assert [group.rows for group in rows.groups] == [1, 1, 2, 1]


def test_no_groups_at_all_is_refused_by_name() -> None:
    with pytest.raises(ValueError, match="groups must be at least 1, not 0"):
        PaddedRows(SimpleNamespace(), SimpleNamespace(pad_token_id=0), groups=0)


def test_a_question_admitted_with_a_document_gets_a_prefill_of_its_own_and_goes_first() -> None:
    assert length_groups([6000, 20], ROW_GROUPS) == [[1], [0]]


def test_prompts_of_about_one_length_share_a_prefill_shortest_first() -> None:
    """Equal lengths (a request's ``n`` choices) pad nothing, so they are
    never apart; the order among them is the order they came in."""
    assert length_groups([300, 20, 25, 300, 280], ROW_GROUPS) == [[1, 2], [4, 0, 3]]
    assert length_groups([40, 40, 40], ROW_GROUPS) == [[0, 1, 2]]
    assert length_groups([], ROW_GROUPS) == []


def test_padding_of_exactly_the_share_of_the_tokens_still_joins() -> None:
    """As for a row joining a running group: 40 padding columns, half of the
    80 tokens (20 and 60)."""
    assert length_groups([20, 60], ROW_GROUPS) == [[0, 1]]
    assert length_groups([20, 61], ROW_GROUPS) == [[0], [1]]


def test_many_short_prompts_are_not_padded_to_a_longer_one() -> None:
    """Ten 100-token prompts and one of 200: 1,000 padding columns, past
    half of their 1,200 tokens, where one 100-token prompt would take it."""
    assert length_groups([200] + [100] * 10, ROW_GROUPS) == [list(range(1, 11)), [0]]
    assert length_groups([200, 100], ROW_GROUPS) == [[1, 0]]


def test_a_smooth_spread_of_lengths_is_not_padded_to_its_longest() -> None:
    """Each prompt close to the one before may still not drift a group's
    padding past the share: the group as a whole is held to it (500, 800
    and 1,300 pad by 1,300 columns, exactly half of their tokens)."""
    lengths = [10, 30, 60, 100, 180, 300, 500, 800, 1300, 2000]
    groups = length_groups(lengths, len(lengths))
    assert groups == [[0, 1], [2, 3], [4, 5], [6, 7, 8], [9]]


def test_past_the_most_groups_the_neighbours_that_pad_each_other_least_merge() -> None:
    """Merging the first two adds 40 columns (two rows of 10 to 30), the
    next pairs 70 and 300: the 10s join the 30s."""
    assert length_groups([10, 10, 30, 100, 400], 4) == [[0, 1], [2], [3], [4]]
    assert length_groups([10, 10, 30, 100, 400], 3) == [[0, 1, 2], [3], [4]]
    assert length_groups([6000, 20, 300], 1) == [[1, 2, 0]], "one group: one prefill for all"


def padding_share(lengths: list[int], group: list[int]) -> float:
    """A group's padding, as a share of its prompts' own tokens."""
    tokens = sum(lengths[i] for i in group)
    return (len(group) * max(lengths[i] for i in group) - tokens) / tokens


@pytest.mark.parametrize("seed", range(100))
def test_random_admissions_are_split_by_the_share_each_prompt_once(seed: int) -> None:
    """With room for every group: each within the share, and each next
    group's shortest prompt would have taken its group past it."""
    rng = random.Random(seed)
    lengths = [rng.choice([rng.randint(1, 64), rng.randint(1, 8000)]) for _ in range(40)]
    groups = length_groups(lengths, len(lengths))
    assert sorted(i for g in groups for i in g) == list(range(len(lengths)))
    for group in groups:
        assert all(lengths[a] <= lengths[b] for a, b in pairwise(group)), "shortest first"
        assert padding_share(lengths, group) <= PADDING_SHARE
    for before, after in pairwise(groups):
        assert padding_share(lengths, [*before, after[0]]) > PADDING_SHARE
    capped = length_groups(lengths, ROW_GROUPS)
    assert len(capped) == min(ROW_GROUPS, len(groups))
    assert [i for g in capped for i in g] == [i for g in groups for i in g], "merged, not moved"


def test_with_one_row_group_prompts_admitted_together_share_one_prefill() -> None:
    """Every row ends up padded to one length then; the old layout, whole."""
    model = SimpleNamespace(device="cpu", new_cache=list)
    rows = PaddedRows(model, SimpleNamespace(pad_token_id=0))
    assert rows.max_groups == 1, "a model that takes no segments keeps one group"
    ((indices, prefill),) = rows.prefills_by_length([[5] * 600, [6] * 20])
    assert indices == [1, 0] and prefill.rows == 2 and prefill.width == 600
    rows.max_groups = ROW_GROUPS  # as for the kit's decoder, which this stand-in is not
    apart = rows.prefills_by_length([[5] * 600, [6] * 20])
    assert [(i, p.width) for i, p in apart] == [([1], 20), ([0], 600)]
