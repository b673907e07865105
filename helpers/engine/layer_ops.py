"""A layer's steps between its matrix products, behind one small interface.

The norms, the rotary embedding and SiLU are where a GPU's decode step spends
its kernel launches, so a GPU swaps in fused Triton kernels for them
(:mod:`helpers.engine.fused_layer_ops`, a subclass of :class:`LayerOps`). This
module is what the model and those kernels share: each imports it, neither
imports the other.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """In the weight's dtype, whatever ``x``'s: an fp32 residual stream
        (see :mod:`helpers.engine.llama`) comes out ready for fp16 layers."""
        x = x.float()
        x = x * x.pow(2).mean(-1, keepdim=True).add_(self.eps).rsqrt_()
        weight = self.weight
        return weight * (x if x.dtype is weight.dtype else x.to(weight.dtype))


def _rotate(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """RoPE's ``x * cos + rotate_half(x) * sin``, where ``rotate_half(x)`` is
    ``x``'s halves swapped with the first negated. The sign lives in
    ``signed_sin`` (:meth:`helpers.engine.llama.Llama._rope`) so the swap is one ``roll``: the same
    products to the bit, in fewer operations a layer."""
    return x * cos + x.roll(x.shape[-1] // 2, dims=-1) * signed_sin


class LayerOps:
    """A layer's steps between its matrix products, in torch's operations:
    what a model runs on CPU, and on a GPU where the kernels of
    :mod:`helpers.engine.fused_layer_ops` (a subclass) cannot take their
    place (:func:`helpers.engine.kernel_choice.layer_ops`)."""

    def norm(self, x: torch.Tensor, norm: RMSNorm) -> torch.Tensor:
        return norm(x)

    def add_norm(
        self, x: torch.Tensor, delta: torch.Tensor, norm: RMSNorm
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The residual stream ``x`` with a layer's output ``delta`` added, and
        that sum normalised for the layer after: one step, so a GPU can run
        the two as one kernel."""
        x = x + delta
        return x, self.norm(x, norm)

    def rotate(
        self,
        queries: torch.Tensor,
        keys: torch.Tensor,
        cos: torch.Tensor,
        signed_sin: torch.Tensor,
        norms: tuple[RMSNorm, RMSNorm] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Both rotated by RoPE (:func:`_rotate`), each head normalised
        first where there are ``norms`` (Qwen3's, of queries and of keys)."""
        if norms is not None:
            queries, keys = norms[0](queries), norms[1](keys)
        return _rotate(queries, cos, signed_sin), _rotate(keys, cos, signed_sin)

    def silu_mul(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        return F.silu(gate) * up
