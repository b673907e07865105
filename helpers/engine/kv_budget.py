"""A GPU replica's KV cache, sized from its share of the GPU's memory.

Why: Ray places two replicas that ask for ``NUM_GPUS_PER_REPLICA=0.5`` on one
GPU, but it does not divide the GPU's memory between them; each replica has to
keep to its share itself. Once its weights are loaded, a replica works out how
many pages of keys and values fit within ``GPU_MEMORY_FRACTION`` of the device
and allocates them all at once; its sequences share them
(:class:`~helpers.engine.paged_rows.PagedRows`), each holding pages for its
own length, and a sequence waits for pages to free rather than push past
them. A sequence may be as long as the model's context, or as the pages
hold, whichever is shorter.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from helpers.engine.kv_cache import PAGE_SIZE, pages_for
from helpers.engine.paged_rows import PREFILL_AREA

FEWEST_POSITIONS = 256
"""Below this, a budget is refused at load rather than served badly."""
ACTIVATION_SHARE = 0.1
"""Of the budget, what is left for the forward pass's activations, the logits
and the captured graphs' memory pools rather than given to the KV cache."""
SCORES_SHARE = 0.5
"""Of that room, what one prefill pass's attention may hold. With a mask and
grouped heads, torch's attention on CUDA runs its plain kernel, which keeps
every score, and its softmax, in float32 whatever the model's dtype; on a
small GPU a long prompt's pass would otherwise take more than the room."""
SCORE_BYTES = 4


class KVBudgetError(ValueError):
    """The budget cannot hold the KV cache of one useful sequence."""


@dataclass(frozen=True)
class KVPlan:
    """The paged cache's size, and how long one sequence may grow in it."""

    pages: int
    positions: int
    prefill_area: int = PREFILL_AREA
    """Most attention positions one prefill pass may hold (:func:`prefill_area`)."""


def bytes_per_position(config: Any, dtype: torch.dtype) -> int:
    """Keys and values of one token in every layer."""
    per_layer = 2 * config.num_key_value_heads * config.head_dim * dtype.itemsize
    return config.num_hidden_layers * per_layer


def prefill_area(heads: int, room: float) -> int:
    """Attention positions whose scores (each head's, and its softmax) and
    additive mask fit ``SCORES_SHARE`` of ``room`` bytes, float32 each."""
    per_position = (2 * heads + 1) * SCORE_BYTES
    return min(PREFILL_AREA, int(room * SCORES_SHARE) // per_position)


def plan_kv(
    budget: int,
    per_position: int,
    context_length: int,
    slots: int | None = None,
    area: int = PREFILL_AREA,
) -> KVPlan:
    """As many pages as ``budget`` bytes hold, but no more than ``slots``
    sequences of the whole context can use (the rest of the share stays free
    for the GPU's other tenants); a sequence up to the context, or all of
    them."""
    pages = max(budget, 0) // (per_position * PAGE_SIZE)
    if slots is not None:
        pages = min(pages, slots * pages_for(context_length))
    positions = min(context_length, pages * PAGE_SIZE)
    if positions < min(context_length, FEWEST_POSITIONS):
        raise KVBudgetError(
            f"GPU_MEMORY_FRACTION leaves {max(budget, 0) // 2**20} MiB for the KV cache: "
            f"room for {positions} positions, fewer than "
            f"{min(context_length, FEWEST_POSITIONS)}; raise GPU_MEMORY_FRACTION or "
            "NUM_GPUS_PER_REPLICA"
        )
    return KVPlan(pages, positions, area)


def kv_budget(fraction: float, total: int, weights: int) -> int:
    """Bytes for the KV cache: the replica's share of a device of ``total``
    bytes, less its ``weights`` and room for activations."""
    share = fraction * total
    return int(share * (1 - ACTIVATION_SHARE)) - weights


def gpu_kv_plan(model: Any, fraction: float, context_length: int, slots: int) -> KVPlan:
    """The plan for a model loaded on its GPU, within ``fraction`` of that
    GPU, for ``slots`` sequences at once."""
    device = model.device
    total = torch.cuda.get_device_properties(device).total_memory
    weights = torch.cuda.memory_allocated(device)
    per_position = bytes_per_position(model.config, next(model.parameters()).dtype)
    budget = kv_budget(fraction, total, weights)
    area = prefill_area(model.config.num_attention_heads, fraction * total * ACTIVATION_SHARE)
    return plan_kv(budget, per_position, context_length, slots, area)
