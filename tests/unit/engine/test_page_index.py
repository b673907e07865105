"""The paged layout's prefix cache: full pages indexed by what they hold,
shared by the slots whose prompts start that way, idle once none holds them,
and taken back least recently used first."""

import torch

from helpers.engine.kv_cache import PAGE_SIZE, PagedCache
from helpers.engine.page_index import PageIndex

from .test_paged_cache import keys_of, small_cache

SYSTEM = list(range(100, 100 + 3 * PAGE_SIZE))  # three pages' worth of a shared start


def tokens(*extra: int, start: list[int] = SYSTEM) -> list[int]:
    return [*start, *extra]


def test_the_longest_indexed_start_is_found_page_by_page() -> None:
    index = PageIndex(PAGE_SIZE)
    index.add(tokens(*range(PAGE_SIZE)), [7, 8, 9, 10])
    assert index.longest(tokens(*range(PAGE_SIZE), 1), most=10) == [7, 8, 9, 10]
    assert index.longest(tokens(1, 2, 3), most=10) == [7, 8, 9], "the fourth page differs"
    assert index.longest(tokens(), most=2) == [7, 8], "held to most"
    assert index.longest([0, *SYSTEM], most=10) == [], "a start shifted by one shares nothing"


def test_a_part_filled_page_is_not_indexed() -> None:
    index = PageIndex(PAGE_SIZE)
    index.add(tokens(1, 2), [7, 8, 9, 10])
    assert 10 not in index
    assert index.longest(tokens(1, 2), most=10) == [7, 8, 9]


def test_a_page_equal_to_one_indexed_leaves_the_entry_and_chains_its_successors_under_it() -> None:
    index = PageIndex(PAGE_SIZE)
    index.add(SYSTEM, [1, 2, 3])
    index.add(tokens(*range(PAGE_SIZE)), [4, 5, 6, 7])
    assert not any(page in index for page in (4, 5, 6))
    assert index.longest(tokens(*range(PAGE_SIZE)), most=10) == [1, 2, 3, 7]


def test_idle_pages_are_taken_back_least_recently_released_first() -> None:
    index = PageIndex(PAGE_SIZE)
    index.add(tokens(*range(PAGE_SIZE)), [1, 2, 3, 4])
    for page in (4, 3, 2, 1):  # last page first, as a slot releases them
        index.released(page)
    assert index.idle == 4
    assert [index.take() for _ in range(2)] == [[4], [3]]
    assert index.longest(tokens(*range(PAGE_SIZE)), most=10) == [1, 2], "the start stays"


def test_taking_an_idle_page_unindexes_the_pages_under_it_and_frees_the_idle_ones() -> None:
    index = PageIndex(PAGE_SIZE)
    index.add(tokens(*range(PAGE_SIZE)), [1, 2, 3, 4])
    for page in (2, 3, 4):
        index.released(page)
    assert sorted(index.take()) == [2, 3, 4]
    assert index.idle == 0
    assert index.longest(tokens(*range(PAGE_SIZE)), most=10) == [1], "1 is held, and stays"


def test_a_page_still_held_is_unindexed_with_its_parent_but_not_freed() -> None:
    index = PageIndex(PAGE_SIZE)
    index.add(SYSTEM, [1, 2, 3])
    index.add(tokens(*range(PAGE_SIZE)), [4, 5, 6, 7])  # 7 is indexed under 3
    index.released(3)
    assert index.take() == [3]
    assert 7 not in index, "nothing reaches it without its parent"


def shared_cache(pages: int = 12) -> PagedCache:
    cache = small_cache(pages=pages)
    generator = torch.Generator().manual_seed(0)
    for layer in cache.layers:
        layer.keys[1:] = torch.randn(layer.keys[1:].shape, generator=generator)
    return cache


def test_a_slot_that_starts_with_kept_pages_reads_them_and_writes_none_of_them() -> None:
    cache = shared_cache()
    first = tokens(*range(5))
    cache.assign([0], [len(first) + 8])
    cache.remember(0, first)
    written = keys_of(cache, 0, len(SYSTEM))
    cache.keep([])
    assert cache.kept.idle == 3 and len(cache.free) + 3 == cache.pages

    start = cache.kept.longest(tokens(9, 9), most=3)
    cache.assign([0, 1], [len(SYSTEM) + 4, 20], {0: start})

    assert cache.owned[0][:3] == start
    assert cache.kept.idle == 0, "a page a slot holds is not idle"
    assert all(
        torch.equal(now, then)
        for now, then in zip(keys_of(cache, 0, len(SYSTEM)), written, strict=True)
    ), "the shared pages were not zeroed"
    assert set(cache.owned[1]).isdisjoint(start)


def test_two_slots_share_a_page_until_both_end() -> None:
    cache = shared_cache()
    cache.assign([0], [len(SYSTEM) + 1])
    cache.remember(0, SYSTEM)
    start = cache.kept.longest(tokens(1), most=3)
    cache.assign([1], [len(SYSTEM) + 8], {1: start})
    cache.keep([1])  # slot 0 ends: its pages are the other's now
    assert cache.kept.idle == 0 and cache.owned[0][:3] == start
    cache.keep([])
    assert cache.kept.idle == 3, "idle once no slot holds them"
    assert sorted(cache.free + start) == list(range(1, cache.pages + 1))


def test_new_pages_come_from_the_free_list_before_the_kept_ones() -> None:
    cache = shared_cache(pages=6)
    cache.assign([0], [len(SYSTEM)])
    cache.remember(0, SYSTEM)
    cache.keep([])
    assert cache.available == 6
    cache.assign([0], [3 * PAGE_SIZE])
    assert cache.kept.idle == 3, "three free pages were enough"
    cache.assign([1], [2 * PAGE_SIZE])
    assert cache.kept.idle == 1, "the kept start's last two pages were taken back"
    assert cache.kept.longest(SYSTEM, most=3) == cache.kept.longest(SYSTEM, most=1)
    assert len(cache.kept.longest(SYSTEM, most=3)) == 1


def test_a_refused_assignment_gives_back_the_kept_pages_it_held() -> None:
    cache = shared_cache(pages=4)
    cache.assign([0], [len(SYSTEM)])
    cache.remember(0, SYSTEM)
    cache.keep([])
    start = cache.kept.longest(SYSTEM, most=3)
    try:
        cache.assign([0], [10 * PAGE_SIZE], {0: start})
    except ValueError as err:
        assert "pages" in str(err)
    else:
        raise AssertionError("ten pages fit a cache of four")
    assert cache.kept.idle == 3 and cache.available == 4
