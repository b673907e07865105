"""A layer's element-wise steps in three Triton kernels, for a GPU's decode step.

Why: a decode step of a small model on a GPU is bound by how many kernels
it launches, not by the bytes or the arithmetic. Replayed as a CUDA graph,
each kernel still costs a few microseconds however little it does, and in
torch a layer's RMSNorm is six of them (square, mean, add, root, scale,
weight), its rotary embedding eight, its residual add and SiLU one each.
These kernels do each of those steps in one: the residual add with the
RMSNorm after it, the rotation of a pass's queries and keys together (with
Qwen3's norm of each head before it), and SiLU with the product after it.
The matrix products and attention are left as they are; on a GPU the
projections that read the same input are merged
(:func:`helpers.engine.llama_loading.merge_projections`), so the queries, keys and
values, and the gate and up halves, arrive here as views of one output.

Each kernel rounds where torch's own operations do (after every product in
half precision), so it gives torch's result up to the order of a sum.
:class:`FusedLayerOps` is :class:`helpers.engine.layer_ops.LayerOps` with these
kernels in place of torch's operations; :func:`problem_on` checks them once
per process and model shape before a model uses them.

On CPU the kernels run only in Triton's interpreter (``TRITON_INTERPRET=1``,
set before this module is imported), which is how the tests hold them to
torch there.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from helpers.engine.layer_ops import LayerOps, RMSNorm
from helpers.engine.llama_config import LlamaConfig

ELEMENTS_PER_PROGRAM = 1024
"""Elements of a row one program of the SiLU kernel computes."""


@triton.jit
def _add_norm_kernel(
    x,  # [rows, columns]: the residual stream
    delta,  # [rows, columns]: a layer's output to add to it, where HAS_DELTA
    total,  # [rows, columns]: x + delta, where HAS_DELTA
    normed,  # [rows, columns], in the weight's dtype
    weight,
    eps,
    columns,
    x_stride,
    delta_stride,
    total_stride,
    normed_stride,
    HAS_DELTA: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)  # offsets past 2**31 in a long pass
    places = tl.arange(0, BLOCK)
    inside = places < columns
    value = tl.load(x + row * x_stride + places, mask=inside, other=0.0).to(tl.float32)
    if HAS_DELTA:
        added = tl.load(delta + row * delta_stride + places, mask=inside, other=0.0)
        # Rounded to the stream's dtype, as torch's add is, before normalising.
        value = (value + added.to(tl.float32)).to(total.dtype.element_ty)
        tl.store(total + row * total_stride + places, value, mask=inside)
        value = value.to(tl.float32)
    scale = tl.rsqrt(tl.sum(value * value, 0) / columns + eps)
    kind = normed.dtype.element_ty
    scaled = (value * scale).to(kind).to(tl.float32)
    factor = tl.load(weight + places, mask=inside, other=0.0).to(tl.float32)
    tl.store(normed + row * normed_stride + places, (scaled * factor).to(kind), mask=inside)


# A pass's token count and element count vary from pass to pass: not
# specialised on, so the compilations at load (``problem_on``) serve them all.
@triton.jit(do_not_specialize=["new"])
def _rotate_kernel(
    queries,  # [batch, heads, new, head_dim], any strides but the last
    keys,  # [batch, kv_heads, new, head_dim]
    cos,  # [batch, 1, new, head_dim]
    signed_sin,  # the same, the first half negated (Llama._rope)
    query_norm,  # [head_dim]: each query head's RMSNorm weight, where NORM
    key_norm,
    eps,
    rotated_queries,  # [batch, new, heads, head_dim], contiguous
    rotated_keys,  # [batch, new, kv_heads, head_dim], contiguous
    new,
    heads,
    kv_heads,
    query_strides_bhn0,
    query_strides_bhn1,
    query_strides_bhn2,
    key_strides_bhn0,
    key_strides_bhn1,
    key_strides_bhn2,
    angle_strides_bn0,
    angle_strides_bn1,
    HEAD_DIM: tl.constexpr,
    DIM_PAD: tl.constexpr,
    NORM: tl.constexpr,  # Qwen3's RMSNorm of each head before the rotation
):
    # On the first axis, which has room for any pass's tokens; 64-bit offsets.
    row = tl.program_id(0).to(tl.int64) // new
    token = tl.program_id(0).to(tl.int64) % new
    head = tl.program_id(1)  # the query heads first, then the key heads
    dims = tl.arange(0, DIM_PAD)
    inside = dims < HEAD_DIM
    partner = (dims + HEAD_DIM // 2) % HEAD_DIM  # rotate_half's swap, as one roll
    angle = row * angle_strides_bn0 + token * angle_strides_bn1
    if head < heads:
        source = (
            queries
            + row * query_strides_bhn0
            + head * query_strides_bhn1
            + token * query_strides_bhn2
        )
        target = rotated_queries + ((row * new + token) * heads + head) * HEAD_DIM
        weight = query_norm
    else:
        source = (
            keys
            + row * key_strides_bhn0
            + (head - heads) * key_strides_bhn1
            + token * key_strides_bhn2
        )
        target = rotated_keys + ((row * new + token) * kv_heads + head - heads) * HEAD_DIM
        weight = key_norm
    value = tl.load(source + dims, mask=inside, other=0.0)
    swapped = tl.load(source + partner, mask=inside, other=0.0)
    kind = value.dtype
    value, swapped = value.to(tl.float32), swapped.to(tl.float32)
    if NORM:  # rounded as RMSNorm's output is, before the rotation
        scale = tl.rsqrt(tl.sum(value * value, 0) / HEAD_DIM + eps)
        value = (value * scale).to(kind).to(tl.float32)
        value = (value * tl.load(weight + dims, mask=inside).to(tl.float32)).to(kind)
        swapped = (swapped * scale).to(kind).to(tl.float32)
        swapped = (swapped * tl.load(weight + partner, mask=inside).to(tl.float32)).to(kind)
        value, swapped = value.to(tl.float32), swapped.to(tl.float32)
    straight = (value * tl.load(cos + angle + dims, mask=inside).to(tl.float32)).to(kind)
    turned = (swapped * tl.load(signed_sin + angle + dims, mask=inside).to(tl.float32)).to(kind)
    tl.store(target + dims, (straight.to(tl.float32) + turned.to(tl.float32)).to(kind), mask=inside)


@triton.jit
def _silu_mul_kernel(gate, up, out, columns, gate_stride, up_stride, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    places = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    inside = places < columns
    g = tl.load(gate + row * gate_stride + places, mask=inside, other=0.0)
    kind = g.dtype
    g = g.to(tl.float32)
    silu = (g / (1.0 + tl.exp(-g))).to(kind).to(tl.float32)
    product = silu * tl.load(up + row * up_stride + places, mask=inside, other=0.0).to(tl.float32)
    tl.store(out + row * columns + places, product.to(kind), mask=inside)


class FusedLayerOps(LayerOps):
    """:class:`~helpers.engine.layer_ops.LayerOps` in one kernel a step."""

    def norm(self, x: torch.Tensor, norm: RMSNorm) -> torch.Tensor:
        return self._add_norm(x, None, norm)[1]

    def add_norm(
        self, x: torch.Tensor, delta: torch.Tensor, norm: RMSNorm
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return self._add_norm(x, delta, norm)

    def _add_norm(
        self, x: torch.Tensor, delta: torch.Tensor | None, norm: RMSNorm
    ) -> tuple[torch.Tensor, torch.Tensor]:
        columns = x.shape[-1]
        rows = x.reshape(-1, columns)
        added = rows if delta is None else delta.reshape(-1, columns)
        total = rows if delta is None else torch.empty_like(rows)
        normed = torch.empty(rows.shape, dtype=norm.weight.dtype, device=x.device)
        for tensor in (rows, added, total, normed):
            assert tensor.stride(-1) == 1, "the kernel reads each row as contiguous"
        block = triton.next_power_of_2(columns)
        _add_norm_kernel[(rows.shape[0],)](
            rows,
            added,
            total,
            normed,
            norm.weight,
            norm.eps,
            columns,
            rows.stride(0),
            added.stride(0),
            total.stride(0),
            normed.stride(0),
            HAS_DELTA=delta is not None,
            BLOCK=block,
            num_warps=min(max(block // 512, 1), 16),  # 16 numbers a thread, or fewer
        )
        return total.view(x.shape), normed.view(x.shape)

    def rotate(
        self,
        queries: torch.Tensor,
        keys: torch.Tensor,
        cos: torch.Tensor,
        signed_sin: torch.Tensor,
        norms: tuple[RMSNorm, RMSNorm] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        batch, heads, new, head_dim = queries.shape
        kv_heads = keys.shape[1]
        for tensor in (queries, keys, cos, signed_sin):
            assert tensor.stride(-1) == 1, "the kernel reads each head as contiguous"
        assert cos.stride() == signed_sin.stride(), "one set of strides for both"
        # Laid out as torch's own elementwise result on these views would be:
        # [batch, new, heads, head_dim] in memory, seen as [batch, heads, new, head_dim].
        rotated_queries = queries.new_empty(batch, new, heads, head_dim)
        rotated_keys = keys.new_empty(batch, new, kv_heads, head_dim)
        weights = (queries, keys) if norms is None else (norms[0].weight, norms[1].weight)
        _rotate_kernel[(batch * new, heads + kv_heads)](
            queries,
            keys,
            cos,
            signed_sin,
            *weights,
            1e-6 if norms is None else norms[0].eps,
            rotated_queries,
            rotated_keys,
            new,
            heads,
            kv_heads,
            *queries.stride()[:3],
            *keys.stride()[:3],
            cos.stride(0),
            cos.stride(2),
            HEAD_DIM=head_dim,
            DIM_PAD=triton.next_power_of_2(head_dim),
            NORM=norms is not None,
            num_warps=1,  # a head is 64 or 128 numbers: one warp's work
        )
        return rotated_queries.transpose(1, 2), rotated_keys.transpose(1, 2)

    def silu_mul(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        """``gate`` and ``up`` may be the two halves of one merged projection
        (:func:`~helpers.engine.llama_loading.merge_projections`): rows apart, each
        row contiguous."""
        assert gate.stride(-1) == 1 and up.stride(-1) == 1, "each row read as contiguous"
        rows, columns = gate.shape
        out = gate.new_empty(rows, columns)
        grid = (rows, triton.cdiv(columns, ELEMENTS_PER_PROGRAM))
        _silu_mul_kernel[grid](
            gate, up, out, columns, gate.stride(0), up.stride(0), BLOCK=ELEMENTS_PER_PROGRAM
        )
        return out


FUSED = FusedLayerOps()


@functools.cache
def problem_on(device: torch.device, dtype: torch.dtype, config: LlamaConfig) -> str | None:
    """Why the kernels cannot serve a model of ``config``'s sizes on
    ``device``, or None where each compiles and agrees with torch's
    operations, tried once per process on a few tokens of that model's
    widths: a decode step's rows and a prefill's, an RMSNorm with a residual
    to add and without, RoPE with each head normalised and without. A GPU or
    a Triton this was never run on then keeps torch's operations, saying
    why, rather than decoding wrong. Compiled here, at load, the kernels are
    ready before the first step needs them."""
    generator = torch.Generator().manual_seed(0)

    def random(*shape: int, kind: torch.dtype = dtype) -> torch.Tensor:
        return torch.randn(*shape, generator=generator).to(device=device, dtype=kind)

    hidden, head_dim = config.hidden_size, config.head_dim
    stream = torch.float32 if dtype == torch.float16 else dtype  # Llama's residual stream
    norm, query_norm, key_norm = (
        RMSNorm(size, config.rms_norm_eps).to(device=device, dtype=dtype)
        for size in (hidden, head_dim, head_dim)
    )
    for each in (norm, query_norm, key_norm):
        each.weight.data = random(*each.weight.shape) + 1
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    widths = (heads * head_dim, kv_heads * head_dim, kv_heads * head_dim)
    checks = []
    for batch, new in ((3, 1), (2, 5)):
        x, delta = random(batch * new, hidden, kind=stream), random(batch * new, hidden)
        # Queries and keys as Attention.forward hands them over: parts of one
        # merged projection, seen per head.
        queries, keys, _ = (
            part.view(batch, new, -1, head_dim).transpose(1, 2)
            for part in random(batch * new, sum(widths)).split(widths, dim=-1)
        )
        angles = random(batch, 1, new, head_dim)
        rope = (angles.cos(), angles.sin())
        gate, up = random(batch * new, 2 * config.intermediate_size).chunk(2, dim=-1)
        checks += [
            ("add_norm", (x, delta, norm)),
            ("norm", (x, norm)),
            ("rotate", (queries, keys, *rope)),
            ("rotate", (queries, keys, *rope, (query_norm, key_norm))),  # Qwen3's
            ("silu_mul", (gate, up)),
        ]
    try:
        with torch.inference_mode():
            for name, arguments in checks:
                got, expected = (getattr(ops, name)(*arguments) for ops in (FUSED, LayerOps()))
                if not isinstance(got, tuple):
                    got, expected = (got,), (expected,)
                for index, (mine, theirs) in enumerate(zip(got, expected, strict=True)):
                    error = float((mine.float() - theirs.float()).abs().max())
                    bound = 2e-2 * max(1.0, float(theirs.float().abs().max()))
                    if mine.shape != theirs.shape or not error <= bound:
                        return f"{name}, output {index}: {error:.3g} from torch's"
    except Exception as err:  # a compiler or driver these kernels do not suit
        return f"{type(err).__name__}: {err}"
    return None
