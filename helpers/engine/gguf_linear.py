"""Linear layers that keep the embedded model's GGUF blocks, for CPU decoding.

Why: on CPU a decode step is bound by streaming the linear layers' weights
from memory, and the GGUF file the embedded model ships as holds the same
weights in 4-bit blocks (Q4_1: 32 weights in 20 bytes, where fp32 takes 6.4
times as many; the output layer in 8-bit Q8_0). De-quantising them to fp32
would give that up. This module keeps them as they are and
multiplies with the kernels in ``gguf_matmul.c``, which compute in fp32: the
products are the fp32 weights' products up to rounding (the kernels sum each
block's quants times x first and scale the sum once), and the greedy text
stays the same (``tests/model/test_gguf_linear.py``).

``python -m bench.engine_direct --fp32`` measures the whole engine both ways
(figures in ``bench/RESULTS.md``).

The conversion (``helpers.engine.gguf_checkpoint``) writes the blocks beside the
safetensors copy, rearranged for the kernels, in the fp32 weights' row order.
The kernels need Linux on an x86-64 CPU with AVX2, FMA and F16C, and a C
compiler; they are compiled once per machine into the user's cache.
Anywhere else the model loads its fp32 weights as before.
"""

from __future__ import annotations

import ctypes
import functools
from collections.abc import Mapping
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import nn

from helpers.engine import native_kernels
from helpers.engine.kernel_linear import KernelLinear, loaded

BLOCKS_FILE = Path("gguf_blocks") / "blocks.safetensors"
BLOCK = 32
GROUP = 8  # output columns the kernels hold in one AVX2 register
_SOURCE = Path(__file__).with_name("gguf_matmul.c")
_CPU_FLAGS = ("avx2", "fma", "f16c")
AVX2_BUILD = ("-O3", "-mavx2", "-mfma", "-mf16c", "-fPIC", "-shared")
AVX512_BUILD = (*AVX2_BUILD, "-mavx512f", "-mavx512vl")
"""Where the CPU has AVX512VL, the Q4_1 kernel takes one instruction fewer per
position (``gguf_matmul.c``, ``quants``), for the same products to the bit."""

Kind = Literal["Q4_1", "Q8_0"]

# GGUF's tensor names inside block ``i``, and the module each is in our Llama.
LAYER_MODULES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}


class GgufLinear(KernelLinear):
    """``nn.Linear``'s product from one weight's GGUF blocks.

    ``blocks`` holds the quants: Q4_1 as ``uint8`` (two a byte), Q8_0 as
    ``int8``. ``scales``, and for Q4_1 ``offsets``, are fp16, 8 per column
    group and block. Built on the meta device, its buffers arrive with the
    checkpoint's other tensors through ``load_state_dict``. With ``bias``
    (Qwen2's queries, keys and values have one) an fp32 ``bias`` buffer is
    added to the product; without, ``bias`` is None, as in ``nn.Linear``.
    """

    def __init__(self, in_features: int, out_features: int, kind: Kind, bias: bool = False) -> None:
        super().__init__()
        if in_features % BLOCK or out_features % GROUP:
            raise ValueError(
                f"GGUF kernels need inputs in blocks of {BLOCK} and outputs in groups of "
                f"{GROUP}, not {in_features} x {out_features}"
            )
        self.in_features, self.out_features, self.kind = in_features, out_features, kind
        groups, blocks = out_features // GROUP, in_features // BLOCK
        quants_per_byte = 2 if kind == "Q4_1" else 1
        dtype = torch.uint8 if kind == "Q4_1" else torch.int8
        # torch.empty, not empty_like: on the meta device the latter imports
        # sympy, which every cold start would then pay for.
        shape = (groups, in_features * GROUP // quants_per_byte)
        self.register_buffer("blocks", torch.empty(shape, dtype=dtype))
        for name in ("scales", "offsets") if kind == "Q4_1" else ("scales",):
            self.register_buffer(name, torch.empty(groups, blocks, GROUP, dtype=torch.float16))
        self.register_buffer("bias", torch.empty(out_features) if bias else None)

    def multiply(self, rows: torch.Tensor, out: torch.Tensor, threads: int) -> int:
        library = loaded(kernels(), self)
        shape = (rows.data_ptr(), rows.shape[0], self.in_features)
        if self.kind == "Q4_1":
            blocks, scales, offsets = self.pointers("blocks", "scales", "offsets")
            return library.q4_1_matmul(
                *shape, blocks, scales, offsets, self.out_features, out.data_ptr(), threads
            )
        blocks, scales = self.pointers("blocks", "scales")
        return library.q8_0_matmul(
            *shape, blocks, scales, self.out_features, out.data_ptr(), threads
        )

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, {self.kind}"


def pack(
    kind: Kind, quants: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor | None = None
) -> dict[str, torch.Tensor]:
    """A ``GgufLinear``'s buffers from a weight's quants ``[out, in]`` (0..15
    for Q4_1, -128..127 for Q8_0) and its fp16 ``scales`` and ``offsets``
    ``[out, in / 32]``: each group of 8 output columns side by side."""
    out, width = quants.shape
    grouped = quants.view(out // GROUP, GROUP, width).transpose(1, 2)  # [groups, in, 8]
    if kind == "Q4_1":
        nibbles = grouped.to(torch.int64) << (4 * torch.arange(GROUP))
        words = nibbles.sum(-1).to(torch.int32).numpy()  # bits past 31 wrap to the sign
        blocks = torch.from_numpy(words.astype("<i4").view(np.uint8).copy())
    else:
        blocks = grouped.to(torch.int8).reshape(out // GROUP, width * GROUP).contiguous()

    def per_group(values: torch.Tensor) -> torch.Tensor:
        return values.view(out // GROUP, GROUP, -1).transpose(1, 2).contiguous()

    packed = {"blocks": blocks, "scales": per_group(scales)}
    if offsets is not None:
        packed["offsets"] = per_group(offsets)
    return packed


def dequantize(
    kind: Kind, quants: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor | None = None
) -> torch.Tensor:
    """The fp32 weight ``[out, in]``, computed as gguf and transformers do."""
    out, width = quants.shape
    values = quants.view(out, width // BLOCK, BLOCK).float() * scales.float()[..., None]
    if offsets is not None:
        values = values + offsets.float()[..., None]
    return values.view(out, width)


def split_blocks(
    kind: Kind, raw: np.ndarray, shape: torch.Size
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """GGUF's blocks ``[out, bytes]`` as quants, scales and offsets.

    A Q4_1 block is an fp16 scale, an fp16 offset and 16 bytes whose low
    nibbles are its first 16 quants and high nibbles the last 16. A Q8_0
    block is an fp16 scale and 32 signed bytes."""
    out, width = shape
    header = 4 if kind == "Q4_1" else 2
    blocks = raw.reshape(out, width // BLOCK, -1)
    scales = torch.from_numpy(blocks[..., :2].copy().view(np.float16)[..., 0])
    body = blocks[..., header:]
    if kind == "Q4_1":
        offsets = torch.from_numpy(blocks[..., 2:4].copy().view(np.float16)[..., 0])
        quants = np.concatenate([body & 0xF, body >> 4], axis=-1)
        return torch.from_numpy(quants.reshape(out, width).astype(np.int16)), scales, offsets
    quants = body.copy().view(np.int8).reshape(out, width)
    return torch.from_numpy(quants.astype(np.int16)), scales, None


def use_blocks(model: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """Swap each ``nn.Linear`` with blocks in ``state`` (``<module>.blocks``)
    for a ``GgufLinear`` of the same shape: on the model's meta device, before
    ``state`` loads into it."""
    for name in state:
        if not name.endswith(".blocks"):
            continue
        module_name = name.removesuffix(".blocks")
        owner_name, _, child = module_name.rpartition(".")
        owner = model.get_submodule(owner_name)
        linear = getattr(owner, child)
        assert isinstance(linear, nn.Linear) and linear.bias is None, module_name
        kind = "Q4_1" if f"{module_name}.offsets" in state else "Q8_0"
        setattr(owner, child, GgufLinear(linear.in_features, linear.out_features, kind))


@functools.cache
def kernels() -> ctypes.CDLL | None:
    """``gguf_matmul.c`` compiled for this machine
    (:func:`~helpers.engine.native_kernels.compiled`), or None where it cannot
    run (not x86-64 with AVX2/FMA/F16C, no working C compiler): callers keep
    fp32 weights."""
    faster = build(AVX512_BUILD) if cpu_can_run(("avx512f", "avx512vl")) else None
    return faster or build(AVX2_BUILD)  # a compiler without AVX512 still gives the AVX2 build


@functools.cache
def build(flags: tuple[str, ...]) -> ctypes.CDLL | None:
    """``gguf_matmul.c`` compiled with ``flags``, its entry points typed.
    :func:`kernels` checks that the CPU runs what the flags ask for."""
    loaded = native_kernels.compiled(_SOURCE, flags, _CPU_FLAGS)
    if loaded is None:
        return None
    pointer, count = ctypes.c_void_p, ctypes.c_int
    inputs = [pointer, count, count, pointer, pointer]
    loaded.q4_1_matmul.argtypes = [*inputs, pointer, count, pointer, count]
    loaded.q8_0_matmul.argtypes = [*inputs, count, pointer, count]
    loaded.q4_1_matmul.restype = loaded.q8_0_matmul.restype = count
    return loaded


def cpu_can_run(flags: tuple[str, ...] = _CPU_FLAGS) -> bool:
    """Whether this CPU has what the kernels use (``flags``: their least)."""
    return native_kernels.cpu_has(flags)
