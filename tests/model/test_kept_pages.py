"""On the real model, in slots of a paged cache: a prompt that starts as an
earlier sequence did shares that sequence's full pages
(``helpers.engine.page_index``), and every text is the one the same layout
gives without keeping anything."""

from collections.abc import Iterator

import pytest

from helpers.engine.engine import Engine
from helpers.engine.kv_budget import KVPlan
from helpers.engine.kv_cache import PAGE_SIZE

from .conftest import slots_only
from .test_prefix_cache import (
    KEPT_BYTES,
    QUESTIONS,
    around,
    asked,
    chat_of_two_turns,
    greedy,
    texts,
)

pytestmark = slots_only


@pytest.fixture
def keeping(engine: Engine) -> Iterator[Engine]:
    """The slots engine's model behind a batcher whose slots keep their pages."""
    with around(engine, slots=True, prefix_cache_bytes=KEPT_BYTES) as kept:
        yield kept


def test_a_chats_next_turn_shares_the_pages_of_the_turn_before_and_says_the_same(
    engine: Engine, keeping: Engine
) -> None:
    first, second = chat_of_two_turns(keeping)
    done = keeping.generate([greedy(second)])[0]
    assert done.text == engine.generate([greedy(second)])[0].text
    assert done.cached_tokens % PAGE_SIZE == 0
    assert done.cached_tokens > keeping.count_tokens(first) - PAGE_SIZE
    assert keeping.stats.reused_prompt_tokens == done.cached_tokens


def test_questions_after_one_system_prompt_share_its_pages_in_one_step(
    engine: Engine, keeping: Engine
) -> None:
    """Two prompts that start as a finished one did and one that shares
    nothing, admitted together, go in one pass, each from where what it
    shares ends: each text as without the cache."""
    keeping.generate([greedy(asked(keeping, QUESTIONS[0]))])
    prompts = [asked(keeping, q) for q in QUESTIONS[1:]] + ["The capital of France is"]
    with keeping.together():
        futures = [keeping.submit(greedy(prompt)) for prompt in prompts]
    done = [future.result(timeout=120) for future in futures]
    assert keeping._batcher._rows.prefill_passes == 1, "each from its own start, together"
    assert [c.text for c in done] == texts(engine, prompts)
    system = keeping.count_tokens(asked(keeping, ""))
    assert [c.cached_tokens > system - 2 * PAGE_SIZE for c in done] == [True, True, False]


def test_a_repeated_prompt_and_its_copies_share_all_but_its_last_page(
    engine: Engine, keeping: Engine
) -> None:
    """The same prompt again, asked for twice in one step (a request's ``n``
    choices): its pages before the one holding its last token are shared."""
    prompt = asked(keeping, QUESTIONS[2])
    assert keeping.generate([greedy(prompt)])[0].cached_tokens == 0
    with keeping.together():
        futures = [keeping.submit(greedy(prompt)) for _ in range(2)]
    done = [future.result(timeout=120) for future in futures]
    assert [c.text for c in done] == texts(engine, [prompt, prompt])
    shared = (keeping.count_tokens(prompt) - 1) // PAGE_SIZE * PAGE_SIZE
    assert [c.cached_tokens for c in done] == [shared] * 2


def test_pages_wanted_for_new_sequences_are_taken_back_and_the_text_holds(
    engine: Engine,
) -> None:
    """A cache of 24 pages: two other prompts admitted together take back
    what the first kept, so the first's next turn finds less of itself, or nothing, and
    still says what it says without the cache."""
    plan = KVPlan(pages=24, positions=12 * PAGE_SIZE)
    with around(engine, slots=True, kv_plan=plan, prefix_cache_bytes=KEPT_BYTES) as small:
        first = asked(small, QUESTIONS[0])
        small.generate([greedy(first)])
        again = small.generate([greedy(first)])[0]
        assert again.cached_tokens > 0
        others = [greedy(f"Another topic entirely, number {n}. " * 20) for n in range(2)]
        with small.together():  # about 22 pages together: more than the free ones
            futures = [small.submit(other) for other in others]
        assert all(future.result(timeout=120).cached_tokens == 0 for future in futures)
        last = small.generate([greedy(first)])[0]
        assert last.cached_tokens < again.cached_tokens
        assert last.text == engine.generate([greedy(first)])[0].text


def test_the_rest_of_a_sharing_prompt_goes_in_pieces_when_one_pass_is_too_large(
    engine: Engine,
) -> None:
    """A prefill pass held to a small attention area: what follows the shared
    pages takes several passes, each reading the pages before it."""
    plan = KVPlan(pages=256, positions=engine.context_length, prefill_area=64 * 64)
    with around(engine, slots=True, kv_plan=plan, prefix_cache_bytes=KEPT_BYTES) as cut:
        first = asked(cut, QUESTIONS[0])
        reply = cut.generate([greedy(first)])[0].text
        follow_up = "And how do replicas start, stop and share one machine's CPUs with each other?"
        second = asked(cut, follow_up, ((QUESTIONS[0], reply),))
        done = cut.generate([greedy(second)])[0]
        assert done.cached_tokens > 0
        assert cut._batcher._rows.prefill_passes > 1, "the rest in one pass"
        assert done.text == engine.generate([greedy(second)])[0].text


def test_an_engine_with_no_budget_shares_nothing(engine: Engine) -> None:
    with around(engine, slots=True, prefix_cache_bytes=0) as none_kept:
        prompt = asked(none_kept, QUESTIONS[0])
        done = [none_kept.generate([greedy(prompt)])[0] for _ in range(2)]
        assert [c.cached_tokens for c in done] == [0, 0]
