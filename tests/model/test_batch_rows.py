"""The two batch layouts decode the same text: slots (what GPUs replay as CUDA
graphs, run eagerly here) against the padded cache CPUs use."""

import time

import pytest
import torch

from helpers.config import EMBEDDED_MODEL_ID, ServeConfig
from helpers.engine.batch_rows import FIRST_CAPACITY
from helpers.engine.engine import Engine, GenerationRequest, PromptTooLongError, Sampling
from helpers.engine.kv_budget import KVPlan

PROMPTS = [
    "The capital of France is",
    "Write a haiku about Ray Serve.",
    "List three colours:\n1.",
]


@pytest.fixture(scope="module")
def engines() -> tuple[Engine, Engine]:
    loaded = Engine.load(
        EMBEDDED_MODEL_ID, ServeConfig.from_env({}).model_cache_dir, cpu_threads=2, prepack=False
    )
    model, tokenizer = loaded.model, loaded.tokenizer
    return tuple(  # type: ignore[return-value]
        Engine(model, tokenizer, model_id=EMBEDDED_MODEL_ID, max_batch_size=4, slots=slots)
        for slots in (False, True)
    )


def greedy(prompt: str, max_new_tokens: int) -> GenerationRequest:
    return GenerationRequest(prompt, Sampling(max_new_tokens, temperature=0.0, top_p=1.0))


def staggered(engine: Engine, requests: list[GenerationRequest]) -> list[str]:
    """The first request decodes a few steps alone; the others join its batch."""
    first = engine.submit(requests[0])
    passes = engine.stats.forward_passes
    while engine.stats.forward_passes < passes + 3 and not first.done():
        time.sleep(0.005)
    rest = [engine.submit(request) for request in requests[1:]]
    return [future.result().text for future in [first, *rest]]


def test_slots_decode_what_the_padded_cache_decodes(engines: tuple[Engine, Engine]) -> None:
    padded, slotted = engines
    requests = [greedy(prompt, 12 + 4 * i) for i, prompt in enumerate(PROMPTS)]
    expected = staggered(padded, requests)
    assert all(expected)
    assert staggered(slotted, requests) == expected


@pytest.mark.parametrize("numbers", [62, 85], ids=["while-decoding", "at-admission"])
def test_slots_grow_past_their_first_capacity(engines: tuple[Engine, Engine], numbers: int) -> None:
    padded, slotted = engines
    long_prompt = "Count on: " + ", ".join(str(n) for n in range(numbers))
    assert slotted.count_tokens(long_prompt) + 24 > FIRST_CAPACITY
    requests = [greedy(PROMPTS[0], 24), greedy(long_prompt, 24)]
    assert staggered(slotted, requests) == staggered(padded, requests)


def test_a_freed_slot_serves_the_next_sequence_cleanly(engines: tuple[Engine, Engine]) -> None:
    """A slot keeps the old sequence's keys past the new one's end; they must
    stay invisible to it."""
    _, slotted = engines
    alone = slotted.generate([greedy(PROMPTS[2], 10)])[0].text
    slotted.generate([greedy(PROMPTS[1] * 6, 20)])  # fills slot 0 far past PROMPTS[2]
    assert slotted.generate([greedy(PROMPTS[2], 10)])[0].text == alone


def test_a_slot_is_cleared_for_its_next_sequence(engines: tuple[Engine, Engine]) -> None:
    """Even a NaN left in a slot's masked columns must not reach the next
    sequence there (masked weights are zero, and zero times NaN is NaN)."""
    _, slotted = engines
    alone = slotted.generate([greedy(PROMPTS[0], 8)])[0].text
    cache = slotted._batcher._rows.cache  # the slot cache the next prompt moves into
    with torch.inference_mode():  # the decode thread may have made it there
        for layer in cache.layers:
            layer.values[:, :, 40] = float("nan")  # past the sequence, inside the width read
    assert slotted.generate([greedy(PROMPTS[0], 8)])[0].text == alone


@pytest.mark.parametrize("layout", ["padded", "slots"])
def test_a_repeated_prompt_is_prefilled_once_and_its_rows_decode_alike(
    engines: tuple[Engine, Engine], layout: str
) -> None:
    """A request's ``n`` choices: one prefill, the other rows copied from it,
    each then decoding exactly as the prompt admitted alone does."""
    engine = engines[layout == "slots"]
    rows_type = type(engine._batcher._rows)
    model, tokenizer = engine.model, engine.tokenizer
    rows = (
        rows_type(model, tokenizer) if layout == "padded" else rows_type(model, tokenizer, 4, False)
    )
    alone = (
        rows_type(model, tokenizer) if layout == "padded" else rows_type(model, tokenizer, 4, False)
    )
    repeated, other = (tokenizer(p)["input_ids"] for p in PROMPTS[:2])
    with torch.inference_mode():
        calls = []
        forward = model.forward
        model.forward = lambda *a, **k: calls.append(k["input_ids"].shape[0]) or forward(*a, **k)
        try:
            lengths = rows.admit([repeated, other, repeated, repeated])
        finally:
            del model.forward
        assert calls == [2], "two distinct prompts, one pass"
        assert lengths == [len(repeated), len(other), len(repeated), len(repeated)]
        alone.admit([repeated])
        for _ in range(3):
            tokens = rows.logits.argmax(-1).tolist()
            assert tokens[0] == tokens[2] == tokens[3] == int(alone.logits[0].argmax())
            # The same up to rounding: attention's CPU kernel does not always
            # round two equal rows of one batch alike (seen in the padded
            # layout on an AMD EPYC host, 4e-5 apart), and alone the sums run
            # in another order.
            for row in (2, 3):
                torch.testing.assert_close(rows.logits[row], rows.logits[0], rtol=0, atol=1e-3)
            torch.testing.assert_close(rows.logits[0], alone.logits[0], rtol=0, atol=1e-3)
            rows.decode(tokens)
            alone.decode([tokens[0]])


def test_a_kv_budget_caps_the_slots_and_their_length_and_the_text_stays(
    engines: tuple[Engine, Engine],
) -> None:
    """A replica sharing a GPU (its plan from :mod:`helpers.engine.kv_budget`):
    no more rows than its slots, no column past its positions, a request that
    would need more refused by name, and the text the padded cache gives."""
    padded, slotted = engines
    plan = KVPlan(slots=2, positions=FIRST_CAPACITY + 40)
    budgeted = Engine(
        slotted.model,
        slotted.tokenizer,
        model_id=EMBEDDED_MODEL_ID,
        max_batch_size=4,
        slots=True,
        kv_plan=plan,
    )
    assert budgeted.context_length == plan.positions
    long_prompt = "Count on: " + ", ".join(str(n) for n in range(62))
    requests = [greedy(PROMPTS[0], 24), greedy(long_prompt, 24), greedy(PROMPTS[1], 24)]
    assert budgeted.generate(requests) == padded.generate(requests)
    assert budgeted.stats.largest_batch == plan.slots
    assert budgeted._batcher._rows.cache.capacity == plan.positions
    with pytest.raises(PromptTooLongError, match=r"share of its GPU holds \(GPU_MEMORY_FRACTION\)"):
        budgeted.check_fits(greedy(long_prompt, plan.positions))
