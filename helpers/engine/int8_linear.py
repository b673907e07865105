"""Q8_0 linear layers that multiply in int8, for ``CPU_WEIGHTS=q8_0`` on CPUs with VNNI.

Why: with 8-bit weights a batch of decode rows or a prompt's prefill is bound
by the multiplies, not by reading the weights, and the fp32 kernel
(:mod:`helpers.engine.gguf_linear`) does 8 of them per instruction. Where the
CPU has AVX512-VNNI, ``int8_matmul.c`` quantizes each row per block of 32
inputs as well, as llama.cpp does for its Q8_0 dot product, and multiplies
64 pairs of bytes per instruction. The rows' rounding is the only new error:
``python -m bench.cpu_weights_quality`` measures what it does to perplexity
and greedy text, ``python -m bench.versus_transformers`` the speed (figures in
``bench/RESULTS.md``).

Only layers quantized at load take this path. The embedded model's own GGUF
blocks keep the fp32 kernel, whose products are the fp32 weights' up to
rounding. Elsewhere (no VNNI, no compiler) ``q8_0`` layers use the fp32
kernel too.
"""

from __future__ import annotations

import ctypes
import functools
from pathlib import Path

import torch

from helpers.engine import native_kernels
from helpers.engine.kernel_linear import KernelLinear, loaded

BLOCK = 32
LANES = 16  # outputs in one AVX-512 register of int32 sums
_RUN = 4  # inputs VPDPBUSD sums into each lane
_SOURCE = Path(__file__).with_name("int8_matmul.c")
_CPU_FLAGS = ("avx512f", "avx512bw", "avx512vl", "avx512_vnni", "f16c")
_COMPILE = (
    "-O3",
    "-mavx512f",
    "-mavx512bw",
    "-mavx512vl",
    "-mavx512vnni",
    "-mf16c",
    "-fPIC",
    "-shared",
)


class Int8Linear(KernelLinear):
    """``nn.Linear``'s product from Q8_0 blocks, with each row quantized to
    Q8_0 on the way in.

    ``blocks`` holds the quants offset by 128 as ``uint8``, in the kernel's
    layout (:func:`pack`); ``scales`` the fp16 block scales, 16 outputs side
    by side. An fp32 ``bias``, where there is one, is added to the product.
    """

    kind = "Q8_0"

    def __init__(self, in_features: int, out_features: int, bias: bool = False) -> None:
        super().__init__()
        if in_features % BLOCK or out_features % LANES:
            raise ValueError(
                f"the int8 kernel needs inputs in blocks of {BLOCK} and outputs in groups of "
                f"{LANES}, not {in_features} x {out_features}"
            )
        self.in_features, self.out_features = in_features, out_features
        groups, blocks = out_features // LANES, in_features // BLOCK
        self.register_buffer(
            "blocks", torch.empty(groups, blocks, BLOCK * LANES, dtype=torch.uint8)
        )
        self.register_buffer("scales", torch.empty(groups, blocks, LANES, dtype=torch.float16))
        self.register_buffer("bias", torch.empty(out_features) if bias else None)

    def multiply(self, rows: torch.Tensor, out: torch.Tensor, threads: int) -> int:
        blocks, scales = self.pointers("blocks", "scales")
        return loaded(kernels(), self).q8_0_int8_matmul(
            rows.data_ptr(),
            rows.shape[0],
            self.in_features,
            blocks,
            scales,
            self.out_features,
            out.data_ptr(),
            threads,
        )

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, Q8_0 x int8"


def pack(quants: torch.Tensor, scales: torch.Tensor) -> dict[str, torch.Tensor]:
    """An ``Int8Linear``'s buffers from Q8_0 quants ``[out, in]`` (-127..127)
    and fp16 scales ``[out, in / 32]``: per group of 16 outputs and block, 8
    runs of 4 inputs, each run the 16 outputs' 4 quants side by side, plus
    128 so that VPDPBUSD reads them as unsigned bytes."""
    out, width = quants.shape
    groups, blocks = out // LANES, width // BLOCK
    runs = quants.view(torch.uint8).view(groups, LANES, blocks, BLOCK // _RUN, _RUN)
    return {
        # q + 128 as a byte is q's two's complement with the top bit flipped.
        "blocks": runs.permute(0, 2, 3, 1, 4).reshape(groups, blocks, BLOCK * LANES) ^ 0x80,
        "scales": scales.view(groups, LANES, blocks).transpose(1, 2).contiguous(),
    }


def fits(in_features: int, out_features: int) -> bool:
    """Whether a layer of this shape can run here on the int8 kernel."""
    return in_features % BLOCK == 0 and out_features % LANES == 0 and kernels() is not None


@functools.cache
def kernels() -> ctypes.CDLL | None:
    """``int8_matmul.c`` compiled for this machine, or None where it cannot run
    (no AVX512-VNNI, no working C compiler): ``q8_0`` layers then use the fp32
    kernel."""
    loaded = native_kernels.compiled(_SOURCE, _COMPILE, _CPU_FLAGS)
    if loaded is None:
        return None
    pointer, count = ctypes.c_void_p, ctypes.c_int
    loaded.q8_0_int8_matmul.argtypes = [
        pointer,
        count,
        count,
        pointer,
        pointer,
        count,
        pointer,
        count,
    ]
    loaded.q8_0_int8_matmul.restype = count
    return loaded
