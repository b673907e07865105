"""On the real model, prompts that start as ended sequences did are prefilled
from where the two part (``helpers.engine.prefix_cache``), and every text is
the one the same engine gives without keeping anything."""

import contextlib
import time
from collections.abc import Iterator
from typing import Any

import pytest

from helpers.config import EMBEDDED_MODEL_ID
from helpers.engine.engine import Engine, GenerationRequest, Sampling

from .conftest import padded_only

pytestmark = padded_only

SYSTEM = "You answer questions about Ray Serve in one or two plain sentences. " * 4
QUESTIONS = ["What is a replica?", "What does scale to zero mean?", "Why batch requests?"]


def greedy(prompt: str, max_new_tokens: int = 16, ignore_eos: bool = False) -> GenerationRequest:
    sampling = Sampling(max_new_tokens, temperature=0.0, top_p=1.0, ignore_eos=ignore_eos)
    return GenerationRequest(prompt, sampling)


def asked(engine: Engine, question: str, history: tuple[tuple[str, str], ...] = ()) -> str:
    """The chat prompt for ``question`` after ``history`` (questions and replies)."""
    messages = [{"role": "system", "content": SYSTEM}]
    for said, reply in history:
        messages += [{"role": "user", "content": said}, {"role": "assistant", "content": reply}]
    return engine.render_chat([*messages, {"role": "user", "content": question}])


KEPT_BYTES = 64 << 20


@contextlib.contextmanager
def around(engine: Engine, **options: Any) -> Iterator[Engine]:
    """The fixture engine's model behind a batcher of its own, with ``options``."""
    made = Engine(engine.model, engine.tokenizer, model_id=EMBEDDED_MODEL_ID, **options)
    try:
        yield made
    finally:
        made.close()


@pytest.fixture
def keeping(engine: Engine) -> Iterator[Engine]:
    """The padded engine's model behind a batcher that keeps ended rows' cache."""
    with around(engine, prefix_cache_bytes=KEPT_BYTES) as kept:
        yield kept


def texts(engine: Engine, prompts: list[str]) -> list[str]:
    """Each prompt's greedy text, all submitted in one step."""
    with engine.together():
        futures = [engine.submit(greedy(prompt)) for prompt in prompts]
    return [future.result(timeout=120).text for future in futures]


def chat_of_two_turns(engine: Engine) -> tuple[str, str]:
    """A chat's first prompt, answered on ``engine``, and its second, which
    repeats the first turn and its reply."""
    first = asked(engine, QUESTIONS[0])
    reply = engine.generate([greedy(first)])[0].text
    return first, asked(engine, QUESTIONS[1], ((QUESTIONS[0], reply),))


def test_a_chats_next_turn_starts_from_the_turn_before_and_says_the_same(
    engine: Engine, keeping: Engine
) -> None:
    first, second = chat_of_two_turns(keeping)
    assert keeping.generate([greedy(second)])[0].text == engine.generate([greedy(second)])[0].text
    assert keeping.stats.reused_prompt_tokens >= keeping.count_tokens(first)


def test_prompts_sharing_a_system_prompt_reuse_it_in_one_step_beside_a_fresh_one(
    engine: Engine, keeping: Engine
) -> None:
    """Two prompts that reuse a kept system prompt and one that reuses
    nothing, admitted in the same step: each a prefill of its own or a group,
    and each text as without the cache."""
    keeping.generate([greedy(asked(keeping, QUESTIONS[0]))])
    reused_before, prefills_before = keeping.stats.reused_prompt_tokens, keeping.stats.prefills
    prompts = [asked(keeping, q) for q in QUESTIONS[1:]] + ["The capital of France is"]
    assert texts(keeping, prompts) == texts(engine, prompts)
    system_tokens = keeping.count_tokens(asked(keeping, ""))  # the question's own tokens aside
    assert keeping.stats.reused_prompt_tokens - reused_before >= 2 * (system_tokens - 8)
    assert keeping.stats.prefills - prefills_before == 3


def test_a_repeated_prompt_and_its_copies_share_one_prefill_of_its_last_token(
    engine: Engine, keeping: Engine
) -> None:
    """The same prompt again, asked for twice in one step (a request's ``n``
    choices): all but its last token come from the kept row, once for both."""
    prompt = asked(keeping, QUESTIONS[2])
    assert keeping.generate([greedy(prompt)])[0].cached_tokens == 0
    stats = keeping.stats
    reused_before, shared_before = stats.reused_prompt_tokens, stats.shared_prefills
    with keeping.together():
        futures = [keeping.submit(greedy(prompt)) for _ in range(2)]
    done = [future.result(timeout=120) for future in futures]
    assert [c.text for c in done] == texts(engine, [prompt, prompt])
    all_but_last = keeping.count_tokens(prompt) - 1
    assert [c.cached_tokens for c in done] == [all_but_last] * 2
    assert stats.reused_prompt_tokens - reused_before == 2 * all_but_last
    assert stats.shared_prefills - shared_before == 1


def test_a_reused_prompts_rest_goes_in_pieces_beside_a_decoding_row(engine: Engine) -> None:
    """What follows the kept prefix takes several pieces (a prefill that
    starts past zero and moves on pass by pass), each riding the decode step
    of a row that was running before it came: both texts as without the
    cache."""
    with around(engine, prefill_chunk=8, prefix_cache_bytes=KEPT_BYTES) as cut:
        first = asked(cut, QUESTIONS[0])
        reply = cut.generate([greedy(first)])[0].text
        follow_up = "And how do replicas start, stop and share one machine's CPUs with each other?"
        second = asked(cut, follow_up, ((QUESTIONS[0], reply),))
        running = greedy("The capital of France is", max_new_tokens=64, ignore_eos=True)
        stats = cut.stats
        decoding = cut.submit(running)
        deadline = time.monotonic() + 60
        while stats.generated_tokens == 0:
            assert time.monotonic() < deadline, "the running row never decoded"
            time.sleep(0.005)
        split_before = stats.split_prefills
        reusing = cut.submit(greedy(second)).result(timeout=120)
        assert not decoding.done(), "the running row ended before the reused prompt went in"
        assert stats.split_prefills == split_before + 1
        assert reusing.cached_tokens >= cut.count_tokens(first)
        assert reusing.text == engine.generate([greedy(second)])[0].text
        assert decoding.result(timeout=120).text == engine.generate([running])[0].text


def test_an_engine_with_no_budget_reuses_nothing(engine: Engine) -> None:
    with around(engine, prefix_cache_bytes=0) as none_kept:
        prompt = asked(none_kept, QUESTIONS[0])
        done = [none_kept.generate([greedy(prompt)])[0] for _ in range(2)]
        assert [c.cached_tokens for c in done] == [0, 0]
        assert none_kept.stats.reused_prompt_tokens == 0
