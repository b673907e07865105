"""The paged cache's bookkeeping: which slot owns which pages, and moving
sequences to the front of the block table when others end."""

from types import SimpleNamespace

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
