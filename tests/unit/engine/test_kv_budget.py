"""A GPU replica's KV cache sized from its share of the GPU, without a GPU:
the arithmetic that lets two replicas of a small model share one."""

from types import SimpleNamespace

import pytest
import torch

from helpers.engine.kv_budget import (
    ACTIVATION_SHARE,
    SCORE_BYTES,
    SCORES_SHARE,
    KVBudgetError,
    KVPlan,
    bytes_per_position,
    kv_budget,
    plan_kv,
    prefill_area,
)
from helpers.engine.kv_cache import PAGE_SIZE, pages_for
from helpers.engine.paged_rows import PREFILL_AREA, one_pass_holds, prefill_pieces

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


def test_the_budget_becomes_pages_and_a_sequence_may_fill_them() -> None:
    page = 1000 * PAGE_SIZE
    assert plan_kv(10**12, 1000, 8192) == KVPlan(10**12 // page, 8192)
    assert plan_kv(300 * page + page - 1, 1000, 8192) == KVPlan(300, 300 * PAGE_SIZE)
    assert plan_kv(16 * page, 1000, 64) == KVPlan(16, 64)  # a short context: its whole


def test_a_budget_too_small_for_one_useful_sequence_is_refused_by_name() -> None:
    assert plan_kv(16 * 1000 * PAGE_SIZE, 1000, 8192) == KVPlan(16, 256)
    with pytest.raises(KVBudgetError, match="GPU_MEMORY_FRACTION leaves 0 MiB"):
        plan_kv(15 * 1000 * PAGE_SIZE, 1000, 8192)
    with pytest.raises(KVBudgetError, match="raise GPU_MEMORY_FRACTION"):
        plan_kv(-5, 1000, 8192)  # the weights alone overrun the share


@pytest.mark.parametrize("shape", sorted(SHAPES))
@pytest.mark.parametrize("total", [15 * GIB, 80 * GIB], ids=["T4", "H100"])
def test_two_replicas_at_half_a_gpu_fit_it_together(shape: str, total: int) -> None:
    """NUM_GPUS_PER_REPLICA=0.5 and GPU_MEMORY_FRACTION auto (0.45 each):
    the two replicas' weights and full KV caches stay inside the GPU, with
    room for their activations, and each holds 16 sequences of 2,048
    positions at once."""
    config, weights, context = SHAPES[shape]
    per_position = bytes_per_position(config, torch.bfloat16)
    fraction = 0.9 * 0.5
    plan = plan_kv(kv_budget(fraction, total, int(weights)), per_position, context)
    one_replica = weights + plan.pages * PAGE_SIZE * per_position
    assert 2 * one_replica <= 2 * fraction * total * (1 - ACTIVATION_SHARE) <= 0.9 * total
    assert plan.pages * PAGE_SIZE >= 16 * 2048


def test_no_more_pages_than_the_slots_can_hold_are_taken() -> None:
    """What no sequence can use stays free for the GPU's other tenants."""
    page = 1000 * PAGE_SIZE
    assert plan_kv(10**12, 1000, 8192, slots=16) == KVPlan(16 * 512, 8192)
    assert plan_kv(300 * page, 1000, 8192, slots=16) == KVPlan(300, 300 * PAGE_SIZE)


HEADS = {"SmolLM2-135M": 9, "Qwen3-0.6B": 16, "Llama-3.2-1B": 32}


@pytest.mark.parametrize("heads", sorted(HEADS.values()))
@pytest.mark.parametrize(
    ("total", "fraction"),
    [(15 * GIB, 0.45), (80 * GIB, 0.9), (141 * GIB, 0.9)],
    ids=["T4, two replicas", "H100", "H200"],
)
@pytest.mark.parametrize("length", [1000, 8192, 32768])
def test_a_long_prompts_prefill_passes_keep_their_scores_within_the_room(
    heads: int, total: int, fraction: float, length: int
) -> None:
    """Each pass's float32 scores, their softmax and the mask (the plain
    attention kernel's, which a mask and grouped heads get on CUDA) fit the
    share of the activations' room kept for them, on a T4 shared by two
    replicas as on an H200: the passes get smaller, not the GPU's memory."""
    room = fraction * total * ACTIVATION_SHARE
    area = prefill_area(heads, room)
    passes = prefill_pieces(length, area) if length > 1000 else [(0, length)]
    if length <= 1000:
        assert one_pass_holds(1, length, area)
    for start, end in passes:
        scores = (2 * heads + 1) * SCORE_BYTES * (end - start) * pages_for(end) * PAGE_SIZE
        assert scores <= SCORES_SHARE * room, (start, end)
    assert area <= PREFILL_AREA, "a large GPU's passes are as before"
