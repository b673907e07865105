"""The paged decode kernel, in Triton's interpreter, against torch's attention
over the same pages gathered under the cache's own mask: every grouping of
query heads the families use, a sliding window, rows spanning several blocks,
and an idle row."""

import functools
from types import SimpleNamespace

import pytest
import torch

from helpers.engine.kv_cache import PAGE_SIZE, PagedCache
from tests.triton_interpreter import decode_kernel

decode_attention = decode_kernel()  # or the module is skipped, without Triton
from helpers.engine.paged_attention import problem_on  # noqa: E402

CPU = torch.device("cpu")
SHAPES = {  # query heads, key-value heads, head dim
    "smollm2-135m": (9, 3, 64),
    "qwen2.5-0.5b": (14, 2, 64),
    "qwen3-0.6b": (16, 8, 128),
    "llama3.2-1b": (32, 8, 64),
    "one head a group, narrow": (4, 4, 16),
}


def paged_cache(kv_heads: int, head_dim: int, window: int | None, slots: int) -> PagedCache:
    config = SimpleNamespace(
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        num_hidden_layers=1,
        sliding_window=window,
    )
    cache = PagedCache(config, slots, pages=64, max_positions=512, dtype=torch.float32, device=CPU)
    assert cache.decode_kernel is None, "on CPU the cache gathers pages unless told otherwise"
    return cache


@pytest.mark.parametrize("splits", [1, 2])
@pytest.mark.parametrize("window", [None, 37])
@pytest.mark.parametrize("shape", SHAPES)
def test_the_kernel_gives_torchs_attention_over_the_gathered_pages(
    shape: str, window: int | None, splits: int
) -> None:
    """Each row read whole, or in two splits combined after (as a GPU splits
    a few long rows between more programs)."""
    heads, kv_heads, head_dim = SHAPES[shape]
    generator = torch.Generator().manual_seed(len(shape))
    cache = paged_cache(kv_heads, head_dim, window, slots=4)
    lengths = [150, 1, 64, 77]  # the next token's position in each busy slot
    busy = [0, 1, 3]  # slot 2 is idle: it decodes padding into scratch
    cache.assign(busy, [lengths[slot] + 1 for slot in busy])
    layer = cache.layers[0]
    for pool in (layer.keys, layer.values):
        pool[1:] = torch.randn(pool[1:].shape, generator=generator)
    positions = torch.tensor([[lengths[slot]] if slot in busy else [512] for slot in range(4)])
    width = 192  # past every position, a multiple of the page size
    assert positions.max() == cache.scratch_position and width % PAGE_SIZE == 0
    new = [torch.randn(4, count, 1, head_dim, generator=generator) for count in (heads, kv_heads)]
    queries, (keys, values) = new[0], (new[1], new[1] * 0.5)
    outputs = []
    for kernel in (None, functools.partial(decode_attention, splits=splits)):
        cache.decode_kernel = kernel
        cache.select(torch.arange(4), positions, width)
        mask = cache.mask(None, positions, 1, window)
        assert (mask is None) == (kernel is not None)
        outputs.append(layer.attend(queries, keys, values, mask, head_dim**-0.5))
    gathered, in_place = outputs
    assert in_place.shape == gathered.shape == (4, heads, 1, head_dim)
    torch.testing.assert_close(in_place[busy], gathered[busy], rtol=1e-5, atol=1e-5)
    assert torch.isfinite(in_place[2]).all(), "an idle row's output stays finite"


@pytest.mark.parametrize("shape", SHAPES)
def test_the_kernel_passes_its_own_check_where_it_runs(shape: str) -> None:
    """The check a GPU replica runs before trusting the kernel, here on CPU."""
    assert problem_on(CPU, torch.float32, *SHAPES[shape]) is None
