"""The engine on the real embedded model: no Ray involved."""

import pytest

from helpers.engine import Engine, GenerationRequest, PromptTooLongError

PROMPTS = [
    "The capital of France is",
    "Write a haiku about Ray Serve.",
    "List three colours:\n1.",
    "Hi",
]


def greedy(prompt: str, max_new_tokens: int = 12) -> GenerationRequest:
    return GenerationRequest(prompt, max_new_tokens=max_new_tokens, temperature=0.0, top_p=1.0)


def test_greedy_decoding_is_deterministic(engine: Engine) -> None:
    first = engine.generate([greedy(PROMPTS[0])])[0]
    second = engine.generate([greedy(PROMPTS[0])])[0]
    assert first.text and first == second


def test_a_prompt_completes_the_same_alone_and_inside_a_batch(engine: Engine) -> None:
    alone = [engine.generate([greedy(p)])[0].text for p in PROMPTS]
    batched = [c.text for c in engine.generate([greedy(p) for p in PROMPTS])]
    assert batched == alone


def test_completions_hold_only_the_new_tokens(engine: Engine) -> None:
    # A prompt whose text does not survive a tokenize/decode round trip
    # unchanged: stripping the prompt as a string would go wrong here.
    prompt = "Numbers:   1,   2,   3,"
    completion = engine.generate([greedy(prompt, 8)])[0]
    assert completion.prompt_tokens == engine.count_tokens(prompt)
    assert completion.completion_tokens == 8
    assert not completion.text.startswith("Numbers")
    regenerated = engine.tokenizer(prompt + completion.text)["input_ids"]
    assert len(regenerated) > completion.prompt_tokens


def test_each_request_keeps_its_own_token_limit(engine: Engine) -> None:
    short, long = engine.generate([greedy(PROMPTS[2], 3), greedy(PROMPTS[2], 9)])
    assert (short.completion_tokens, short.finish_reason) == (3, "length")
    assert long.completion_tokens <= 9
    assert long.text.startswith(short.text)


def test_an_end_of_sequence_token_stops_with_reason_stop(engine: Engine) -> None:
    prompt = engine.format_prompt("Reply with the single word: yes", "chat")
    completion = engine.generate([greedy(prompt, 64)])[0]
    assert completion.finish_reason == "stop"
    assert completion.completion_tokens < 64


def test_sampling_with_a_seed_is_reproducible(engine: Engine) -> None:
    def sample(seed: int) -> str:
        request = GenerationRequest(PROMPTS[1], 16, temperature=1.0, top_p=0.95, seed=seed)
        return engine.generate([request])[0].text

    assert sample(7) == sample(7)
    assert len({sample(seed) for seed in range(4)}) > 1


def test_a_tiny_top_p_keeps_only_the_most_likely_token(engine: Engine) -> None:
    nucleus = GenerationRequest(PROMPTS[0], 12, temperature=1.5, top_p=1e-6, seed=3)
    assert engine.generate([nucleus])[0].text == engine.generate([greedy(PROMPTS[0])])[0].text


def test_chat_format_wraps_the_prompt_in_the_template(engine: Engine) -> None:
    wrapped = engine.format_prompt("Hello", "auto")
    assert wrapped != "Hello" and "Hello" in wrapped
    assert engine.format_prompt("Hello", "raw") == "Hello"


def test_a_prompt_longer_than_the_context_is_refused(engine: Engine) -> None:
    too_long = greedy("word " * engine.context_length, 1)
    with pytest.raises(PromptTooLongError, match="context length"):
        engine.check_fits(too_long)
    engine.check_fits(greedy("short prompt", 16))


def test_batch_counters_record_one_call_per_batch(engine: Engine) -> None:
    before = engine.stats.batches, engine.stats.sequences
    engine.generate([greedy(p, 2) for p in PROMPTS])
    assert (engine.stats.batches, engine.stats.sequences) == (before[0] + 1, before[1] + 4)
    assert engine.stats.largest_batch >= 4
