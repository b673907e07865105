"""Whether a GPU's Triton kernels take torch's place, decided once per model.

Triton is absent off Linux x86_64, and a kernel may fail to compile or to
agree with torch for one model's shapes, so every kernel module is imported
inside a ``try`` and checked before it serves; elsewhere torch's path runs,
with a warning that says which. This is the one module that imports both the
kernels and what they stand in for, so the model never imports Triton and
the kernels never import the model.
"""

from __future__ import annotations

import logging

import torch

from helpers.engine.kv_cache import DecodeKernel
from helpers.engine.layer_ops import LayerOps
from helpers.engine.llama_config import LlamaConfig

logger = logging.getLogger(__name__)


def paged_decode_kernel(
    config: LlamaConfig, device: torch.device, dtype: torch.dtype
) -> DecodeKernel | None:
    """The kernel that reads a decode step's pages in place
    (:mod:`helpers.engine.paged_attention`), where it runs and agrees with
    torch's attention for this model's heads. Elsewhere None, and the pages
    are gathered for torch's attention."""
    fallback = "decode steps gather the KV cache's pages for attention"
    if not _triton_may_serve(device, dtype, fallback):
        return None
    try:
        from helpers.engine import paged_attention
    except ImportError:
        logger.warning("no Triton: %s", fallback)
        return None
    problem = paged_attention.problem_on(
        device, dtype, config.num_attention_heads, config.num_key_value_heads, config.head_dim
    )
    if problem is not None:
        logger.warning("paged_attention failed its check (%s): %s", problem, fallback)
        return None
    return paged_attention.decode_attention


def layer_ops(config: LlamaConfig, device: torch.device, dtype: torch.dtype) -> LayerOps:
    """A layer's steps between its matrix products as one kernel each
    (:mod:`helpers.engine.fused_layer_ops`), where they run and agree with
    torch's operations for this model's sizes; elsewhere torch's."""
    fallback = "each layer runs torch's operations between its matrix products"
    if not _triton_may_serve(device, dtype, fallback):
        return LayerOps()
    try:
        from helpers.engine import fused_layer_ops
    except ImportError:
        logger.warning("no Triton: %s", fallback)
        return LayerOps()
    problem = fused_layer_ops.problem_on(device, dtype, config)
    if problem is not None:
        logger.warning("fused_layer_ops failed its check (%s): %s", problem, fallback)
        return LayerOps()
    return fused_layer_ops.FUSED


def _triton_may_serve(device: torch.device, dtype: torch.dtype, fallback: str) -> bool:
    """Whether Triton's kernels are worth importing and checking here: on a
    GPU, in a dtype its matrix units take. Off a GPU False, silently (the
    CPU path is the expected one there); on an older GPU False, with a
    warning that names the ``fallback`` taken."""
    if device.type != "cuda":
        return False
    if dtype != torch.float16 and torch.cuda.get_device_capability(device) < (8, 0):
        # Triton's matrix units there take fp16 only; a failed compile can abort the process.
        logger.warning("Triton's kernels here need float16 before Ampere: %s", fallback)
        return False
    return True
