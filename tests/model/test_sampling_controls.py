"""The sampling controls on the real embedded model, in both batch layouts:
each row's settings are its own, whatever shares its batch."""

from __future__ import annotations

from collections import Counter
from dataclasses import replace

import pytest

from helpers.engine.engine import Engine, GenerationRequest, Sampling, TokenIdError

COLOURS = "List three colours:\n1."
GREEDY = Sampling(24, temperature=0.0, top_p=1.0)


def completion_ids(engine: Engine, text: str) -> list[int]:
    return engine.tokenizer(text, add_special_tokens=False)["input_ids"]


def test_each_rows_controls_leave_its_neighbours_text_alone(engine: Engine) -> None:
    """Every request gives the same text alone and inside one batch with the
    others, each with different controls (and seeds where it samples)."""
    sampled = Sampling(16, temperature=1.0, top_p=1.0, seed=5)
    requests = [
        GenerationRequest(COLOURS, replace(sampled, top_k=40)),
        GenerationRequest(COLOURS, replace(GREEDY, max_new_tokens=16, logit_bias=((198, -100),))),
        GenerationRequest("The capital of France is", replace(sampled, repetition_penalty=1.3)),
        GenerationRequest(
            "Hi", replace(sampled, seed=1, min_p=0.1, frequency_penalty=1.0, presence_penalty=0.5)
        ),
        GenerationRequest(COLOURS, replace(GREEDY, max_new_tokens=16)),
    ]
    alone = [engine.generate([request])[0] for request in requests]
    together = engine.generate(requests)
    assert [c.text for c in together] == [c.text for c in alone]
    assert len({c.text for c in alone[:2] + alone[4:]}) == 3, "the controls changed nothing"


def test_top_k_one_gives_the_greedy_text_at_any_temperature(engine: Engine) -> None:
    greedy = engine.generate([GenerationRequest(COLOURS, GREEDY)])[0]
    top_one = replace(GREEDY, temperature=1.8, top_k=1, seed=11)
    assert engine.generate([GenerationRequest(COLOURS, top_one)])[0].text == greedy.text


def test_a_logit_bias_of_100_makes_its_token_every_token(engine: Engine) -> None:
    token = completion_ids(engine, " ray")[-1]
    forced = replace(GREEDY, max_new_tokens=6, logit_bias=((token, 100.0),))
    completion = engine.generate([GenerationRequest(COLOURS, forced)])[0]
    assert completion.text == engine.tokenizer.decode([token] * 6)


def test_a_stop_token_id_ends_the_completion_without_it(engine: Engine) -> None:
    greedy = engine.generate([GenerationRequest(COLOURS, GREEDY)])[0]
    newline = 198  # "\n" in this vocabulary; the greedy list has several
    assert engine.tokenizer.decode([newline]) == "\n" and "\n" in greedy.text
    stopped = replace(GREEDY, stop_token_ids=(newline,))
    completion = engine.generate([GenerationRequest(COLOURS, stopped)])[0]
    assert completion.finish_reason == "stop"
    assert completion.text == greedy.text.split("\n")[0]


def test_ignore_eos_decodes_past_the_end_of_sequence(engine: Engine) -> None:
    prompt = engine.format_prompt("Reply with the single word: yes", "chat")
    short = engine.generate([GenerationRequest(prompt, replace(GREEDY, max_new_tokens=48))])[0]
    assert short.finish_reason == "stop" and short.completion_tokens < 48
    past = replace(GREEDY, max_new_tokens=48, ignore_eos=True)
    completion = engine.generate([GenerationRequest(prompt, past)])[0]
    assert (completion.completion_tokens, completion.finish_reason) == (48, "length")
    assert completion.text.startswith(short.text)


@pytest.mark.parametrize(
    "penalty",
    [{"frequency_penalty": 2.0}, {"presence_penalty": 2.0}, {"repetition_penalty": 1.8}],
    ids=lambda p: next(iter(p)),
)
def test_a_penalty_makes_the_greedy_text_repeat_itself_less(engine: Engine, penalty: dict) -> None:
    """Greedy, this list repeats "\\n" 8 times in 32 tokens."""
    plain = engine.generate([GenerationRequest(COLOURS, replace(GREEDY, max_new_tokens=32))])[0]
    penalized = replace(GREEDY, max_new_tokens=32, **penalty)
    text = engine.generate([GenerationRequest(COLOURS, penalized)])[0].text

    def most_repeated(completion: str) -> int:
        return Counter(completion_ids(engine, completion)).most_common(1)[0][1]

    assert most_repeated(text) < most_repeated(plain.text)


@pytest.mark.parametrize("field", ["logit_bias", "stop_token_ids"])
def test_a_token_id_outside_the_vocabulary_is_refused_by_its_field(
    engine: Engine, field: str
) -> None:
    vocabulary = engine.model.config.vocab_size
    value = ((vocabulary, 1.0),) if field == "logit_bias" else (vocabulary,)
    with pytest.raises(TokenIdError, match=f"{field}: token id {vocabulary} is outside") as caught:
        engine.request(COLOURS, replace(GREEDY, **{field: value}))
    assert caught.value.field == field
    engine.request(
        COLOURS, replace(GREEDY, **{field: ((0, 1.0),) if field == "logit_bias" else (0,)})
    )
