"""8-bit weights for any checkpoint's linear layers on CPU: GGUF's Q8_0, made at load.

Why: on CPU a decode step is bound by streaming the linear layers' weights
from memory. The embedded model ships 4-bit GGUF blocks for that
(:mod:`helpers.engine.gguf_linear`); every other checkpoint (Llama-3, Mistral,
Qwen2, Qwen3 as safetensors) arrives in fp32, bf16 or fp16 and would decode
from fp32, four bytes a weight. Quantizing each layer to Q8_0 at load (32
weights share one fp16 scale: 34 bytes for 128 bytes of fp32) lets the kernels
read about a quarter of the bytes. Where the CPU has AVX512-VNNI they also
multiply in int8 (:mod:`helpers.engine.int8_linear`), which is what makes a
batch of rows fast; elsewhere the embedded model's kernel
(``q8_0_matmul`` in ``gguf_matmul.c``) computes in fp32.

Why Q8_0 and exactly llama.cpp's rounding: it is the 8-bit format llama.cpp
and GGUF files use, so the blocks are what ``llama-quantize`` would write for
the same weights (``quantize_row_q8_0_ref``: ``d = amax / 127``, quants
``roundf(x * (1 / d))`` rounding halves away from zero, ``d`` stored as fp16),
and its accuracy is GGUF Q8_0's, which is known: the error of a weight is at
most half its block's scale (plus the scale's fp16 rounding).
``tests/model/test_cpu_weights.py`` holds the blocks to ``gguf``'s own
reference quantizer byte for byte; ``python -m bench.cpu_weights_quality``
measures the embedded model's perplexity and greedy text against fp32
(figures in ``bench/RESULTS.md``).

Layers are quantized one at a time, in slices of rows, and each fp32 weight
is let go as soon as its blocks are in place, so the peak memory stays near
the fp32 model's plus one layer's blocks.
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from helpers.engine import gguf_linear, int8_linear
from helpers.engine.gguf_linear import BLOCK, GROUP, GgufLinear
from helpers.engine.int8_linear import Int8Linear

_SLICE_WEIGHTS = 1 << 18
"""About how many weights are quantized at once: the temporaries (1 MiB each)
stay in the CPU's caches and the allocator's free lists, which was fastest."""
_JUST_BELOW_HALF = 0.4999999701976776  # the fp32 float before 0.5: 0.5 - 2**-25


def quantize_linear_layers(model: nn.Module) -> int:
    """Swap every fp32 CPU ``nn.Linear`` in ``model`` whose shape the kernels
    take (inputs a multiple of 32, outputs of 8) for a Q8_0 layer made from
    its weight (and its bias, kept in fp32; :func:`q8_0_linear`); return how
    many were swapped.

    Nothing changes where the kernels do not load on this machine (ARM, no
    AVX2, no C compiler): 0. Layers of other shapes, dtypes or devices stay as
    they are. An output layer tied to the embedding is quantized from its
    weight while the embedding keeps the fp32 table for its lookups.
    Inference only: the new layers know no autograd.
    """
    if gguf_linear.kernels() is None:
        return 0
    # Names, not modules: holding the modules would keep every fp32 weight
    # alive until the end, the whole model twice over at the peak.
    names = [name for name, module in model.named_modules() if _quantizable(module)]
    for name in names:
        owner_name, _, child = name.rpartition(".")
        owner = model.get_submodule(owner_name)
        setattr(owner, child, q8_0_linear(getattr(owner, child)))
    return len(names)


def _quantizable(module: nn.Module) -> bool:
    return (
        type(module) is nn.Linear
        and module.weight.device.type == "cpu"
        and module.weight.dtype == torch.float32
        and module.in_features % BLOCK == 0
        and module.out_features % GROUP == 0
    )


def q8_0_linear(linear: nn.Linear) -> Int8Linear | GgufLinear:
    """A Q8_0 layer with ``linear``'s product, up to Q8_0's rounding: an
    :class:`~helpers.engine.int8_linear.Int8Linear` where the int8 kernel runs
    and the layer's outputs come in groups of 16, else a ``GgufLinear``."""
    out, width = linear.out_features, linear.in_features
    bias = linear.bias is not None
    if int8_linear.fits(width, out):
        layer: Int8Linear | GgufLinear = Int8Linear(width, out, bias=bias)
        pack, unit = int8_linear.pack, int8_linear.LANES
    else:
        layer, unit = GgufLinear(width, out, "Q8_0", bias=bias), GROUP
        pack = functools.partial(gguf_linear.pack, "Q8_0")
    if linear.bias is not None:
        layer.bias.copy_(linear.bias.detach())
    # Slices of whole groups for either layout (16 outputs is two groups of 8).
    rows = max(int8_linear.LANES, _SLICE_WEIGHTS // width // int8_linear.LANES * int8_linear.LANES)
    weight = linear.weight.detach()
    with torch.no_grad():
        for start in range(0, out, rows):
            packed = pack(*quantize_q8_0(weight[start : start + rows]))
            groups = slice(start // unit, start // unit + packed["blocks"].shape[0])
            layer.blocks[groups] = packed["blocks"]
            layer.scales[groups] = packed["scales"]
    return layer


def quantize_q8_0(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """GGUF Q8_0 of an fp32 weight ``[out, in]``: its int8 quants ``[out, in]``
    and fp16 scales ``[out, in / 32]``, as llama.cpp's
    ``quantize_row_q8_0_ref`` and ``gguf.quants`` compute them, bit for bit.

    Per block of 32 inputs, ``d = amax / 127`` in fp32; the quants are
    ``x * (1 / d)`` rounded half away from zero (C's ``roundf``, not torch's
    half to even), computed with the fp32 ``d``; ``d`` is then stored as fp16.
    An all-zero block gets ``d = 0`` and zero quants.

    ``roundf`` is done as adding the float just below 0.5, with the value's
    sign, and truncating (the cast to int8 truncates): for every fp32 value
    of magnitude up to 128, where the quants lie, this equals ``gguf``'s
    ``np_roundf`` (checked over all of them once; the tests hold the quants
    to ``gguf``'s on random weights and on exact halves). Adding 0.5 itself
    would round 0.49999997 up. It takes fewer passes over the weight than
    ``np_roundf``'s formula: quantizing is most of what ``CPU_WEIGHTS=q8_0``
    adds to a replica's start."""
    out, width = weight.shape
    blocks = weight.float().reshape(out, width // BLOCK, BLOCK)
    scales = blocks.abs().amax(dim=-1, keepdim=True).div_(127)
    inverse = torch.where(scales == 0, 0.0, 1 / scales)
    scaled = blocks * inverse
    scaled.add_(scaled.sign(), alpha=_JUST_BELOW_HALF)
    return scaled.to(torch.int8).reshape(out, width), scales.squeeze(-1).half()
