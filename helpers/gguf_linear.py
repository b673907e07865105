"""Linear layers that keep the embedded model's GGUF blocks, for CPU decoding.

Why: on CPU a decode step is bound by streaming the linear layers' weights
from memory (about 540 MB a step in fp32 for SmolLM2-135M), and the GGUF file
the embedded model ships as holds the same weights in 4-bit blocks (Q4_1;
the output layer in 8-bit Q8_0), a sixth of the bytes. transformers
de-quantises them to fp32 on load. This module keeps them as they are and
multiplies with the kernels in ``gguf_matmul.c``, which compute in fp32: the
products are the fp32 weights' products up to the order of the additions,
and the greedy text stays the same (``tests/model/test_gguf_linear.py``).

On this project's 2-core machine, one thread, 8 rows a step, a 1536 x 576
layer read from memory took 245 us against 480 us for oneDNN's fp32 product;
``python -m bench.engine_direct --fp32`` measures the whole engine both ways.

The conversion (``helpers.embedded_model``) writes the blocks beside the
safetensors copy, rearranged for the kernels and checked to reproduce the
converted fp32 weights exactly. The kernels need an x86-64 CPU with AVX2, FMA
and F16C and a C compiler; they are compiled once per machine (about a
second). Anywhere else the model loads its fp32 weights as before.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
from torch import nn

logger = logging.getLogger(__name__)

BLOCKS_FILE = Path("gguf_blocks") / "blocks.safetensors"
BLOCK = 32
GROUP = 8  # output columns the kernels hold in one AVX2 register
_SOURCE = Path(__file__).with_name("gguf_matmul.c")
_CPU_FLAGS = ("avx2", "fma", "f16c")
_COMPILE = ("-O3", "-mavx2", "-mfma", "-mf16c", "-fPIC", "-shared")

# GGUF's tensor names inside block ``i``, and the module each is in our Llama.
_LAYER_MODULES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}


class GgufLinear(nn.Module):
    """``nn.Linear``'s product (no bias) from one weight's GGUF blocks.

    ``blocks`` holds the quants: Q4_1 as ``uint8`` (two a byte), Q8_0 as
    ``int8``. ``scales``, and for Q4_1 ``offsets``, are fp16, 8 per column
    group and block. Built on the meta device, its buffers arrive with the
    checkpoint's other tensors through ``load_state_dict``.
    """

    def __init__(self, in_features: int, out_features: int, kind: str) -> None:
        super().__init__()
        self.in_features, self.out_features, self.kind = in_features, out_features, kind
        groups, blocks = out_features // GROUP, in_features // BLOCK
        quant_bytes = {"Q4_1": in_features * GROUP // 2, "Q8_0": in_features * GROUP}[kind]
        dtype = torch.uint8 if kind == "Q4_1" else torch.int8
        # torch.empty, not empty_like: on the meta device the latter imports
        # sympy, half a second of a cold start.
        self.register_buffer("blocks", torch.empty(groups, quant_bytes, dtype=dtype))
        for name in ("scales", "offsets") if kind == "Q4_1" else ("scales",):
            self.register_buffer(name, torch.empty(groups, blocks, GROUP, dtype=torch.float16))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features).contiguous()
        out = torch.empty(rows.shape[0], self.out_features, dtype=torch.float32)
        library = kernels()
        assert library is not None, "GgufLinear exists only where the kernels load"
        shape = (rows.data_ptr(), rows.shape[0], self.in_features, self.blocks.data_ptr())
        if self.kind == "Q4_1":
            status = library.q4_1_matmul(
                *shape,
                self.scales.data_ptr(),
                self.offsets.data_ptr(),
                self.out_features,
                out.data_ptr(),
            )
        else:
            status = library.q8_0_matmul(
                *shape, self.scales.data_ptr(), self.out_features, out.data_ptr()
            )
        if status != 0:
            raise MemoryError("the GGUF kernel could not allocate its row sums")
        return out.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, {self.kind}"


def pack(
    kind: str, quants: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor | None = None
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
    kind: str, quants: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor | None = None
) -> torch.Tensor:
    """The fp32 weight ``[out, in]``, computed as gguf and transformers do."""
    out, width = quants.shape
    values = quants.view(out, width // BLOCK, BLOCK).float() * scales.float()[..., None]
    if offsets is not None:
        values = values + offsets.float()[..., None]
    return values.view(out, width)


def read_gguf(path: Path, converted: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Every linear layer's packed blocks from the GGUF at ``path``, keyed by
    buffer name (``model.layers.0.mlp.up_proj.blocks``...).

    ``converted`` is the fp32 checkpoint transformers made of the same file.
    Each weight's rows are matched to it by value, which also undoes the row
    order transformers changes for the attention's queries and keys. A weight
    whose blocks do not reproduce its converted copy exactly raises.
    """
    from gguf import GGUFReader

    found: dict[str, torch.Tensor] = {}
    for tensor in GGUFReader(str(path)).tensors:
        module = _module_name(tensor.name)
        if module is None or tensor.tensor_type.name not in ("Q4_1", "Q8_0"):
            continue
        kind = tensor.tensor_type.name
        weight = converted[f"{module}.weight"]
        parts = _split_blocks(kind, np.asarray(tensor.data), weight.shape)
        parts = _match_rows(parts, kind, weight, tensor.name)
        found |= {f"{module}.{name}": value for name, value in pack(kind, *parts).items()}
    return found


def _module_name(gguf_name: str) -> str | None:
    if gguf_name == "token_embd.weight":
        return "lm_head"  # tied: the embedding table is the output layer
    pieces = gguf_name.split(".")
    if len(pieces) == 4 and pieces[0] == "blk" and pieces[2] in _LAYER_MODULES:
        return f"model.layers.{pieces[1]}.{_LAYER_MODULES[pieces[2]]}"
    return None


def _split_blocks(
    kind: str, raw: np.ndarray, shape: torch.Size
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


def _match_rows(
    parts: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None],
    kind: str,
    weight: torch.Tensor,
    name: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    values = dequantize(kind, *parts)
    row_of = {row.numpy().tobytes(): i for i, row in enumerate(values)}
    order = [row_of.get(row.numpy().tobytes(), -1) for row in weight.float()]
    if -1 in order:
        raise ValueError(f"{name}: its GGUF blocks do not reproduce the converted weight")
    index = torch.tensor(order)
    return tuple(part[index] if part is not None else None for part in parts)  # type: ignore[return-value]


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
    """``gguf_matmul.c`` compiled for this machine, or None where it cannot run
    (not x86-64, no AVX2/FMA/F16C, no C compiler): callers keep fp32 weights.

    The library is built once into a per-user cache under the temporary
    directory, named by a digest of the source, so an edited kernel rebuilds
    and concurrent replicas never load a half-written file."""
    if not _cpu_can_run():
        return None
    digest = hashlib.sha256(_SOURCE.read_bytes() + " ".join(_COMPILE).encode()).hexdigest()[:16]
    library = Path(tempfile.gettempdir()) / f"llm-kernels-{os.getuid()}" / f"gguf_{digest}.so"
    if not library.is_file() and not _compile(library):
        return None
    loaded = ctypes.CDLL(str(library))
    pointer, count = ctypes.c_void_p, ctypes.c_int
    loaded.q4_1_matmul.argtypes = [pointer, count, count, pointer, pointer, pointer, count, pointer]
    loaded.q8_0_matmul.argtypes = [pointer, count, count, pointer, pointer, count, pointer]
    loaded.q4_1_matmul.restype = loaded.q8_0_matmul.restype = count
    return loaded


def _cpu_can_run() -> bool:
    if platform.machine() not in ("x86_64", "AMD64"):
        return False
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    flags = next((line for line in cpuinfo.splitlines() if line.startswith("flags")), "")
    return all(flag in flags.split() for flag in _CPU_FLAGS)


def _compile(library: Path) -> bool:
    compiler = shutil.which(os.environ.get("CC", "cc"))
    if compiler is None:
        logger.warning("no C compiler (cc): linear layers keep fp32 weights on CPU")
        return False
    library.parent.mkdir(parents=True, exist_ok=True)
    partial = library.with_suffix(f".{os.getpid()}.tmp")
    command = [compiler, *_COMPILE, str(_SOURCE), "-o", str(partial)]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        logger.warning("compiling %s failed, fp32 weights stay:\n%s", _SOURCE, result.stderr)
        partial.unlink(missing_ok=True)
        return False
    os.replace(partial, library)
    return True
