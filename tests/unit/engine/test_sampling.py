"""One sequence's sampler (helpers/engine/sampling.py) on logits made by hand,
so each control's arithmetic is checked where a token flips or does not."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from helpers.engine.sampling import NUCLEUS_FIRST_K, Sampler
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


# top_p: the nucleus from topk must be the full sort's, bit for bit, so a
# seeded request draws the same tokens as it did with the sort.

VOCABULARY = 49152  # the embedded model's


def nucleus_by_sorting(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """The rule as it stood before topk: sort everything, zero what lies past
    the smallest prefix whose mass reaches top_p."""
    sorted_probs, order = probs.sort(descending=True)
    outside = sorted_probs.cumsum(-1) - sorted_probs >= top_p
    sorted_probs[outside] = 0.0
    return torch.zeros_like(probs).scatter_(0, order, sorted_probs)


def reference_probabilities(sampling: Sampling, row: torch.Tensor) -> torch.Tensor:
    """What the sampler hands torch.multinomial: its own temperature, min_p and
    top_k steps (no top_p), then the sorting rule above."""
    whole = Sampler(replace(sampling, top_p=1.0), "cpu", ())._probabilities(row)
    return nucleus_by_sorting(whole, sampling.top_p) if sampling.top_p < 1.0 else whole


def assert_same_bits(sampling: Sampling, row: torch.Tensor) -> None:
    got = Sampler(sampling, "cpu", ())._probabilities(row)
    want = reference_probabilities(sampling, row)
    assert got.dtype == want.dtype and got.shape == want.shape
    bits = torch.int32 if got.dtype == torch.float32 else torch.int16
    differ = (got.view(bits) != want.view(bits)).nonzero().flatten().tolist()
    assert not differ, f"{len(differ)} probabilities differ, first at {differ[:5]}"


@pytest.fixture
def sorts(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts the rows the sampler leaves to the full sort."""
    from helpers.engine import sampling as module

    counted: list[int] = []
    sort = module._nucleus_sorted

    def counting(probs: torch.Tensor, top_p: float) -> torch.Tensor:
        counted.append(1)
        return sort(probs, top_p)

    monkeypatch.setattr(module, "_nucleus_sorted", counting)
    return counted


def peaked_rows(count: int, seed: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Logits shaped like a language model's: a long flat tail, a few tokens
    well above it, a sharper or flatter row each time. At temperature 0.7 and
    top_p 0.9 most nuclei are a few tokens, and a few rows' run deep into the
    tail."""
    gen = torch.Generator().manual_seed(seed)
    rows = torch.randn(count, VOCABULARY, generator=gen) * 1.5
    for row in rows:
        head = torch.randint(VOCABULARY, (40,), generator=gen)
        height = float(torch.randint(8, 18, (1,), generator=gen))
        row[head] += torch.rand(40, generator=gen) * height
    return rows.to(dtype)


@pytest.mark.parametrize("top_p", [0.5, 0.9, 0.95, 0.99])
def test_top_p_matches_the_full_sort_on_peaked_rows_without_sorting(
    top_p: float, sorts: list[int]
) -> None:
    """A nucleus of a few tokens never needs the sort; a deep one may (its cut
    lies among probabilities smaller than the margin)."""
    settings = replace(SAMPLED, temperature=0.7, top_p=top_p)
    small = 0
    for row in peaked_rows(24, seed=int(top_p * 100)):
        sorted_before = len(sorts)
        assert_same_bits(settings, row)
        if int((reference_probabilities(settings, row) > 0).sum()) <= NUCLEUS_FIRST_K:
            small += 1
            assert len(sorts) == sorted_before, "a small nucleus is found by topk"
    assert small >= 12, "the rows are mostly peaked, as a language model's are"


def test_top_p_near_one_and_nuclei_past_the_first_k(sorts: list[int]) -> None:
    """Flatter rows put the cut past 64, then 256 tokens (k grows), or past
    every k (the sort); top_p a hair under 1 cuts where rounding decides."""
    gen = torch.Generator().manual_seed(3)
    for scale in (0.01, 0.5, 1.0, 2.0, 3.0):
        row = torch.randn(VOCABULARY, generator=gen) * scale
        for top_p in (0.9, 0.999, 0.999999, 1.0 - 1e-7, 1.0 - 1e-12):
            assert_same_bits(replace(SAMPLED, top_p=top_p), row)
    grows = torch.randn(VOCABULARY, generator=gen) * 2.5
    before = len(sorts)
    assert_same_bits(replace(SAMPLED, top_p=0.5), grows)
    kept = int((reference_probabilities(replace(SAMPLED, top_p=0.5), grows) > 0).sum())
    assert kept > NUCLEUS_FIRST_K and len(sorts) == before, "found by a larger topk"


def test_a_flat_row_is_one_tie_the_sort_decides(sorts: list[int]) -> None:
    """Every probability equal: which tokens make the nucleus is the sort's
    order of ties alone."""
    row = torch.zeros(VOCABULARY)
    assert_same_bits(replace(SAMPLED, top_p=0.9), row)
    assert_same_bits(replace(SAMPLED, top_p=0.001), row)  # 49 of them
    assert sorts


@pytest.mark.parametrize("tied", [2, 3, 10, 70, 300])
def test_a_cut_inside_equal_probabilities_matches_the_sort(tied: int, sorts: list[int]) -> None:
    """``tied`` tokens share the top probability, scattered over the row; top_p
    is set to cut inside them, at their edge, and past them."""
    gen = torch.Generator().manual_seed(tied)
    row = torch.randn(VOCABULARY, generator=gen) - 20
    row[torch.randperm(VOCABULARY, generator=gen)[:tied]] = 0.0
    share = float(torch.softmax(row, -1).max())
    for top_p in (share * 1.5, share * (tied - 0.5), share * tied, share * tied + 0.001, 0.9999):
        assert_same_bits(replace(SAMPLED, top_p=min(top_p, 0.99999)), row)
    assert sorts, "a cut inside the tie is left to the sort"


def test_ties_below_the_cut_and_at_the_kth_token_match_the_sort() -> None:
    """Equal probabilities kept whole, dropped whole, and straddling the 64th
    place, where topk and the sort may order them differently."""
    gen = torch.Generator().manual_seed(5)
    row = torch.randn(VOCABULARY, generator=gen) - 30
    places = torch.randperm(VOCABULARY, generator=gen)
    row[places[:4]] = 3.0  # kept whole at top_p 0.5
    row[places[4:8]] = 2.0
    row[places[8:200]] = 0.5  # a tie across k = 64, past the cut
    for top_p in (0.5, 0.6, 0.75, 0.9):
        assert_same_bits(replace(SAMPLED, top_p=top_p), row)


@pytest.mark.parametrize(
    "controls",
    [
        {"top_k": 5},
        {"top_k": 40},
        {"top_k": 100},
        {"min_p": 0.05},
        {"min_p": 0.3, "top_k": 64},
    ],
)
def test_top_p_after_min_p_and_top_k_matches_the_sort(controls: dict[str, float]) -> None:
    """Masked tokens have probability 0: a tie of thousands after the cut."""
    for row in peaked_rows(6, seed=11):
        for top_p in (0.5, 0.9, 0.999999):
            assert_same_bits(replace(SAMPLED, temperature=0.7, top_p=top_p, **controls), row)


def test_a_one_hot_row_keeps_its_one_token(sorts: list[int]) -> None:
    row = torch.full((VOCABULARY,), float("-inf"))
    row[1234] = 0.0
    for top_p in (0.1, 0.9):
        assert_same_bits(replace(SAMPLED, top_p=top_p), row)
    sure = torch.zeros(VOCABULARY)
    sure[7] = 200.0  # every other probability underflows to 0
    assert_same_bits(replace(SAMPLED, top_p=0.9), sure)
    assert not sorts
    assert_same_bits(replace(SAMPLED, top_p=0.9999999), row)  # within the margin of 1


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_top_p_in_half_precision_matches_the_sort(dtype: torch.dtype) -> None:
    """The batch hands the sampler fp32, but the rule holds in any float:
    bf16's coarse sums tie often and sit near top_p more often."""
    for row in peaked_rows(8, seed=13, dtype=dtype):
        for top_p in (0.5, 0.9, 0.95):
            assert_same_bits(replace(SAMPLED, temperature=0.7, top_p=top_p), row)


def test_seeded_draws_are_those_of_the_full_sort() -> None:
    settings = replace(SAMPLED, temperature=0.7, top_p=0.9)
    rows = peaked_rows(16, seed=17)
    for seed in range(4):
        picker = sampler(replace(settings, seed=seed))
        drawn = [picker.pick(row) for row in rows]
        gen = torch.Generator().manual_seed(seed)
        wanted = [
            int(torch.multinomial(reference_probabilities(settings, row), 1, generator=gen))
            for row in rows
        ]
        assert drawn == wanted
