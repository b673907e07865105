"""Linear layers with their weights prepacked for oneDNN, for CPU decoding.

Why: torch computes an fp32 ``nn.Linear`` on CPU with MKL's sgemm by default,
which on AMD processors (this project's machine is one) takes a generic code
path. oneDNN, also inside every x86 torch build, runs the same products from
weights reordered once into its own blocked layout, faster with the same text
(``python -m bench.engine_direct --mkl`` measures it; figures in
``bench/RESULTS.md``).

The embedded model's layers run from its GGUF blocks instead where the CPU
allows (``helpers/engine/gguf_linear.py``); this serves every other fp32 layer: other
Llama checkpoints, and CPUs without AVX2 or a C compiler.

The reorder uses two operators of ``torch.ops.mkldnn`` that torch's own
compiler uses to freeze CPU models; where they are missing (a build without
oneDNN, an ARM Mac) the layers are left as they are.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from torch import nn


class PrepackedLinear(nn.Module):
    """``nn.Linear``'s product, from a weight oneDNN reordered ahead of time."""

    def __init__(self, linear: nn.Linear, rows_hint: int) -> None:
        super().__init__()
        self.out_features = linear.out_features
        self.packed = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), rows_hint)
        self.bias = linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1])
        out = torch.ops.mkldnn._linear_pointwise(rows, self.packed, self.bias, "none", [], "")
        return out.reshape(*x.shape[:-1], self.out_features)


def can_prepack() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(
        torch.ops.mkldnn, "_reorder_linear_weight"
    )


def prepack_pieces(model: nn.Module, rows_hint: int) -> list[Callable[[], None]]:
    """One piece of work per module that owns fp32 CPU ``nn.Linear`` layers
    (a layer's attention, its MLP, the output layer), each swapping those
    layers for prepacked ones: the engine runs them between decode steps.

    ``rows_hint`` is the rows a call usually has (the batch size): oneDNN
    picks its layout for it, and any other row count still works. No pieces
    where this torch cannot prepack."""
    if not can_prepack():
        return []
    owners = [
        module
        for module in model.modules()
        if any(_prepackable(child) for child in module.children())
    ]
    return [functools.partial(_prepack_children, owner, rows_hint) for owner in owners]


def _prepackable(module: nn.Module) -> bool:
    return (
        isinstance(module, nn.Linear)
        and module.weight.device.type == "cpu"
        and module.weight.dtype == torch.float32
    )


def _prepack_children(owner: nn.Module, rows_hint: int) -> None:
    for name, child in list(owner.named_children()):
        if _prepackable(child):
            setattr(owner, name, PrepackedLinear(child, rows_hint))
