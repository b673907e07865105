"""One sequence's sampler (helpers/engine/sampling.py) on logits made by hand,
so each control's arithmetic is checked where a token flips or does not."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from helpers.engine.sampling import Sampler
from helpers.protocol import Sampling

GREEDY = Sampling(max_new_tokens=8, temperature=0.0, top_p=1.0)
SAMPLED = Sampling(max_new_tokens=8, temperature=1.0, top_p=1.0, seed=0)


def sampler(sampling: Sampling, prompt: tuple[int, ...] = ()) -> Sampler:
    return Sampler(sampling, "cpu", prompt)


def logits(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


def test_plain_greedy_is_the_argmax_and_leaves_the_logits_to_the_batch() -> None:
    plain = sampler(GREEDY)
    assert plain.greedy and not plain.changes_logits
    assert plain.pick(logits(0.1, 0.9, 0.3)) == 1


@pytest.mark.parametrize(("bias", "expected"), [(0.5, 0), (0.9, 2)])
def test_logit_bias_is_added_before_the_argmax(bias: float, expected: int) -> None:
    row = logits(1.0, 0.2, 0.2)
    picker = sampler(replace(GREEDY, logit_bias=((2, bias),)))
    assert picker.changes_logits
    assert picker.pick(row) == expected
    assert torch.equal(row, logits(1.0, 0.2, 0.2)), "the batch's logits are left as they were"


@pytest.mark.parametrize(("penalty", "expected"), [(0.04, 2), (0.06, 3)])
def test_frequency_penalty_subtracts_per_occurrence(penalty: float, expected: int) -> None:
    """Token 2 came twice: 1.0 - 2 x penalty against 0.9."""
    picker = sampler(replace(GREEDY, frequency_penalty=penalty))
    for token in (2, 2):
        picker.record(token)
    assert picker.pick(logits(0.0, 0.0, 1.0, 0.9)) == expected


@pytest.mark.parametrize(("penalty", "expected"), [(0.09, 2), (0.11, 3)])
def test_presence_penalty_subtracts_once_however_often(penalty: float, expected: int) -> None:
    picker = sampler(replace(GREEDY, presence_penalty=penalty))
    for token in (2, 2, 2):
        picker.record(token)
    assert picker.pick(logits(0.0, 0.0, 1.0, 0.9)) == expected


def test_a_negative_penalty_favours_what_came_before() -> None:
    picker = sampler(replace(GREEDY, presence_penalty=-0.5))
    picker.record(0)
    assert picker.pick(logits(0.6, 1.0)) == 0


def test_repetition_penalty_divides_positive_and_multiplies_negative_logits() -> None:
    """Over the prompt's tokens and the completion's, as vLLM and transformers do."""
    picker = sampler(replace(GREEDY, repetition_penalty=2.0), prompt=(0,))
    assert picker.pick(logits(1.0, 0.6)) == 1  # 1.0 / 2 < 0.6
    picker = sampler(replace(GREEDY, repetition_penalty=2.0), prompt=(0,))
    assert picker.pick(logits(-0.5, -0.9)) == 1  # -0.5 x 2 < -0.9
    picker = sampler(replace(GREEDY, repetition_penalty=2.0))
    picker.record(1)
    assert picker.pick(logits(0.5, 0.9)) == 0  # 0.9 / 2 < 0.5, from the completion
    without = sampler(replace(GREEDY, repetition_penalty=2.0), prompt=(5,))
    assert without.pick(logits(1.0, 0.6, 0, 0, 0, 0)) == 0


def test_top_k_one_is_greedy_at_any_temperature() -> None:
    row = torch.randn(50, generator=torch.Generator().manual_seed(1))
    for seed in range(20):
        picker = sampler(replace(SAMPLED, temperature=2.0, top_k=1, seed=seed))
        assert picker.pick(row) == int(row.argmax())


def test_top_k_keeps_only_the_k_likeliest() -> None:
    row = logits(3.0, 2.9, 2.8, 2.7)
    drawn = {sampler(replace(SAMPLED, top_k=2, seed=seed)).pick(row) for seed in range(200)}
    assert drawn == {0, 1}


def test_min_p_drops_tokens_below_its_share_of_the_likeliest() -> None:
    """Probabilities 0.5, 0.3, 0.2: min_p 0.5 keeps 0.3 (>= 0.25), drops 0.2."""
    row = torch.tensor([0.5, 0.3, 0.2]).log()
    drawn = {sampler(replace(SAMPLED, min_p=0.5, seed=seed)).pick(row) for seed in range(300)}
    assert drawn == {0, 1}
    every = {sampler(replace(SAMPLED, seed=seed)).pick(row) for seed in range(300)}
    assert every == {0, 1, 2}


def test_min_p_applies_before_top_p_as_in_vllm() -> None:
    """Probabilities 0.5, 0.3, 0.2: min_p 0.5 drops 0.2, leaving 0.625 and
    0.375, whose top_p 0.6 nucleus is the first alone. top_p first would keep
    0.5 and 0.3, and min_p then both."""
    row = torch.tensor([0.5, 0.3, 0.2]).log()
    both = replace(SAMPLED, min_p=0.5, top_p=0.6)
    assert {sampler(replace(both, seed=seed)).pick(row) for seed in range(300)} == {0}


def test_logit_bias_applies_before_the_repetition_penalty_as_in_vllm() -> None:
    """Token 0 (logit 2, in the prompt) biased by -4 gives -2, which the penalty
    of 2 doubles to -4, below token 1's -3.5. Penalized first, token 0 would
    have 2 / 2 - 4 = -3 and win."""
    picker = sampler(replace(GREEDY, logit_bias=((0, -4.0),), repetition_penalty=2.0), (0,))
    assert picker.pick(logits(2.0, -3.5)) == 1


def test_the_same_seed_and_settings_draw_the_same_tokens() -> None:
    settings = replace(SAMPLED, top_k=20, min_p=0.01, frequency_penalty=0.3, seed=7)
    rows = torch.randn(12, 100, generator=torch.Generator().manual_seed(2))

    def draws() -> list[int]:
        picker = sampler(settings)
        picked = []
        for row in rows:
            picked.append(picker.pick(row))
            picker.record(picked[-1])
        return picked

    assert draws() == draws()


def test_a_temperature_too_small_to_divide_by_is_greedy() -> None:
    """1e-300 is 0 in fp32: dividing by it would give inf - inf = NaN."""
    picker = sampler(replace(SAMPLED, temperature=1e-300))
    assert picker.greedy
    assert picker.pick(logits(0.1, 0.9, 0.3)) == 1


def test_a_repetition_penalty_near_zero_still_samples_a_distribution() -> None:
    """Dividing positive logits by 1e-300 makes them infinite in fp32: the
    likeliest of them is then drawn, not a NaN distribution."""
    picker = sampler(replace(SAMPLED, repetition_penalty=1e-300), prompt=(0, 2))
    assert picker.pick(logits(0.5, 0.9, 0.3)) in (0, 2)
