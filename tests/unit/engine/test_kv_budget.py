"""A GPU replica's KV cache sized from its share of the GPU, without a GPU:
the arithmetic that lets two replicas of a small model share one."""

from types import SimpleNamespace

import pytest
import torch

from helpers.engine.kv_budget import (
    ACTIVATION_SHARE,
    MIN_POSITIONS,
    KVBudgetError,
    KVPlan,
    bytes_per_position,
    kv_budget,
    plan_kv,
)

GIB = 2**30
QWEN25_05B = SimpleNamespace(num_hidden_layers=24, num_key_value_heads=2, head_dim=64)
LLAMA32_1B = SimpleNamespace(num_hidden_layers=16, num_key_value_heads=8, head_dim=64)
SHAPES = {
    "Qwen2.5-0.5B": (QWEN25_05B, 1.0 * GIB, 32768),
    "Llama-3.2-1B": (LLAMA32_1B, 2.5 * GIB, 131072),
}


def test_a_position_holds_keys_and_values_of_every_layer() -> None:
    assert bytes_per_position(QWEN25_05B, torch.bfloat16) == 24 * 2 * 2 * 64 * 2
    assert bytes_per_position(LLAMA32_1B, torch.float32) == 16 * 2 * 8 * 64 * 4


def test_a_roomy_budget_keeps_every_slot_up_to_the_context() -> None:
    assert plan_kv(10**12, 1000, 16, 8192) == KVPlan(16, 8192)
    assert plan_kv(16 * 5000 * 1000, 1000, 16, 8192) == KVPlan(16, 5000)


def test_a_tight_budget_drops_slots_before_sequences_get_too_short() -> None:
    budget = 4 * MIN_POSITIONS * 1000
    assert plan_kv(budget, 1000, 16, 8192) == KVPlan(4, MIN_POSITIONS)
    assert plan_kv(budget, 1000, 16, 1024) == KVPlan(8, 1024)  # a short context: its whole
    assert plan_kv(300 * 1000, 1000, 16, 8192) == KVPlan(1, 300)
    with pytest.raises(KVBudgetError, match="GPU_MEMORY_FRACTION leaves 0 MiB"):
        plan_kv(100 * 1000, 1000, 16, 8192)
    with pytest.raises(KVBudgetError, match="raise GPU_MEMORY_FRACTION"):
        plan_kv(-5, 1000, 16, 8192)  # the weights alone overrun the share


@pytest.mark.parametrize("shape", sorted(SHAPES))
@pytest.mark.parametrize("total", [15 * GIB, 80 * GIB], ids=["T4", "H100"])
def test_two_replicas_at_half_a_gpu_fit_it_together(shape: str, total: int) -> None:
    """NUM_GPUS_PER_REPLICA=0.5 and GPU_MEMORY_FRACTION auto (0.45 each):
    the two replicas' weights and full KV caches stay inside the GPU, with
    room for their activations, and each keeps MAX_BATCH_SIZE slots."""
    config, weights, context = SHAPES[shape]
    per_position = bytes_per_position(config, torch.bfloat16)
    fraction = 0.9 * 0.5
    plan = plan_kv(kv_budget(fraction, total, int(weights)), per_position, 16, context)
    one_replica = weights + plan.slots * plan.positions * per_position
    assert 2 * one_replica <= 2 * fraction * total * (1 - ACTIVATION_SHARE) <= 0.9 * total
    assert plan.slots == 16 and plan.positions >= MIN_POSITIONS
