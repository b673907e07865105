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
        # Kept lean: a decode step calls this seven times a layer, and at one
        # row each tensor method here costs about what the product does.
        if x.dtype is not torch.float32 or not x.is_cpu or x.shape[-1] != self.in_features:
            raise ValueError(
                f"{type(self).__name__} takes fp32 CPU rows of {self.in_features}, "
                f"not {x.dtype} {x.device.type} rows of {x.shape[-1]}"
            )
        packed = x.dim() == 2 and x.is_contiguous()  # the kit's decoder passes [tokens, hidden]
        rows = x if packed else x.reshape(-1, self.in_features).contiguous()
        out = torch.empty(rows.shape[0], self.out_features, dtype=torch.float32)
        if self.multiply(rows, out, torch.get_num_threads()) != 0:
            raise MemoryError(f"{type(self).__name__}'s kernel could not allocate its scratch")
        bias = self._buffers["bias"]
        if bias is not None:
            out += bias
        return out if packed else out.view(*x.shape[:-1], self.out_features)

    def pointers(self, *names: str) -> list[int]:
        """The addresses of buffers ``names``, read from ``_buffers`` directly:
        ``nn.Module``'s attribute lookup costs microseconds a call."""
        return [self._buffers[name].data_ptr() for name in names]  # type: ignore[union-attr]

    def multiply(self, rows: torch.Tensor, out: torch.Tensor, threads: int) -> int:
        """Write ``rows`` times the weight into ``out`` with ``threads``
        threads; the kernel's status (0, or -1 when out of memory)."""
        raise NotImplementedError


def loaded(library: ctypes.CDLL | None, layer: KernelLinear) -> ctypes.CDLL:
    """``library``, or a clear error where the layer's kernel did not load."""
    if library is None:
        raise RuntimeError(f"{type(layer).__name__} runs only where its kernel loads")
    return library
