"""A decode step's attention read straight from a paged KV cache, as one Triton kernel.

Why: torch's attention takes each row's keys and values as one contiguous
tensor, so a decode step over a :class:`~helpers.engine.kv_cache.PagedCache`
first gathers every row's pages into a copy as wide as the longest row
(rounded up to a power of two), in every layer, and attention then reads
that copy again: the weights are read once a step, the KV cache about three
times over, which at 256 sequences of a thousand positions is far more
bytes (decision record 0031 estimates it; the GPU benchmark measures it).
This kernel reads each row's pages in place, only as far as that row's own
position, and each key and value once for all the query heads that share it
(grouped-query attention).

One program per (row, key-value head) walks the row's block table a block
of positions at a time, with the online softmax of FlashAttention: a running
maximum and sum per query head, so no scores are kept. Where a few long rows
would leave the GPU idle, each row is split between several programs and
their partial sums combined (flash-decoding). Fixed arguments and grid for a
fixed (batch, width) shape, so a CUDA graph captures it as it captures the
rest of the step.

Triton comes with torch's CUDA builds. On CPU the kernel runs only in
Triton's interpreter (``TRITON_INTERPRET=1``, set before this module is
imported), which is how the tests hold it to torch's attention there.
"""

from __future__ import annotations

import functools
import itertools

import torch
import triton
import triton.language as tl

from helpers.engine.kv_cache import PAGE_SIZE

BLOCK_POSITIONS = 64
"""Positions a program reads per iteration: four pages."""
NO_WINDOW = 2**30
"""The window of a model without one: past any context."""
MIN_SPLIT_POSITIONS = 512
"""Fewest positions one program reads when a row is split between several."""


# Arguments that vary from step to step or shape to shape are not specialised
# on, so the compilations at load (``problem_on``) serve every step.
@triton.jit(do_not_specialize=["window", "table_stride_row", "split_size", "splits"])
def _decode_kernel(
    queries,  # [batch, heads, head_dim]
    key_pages,  # [pages, PAGE, kv_heads, head_dim]
    value_pages,
    table,  # [batch, columns]: each row's pages in order
    ends,  # [batch]: where each row stops reading (PagedCache.select)
    out,  # [batch, heads, head_dim], written where SPLIT is off
    part_acc,  # [batch, heads, splits, head_dim] fp32, where SPLIT is on
    part_best,  # [batch, heads, splits] fp32: each split's highest score
    part_total,  # [batch, heads, splits] fp32: its sum of exponentials
    scale,
    window,  # positions a token attends to, itself included
    split_size,  # positions each split of a row reads, a multiple of BLOCK
    splits,
    heads_total,
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
    SPLIT: tl.constexpr,
    PRECISION: tl.constexpr,  # of products of fp32 inputs: "ieee", not the default tf32
):
    row = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    end = tl.load(ends + row).to(tl.int32)
    low = tl.maximum(tl.maximum(end - window, 0), split * split_size)
    high = tl.minimum(end, (split + 1) * split_size)
    heads = kv_head * GROUP + tl.arange(0, GROUP_PAD)
    head_ok = tl.arange(0, GROUP_PAD) < GROUP
    dims = tl.arange(0, DIM_PAD)
    dim_ok = dims < HEAD_DIM
    rows_ok = head_ok[:, None] & dim_ok[None, :]
    q = tl.load(
        queries + row * query_stride_row + heads[:, None] * query_stride_head + dims[None, :],
        mask=rows_ok,
        other=0.0,
    )
    best = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    total = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([GROUP_PAD, DIM_PAD], tl.float32)
    for block in range(low // BLOCK * BLOCK, high, BLOCK):
        columns = block + tl.arange(0, BLOCK)
        valid = (columns >= low) & (columns < high)
        page = tl.load(table + row * table_stride_row + columns // PAGE, mask=valid, other=0)
        place = (
            page[:, None] * page_stride
            + (columns % PAGE)[:, None] * page_stride_position
            + kv_head * page_stride_head
            + dims[None, :]
        )
        both = valid[:, None] & dim_ok[None, :]
        k = tl.load(key_pages + place, mask=both, other=0.0)
        v = tl.load(value_pages + place, mask=both, other=0.0)
        scores = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale
        scores = tl.where(valid[None, :], scores, float("-inf"))
        new_best = tl.maximum(best, tl.max(scores, 1))
        kept = tl.exp(best - new_best)
        weights = tl.exp(scores - new_best[:, None])
        total = total * kept + tl.sum(weights, 1)
        acc = acc * kept[:, None] + tl.dot(weights.to(v.dtype), v, input_precision=PRECISION)
        best = new_best
    if SPLIT:  # combined by decode_attention; an empty split leaves -inf, 0, 0
        part = (row * heads_total + heads) * splits + split
        tl.store(part_best + part, best, mask=head_ok)
        tl.store(part_total + part, total, mask=head_ok)
        tl.store(part_acc + part[:, None] * HEAD_DIM + dims[None, :], acc, mask=rows_ok)
    else:
        tl.store(
            out + row * out_stride_row + heads[:, None] * out_stride_head + dims[None, :],
            (acc / total[:, None]).to(out.dtype.element_ty),
            mask=rows_ok,
        )


def decode_attention(
    queries: torch.Tensor,
    key_pages: torch.Tensor,
    value_pages: torch.Tensor,
    table: torch.Tensor,
    ends: torch.Tensor,
    scale: float,
    window: int | None,
    splits: int | None = None,
) -> torch.Tensor:
    """Attention of one new token per row, ``queries`` ``[batch, heads, 1,
    head_dim]``, over its row's pages: what ``scaled_dot_product_attention``
    gives over the gathered pages under the cache's mask, ``[batch, heads,
    1, head_dim]``. ``table`` lists each row's pages, as many columns as the
    step reads; row ``i`` reads positions up to ``ends[i]`` (its new token's
    position plus one), the last ``window`` of them where there is one.

    Each row is read by ``splits`` programs, a stretch of positions each
    (by default as many as :func:`_splits` picks), whose partial sums are
    then combined, as flash-decoding does: a few long rows otherwise leave
    most of a GPU idle."""
    batch, heads, _, head_dim = queries.shape
    page, kv_heads = key_pages.shape[1], key_pages.shape[2]
    query_rows = queries[:, :, 0]
    for tensor in (query_rows, key_pages, value_pages, table):
        assert tensor.stride(-1) == 1, "the kernel reads each last dimension as contiguous"
    width = table.shape[1] * page
    splits = splits or _splits(batch * kv_heads, width, queries.device)
    blocks = -(-width // BLOCK_POSITIONS)
    split_size = -(-blocks // splits) * BLOCK_POSITIONS  # whole blocks each
    device = queries.device
    if splits > 1:
        shape = (batch, heads, splits)
        parts = (
            torch.empty((*shape, head_dim), dtype=torch.float32, device=device),
            torch.empty(shape, dtype=torch.float32, device=device),
            torch.empty(shape, dtype=torch.float32, device=device),
        )
        out = parts[1]  # not written: the parts are combined below
    else:
        out = torch.empty((batch, heads, head_dim), dtype=queries.dtype, device=device)
        parts = (out, out, out)  # not written
    group = heads // kv_heads
    _decode_kernel[(batch, kv_heads, splits)](
        query_rows,
        key_pages,
        value_pages,
        table,
        ends,
        out,
        *parts,
        scale,
        window or NO_WINDOW,
        split_size,
        splits,
        heads,
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
        SPLIT=splits > 1,
        PRECISION="ieee" if queries.dtype == torch.float32 else "tf32",
    )
    if splits > 1:
        acc, best, total = parts
        weights = torch.exp(best - best.amax(-1, keepdim=True))  # an empty split's is 0
        combined = (acc * weights[..., None]).sum(-2) / (total * weights).sum(-1)[..., None]
        out = combined.to(queries.dtype)
    return out[:, :, None]


def _splits(programs: int, width: int, device: torch.device) -> int:
    """How many programs read each row: enough for two a multiprocessor,
    none reading fewer than ``MIN_SPLIT_POSITIONS``. One wherever the rows
    alone fill the GPU, as a large batch does."""
    if device.type != "cuda":
        return 1
    wanted = -(-2 * _multiprocessors(device) // programs)
    return max(1, min(wanted, width // MIN_SPLIT_POSITIONS))


@functools.cache
def _multiprocessors(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


@functools.cache
def problem_on(
    device: torch.device, dtype: torch.dtype, heads: int, kv_heads: int, head_dim: int
) -> str | None:
    """Why the kernel cannot serve a model with these heads on ``device``,
    or None where it compiles and agrees with torch's attention, tried once
    per process on a small cache: rows across several blocks, one ending at
    a block's edge, one under a window, one idle, each row read whole and in
    splits (one of them empty). A GPU or a Triton this was
    never run on then falls back to gathering pages, saying why, rather than
    decoding wrong or not at all. Compiled here, at load, the kernel is
    ready before the first decode step needs it."""
    generator = torch.Generator().manual_seed(0)
    page, pages = PAGE_SIZE, 20

    def random(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator).to(device=device, dtype=dtype)

    keys, values = (random(pages + 1, page, kv_heads, head_dim) for _ in range(2))
    queries = random(4, heads, 1, head_dim)
    order = (torch.randperm(pages, generator=generator) + 1).tolist()
    table = torch.zeros(4, 16, dtype=torch.long)
    table[0, :13], table[1, :4], table[2, :2] = (
        torch.tensor(o) for o in (order[:13], order[13:17], order[17:19])
    )
    table = table.to(device)
    ends = torch.tensor([201, 64, 21, 1], dtype=torch.int32, device=device)  # the last idle
    scale = head_dim**-0.5
    try:
        for window, splits in itertools.product((None, 37), (1, 3)):
            got = decode_attention(queries, keys, values, table, ends, scale, window, splits)
            if not torch.isfinite(got[3]).all():
                return "an idle row's output is not finite"
            for row, end in enumerate(ends[:3].tolist()):
                start = 0 if window is None else max(end - window, 0)
                row_keys, row_values = (
                    pool[table[row]].flatten(0, 1)[start:end].transpose(0, 1)[None]
                    for pool in (keys, values)
                )
                expected = torch.nn.functional.scaled_dot_product_attention(
                    queries[row : row + 1], row_keys, row_values, scale=scale, enable_gqa=True
                )
                error = float((got[row] - expected[0]).abs().max())
                if not error <= 2e-2:
                    return (
                        f"row {row}, window {window}, {splits} splits: "
                        f"{error:.3g} from torch's attention"
                    )
    except Exception as err:  # a compiler or driver this kernel does not suit
        return f"{type(err).__name__}: {err}"
    return None
