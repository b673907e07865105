"""What the CPU kernels' linear layers share: ``nn.Linear``'s interface on top of a C call.

Why a base class: :class:`~helpers.engine.gguf_linear.GgufLinear` and
:class:`~helpers.engine.int8_linear.Int8Linear` store their blocks
differently and call different kernels, but take and give the same tensors,
refuse the same inputs and add a bias the same way; keeping that here keeps
the two from drifting apart.
"""

from __future__ import annotations

import ctypes

import torch
from torch import nn


class KernelLinear(nn.Module):
    """``nn.Linear``'s product for fp32 CPU rows, computed by :meth:`multiply`.
    Inference only: the kernels know no autograd."""

    in_features: int
    out_features: int
    bias: torch.Tensor | None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype != torch.float32 or x.device.type != "cpu" or x.shape[-1] != self.in_features:
            raise ValueError(
                f"{type(self).__name__} takes fp32 CPU rows of {self.in_features}, "
                f"not {x.dtype} {x.device.type} rows of {x.shape[-1]}"
            )
        rows = x.reshape(-1, self.in_features).contiguous()
        out = torch.empty(rows.shape[0], self.out_features, dtype=torch.float32)
        if self.multiply(rows, out, torch.get_num_threads()) != 0:
            raise MemoryError(f"{type(self).__name__}'s kernel could not allocate its scratch")
        if self.bias is not None:
            out += self.bias
        return out.view(*x.shape[:-1], self.out_features)

    def multiply(self, rows: torch.Tensor, out: torch.Tensor, threads: int) -> int:
        """Write ``rows`` times the weight into ``out`` with ``threads``
        threads; the kernel's status (0, or -1 when out of memory)."""
        raise NotImplementedError


def loaded(library: ctypes.CDLL | None, layer: KernelLinear) -> ctypes.CDLL:
    """``library``, or a clear error where the layer's kernel did not load."""
    if library is None:
        raise RuntimeError(f"{type(layer).__name__} runs only where its kernel loads")
    return library
