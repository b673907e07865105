"""Where the padded layout puts rows that join it (``batch_rows.group_for``):
with rows of about their length, or in a group of their own."""

from types import SimpleNamespace

import torch

from helpers.engine.batch_rows import ROW_GROUPS, PaddedRows, RowGroup, group_for


def group(rows: int, width: int) -> RowGroup:
    return RowGroup(None, torch.ones(rows, width, dtype=torch.long), torch.zeros(rows, 1))


def test_the_first_rows_start_the_first_group() -> None:
    assert group_for([], group(1, 50), ROW_GROUPS, anywhere=True) == 0


def test_rows_of_about_the_groups_length_join_it() -> None:
    assert group_for([group(4, 300)], group(1, 50), ROW_GROUPS, anywhere=True) == 0


def test_a_long_prompt_beside_short_rows_starts_a_group_of_its_own() -> None:
    assert group_for([group(4, 300)], group(1, 6000), ROW_GROUPS, anywhere=True) == 1


def test_a_question_joins_the_short_rows_not_the_document_after_them() -> None:
    groups = [group(4, 300), group(1, 6000)]
    assert group_for(groups, group(1, 40), ROW_GROUPS, anywhere=True) == 0


def test_every_group_is_held_to_the_share_not_only_the_least_padded() -> None:
    """Joining the short group adds 30 padding columns, past half of 50;
    joining the long one adds 35, within half of 115."""
    assert group_for([group(1, 10), group(1, 75)], group(1, 40), ROW_GROUPS, anywhere=True) == 1


def test_rows_that_must_come_last_join_only_the_last_group_or_start_one() -> None:
    groups = [group(4, 300), group(1, 6000)]
    assert group_for(groups, group(1, 40), ROW_GROUPS, anywhere=False) == 2
    assert group_for(groups, group(1, 5900), ROW_GROUPS, anywhere=False) == 1


def test_with_no_room_for_another_group_they_join_the_one_they_pad_least() -> None:
    groups = [group(1, 800), group(1, 6000), group(1, 3000), group(1, 1500)]
    assert group_for(groups, group(1, 10), 5, anywhere=True) == 4, "room for a fifth"
    assert group_for(groups, group(1, 10), 4, anywhere=True) == 0
    assert group_for(groups, group(1, 10), 4, anywhere=False) == 3
    assert group_for([group(4, 300)], group(1, 6000), 1, anywhere=True) == 0


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


def test_rows_that_leave_leave_their_groups_and_an_emptied_group_goes() -> None:
    rows = PaddedRows(SimpleNamespace(), SimpleNamespace(pad_token_id=0))
    rows.groups = [cached_group([3, 9], 0), cached_group([40], 2), cached_group([5, 2], 3)]
    rows.keep([0, 3])
    first, last = rows.groups
    assert rows.rows == 2 and len(rows.groups) == 2
    assert first.mask.tolist() == [[1, 1, 1]], "padding no row needs is dropped"
    assert first.cache.layers[0].keys.shape == (1, 2, 3, 4)
    assert bool((first.cache.layers[0].keys == 0).all())
    assert last.mask.tolist() == [[1] * 5] and bool((last.cache.layers[0].values == 3).all())
