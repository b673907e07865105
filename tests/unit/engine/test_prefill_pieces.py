"""A prompt past ``PREFILL_TOKENS`` prefills in pieces; the arithmetic that
bounds what each piece's pass holds, for the families' longest contexts."""

import itertools

import pytest

from helpers.engine.batch_rows import PREFILL_TOKENS, prefill_pieces
from helpers.engine.llama import PAGE_SIZE, pages_for


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
