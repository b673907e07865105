"""The paged cache's bookkeeping: which slot owns which pages, moving
sequences to the front of the block table when others end, and kept pages
shared by the rows that start with them."""

from types import SimpleNamespace

import pytest
import torch

from helpers.engine.kv_cache import PAGE_SIZE, PagedCache


def small_cache(slots: int = 4, pages: int = 12) -> PagedCache:
    config = SimpleNamespace(
        num_key_value_heads=1, head_dim=2, num_hidden_layers=2, sliding_window=None
    )
    return PagedCache(
        config,
        slots,
        pages,
        max_positions=8 * PAGE_SIZE,
        dtype=torch.float32,
        device=torch.device("cpu"),
    )


def keys_of(cache: PagedCache, slot: int, positions: int) -> list[torch.Tensor]:
    """What each layer holds at a slot's first ``positions`` positions, read
    through its row of the table as a decode step reads it."""
    cache.select(torch.tensor([slot]), torch.tensor([[positions - 1]]), positions)
    return [layer.keys[cache.read_pages].flatten(1, 2)[0, :positions] for layer in cache.layers]


def test_keeping_rows_moves_them_to_the_front_and_frees_the_rest() -> None:
    cache = small_cache()
    lengths = [20, 40, 5, 33]  # pages: 2, 3, 1, 3
    cache.assign([0, 1, 2, 3], lengths)
    owned = {slot: list(pages) for slot, pages in cache.owned.items()}
    generator = torch.Generator().manual_seed(0)
    for layer in cache.layers:
        layer.keys[1:] = torch.randn(layer.keys[1:].shape, generator=generator)
    before = {slot: keys_of(cache, slot, lengths[slot]) for slot in (1, 3)}
    free = len(cache.free)

    cache.keep([3, 1])

    assert cache.owned == {0: owned[3], 1: owned[1]}
    assert len(cache.free) == free + len(owned[0]) + len(owned[2])
    assert set(cache.free).isdisjoint(owned[3] + owned[1])
    for row, slot in enumerate((3, 1)):
        assert all(
            torch.equal(now, then)
            for now, then in zip(keys_of(cache, row, lengths[slot]), before[slot], strict=True)
        ), "a moved sequence reads the keys it wrote"
    assert not cache.table[2:].any(), "the rows left point at scratch"


def test_keeping_rows_already_in_front_changes_nothing_but_the_rest() -> None:
    cache = small_cache()
    cache.assign([0, 1, 2], [16, 16, 16])
    table = cache.table.clone()
    cache.keep([0, 1])
    assert torch.equal(cache.table[:2], table[:2])
    assert not cache.table[2:].any()
    cache.keep([])
    assert cache.owned == {} and not cache.table.any()
    assert sorted(cache.free) == list(range(1, cache.pages + 1)), "every page is free again"


def written(cache: PagedCache, slot: int, tokens: list[int]) -> list[int]:
    """Slot ``slot`` given pages for ``tokens``, random keys written in them,
    its full pages indexed and then given up: the pages it had."""
    cache.assign([slot], [len(tokens)])
    pages = list(cache.owned[slot])
    for layer in cache.layers:
        layer.keys[pages] = torch.randn(layer.keys[pages].shape)
    cache.remember(slot, tokens)
    return pages


def accounted(cache: PagedCache) -> bool:
    """Every page is exactly one of free, idle in the index, or held."""
    held = set(cache.holders)
    idle = {page for page in range(1, cache.pages + 1) if page in cache.kept} - held
    free = set(cache.free)
    return (
        len(free) == len(cache.free)
        and free.isdisjoint(held | idle)
        and len(free | held | idle) == cache.pages
        and cache.available == len(free) + len(idle)
    )


def test_a_kept_start_sits_unzeroed_in_every_row_that_shares_it_and_a_copy_skips_it() -> None:
    cache = small_cache()
    tokens = list(range(40))  # two full pages and eight positions of a third
    first = written(cache, 0, tokens)
    cache.keep([])
    start = first[:2]
    before = [layer.keys[start].clone() for layer in cache.layers]

    def start_unchanged() -> bool:
        return all(map(torch.equal, (layer.keys[start] for layer in cache.layers), before))

    assert cache.available == cache.pages and accounted(cache)

    cache.assign([0, 1], [48, 48], {0: start, 1: start})

    assert cache.owned[0][:2] == cache.owned[1][:2] == start
    assert cache.owned[0][2] != cache.owned[1][2], "the rest is each row's own"
    assert [cache.holders[page] for page in start] == [2, 2]
    assert start_unchanged()
    for layer in cache.layers:
        layer.keys[cache.owned[0][2]] = 7.0
    cache.copy(0, 1, 48)
    assert start_unchanged()
    assert all(bool((layer.keys[cache.owned[1][2]] == 7.0).all()) for layer in cache.layers)
    cache.keep([])
    assert cache.holders == {} and accounted(cache)
    assert cache.kept.longest(tokens, 2) == start, "still kept for the next prompt"


def test_new_pages_come_from_the_free_list_first_then_from_the_idle_least_recent_first() -> None:
    cache = small_cache(pages=8)
    older = written(cache, 0, list(range(48)))  # three pages, all full
    cache.keep([])
    newer = written(cache, 0, list(range(100, 148)))
    cache.keep([])
    assert cache.kept.idle == 6 and len(cache.free) == 2

    cache.assign([0], [5 * PAGE_SIZE])  # two free pages, then three idle ones

    assert set(cache.owned[0]) >= set(older), "the least recently used went first"
    assert cache.kept.longest(list(range(48)), 3) == []
    assert cache.kept.longest(list(range(100, 148)), 3) == newer
    assert accounted(cache)


def test_a_refused_assignment_gives_back_the_starts_it_held() -> None:
    cache = small_cache(pages=6)
    start = written(cache, 0, list(range(32)))
    cache.keep([])
    with pytest.raises(ValueError, match="need"):
        cache.assign([0, 1], [32 + 2 * PAGE_SIZE, 8 * PAGE_SIZE], {0: start, 1: start})
    cache.keep([])  # as PagedRows.admit does: the rows assigned before go too
    assert cache.holders == {} and accounted(cache)
    assert cache.kept.longest(list(range(32)), 2) == start
