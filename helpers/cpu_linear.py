"""Linear layers with their weights prepacked for oneDNN, for CPU decoding.

Why: torch computes an fp32 ``nn.Linear`` on CPU with MKL's sgemm by default,
which on AMD processors (this project's machine is one) takes a generic code
path. oneDNN, also inside every x86 torch build, runs the same products from
weights reordered once into its own blocked layout. On the 2-core machine, at
8 rows a step: the output layer (49,152 x 576) took 17 ms instead of 35, and
the whole decode loop gave 1.12x the tokens/s with the same text
(``python -m bench.engine_direct --mkl`` measures it again).

The reorder uses two operators of ``torch.ops.mkldnn`` that torch's own
compiler uses to freeze CPU models; where they are missing (a build without
oneDNN, an ARM Mac) the layers are left as they are.
"""

from __future__ import annotations

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


def prepack_linears(model: nn.Module, rows_hint: int) -> int:
    """Swap every fp32 CPU ``nn.Linear`` in ``model`` for a prepacked one;
    returns how many. ``rows_hint`` is the rows a call usually has (the batch
    size): oneDNN picks its layout for it, and any other row count still works."""
    if not can_prepack():
        return 0
    swapped = 0
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if (
                isinstance(child, nn.Linear)
                and child.weight.device.type == "cpu"
                and child.weight.dtype == torch.float32
            ):
                setattr(module, name, PrepackedLinear(child, rows_hint))
                swapped += 1
    return swapped
