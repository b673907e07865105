"""A GPU replica's KV cache, sized from its share of the GPU's memory.

Why: Ray places two replicas that ask for ``NUM_GPUS_PER_REPLICA=0.5`` on one
GPU, but it does not divide the GPU's memory between them; each replica has to
keep to its share itself. The slot cache (:class:`~helpers.engine.batch_rows.SlotRows`)
grows its columns as sequences lengthen, for every slot at once, so left
unbounded the first long batch of one replica would take the memory the other
counts on. Once its weights are loaded, a replica works out how many positions
its slots may grow to within ``GPU_MEMORY_FRACTION`` of the device, and drops
slots where keeping them all would leave each sequence too short to be useful.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

MIN_POSITIONS = 2048
"""A sequence's length (prompt and reply) a replica keeps room for before it
keeps fewer slots; a model with a shorter context keeps room for all of it."""
FEWEST_POSITIONS = 256
"""Below this, a budget is refused at load rather than served badly."""
ACTIVATION_SHARE = 0.1
"""Of the budget, what is left for the forward pass's activations, the logits
and the captured graphs' memory pools rather than given to the KV cache."""


class KVBudgetError(ValueError):
    """The budget cannot hold the KV cache of one useful sequence."""


@dataclass(frozen=True)
class KVPlan:
    """How many sequences the slot cache holds at once, each up to how many positions."""

    slots: int
    positions: int


def bytes_per_position(config: Any, dtype: torch.dtype) -> int:
    """Keys and values of one token in every layer."""
    per_layer = 2 * config.num_key_value_heads * config.head_dim * dtype.itemsize
    return config.num_hidden_layers * per_layer


def plan_kv(budget: int, per_position: int, max_slots: int, context_length: int) -> KVPlan:
    """Every slot up to ``MAX_BATCH_SIZE`` (``max_slots``) while each still gets
    ``MIN_POSITIONS`` (or the whole context); fewer slots, each that long,
    where the budget is smaller."""
    wanted = min(context_length, MIN_POSITIONS)
    positions = budget // (max_slots * per_position)
    if positions >= wanted:
        return KVPlan(max_slots, min(positions, context_length))
    slots = max(1, min(max_slots, budget // (wanted * per_position)))
    positions = min(context_length, budget // (slots * per_position))
    if positions < min(context_length, FEWEST_POSITIONS):
        raise KVBudgetError(
            f"GPU_MEMORY_FRACTION leaves {max(budget, 0) // 2**20} MiB for the KV cache: "
            f"room for {max(positions, 0)} positions of one sequence, fewer than "
            f"{min(context_length, FEWEST_POSITIONS)}; raise GPU_MEMORY_FRACTION or "
            "NUM_GPUS_PER_REPLICA"
        )
    return KVPlan(slots, positions)


def kv_budget(fraction: float, total: int, weights: int) -> int:
    """Bytes for the KV cache: the replica's share of a device of ``total``
    bytes, less its ``weights`` and room for activations."""
    share = fraction * total
    return int(share * (1 - ACTIVATION_SHARE)) - weights


def gpu_kv_plan(model: Any, fraction: float, max_slots: int, context_length: int) -> KVPlan:
    """The plan for a model loaded on its GPU, within ``fraction`` of that GPU."""
    device = model.device
    total = torch.cuda.get_device_properties(device).total_memory
    weights = torch.cuda.memory_allocated(device)
    per_position = bytes_per_position(model.config, next(model.parameters()).dtype)
    budget = kv_budget(fraction, total, weights)
    return plan_kv(budget, per_position, max_slots, context_length)
