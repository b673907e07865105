"""A decode step's attention read straight from a paged KV cache, as one Triton kernel.

Why: torch's attention takes each row's keys and values as one contiguous
tensor, so a decode step over a :class:`~helpers.engine.llama.PagedCache`
first gathers every row's pages into a copy as wide as the longest row
(rounded up to a power of two), in every layer, and attention then reads
that copy again. At 256 sequences of a thousand positions that is most of a
GPU's decode step: the weights are read once a step, the KV cache about
three times over. This kernel reads each row's pages in place, only as far
as that row's own position, and each key and value once for all the query
heads that share it (grouped-query attention).

One program per (row, key-value head) walks the row's block table a block
of positions at a time, with the online softmax of FlashAttention: a running
maximum and sum per query head, so no scores are kept. Fixed arguments and
grid for a fixed (batch, width) shape, so a CUDA graph captures it as it
captures the rest of the step.

Triton comes with torch's CUDA builds. On CPU the kernel runs only in
Triton's interpreter (``TRITON_INTERPRET=1``, set before this module is
imported), which is how the tests hold it to torch's attention there.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

BLOCK_POSITIONS = 64
"""Positions a program reads per iteration: four pages."""
NO_WINDOW = 2**30
"""The window of a model without one: past any context."""


# Arguments that vary from step to step are not specialised on, so one
# compilation, at load (``works_on``), serves every step.
@triton.jit(do_not_specialize=["window", "table_stride_row"])
def _decode_kernel(
    queries,  # [batch, heads, head_dim]
    key_pages,  # [pages, PAGE, kv_heads, head_dim]
    value_pages,
    table,  # [batch, columns]: each row's pages in order
    ends,  # [batch]: each row's new token's position, plus one
    out,  # [batch, heads, head_dim]
    scale,
    window,  # positions a token attends to, itself included
    query_stride_row,
    query_stride_head,
    page_stride,
    page_stride_position,
    page_stride_head,
    table_stride_row,
    out_stride_row,
    out_stride_head,
    GROUP: tl.constexpr,  # query heads per key-value head
    GROUP_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    DIM_PAD: tl.constexpr,
    PAGE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0)
    kv_head = tl.program_id(1)
    end = tl.load(ends + row).to(tl.int32)
    start = tl.maximum(end - window, 0)
    heads = kv_head * GROUP + tl.arange(0, GROUP_PAD)
    head_ok = tl.arange(0, GROUP_PAD) < GROUP
    dims = tl.arange(0, DIM_PAD)
    dim_ok = dims < HEAD_DIM
    q = tl.load(
        queries + row * query_stride_row + heads[:, None] * query_stride_head + dims[None, :],
        mask=head_ok[:, None] & dim_ok[None, :],
        other=0.0,
    )
    best = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    total = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([GROUP_PAD, DIM_PAD], tl.float32)
    for block in range(start // BLOCK * BLOCK, end, BLOCK):
        columns = block + tl.arange(0, BLOCK)
        valid = (columns >= start) & (columns < end)
        page = tl.load(table + row * table_stride_row + columns // PAGE, mask=valid, other=0)
        place = (
            page[:, None] * page_stride
            + (columns % PAGE)[:, None] * page_stride_position
            + kv_head * page_stride_head
            + dims[None, :]
        )
        both = valid[:, None] & dim_ok[None, :]
        k = tl.load(key_pages + place, mask=both, other=0.0)
        scores = tl.dot(q, tl.trans(k)) * scale
        scores = tl.where(valid[None, :], scores, float("-inf"))
        new_best = tl.maximum(best, tl.max(scores, 1))
        kept = tl.exp(best - new_best)
        weights = tl.exp(scores - new_best[:, None])
        total = total * kept + tl.sum(weights, 1)
        v = tl.load(value_pages + place, mask=both, other=0.0)
        acc = acc * kept[:, None] + tl.dot(weights.to(v.dtype), v)
        best = new_best
    result = acc / total[:, None]
    tl.store(
        out + row * out_stride_row + heads[:, None] * out_stride_head + dims[None, :],
        result.to(out.dtype.element_ty),
        mask=head_ok[:, None] & dim_ok[None, :],
    )


def decode_attention(
    queries: torch.Tensor,
    key_pages: torch.Tensor,
    value_pages: torch.Tensor,
    table: torch.Tensor,
    positions: torch.Tensor,
    scale: float,
    window: int | None,
    scratch_position: int,
) -> torch.Tensor:
    """Attention of one new token per row, ``queries`` ``[batch, heads, 1,
    head_dim]``, over its row's pages up to its position: what
    ``scaled_dot_product_attention`` gives over the gathered pages under the
    cache's mask, ``[batch, heads, 1, head_dim]``. ``table`` lists each
    row's pages, as many columns as the step reads; ``positions`` is
    ``[batch, 1]``."""
    batch, heads, _, head_dim = queries.shape
    page, kv_heads = key_pages.shape[1], key_pages.shape[2]
    query_rows = queries[:, :, 0]
    out = torch.empty((batch, heads, head_dim), dtype=queries.dtype, device=queries.device)
    group = heads // kv_heads
    # An idle row (at scratch) reads one column, page 0's first: its output
    # is never used, but it must stay finite, as it goes on to write there.
    ends = torch.where(positions[:, 0] >= scratch_position, 1, positions[:, 0] + 1)
    _decode_kernel[(batch, kv_heads)](
        query_rows,
        key_pages,
        value_pages,
        table,
        ends,
        out,
        scale,
        window or NO_WINDOW,
        query_rows.stride(0),
        query_rows.stride(1),
        key_pages.stride(0),
        key_pages.stride(1),
        key_pages.stride(2),
        table.stride(0),
        out.stride(0),
        out.stride(1),
        GROUP=group,
        GROUP_PAD=max(16, triton.next_power_of_2(group)),
        HEAD_DIM=head_dim,
        DIM_PAD=max(16, triton.next_power_of_2(head_dim)),
        PAGE=page,
        BLOCK=BLOCK_POSITIONS,
    )
    return out[:, :, None]


@functools.cache
def works_on(
    device: torch.device, dtype: torch.dtype, heads: int, kv_heads: int, head_dim: int
) -> bool:
    """Whether the kernel compiles on ``device`` for a model's heads and
    agrees with torch's attention there, tried once per process on a small
    cache. A GPU or a Triton this was never run on then falls back to
    gathering pages rather than decoding wrong or not at all. Compiled here,
    at load, the kernel is ready before the first decode step needs it."""
    generator = torch.Generator().manual_seed(0)
    page, pages = 16, 9

    def random(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator).to(device=device, dtype=dtype)

    keys, values = random(pages, page, kv_heads, head_dim), random(pages, page, kv_heads, head_dim)
    queries = random(3, heads, 1, head_dim)
    table = torch.tensor([[1, 2, 3, 4], [5, 6, 0, 0], [7, 8, 0, 0]], device=device)
    positions = torch.tensor([[50], [20], [64 * 4]], device=device)  # the last idle
    try:
        got = decode_attention(queries, keys, values, table, positions, head_dim**-0.5, None, 256)
        expected = [
            torch.nn.functional.scaled_dot_product_attention(
                queries[row : row + 1],
                keys[table[row]].flatten(0, 1)[: length + 1].transpose(0, 1)[None],
                values[table[row]].flatten(0, 1)[: length + 1].transpose(0, 1)[None],
                scale=head_dim**-0.5,
                enable_gqa=True,
            )
            for row, length in ((0, 50), (1, 20))
        ]
        return bool(torch.allclose(got[:2], torch.cat(expected), atol=2e-2, rtol=0))
    except Exception:  # a compiler or driver this kernel does not suit
        return False
