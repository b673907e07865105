"""The sampling controls on the real embedded model: each row's settings are
its own, whatever shares its batch. On the padded layout alone, to keep the
suite's time: the sampler is the same for both layouts, and
``test_engine.py`` holds the slots to the padded text."""

from __future__ import annotations

import math
from collections import Counter
from concurrent.futures import Future
from dataclasses import replace

import pytest
import torch

from helpers.engine.engine import SCORING_CHUNK, Engine, GenerationRequest, Sampling, TokenIdError

from .conftest import padded_only

COLOURS = "List three colours:\n1."
GREEDY = Sampling(24, temperature=0.0, top_p=1.0)


def completion_ids(engine: Engine, text: str) -> list[int]:
    return engine.tokenizer(text, add_special_tokens=False)["input_ids"]


@padded_only
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


@padded_only
def test_top_k_one_gives_the_greedy_text_at_any_temperature(engine: Engine) -> None:
    greedy = engine.generate([GenerationRequest(COLOURS, GREEDY)])[0]
    top_one = replace(GREEDY, temperature=1.8, top_k=1, seed=11)
    assert engine.generate([GenerationRequest(COLOURS, top_one)])[0].text == greedy.text


@padded_only
def test_a_logit_bias_of_100_makes_its_token_every_token(engine: Engine) -> None:
    token = completion_ids(engine, " ray")[-1]
    forced = replace(GREEDY, max_new_tokens=6, logit_bias=((token, 100.0),))
    completion = engine.generate([GenerationRequest(COLOURS, forced)])[0]
    assert completion.text == engine.tokenizer.decode([token] * 6)


@padded_only
def test_a_stop_token_id_ends_the_completion_without_it(engine: Engine) -> None:
    greedy = engine.generate([GenerationRequest(COLOURS, GREEDY)])[0]
    newline = 198  # "\n" in this vocabulary; the greedy list has several
    assert engine.tokenizer.decode([newline]) == "\n" and "\n" in greedy.text
    stopped = replace(GREEDY, stop_token_ids=(newline,))
    completion = engine.generate([GenerationRequest(COLOURS, stopped)])[0]
    assert completion.finish_reason == "stop"
    assert completion.text == greedy.text.split("\n")[0]


@padded_only
def test_ignore_eos_decodes_past_the_end_of_sequence(engine: Engine) -> None:
    prompt = engine.format_prompt("Reply with the single word: yes", "chat")
    short = engine.generate([GenerationRequest(prompt, replace(GREEDY, max_new_tokens=48))])[0]
    assert short.finish_reason == "stop" and short.completion_tokens < 48
    past = replace(GREEDY, max_new_tokens=48, ignore_eos=True)
    completion = engine.generate([GenerationRequest(prompt, past)])[0]
    assert (completion.completion_tokens, completion.finish_reason) == (48, "length")
    assert completion.text.startswith(short.text)


@padded_only
def test_each_penalty_makes_the_greedy_text_repeat_itself_less(engine: Engine) -> None:
    """Greedy, this list repeats "\n" 8 times in 32 tokens; the three
    penalized rows decode in one batch beside it."""
    penalties = [{"frequency_penalty": 2.0}, {"presence_penalty": 2.0}, {"repetition_penalty": 1.8}]
    requests = [
        GenerationRequest(COLOURS, replace(GREEDY, max_new_tokens=32, **penalty))
        for penalty in [{}, *penalties]
    ]
    plain, *penalized = engine.generate(requests)

    def most_repeated(completion: str) -> int:
        return Counter(completion_ids(engine, completion)).most_common(1)[0][1]

    for penalty, completion in zip(penalties, penalized, strict=True):
        assert most_repeated(completion.text) < most_repeated(plain.text), penalty


@padded_only
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


def independent_greedy(engine: Engine, prompt: str, steps: int) -> list[tuple[str, float]]:
    """Greedy tokens and their log probabilities from a full forward pass over
    the whole sequence at every step: no cache, no batch, no sampler."""
    ids = engine.tokenizer(prompt)["input_ids"]
    found = []
    with torch.inference_mode():
        for _ in range(steps):
            logits = engine.model(input_ids=torch.tensor([ids])).logits[0, -1].float()
            values = torch.log_softmax(logits, dim=-1)
            token = int(values.argmax())
            found.append((engine.tokenizer.decode([token]), float(values[token])))
            ids.append(token)
    return found


def test_logprobs_are_the_models_own_from_an_independent_forward_pass(engine: Engine) -> None:
    asked = replace(GREEDY, max_new_tokens=8, logprobs=3)
    others = [GenerationRequest("Hi", replace(asked, temperature=1.0, seed=2, top_k=5))]
    completion = engine.generate([GenerationRequest(COLOURS, asked), *others])[0]
    assert completion.logprobs is not None and len(completion.logprobs) == 8
    expected = independent_greedy(engine, COLOURS, 8)
    for entry, (token, logprob) in zip(completion.logprobs, expected, strict=True):
        assert entry.token == token
        assert entry.logprob == pytest.approx(logprob, abs=1e-3)
        assert len(entry.top) == 3 and entry.top[0] == (entry.token, entry.logprob)
        assert entry.top[0][1] >= entry.top[1][1] >= entry.top[2][1]
    assert "".join(entry.token for entry in completion.logprobs) == completion.text
    assert engine.generate([GenerationRequest(COLOURS, GREEDY)])[0].logprobs is None


@padded_only
def test_logprobs_are_taken_before_the_controls_change_the_logits(engine: Engine) -> None:
    """A token forced by logit_bias keeps its own, low, log probability."""
    token = completion_ids(engine, " ray")[-1]
    forced = replace(GREEDY, max_new_tokens=3, logit_bias=((token, 100.0),), logprobs=1)
    completion = engine.generate([GenerationRequest(COLOURS, forced)])[0]
    assert completion.logprobs is not None
    assert [entry.token for entry in completion.logprobs] == [engine.tokenizer.decode([token])] * 3
    first = completion.logprobs[0]  # after it, the model itself expects " ray" again
    assert first.logprob < first.top[0][1] and first.top[0][0] == " Red"


@padded_only
def test_a_prompts_logprobs_are_one_forward_pass_over_it(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Scored in chunks of 256 through a cache, a chunk between two decode
    steps, a prompt longer than a chunk gets the log probabilities of one
    full pass."""
    prompt = " ".join(f"{i} green bottles" for i in range(60))
    ids = engine.tokenizer(prompt)["input_ids"]
    assert len(ids) > SCORING_CHUNK
    pieces: list[int] = []
    queue_chore = engine._batcher.between_steps

    def counted(work: list, wake: bool = False) -> Future:
        pieces.append(len(work))
        return queue_chore(work, wake)

    monkeypatch.setattr(engine._batcher, "between_steps", counted)
    idle = engine.prompt_logprobs(prompt, 2).result(timeout=120)  # the loop wakes for it
    assert pieces == [math.ceil((len(ids) - 1) / SCORING_CHUNK) + 1], "a chunk a piece, and the end"
    busy = engine.submit(GenerationRequest(COLOURS, replace(GREEDY, max_new_tokens=24)))
    entries = engine.prompt_logprobs(prompt, 2).result(timeout=120)  # between two steps
    busy.result(timeout=120)
    assert entries == idle
    with torch.inference_mode():
        logits = engine.model(input_ids=torch.tensor([ids])).logits[0].float()
    expected = torch.log_softmax(logits, dim=-1)
    assert len(entries) == len(ids) and entries[0].logprob is None and entries[0].top == ()
    assert "".join(entry.token for entry in entries) == prompt
    for position, entry in enumerate(entries[1:]):
        assert entry.logprob == pytest.approx(
            float(expected[position, ids[position + 1]]), abs=1e-3
        )
        best = expected[position].topk(2)
        assert [text for text, _ in entry.top] == [
            engine.tokenizer.decode([t]) for t in best.indices.tolist()
        ]
