"""How an admission is cut into prefill passes: many prompts into groups,
fewest new tokens first, and a prompt past ``PREFILL_TOKENS`` into pieces; the
arithmetic that bounds what each pass holds, for the families' longest
contexts."""

import itertools
import random

import pytest

from helpers.engine.kv_cache import PAGE_SIZE, pages_for
from helpers.engine.paged_rows import (
    PREFILL_AREA,
    PREFILL_TOKENS,
    attended,
    prefill_groups,
    prefill_pieces,
)


@pytest.mark.parametrize("length", [PREFILL_TOKENS + 1, 32768, 40960, 131072])
def test_pieces_cover_the_prompt_in_order_within_one_full_pass(length: int) -> None:
    pieces = prefill_pieces(length)
    assert pieces[0][0] == 0 and pieces[-1][1] == length
    assert all(end == next_start for (_, end), (next_start, _) in itertools.pairwise(pieces))
    for start, end in pieces:
        assert 0 < end - start <= PREFILL_TOKENS
        columns = pages_for(end) * PAGE_SIZE
        assert (end - start) * columns <= PREFILL_TOKENS**2, (start, end)
        assert start % PAGE_SIZE == 0, "each piece but the last fills whole pages"


def test_the_first_piece_is_a_full_pass_and_later_ones_shrink() -> None:
    sizes = [end - start for start, end in prefill_pieces(32768)]
    assert sizes[0] == PREFILL_TOKENS
    assert sizes[:-1] == sorted(sizes[:-1], reverse=True)
    assert sizes[-2] < PREFILL_TOKENS // 2


def test_prompts_of_mixed_lengths_are_grouped_shortest_first_and_barely_padded() -> None:
    """nano-vllm's workload, 256 prompts of 100 to 1,024 tokens: each index
    in one group, every group within the budget, and the padding a few per
    cent of the tokens, where groups taken in arrival order pad nearly as
    many tokens as the prompts hold."""
    rng = random.Random(0)
    prompts = [[1] * rng.randint(100, 1024) for _ in range(256)]
    groups = prefill_groups(prompts)
    assert sorted(index for group in groups for index in group) == list(range(256))
    padded = 0
    for group in groups:
        longest = max(len(prompts[index]) for index in group)
        assert len(group) * longest <= PREFILL_TOKENS
        padded += len(group) * longest
    real = sum(map(len, prompts))
    assert padded < 1.05 * real, (padded, real)
    lengths = [len(prompts[group[0]]) for group in groups]
    assert lengths == sorted(lengths), "shortest first"
    assert in_arrival_order(list(map(len, prompts))) > 1.5 * real


def in_arrival_order(lengths: list[int]) -> int:
    """Padded tokens of the same budget's passes cut in arrival order."""
    padded, count, longest = 0, 0, 0
    for length in lengths:
        if count and (count + 1) * max(longest, length) > PREFILL_TOKENS:
            padded, count, longest = padded + count * longest, 0, 0
        count, longest = count + 1, max(longest, length)
    return padded + count * longest


def test_a_prompt_past_the_budget_is_a_group_of_its_own() -> None:
    prompts = [[1] * 10, [1] * (PREFILL_TOKENS + 5), [1] * 20]
    assert prefill_groups(prompts) == [[0, 2], [1]]
    assert prefill_groups([]) == []


def test_prompts_that_share_kept_pages_group_by_their_new_tokens_within_both_bounds() -> None:
    """Questions of 40 new tokens after a kept system prompt go in together,
    with a short fresh prompt, as many a pass as the columns they read allow
    (each row gathers its whole prompt's keys and values) and within the
    area, which counts those columns too."""
    questions = [[1] * 1032] * 64  # 992 kept
    groups = prefill_groups([*questions, [1] * 50], begins=[992] * 64 + [0])
    assert [len(group) for group in groups] == [7] * 9 + [2]
    assert groups[-1] == [63, 64]
    shorter = [[1] * 200] * 64  # 160 kept
    narrow = 20 * 40 * 208  # twenty rows' attention, not all 64
    cut = prefill_groups(shorter, narrow, [160] * 64)
    assert [len(group) for group in cut] == [20, 20, 20, 4]
    # A long kept prompt never widens a pass of short fresh ones.
    wide = prefill_groups([[1] * 40] * 200 + [[1] * 8216], begins=[0] * 200 + [8176])
    assert wide == [list(range(200)), [200]]


@pytest.mark.parametrize("area", [1_000_000, 3000**2, PREFILL_AREA // 4])
def test_a_smaller_area_cuts_smaller_passes_that_still_cover_every_prompt(area: int) -> None:
    """A GPU with little room for activations (kv_budget.prefill_area)."""
    for length in (PREFILL_TOKENS, 32768):
        pieces = prefill_pieces(length, area)
        assert pieces[0][0] == 0 and pieces[-1][1] == length
        for start, end in pieces:
            assert (end - start) * pages_for(end) * PAGE_SIZE <= area, (start, end)
    rng = random.Random(1)
    prompts = [[1] * rng.randint(100, 4000) for _ in range(64)]
    groups = prefill_groups(prompts, area)
    assert sorted(index for group in groups for index in group) == list(range(64))
    for group in groups:
        longest = max(len(prompts[index]) for index in group)
        assert len(group) == 1 or attended(len(group), longest) <= area
