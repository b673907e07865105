"""What the prefix cache keeps of ended sequences, and what of a new prompt it
finds already computed (``helpers.engine.prefix_cache``)."""

import random

import pytest
import torch

from helpers.engine.prefix_cache import MIN_REUSED_TOKENS, PrefixCache

LAYERS, HEADS, DIM = 2, 1, 4
TOKEN_BYTES = LAYERS * 2 * HEADS * DIM * 4
"""Bytes one token's keys and values take here: fp32, keys and values a layer."""


def layers_for(tokens: list[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Keys and values that carry their tokens' ids, so a test can see which
    entry, and which columns of it, a prefix came from."""
    ids = torch.tensor(tokens, dtype=torch.float32)
    column = ids[None, None, :, None].expand(1, HEADS, len(tokens), DIM)
    return [(column + layer, -column - layer) for layer in range(LAYERS)]


def kept(cache: PrefixCache, tokens: list[int]) -> None:
    cache.remember(tokens, layers_for(tokens))


def common_start(a: list[int], b: list[int]) -> int:
    shared = 0
    while shared < min(len(a), len(b)) and a[shared] == b[shared]:
        shared += 1
    return shared


def tokens_from(start: int, count: int) -> list[int]:
    return list(range(start, start + count))


@pytest.fixture
def cache() -> PrefixCache:
    return PrefixCache(budget=10**9)


def test_a_prompt_that_starts_as_a_kept_sequence_gets_the_columns_they_share(
    cache: PrefixCache,
) -> None:
    kept(cache, tokens_from(0, 100))
    prompt = tokens_from(0, 60) + [999] * 20
    prefix = cache.longest(prompt)
    assert prefix is not None and prefix.tokens == 60
    for layer, (keys, values) in enumerate(prefix.layers):
        assert keys.shape == values.shape == (1, HEADS, 60, DIM)
        assert keys[0, 0, :, 0].tolist() == [float(t + layer) for t in range(60)]
        assert values[0, 0, :, 0].tolist() == [float(-t - layer) for t in range(60)]


def test_too_little_in_common_is_no_prefix(cache: PrefixCache) -> None:
    kept(cache, tokens_from(0, 100))
    assert cache.longest(tokens_from(0, MIN_REUSED_TOKENS - 1) + [999] * 50) is None
    assert cache.longest(tokens_from(0, MIN_REUSED_TOKENS) + [999] * 50) is not None
    assert cache.longest([999, *tokens_from(1, 99)]) is None


def test_a_prompt_kept_whole_leaves_its_last_token_to_run(cache: PrefixCache) -> None:
    """Running the last prompt token gives the first new token's logits."""
    kept(cache, tokens_from(0, 100))
    for length in (60, 100):
        prefix = cache.longest(tokens_from(0, length))
        assert prefix is not None and prefix.tokens == length - 1


def test_of_several_kept_sequences_the_one_sharing_most_is_used(cache: PrefixCache) -> None:
    kept(cache, tokens_from(0, 50) + [7] * 50)
    kept(cache, tokens_from(0, 80) + [8] * 50)
    kept(cache, tokens_from(0, 40) + [9] * 90)
    prefix = cache.longest(tokens_from(0, 90) + [1] * 10)
    assert prefix is not None and prefix.tokens == 80
    assert prefix.layers[0][0][0, 0, -1, 0].item() == 79.0


def test_a_sequence_kept_drops_those_it_starts_with_and_joins_none_it_is_the_start_of(
    cache: PrefixCache,
) -> None:
    """A chat's next turn holds the turn before: keeping both would hold it twice."""
    kept(cache, tokens_from(0, 100))
    kept(cache, tokens_from(0, 200))
    assert (len(cache), cache.size) == (1, 200 * TOKEN_BYTES)
    kept(cache, tokens_from(0, 150))
    assert (len(cache), cache.size) == (1, 200 * TOKEN_BYTES)
    kept(cache, tokens_from(0, 120) + [5] * 10)
    assert (len(cache), cache.size) == (2, 330 * TOKEN_BYTES)


def test_sequences_too_short_to_reuse_are_not_kept(cache: PrefixCache) -> None:
    kept(cache, tokens_from(0, MIN_REUSED_TOKENS - 1))
    assert len(cache) == 0


def test_past_the_budget_the_least_recently_used_go_first() -> None:
    cache = PrefixCache(budget=250 * TOKEN_BYTES)
    first, second, third = (tokens_from(1000 * n, 100) for n in (1, 2, 3))
    kept(cache, first)
    kept(cache, second)
    assert cache.longest(first) is not None  # used: the second is now the oldest
    kept(cache, third)
    assert cache.longest(second) is None
    assert cache.longest(first) is not None and cache.longest(third) is not None
    assert cache.size == 200 * TOKEN_BYTES <= cache.budget


def test_a_sequence_larger_than_the_whole_budget_is_not_kept_and_evicts_nothing() -> None:
    """Not even the turn it continues: a chat past the budget keeps reusing it."""
    cache = PrefixCache(budget=150 * TOKEN_BYTES)
    kept(cache, tokens_from(0, 100))
    kept(cache, tokens_from(1000, 40))
    kept(cache, tokens_from(0, 151))
    assert cache.size == 140 * TOKEN_BYTES
    prefix = cache.longest(tokens_from(0, 151))
    assert prefix is not None and prefix.tokens == 100
    assert cache.longest(tokens_from(1000, 40)) is not None


def test_what_is_kept_is_a_copy_of_a_cache_that_goes_on_changing(cache: PrefixCache) -> None:
    tokens = tokens_from(0, 60)
    live = layers_for(tokens + [999] * 4)
    cache.remember(tokens, [(keys[:, :, :60], values[:, :, :60]) for keys, values in live])
    for keys, values in live:
        keys.zero_(), values.zero_()
    prefix = cache.longest(tokens)
    assert prefix is not None
    assert prefix.layers[1][0][0, 0, :, 0].tolist() == [float(t + 1) for t in range(59)]
    assert cache.size == 60 * TOKEN_BYTES


def test_the_prefix_found_is_the_longest_common_start_among_random_kept_sequences() -> None:
    rng = random.Random(7)
    for _ in range(50):
        cache = PrefixCache(budget=10**9)
        stems = [[rng.randrange(3) for _ in range(rng.randrange(1, 120))] for _ in range(4)]
        kept_tokens = []
        for stem in stems:
            tokens = stem + [rng.randrange(3) for _ in range(rng.randrange(0, 80))]
            kept(cache, tokens)
            kept_tokens.append(tokens)
        prompt = [*rng.choice(kept_tokens)[: rng.randrange(1, 150)], rng.randrange(3)]
        # Brute force, over what the cache still holds (a kept sequence drops
        # any it starts with, which shares no more with a prompt than it does).
        shared = min(max(common_start(t, prompt) for t in kept_tokens), len(prompt) - 1)
        prefix = cache.longest(prompt)
        if shared < MIN_REUSED_TOKENS:
            assert prefix is None
        else:
            assert prefix is not None and prefix.tokens == shared
            assert prefix.layers[0][0][0, 0, :, 0].tolist() == [float(t) for t in prompt[:shared]]
